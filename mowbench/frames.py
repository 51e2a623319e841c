"""Frames of a policy episode and of a world model's open-loop prediction, as arrays and as MP4/GIF files: what the
video command (mowbench.video) writes and what a run logs to TensorBoard (train.video_every)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mowbench import results
from mowbench.agents.base import Agent
from mowbench.evaluation import stream_seed

CAPTION = 16  # pixels of the caption row under the open-loop panel
VIDEO_STEPS = 200  # episode cap of the videos a run logs to TensorBoard (train.video_every)


def play(agent: Agent, env: Any, task: int, greedy: bool, steps: int, seed: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One episode (at most `steps` steps) of the agent on `env`: frames (T+1, S, S, 3) uint8 (the last one after
    the last action), actions (T,) or (T, A), rewards (T,)."""
    context = agent.new_context(task, seed)
    obs = env.reset()
    agent.episode_start(context)
    frames, actions, rewards = [obs], [], []
    for _ in range(steps):
        action = agent.act_batch([context], [obs], greedy)[0]
        step = env.step(action)
        actions.append(np.asarray(action))
        rewards.append(step.reward)
        obs = step.obs
        frames.append(obs)
        if step.done:
            break
    return np.stack(frames), np.stack(actions), np.asarray(rewards, np.float32)


def upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """(T, S, S, 3) -> (T, S*scale, S*scale, 3), nearest neighbour (pixels stay pixels)."""
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def open_loop_panel(real: np.ndarray, predicted: np.ndarray, real_reward: np.ndarray, predicted_reward: np.ndarray,
                    context: int, scale: int) -> np.ndarray:
    """Per step: [real | predicted | |difference|] upscaled, with a caption row (step, context or prediction, real
    and predicted reward) -> (T, S*scale + CAPTION, 3*S*scale, 3) uint8."""
    import cv2

    diff = np.abs(real.astype(np.int16) - predicted.astype(np.int16)).astype(np.uint8)
    panel = np.concatenate([upscale(real, scale), upscale(predicted, scale), upscale(diff, scale)], axis=2)
    out = np.zeros((panel.shape[0], panel.shape[1] + CAPTION, panel.shape[2], 3), np.uint8)
    out[:, :panel.shape[1]] = panel
    for t in range(len(out)):
        kind = "context" if t < context else "predicted"
        text = f"t={t} {kind}  r={real_reward[t]:.2f}  r^={predicted_reward[t]:.2f}"
        cv2.putText(out[t], text, (2, panel.shape[1] + CAPTION - 4), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out


def write_video(path: Path, frames: np.ndarray, fps: int) -> list[Path]:
    """frames (T, H, W, 3) uint8 as path.mp4 (H.264) and path.gif, each written to a temporary file first and then
    renamed, so no half-written video is ever left under its name."""
    import imageio.v3 as iio

    written = []
    h, w = frames.shape[1:3]
    padded = np.pad(frames, ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0)))  # H.264's 16-pixel macroblocks
    for ext, kwargs in ((".mp4", {"fps": fps, "codec": "libx264", "macro_block_size": 16}),
                        (".gif", {"duration": 1000 / fps, "loop": 0})):
        target = path.with_suffix(ext)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=ext,
                                         delete=False) as tmp:
            temporary = Path(tmp.name)
        try:
            iio.imwrite(temporary, padded if ext == ".mp4" else frames, extension=ext, **kwargs)
            temporary.chmod(0o666 & ~results.umask())  # as every results file: readable as the umask allows
            temporary.replace(target)
        finally:
            temporary.unlink(missing_ok=True)
        written.append(target)
    return written


def task_videos(agent: Agent, make: Any, task: int, greedy: bool, steps: int, seed: int,
                context: int | None = None) -> dict[str, Any]:
    """The policy episode of one task and, where the agent has a decoder, the open-loop prediction of its first
    steps (`context` real frames, default the agent's own; Agent.open_loop_window): {"policy": frames,
    "open_loop": (real, predicted, real rewards, predicted rewards, context) or None}."""
    env = make(task)
    try:
        frames, actions, rewards = play(agent, env, task, greedy, steps, stream_seed(seed, task))
    finally:
        env.close()
    out: dict[str, Any] = {"policy": frames, "open_loop": None}
    window = agent.open_loop_window()
    if window is None:
        return out
    context = context or window[0]
    n = min(len(actions), window[1])
    if n > context:
        torch.manual_seed(stream_seed(seed, task, 1) % 2**63)  # the prior's draws
        predicted = agent.open_loop(frames[:n], actions[:n], task, context)
        if predicted is not None:
            # frame t+1 follows action t: rewards shift so that each frame shows the reward of the step into it
            real_reward = np.concatenate([[0.0], rewards[:n - 1]])
            predicted_reward = np.concatenate([[0.0], predicted[1][:n - 1]])
            out["open_loop"] = (frames[:n], predicted[0], real_reward, predicted_reward, context)
    return out
