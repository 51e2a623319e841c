"""Shared helpers: compose the real Hydra config with overrides, as the CLI does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mowbench.config import compose_config

REPO = Path(__file__).resolve().parent.parent

# A very small STORM for loop tests (not for learning): seconds per run on 2 CPU cores.
MICRO = ["agent.channels=[8,16]", "agent.n_vars=4", "agent.n_classes=4", "agent.width=16", "agent.heads=2",
         "agent.ffn=32", "agent.head_width=16", "agent.ac_width=16", "agent.batch_per_task=2", "agent.batch_length=8",
         "agent.imag_per_task=4", "agent.imag_context=2", "agent.imag_horizon=3", "agent.act_context=4",
         "agent.bins=33", "train.progress=false", "train.tensorboard=false"]

# Extra micro sizes for the multi-task agents (MoW: few clusters/experts, a 2-update warm-up).
MICRO_AGENT = {
    "storm": [], "monolithic": ["agent.embed_dim=4"],
    "mow": ["agent.embed_dim=4", "agent.n_clusters=2", "agent.n_experts=3", "agent.top_k=2", "agent.router_width=8",
            "agent.cluster_warmup_updates=2", "agent.cluster_grad_batches=1", "agent.cluster_n_init=3"],
}


@pytest.fixture
def micro_cfg(tmp_path):
    def make(*extra: str) -> dict[str, Any]:
        task = [] if any(e.startswith("task=") for e in extra) else ["task=breakout"]
        return compose_config([*task, f"results_dir={tmp_path}", "train.warmup=20", "train.steps=60",
                            "train.eval_episodes=1", "train.eval_max_steps=30", "train.replay_capacity=500",
                            "train.updates_per_step=0.5",
                            *MICRO, *extra])
    return make

