"""Shared helpers: compose the real Hydra config with overrides, as the CLI does; and the suite's schedule
across pytest-xdist workers (scripts/test.sh runs `-n 2`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mowbench.config import compose_config

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per xdist worker (and in the subprocesses the tests start, which inherit the variable):
    # two workers fill CI's 2 cores better than one worker with two threads, whose small matmuls scale poorly;
    # and a test comparing a subprocess's numbers with its own sees the same thread count on both sides.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from seeded global RNGs (torch, numpy, random): a test drawing random inputs sees the
    same draw whichever worker runs it and whatever ran before (stop 26's CI failed on an unseeded draw)."""
    import random

    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: tests marked `slow(seconds=S)` are ordered by S, descending, before all others, so that
    with `-n 2 --maxschedchunk 1` the long tests start at once and the short ones fill the other worker
    (longest-processing-time-first scheduling). S is a rough CI figure; it orders, it asserts nothing."""
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.kwargs.get("seconds", 60)) if mark else 0.0
    items.sort(key=seconds, reverse=True)  # stable: equal estimates keep file order


# The micro preset (agent/preset/<agent>_micro.yaml): every agent at the tests' sizes, seconds per run on 2 CPU
# cores, no progress bar, no TensorBoard. For loop tests, not for learning.
MICRO = ["preset=micro"]


def refuses_suite(agent: str, suite: str, discrete: bool) -> bool:
    """Whether an agent's config refuses a suite of discrete or continuous actions before any work."""
    from mowbench.agents.base import registered_agents

    cfg = registered_agents()[agent].config()
    try:
        cfg.check_suite(suite, discrete)
    except ValueError:
        return True
    return False


def continuous_only(agent: str) -> bool:
    """Whether an agent refuses discrete-action suites (the TD-MPC2 family: Meta-World only)."""
    return refuses_suite(agent, "minatar", True)


@pytest.fixture
def micro_cfg(tmp_path):
    def make(*extra: str) -> dict[str, Any]:
        task = [] if any(e.startswith("task=") for e in extra) else ["task=breakout"]
        return compose_config([*task, f"results_dir={tmp_path}", "train.warmup=20", "train.steps=60",
                            "train.eval_episodes=1", "train.eval_max_steps=30", "train.replay_capacity=500",
                            "train.updates_per_step=0.5",
                            *MICRO, *extra])
    return make

