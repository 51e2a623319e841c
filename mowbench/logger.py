"""Scalar logs keyed by env step: kept in memory, flushed atomically to CSV (the source of truth), mirrored to
TensorBoard and, optionally, to Weights & Biases."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

from mowbench.results import atomic_write_csv


class RunLog:
    """Tables of a run (metrics, episodes, evaluations). Rows live in memory and in checkpoints, so a
    resumed run rewrites exactly the rows up to its checkpoint: no duplicated or lost lines."""

    TABLES = {
        "metrics.csv": ["step", "name", "value"],
        "episodes.csv": ["step", "task", "return", "length", "success"],
        "eval.csv": ["step", "task", "episode", "return", "length", "success", "mode"],
    }

    def __init__(self, folder: Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.folder = folder
        self.rows: dict[str, list[dict[str, Any]]] = {name: [] for name in self.TABLES}
        self.writer = None
        self.wandb: Any = None  # a wandb Run (start_wandb), or None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint (see Trainer)
            self.writer = SummaryWriter(str(folder / "tb"), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows["metrics.csv"].append({"step": step, "name": name, "value": float(value)})
            if self.writer:
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log({name: float(value) for name, value in values.items()}, step=step)

    def gif(self, tag: str, frames: Any, step: int, fps: int = 15) -> None:
        """An animation (T, H, W, 3) uint8 in TensorBoard's image panel, encoded as a GIF (what torch's add_video
        writes, without its moviepy dependency)."""
        if not self.writer:
            return
        import imageio.v3 as iio
        from tensorboard.compat.proto.summary_pb2 import Summary

        data = iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)
        image = Summary.Image(height=frames.shape[1], width=frames.shape[2], colorspace=3, encoded_image_string=data)
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def episode(self, step: int, task: str, ret: float, length: int, success: float | None) -> None:
        self.rows["episodes.csv"].append({"step": step, "task": task, "return": ret, "length": length,
                                          "success": "" if success is None else success})
        if self.writer:
            self.writer.add_scalar(f"train_return/{task}", ret, step)
        if self.wandb is not None:
            self.wandb.log({f"train_return/{task}": ret}, step=step)

    def evaluation(self, step: int, task: str, episode: int, ret: float, length: int, success: float | None,
                   mode: str = "full") -> None:
        """One evaluation episode; `mode` is the evaluation mode (evaluation.EVAL_MODES) it was counted under."""
        self.rows["eval.csv"].append({"step": step, "task": task, "episode": episode, "return": ret,
                                      "length": length, "success": "" if success is None else success, "mode": mode})

    def flush(self) -> None:
        for name, header in self.TABLES.items():
            atomic_write_csv(self.folder / name, header, self.rows[name])
        if self.writer:
            self.writer.flush()

    def state_dict(self) -> dict[str, Any]:
        return {name: list(rows) for name, rows in self.rows.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = {name: list(state.get(name, [])) for name in self.TABLES}

    def close(self, flush: bool = True) -> None:
        """Close the TensorBoard writer (idempotent); with `flush`, write the CSVs first."""
        if flush:
            self.flush()
        if self.writer:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def start_wandb(folder: Path, cfg: dict[str, Any], meta: dict[str, Any], method: str, task: str, seed: int) -> Any:
    """A W&B run for the run folder (config `logger.wandb=true`): project, entity and group from `logger`, tags
    method, task and seed, the run's config uploaded. Its id is kept in metadata.json (`wandb.id`), so every session
    of the run folder, a resumed one included, logs to the same W&B run. WANDB_MODE=offline writes it under
    `folder/wandb/` without a network (`wandb sync` uploads it later). Steps a killed session logged after its last
    checkpoint are not logged twice: W&B keeps a run's first value of a step (the CSV files and TensorBoard are the
    record)."""
    import wandb

    settings = cfg.get("logger") or {}
    old = meta.get("wandb") or {}
    run_id = old.get("id") or secrets.token_hex(4)  # W&B ids: lower-case letters and digits
    meta["wandb"] = {"id": run_id, "project": settings.get("project"), "entity": settings.get("entity"),
                     "group": settings.get("group")}
    return wandb.init(id=run_id, resume="allow", dir=str(folder), project=settings.get("project"),
                      entity=settings.get("entity"), group=settings.get("group"), name=f"{method}/{task}/seed_{seed}",
                      tags=[method, task, f"seed_{seed}"], config=cfg, reinit="create_new")


class Ticker:
    """Progress of a long phase that would otherwise print nothing (MoW's clustering warm-up, the analysis's
    bootstrap): a line on stderr when it starts, then at most one every `every_s` seconds, and one at the end, each
    with the count, the elapsed time and the time left at the rate so far."""

    def __init__(self, label: str, total: int, every_s: float = 10.0, stream: Any = None) -> None:
        self.label, self.total, self.every_s = label, max(total, 1), every_s
        self.stream = stream or sys.stderr
        self.clock = time.monotonic
        self.start = self.last = self.clock()
        self.done = 0
        print(f"[mowbench] {label}: 0/{total}", file=self.stream, flush=True)

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        end = "done" if self.done >= self.total else f"~{duration(left)} left"
        print(f"[mowbench] {self.label}: {self.done}/{self.total}, {duration(elapsed)}, {end}", file=self.stream,
              flush=True)


def duration(seconds: float) -> str:
    """12 s, 3 min 5 s, 2 h 4 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
