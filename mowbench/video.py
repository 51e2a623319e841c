"""`python -m mowbench.video RUN_DIR [key=value ...]` (or `mowbench video`): watch a finished run's policy and, for
methods with a decoder (STORM, monolithic STORM, MoW), what its world model predicts.

Per task of the run it writes to RUN_DIR/videos/ (or out=DIR), as MP4 (H.264, imageio's ffmpeg) and GIF:
  <task>_policy      one episode of the trained policy (the evaluation protocol's env and greedy setting)
  <task>_open_loop   DreamerV3's open-loop panel on that episode's first steps: the real frames, the world model's
                     frames (reconstructions of the first `context` frames, then predictions from the real actions
                     alone) and their difference, side by side, each step captioned with the real and predicted
                     reward
Keys: task=NAME (one task; default all), context=C (default: the agent's imag_context), steps=N (episode cap,
default 500), scale=K (pixel upscaling, default 4), fps=F (default 15), seed=N, checkpoint=PATH, out=DIR, and
device, precision, threads. The same seed gives the same videos.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mowbench import results
from mowbench.agents.base import Agent
from mowbench.envs import make_env
from mowbench.evaluation import eval_env_seed, stream_seed

OWN_KEYS = ("task", "context", "steps", "scale", "fps", "out", "checkpoint", "seed")
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


def task_videos(agent: Agent, make: Any, task: int, greedy: bool, steps: int, context: int, max_len: int | None,
                seed: int) -> dict[str, Any]:
    """The policy episode of one task and, where the agent has a decoder, the open-loop prediction of its first
    steps: {"policy": frames, "open_loop": (real, predicted, real rewards, predicted rewards) or None}."""
    env = make(task)
    try:
        frames, actions, rewards = play(agent, env, task, greedy, steps, stream_seed(seed, task))
    finally:
        env.close()
    out: dict[str, Any] = {"policy": frames, "open_loop": None}
    n = min(len(actions), max_len or len(actions))
    if n > context:
        torch.manual_seed(stream_seed(seed, task, 1) % 2**63)  # the prior's draws
        predicted = agent.open_loop(frames[:n], actions[:n], task, context)
        if predicted is not None:
            # frame t+1 follows action t: rewards shift so that each frame shows the reward of the step into it
            real_reward = np.concatenate([[0.0], rewards[:n - 1]])
            predicted_reward = np.concatenate([[0.0], predicted[1][:n - 1]])
            out["open_loop"] = (frames[:n], predicted[0], real_reward, predicted_reward)
    return out


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        written = video_command(args)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(f"[mowbench.video] wrote {path}")


def positive(own: dict[str, str], key: str, default: int) -> int:
    value = own.get(key)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{key}={value}; allowed: a positive integer")
    return int(value)


def video_command(args: list[str]) -> list[Path]:
    from mowbench.evaluate import MACHINE_KEYS, load_run

    if not args or "=" in args[0] or args[0].startswith("-"):
        raise ValueError("usage: mowbench video RUN_DIR [key=value ...] (RUN_DIR first: a finished run's folder)")
    folder, own, overrides = Path(args[0]), {}, {}
    for arg in args[1:]:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"{arg!r}: expected key=value; allowed keys: {', '.join([*OWN_KEYS, *MACHINE_KEYS])}")
        if key in OWN_KEYS:
            own[key] = value
        elif key in MACHINE_KEYS:
            overrides[key] = value
        else:
            allowed = ", ".join([*OWN_KEYS, *MACHINE_KEYS])
            raise ValueError(f"{key}={value}: not a video setting; allowed keys: {allowed}")
    steps, scale, fps = positive(own, "steps", 500), positive(own, "scale", 4), positive(own, "fps", 15)
    if "seed" in own and not own["seed"].isdigit():
        raise ValueError(f"seed={own['seed']}; allowed: a non-negative integer")
    run = load_run(folder, overrides, own.get("checkpoint"))
    tasks = run.tasks
    if "task" in own:
        if own["task"] not in tasks:
            raise ValueError(f"task={own['task']}; allowed: the run's tasks ({', '.join(tasks)})")
        tasks = [own["task"]]
    cfg = run.plan.agent_config
    context = positive(own, "context", getattr(cfg, "imag_context", 8))
    max_len = getattr(cfg, "max_len", None)
    if max_len is not None and context >= max_len:
        raise ValueError(f"context={context}; allowed: 1..{max_len - 1} (the world model's max_len is {max_len})")
    seed = int(own.get("seed", run.plan.seed))
    out = Path(own.get("out", folder / "videos"))

    def make(task: int) -> Any:
        return make_env(run.plan.suite, run.tasks, task, run.env_cfg, eval_env_seed(seed, run.final_key, 0),
                        evaluation=True)

    written: list[Path] = []
    for name in tasks:
        k = run.tasks.index(name)
        videos = task_videos(run.agent, make, k, run.plan.train.eval_greedy, steps, context, max_len, seed)
        written += write_video(out / f"{name}_policy", upscale(videos["policy"], scale), fps)
        if videos["open_loop"] is not None:
            panel = open_loop_panel(*videos["open_loop"], context, scale)
            written += write_video(out / f"{name}_open_loop", panel, fps)
    return written


if __name__ == "__main__":
    main()
