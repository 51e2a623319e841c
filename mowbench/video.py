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
from pathlib import Path
from typing import Any

from mowbench.envs import make_env
from mowbench.evaluation import eval_env_seed
from mowbench.frames import open_loop_panel, task_videos, upscale, write_video

OWN_KEYS = ("task", "context", "steps", "scale", "fps", "out", "checkpoint", "seed")


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
    window = run.agent.open_loop_window()  # None: no decoder, no open-loop video
    context = positive(own, "context", window[0] if window else 1)
    if window is not None and context >= window[1]:
        raise ValueError(f"context={context}; allowed: 1..{window[1] - 1} (the world model's max_len is {window[1]})")
    seed = int(own.get("seed", run.plan.seed))
    out = Path(own.get("out", folder / "videos"))

    def make(task: int) -> Any:
        return make_env(run.plan.suite, run.tasks, task, run.env_cfg, eval_env_seed(seed, run.final_key, 0),
                        evaluation=True)

    written: list[Path] = []
    for name in tasks:
        k = run.tasks.index(name)
        videos = task_videos(run.agent, make, k, run.plan.train.eval_greedy, steps, seed, context)
        written += write_video(out / f"{name}_policy", upscale(videos["policy"], scale), fps)
        if videos["open_loop"] is not None:
            panel = open_loop_panel(*videos["open_loop"], scale)
            written += write_video(out / f"{name}_open_loop", panel, fps)
    return written


if __name__ == "__main__":
    main()
