"""Weights & Biases, optional (`logger.wandb=true`), offline: a run preempted and resumed logs to one W&B run, whose id
its metadata.json keeps; the CSV files stay the record."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mowbench.results import DONE, read_json
from tests.conftest import MICRO, REPO


@pytest.mark.slow(seconds=40)
def test_an_offline_wandb_run_is_written_and_resumed_under_one_id(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "unused")}
    args = [sys.executable, "-m", "mowbench.run", *MICRO, "env=minatar", "task=breakout", f"results_dir={tmp_path}",
            "train.warmup=20", "train.steps=60", "train.eval_episodes=1", "train.eval_max_steps=30",
            "train.replay_capacity=500", "train.log_every=10", "threads=1", "logger.wandb=true",
            "logger.project=mowbench-test"]
    first = subprocess.run([*args, "train.stop_at=40"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    folder = tmp_path / "minatar" / "storm" / "breakout" / "seed_0"
    assert not (folder / DONE).exists()
    run_id = read_json(folder / "metadata.json")["wandb"]["id"]
    second = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (folder / DONE).exists()
    meta = read_json(folder / "metadata.json")
    assert meta["wandb"] == {"id": run_id, "project": "mowbench-test", "entity": None, "group": None}
    sessions = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(f"-{run_id}") for s in sessions), sessions
    for session in sessions:
        data = next(session.glob("run-*.wandb")).read_bytes()
        assert b"eval_return/breakout" in data or b"wm/loss" in data  # scalars were logged
    assert b"mowbench-test" in (next(sessions[0].glob("run-*.wandb")).read_bytes())
    # the settings a rerun compares ignore the logger: the same run resumes with W&B off
    third = subprocess.run([*args[:-2]], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert third.returncode == 0 and "already finished" in third.stdout, third.stderr[-500:]
