"""Newt (Hansen et al., "massively multi-task" TD-MPC2 with language; nicklashansen/newt; spec baselines.md) on
Meta-World from pixels: TD-MPC2 at Newt's size L with frozen 512-d CLIP text vectors as task embeddings,
rho weights normalised to sum 1, no Q dropout, batch 1024, and Newt's constrained planning (MPPI's initial
mean and std pulled towards the policy prior's trajectories).

This is the no-demonstration variant (`newt` here; upstream's supported `use_demos=False` path): the paper
pretrains on demonstrations and adds a behaviour-cloning term, and we have none. Other deviations, each for a
reason:
- Pixels: upstream's RGB path uses frozen DINOv2 features (hub weights we cannot download); here the TD-MPC2
  conv encoder, trained, with the language vector joined after the conv trunk (as for tdmpc2).
- Language vectors: the authors' own (mowbench/data/newt_metaworld_text_embeddings.json, with SOURCES.md);
  shelf-place-v3, absent upstream, takes pick-place-v3's vector (the nearest instruction; language_vectors).
- Constrained planning: weight 1 until 2M and 0 from 12M total env steps of Newt's 100M over 200 tasks, i.e.
  until 2% and to 12% of each task's budget; counted here in updates (one per round after warm-up):
  constrain_full_updates=3000 and constrain_zero_updates=18000 are 2% and 12% of the MT50 budget of 150k
  agent steps per task. The prior's mean and std are those of the num_pi_trajs policy trajectories MPPI rolls
  out anyway.
- Update ratio: Newt makes 0.075 updates per env step over all tasks (3.75 per round of MT50); the harness's
  train.updates_per_step (one per round by default) is the same for every agent of a grid, so set
  train.updates_per_step=3.75 to match Newt's.
Ablation `newt-onehot` (the paper's "no language"): agent.task_embedding=learned (ablations/ablation/newt_onehot).
Within Meta-World the language vectors are nearly collinear (cosine >= 0.95), so expect a small effect there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mowbench.agents.base import register_agent
from mowbench.agents.latent import FrameContext
from mowbench.baselines.tdmpc2 import TDMPC2Agent, TDMPC2Config
from mowbench.envs.base import TaskInfo

FILLED = {"shelf-place-v3": "pick-place-v3"}  # absent upstream -> the task of the nearest instruction


def data_file() -> Path:
    """The shipped vectors: next to the mowbench package (installed or editable)."""
    import mowbench

    return Path(mowbench.__file__).resolve().parent / "data" / "newt_metaworld_text_embeddings.json"


def language_vectors(names: list[str]) -> torch.Tensor:
    """Newt's 512-d text vectors of these Meta-World tasks (K, 512), shelf-place-v3 filled by FILLED."""
    table = json.loads(data_file().read_text())["tasks"]
    missing = [n for n in names if FILLED.get(n, n) not in table]
    if missing:
        raise ValueError(f"no Newt language vector for task(s) {missing}; allowed: Meta-World v3 tasks "
                         f"({len(table) + len(FILLED)} of them)")
    return torch.tensor([table[FILLED.get(n, n)]["text_embedding"] for n in names], dtype=torch.float32)


@dataclass
class NewtConfig(TDMPC2Config):
    """Newt's settings on top of TD-MPC2's (spec baselines.md)."""

    model_size: str = "L"  # enc 1024, mlp 1024, latent 512 (~20M parameters upstream)
    q_dropout: float = 0.0  # Newt: no Q dropout
    rho_normalise: bool = True  # rho^t weights normalised to sum 1
    task_embedding: str = "language"  # language: frozen Newt vectors | learned: the newt-onehot ablation
    constrain_full_updates: int = 3000  # constrained planning at weight 1 up to this many updates
    constrain_zero_updates: int = 18000  # ... decaying linearly to 0 here

    def check(self) -> None:
        super().check()
        if self.task_embedding not in ("language", "learned"):
            raise ValueError(f"task_embedding={self.task_embedding!r}; allowed: language, learned")
        if not 0 <= self.constrain_full_updates <= self.constrain_zero_updates:
            raise ValueError(f"constrain_full_updates={self.constrain_full_updates}, constrain_zero_updates="
                             f"{self.constrain_zero_updates}; allowed: 0 <= full <= zero")


def constraint_weight(updates: int, full: int, zero: int) -> float:
    """Newt's constrained-planning weight: 1 up to `full` updates, linear to 0 at `zero`, then 0."""
    if updates <= full:
        return 1.0
    return max(0.0, 1.0 - (updates - full) / max(zero - full, 1))


@register_agent("newt", NewtConfig, multi_task=True)
class NewtAgent(TDMPC2Agent):
    """TD-MPC2 with language task vectors and constrained planning (see the module docstring)."""

    cfg: NewtConfig

    def task_vectors(self, tasks: list[TaskInfo]) -> torch.Tensor | None:
        if self.cfg.task_embedding == "learned":
            return None
        return language_vectors([t.name for t in tasks])

    def world_model_kwargs(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> dict:
        kwargs = super().world_model_kwargs(tasks, action_mask)
        if self.cfg.task_embedding == "learned" and len(tasks) == 1:
            kwargs["task_dim"] = self.cfg.task_dim  # the ablation's learned vector also for one task
        return kwargs

    def initial_plan(self, contexts: list[FrameContext], z: torch.Tensor, task: torch.Tensor,
                     pi_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TD-MPC2's start, pulled towards the policy prior's trajectories (B, P, H, A) with weight w:
        mean = w * their mean + (1 - w) * warm start; std = w * their std + (1 - w) * max_std."""
        mean, std = super().initial_plan(contexts, z, task, pi_actions)
        cfg = self.cfg
        w = constraint_weight(self.updates, cfg.constrain_full_updates, cfg.constrain_zero_updates)
        if w == 0.0 or pi_actions.shape[1] < 2:
            return mean, std
        prior_std = pi_actions.std(1).clamp(cfg.min_std, cfg.max_std) * self.action_mask[task][:, None].float()
        return w * pi_actions.mean(1) + (1 - w) * mean, w * prior_std + (1 - w) * std
