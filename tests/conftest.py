"""Shared helpers: compose the real Hydra config with overrides, as the CLI does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mowbench.config import compose_config

REPO = Path(__file__).resolve().parent.parent

# The micro preset (agent/preset/<agent>_micro.yaml): every agent at the tests' sizes, seconds per run on 2 CPU
# cores, no progress bar, no TensorBoard. For loop tests, not for learning.
MICRO = ["preset=micro"]


def continuous_only(agent: str) -> bool:
    """Whether an agent's config refuses discrete-action suites (the TD-MPC2 family: Meta-World only)."""
    from mowbench.agents.base import registered_agents

    cfg = registered_agents()[agent].config()
    try:
        if hasattr(cfg, "check_suite"):
            cfg.check_suite("minatar", True)
    except ValueError:
        return True
    return False


@pytest.fixture
def micro_cfg(tmp_path):
    def make(*extra: str) -> dict[str, Any]:
        task = [] if any(e.startswith("task=") for e in extra) else ["task=breakout"]
        return compose_config([*task, f"results_dir={tmp_path}", "train.warmup=20", "train.steps=60",
                            "train.eval_episodes=1", "train.eval_max_steps=30", "train.replay_capacity=500",
                            "train.updates_per_step=0.5",
                            *MICRO, *extra])
    return make

