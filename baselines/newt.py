"""Newt (Hansen et al., "massively multi-task" TD-MPC2 with language; nicklashansen/newt; docs/methods/newt.md) on
Meta-World from pixels: TD-MPC2 at Newt's size L with frozen 512-d CLIP text vectors as task embeddings, no Q
dropout, batch 1024, and Newt's changes to TD-MPC2's learning and planning, as its published code makes them
(checked by `python -m mowbench.verify agent=newt`, docs/verify.md):
- a behaviour-cloning term in every policy update: the masked squared error of the policy's sampled actions to the
  replayed ones over the task's action dims, rho-weighted over the unroll's H steps and added per sample to the
  max-Q objective, coefficient 1 (bc_coef);
- horizon weights rho^t / sum_{t=0..H} rho^t over the policy loss's H + 1 steps; the consistency, reward and value
  losses use the first H of them (not rescaled to sum 1, not divided by H), the value loss averages the Q heads;
- the policy loss divides Q by the running scale S as it was before the update; S takes this batch's Q range after
  the policy's step (TD-MPC2 updates S first); the target Qs' Polyak step comes before the policy's step (the same
  numbers: the policy's step reads the online Qs only);
- the policy's Gaussian log-prob counts each padded action dim as a standard normal at 0 (upstream masks the noise
  and log-std to 0 there): a constant per task in the entropy and the scaled entropy, which moves no gradient;
- constrained planning: MPPI's initial mean and std pulled towards the num_pi_trajs policy trajectories' mean and
  std (clamped into [min_std, max_std], padded dims included; they are masked out of every sample), weight 1 until
  2M and 0 from 12M total env steps of Newt's 100M over 200 tasks, i.e. until 2% and to 12% of each task's budget;
  counted here in updates (one per round after warm-up): constrain_full_updates=3000 and
  constrain_zero_updates=18000 are 2% and 12% of the MT50 budget of 150k agent steps per task.
Ablations that restore what this file did before that check: no_bc (no behaviour cloning), rho_over_h (weights
normalised over the H unroll steps for the model losses) and scale_update_first (S updated before the policy loss
uses it); those of TD-MPC2 (squashed_entropy, unclamped_scale, no_dynamics_norm, torch_init) apply too. The padded
dims' log-prob, the unmasked prior std, the update order and upstream's +1e-9 in MPPI's elite-weight sum (below fp32
rounding: the sum is >= 1) train identically either way, so they are no ablations.

Demonstrations, as upstream uses them (use_demos=True; the `pretrain` rows of mowbench.verify):
- `demos` (10) successful episodes per task of Meta-World's scripted expert (metaworld.policies), played through the
  run's own envs (the same pixels, action repeat and goal variations; mowbench.offline), kept in a replay of their
  own and also loaded into the online replay at the start;
- `pretrain_updates` updates on them before the first env step: the world model's loss plus a behaviour-cloning prior
  (the masked BC error minus entropy_coef x the scaled entropy, rho-weighted, on the attached latents, coefficient
  prior_coef 1) stepped by the model optimiser, which also holds the policy; no max-Q policy step, no S update;
- the learning rate warmed up linearly over `lr_warmup` updates (pretraining and online counted together);
- until the first online update the policy prior acts alone (no MPPI), then half of every batch (`demo_share`)
  comes from the demonstrations.
Upstream pretrains 200k updates (warm-up 5000) before 7.5M online ones; the paper preset keeps that 2.7% of the MT50
budget's 150k updates (4000, warm-up 100). `newt-nodemo` is Newt without any of this (upstream's use_demos=False
path; the online behaviour cloning stays, on the agent's own replayed actions). Other deviations, each for a
reason:
- Pixels: upstream's RGB path concatenates frozen DINOv2 features (hub weights we cannot download), computed
  outside the agent, to the state, into its state MLP encoder; here the TD-MPC2 conv encoder, trained, with the
  language vector joined after the conv trunk (as for tdmpc2). The state encoder (agent.obs=state) is upstream's,
  used by mowbench.verify; no suite here gives states.
- Language vectors: the authors' own (mowbench/data/newt_metaworld_text_embeddings.json, with SOURCES.md);
  shelf-place-v3, absent upstream, takes pick-place-v3's vector (the nearest instruction; language_vectors).
- Update ratio: Newt makes 0.075 updates per env step over all tasks (3.75 per round of MT50); the harness's
  train.updates_per_step (one per round by default) is the same for every agent of a grid, so set
  train.updates_per_step=3.75 to match Newt's.
- Actions are padded to the largest action dim of the run's tasks (upstream: to 16 for every task).
Ablation `newt-onehot` (the paper's "no language"): agent.task_embedding=learned (ablations/ablation/newt_onehot).
Within Meta-World the language vectors are nearly collinear (cosine >= 0.95), so expect a small effect there.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mowbench.agents.base import Metrics, count_parameters, register_agent
from mowbench.agents.tdmpc_family import FrameContext, Unroll
from mowbench.baselines.tdmpc2 import (
    MLP_RULES,
    UPSTREAM_CONSTANTS,
    TDMPC2Agent,
    TDMPC2Config,
    _others,
    upstream_name,
)
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.models.tdmpc import pair_values
from mowbench.offline import OfflineSpec
from mowbench.replay import Batch

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




# known departures from the paper and the published code (one line each; docs/methods/newt.md has them
# as a table): recorded in every run's metadata.json and printed in the analysis's notes
DEPARTURES = (
    "demonstrations from Meta-World's scripted experts (upstream: successful episodes of its trained single-task "
    "agents); pretraining scaled to the budget: 4000 updates, warm-up 100 (upstream 200k, 5000)",
    "pixels through TD-MPC2's trained conv encoder (upstream: the state with frozen DINOv2 frame features)",
    "shelf-place-v3 takes pick-place-v3's language vector (absent upstream)",
    "actions padded to the run's largest action dim (upstream: 16)",
)


@dataclass
class NewtConfig(TDMPC2Config):
    """Newt's settings on top of TD-MPC2's (docs/methods/newt.md; the module docstring)."""

    WITH_DEMOS: ClassVar[bool] = True  # `newt`; NewtNoDemoConfig (`newt-nodemo`) has none

    model_size: str = "L"  # enc 1024, mlp 1024, latent 512 (~20M parameters upstream)
    enc_layers: int = 3  # Newt's L: num_enc_layers 3 (state encoders only)
    q_dropout: float = 0.0  # Newt: no Q dropout
    seed_updates: int = 0  # upstream Newt updates at its ratio from the end of seeding, with no burst of updates
    rho_normalise: bool = True  # rho^t weights normalised to sum 1
    # h1: upstream's rho^t / sum_{t=0..H} rho^t over the policy loss's H+1 steps, the model losses using the first H
    # | h: the model losses' H weights normalised to sum 1 on their own (ablation rho_over_h)
    rho_steps: str = "h1"
    bc_coef: float = 1.0  # behaviour cloning of the replayed actions in every policy update (0: ablation no_bc)
    # after: upstream's, the policy loss divides by S before this batch updates it, after the policy's step |
    # before: TD-MPC2's order, S updated first (ablation scale_update_first)
    scale_update: str = "after"
    task_embedding: str = "language"  # language: frozen Newt vectors | learned: the newt-onehot ablation
    constrain_full_updates: int = 3000  # constrained planning at weight 1 up to this many updates
    constrain_zero_updates: int = 18000  # ... decaying linearly to 0 here
    # demonstrations: successful episodes of Meta-World's scripted expert per task (upstream's README generates 10
    # per task; its demonstration buffer holds 1.9M steps for 200 tasks, ~10 episodes each); 0: newt-nodemo
    demos: int = 10
    # pretraining updates on them before the first env step: upstream's 200k before 7.5M online updates (0.075 per
    # env step of 100M), 2.7%; the same share of the MT50 budget's 150k updates (one per round) is 4000
    pretrain_updates: int = 4000
    demo_share: float = 0.5  # of every online batch drawn from the demonstrations (upstream: half)
    # linear learning-rate warm-up over this many updates (pretraining first, counted on into online updates), as
    # upstream whenever it pretrains: 5000 of its 200k pretraining updates, 2.5%; scaled likewise (0: none)
    lr_warmup: int = 100
    prior_coef: float = 1.0  # the pretraining loss's behaviour-cloning prior (upstream sets 1.0 for pretraining)

    def check(self) -> None:
        super().check()
        if self.task_embedding not in ("language", "learned"):
            raise ValueError(f"task_embedding={self.task_embedding!r}; allowed: language, learned")
        if not 0 <= self.constrain_full_updates <= self.constrain_zero_updates:
            raise ValueError(f"constrain_full_updates={self.constrain_full_updates}, constrain_zero_updates="
                             f"{self.constrain_zero_updates}; allowed: 0 <= full <= zero")
        if self.rho_steps not in ("h1", "h"):
            raise ValueError(f"rho_steps={self.rho_steps!r}; allowed: h1, h")
        if self.scale_update not in ("after", "before"):
            raise ValueError(f"scale_update={self.scale_update!r}; allowed: after, before")
        if self.bc_coef < 0:
            raise ValueError(f"bc_coef={self.bc_coef}; allowed: >= 0")
        self.check_non_negative(("demos", "pretrain_updates", "lr_warmup", "prior_coef"))
        if not 0 <= self.demo_share < 1:
            raise ValueError(f"demo_share={self.demo_share}; allowed: 0 <= demo_share < 1")
        # `newt` is the method with demonstrations; without them it is `newt-nodemo` (NewtNoDemoConfig)
        if self.WITH_DEMOS and self.demos == 0:
            raise ValueError("demos=0; allowed: >= 1 for agent=newt (Newt without demonstrations is agent=newt-nodemo)")
        if not self.WITH_DEMOS and (self.demos or self.pretrain_updates or self.demo_share or self.lr_warmup):
            raise ValueError(f"demos={self.demos}, pretrain_updates={self.pretrain_updates}, demo_share="
                             f"{self.demo_share}, lr_warmup={self.lr_warmup}; allowed: 0 for agent=newt-nodemo "
                             "(Newt with demonstrations is agent=newt)")


@dataclass
class NewtNoDemoConfig(NewtConfig):
    """Newt without demonstrations (upstream's use_demos=False path): no pretraining, no demonstration share, no
    learning-rate warm-up (upstream warms up only when it pretrains); the online behaviour cloning stays."""

    WITH_DEMOS: ClassVar[bool] = False

    demos: int = 0
    pretrain_updates: int = 0
    demo_share: float = 0.0
    lr_warmup: int = 0


def constraint_weight(updates: int, full: int, zero: int) -> float:
    """Newt's constrained-planning weight: 1 up to `full` updates, linear to 0 at `zero`, then 0."""
    if updates <= full:
        return 1.0
    return max(0.0, 1.0 - (updates - full) / max(zero - full, 1))


def masked_bc(pi_action: torch.Tensor, action: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Newt's behaviour cloning per sample and step: the squared error of the policy's actions pi_action (B, T, A)
    to the replayed actions (B, T, A) summed over the task's valid dims mask (B, A) and divided by their number
    (at least 1) -> (B, T). The padded dims of the replayed actions are left out whatever they hold."""
    m = mask[:, None].to(action.dtype)  # (B, 1, A)
    return ((pi_action - action).pow(2) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# upstream's log-prob of a padded dim (noise and log-std masked to 0): a standard normal's at 0, minus tanh's
# Jacobian log(1 - tanh(0)^2 + 1e-6) as fp32 computes it
PADDED_LOG_PROB = -HALF_LOG_2PI - float(torch.log(torch.tensor(1.0) + 1e-6))


@register_agent("newt", NewtConfig, multi_task=True)
class NewtAgent(TDMPC2Agent):
    """TD-MPC2 with language task vectors, behaviour cloning in the policy update and constrained planning (see
    the module docstring)."""

    cfg: NewtConfig

    def __init__(self, cfg: NewtConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        super().__init__(cfg, tasks, device, precision)
        if cfg.rho_steps == "h1":  # the model losses take the first H of the policy loss's H+1 weights
            self.rho = self.pi_rho[:cfg.horizon].clone()
        # upstream's model optimiser also holds the policy: it learns there from the pretraining's behaviour-cloning
        # prior (Adam eps 1e-8, the model's learning rate); online the policy has no gradient at the model's step
        # (its own optimiser steps it), so Adam leaves it there
        self.wm_params = [p for n, p in self.wm.named_parameters() if not n.startswith("target_qs.")]
        self.optim = torch.optim.Adam(self.world_model_groups(self.wm_params), lr=cfg.lr)
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in (self.optim, self.pi_optim)]
        self.pretrained = 0  # pretraining updates done
        self.pretraining = False  # inside pretrain(): the model loss takes the behaviour-cloning prior

    # ---- demonstrations ----
    def offline_data(self) -> OfflineSpec | None:
        """cfg.demos successful scripted-expert episodes per task, pretrained on cfg.pretrain_updates times, a share
        cfg.demo_share of every online batch, and in the online replay from the start too (upstream loads them into
        both its buffers); until the first online update the agent acts with its policy alone (upstream's mpc=False
        while seeding)."""
        cfg = self.cfg
        if not cfg.demos:
            return None
        return OfflineSpec(demos=cfg.demos, pretrain_updates=cfg.pretrain_updates, share=cfg.demo_share,
                           into_replay=True, act_in_warmup=True)

    def warm_up_lr(self) -> None:
        """Upstream's warm-up: the n-th update (pretraining and online counted together, from 1) runs at
        min(1, (n + 1) / lr_warmup) of each group's learning rate."""
        if not self.cfg.lr_warmup:
            return
        n = self.pretrained + self.updates + 1
        factor = min(1.0, (n + 1) / self.cfg.lr_warmup)
        for optim, bases in zip((self.optim, self.pi_optim), self.base_lrs, strict=True):
            for group, base in zip(optim.param_groups, bases, strict=True):
                group["lr"] = base * factor

    def pretrain(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """Upstream's pretraining update on demonstrations: the world model's loss with the policy's behaviour-
        cloning prior (prior_coef) in it, its optimiser step (the policy included), the target Qs' Polyak step; no
        max-Q policy step, no scale update."""
        self.warm_up_lr()
        self.set_train(True)
        self.pretraining = True
        try:
            u = self.unroll(sample(self.batch_size(), self.cfg.batch_length))
            metrics, _ = self.model_step(u)
            self.wm.update_targets(self.cfg.tau)
        finally:
            self.pretraining = False
            self.set_train(False)
        self.pretrained += 1
        lrs = {"lr/encoder": self.optim.param_groups[0]["lr"], "lr/model": self.optim.param_groups[1]["lr"],
               "lr/pi": self.pi_optim.param_groups[0]["lr"]}
        return metrics | self.pretrain_metrics | lrs

    def model_extra_terms(self, u: Unroll, zs: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
        """While pretraining: the behaviour-cloning prior on the attached latents zs[:, :H] (B, H, L), per step the
        masked BC error plus -entropy_coef x the scaled entropy, rho-weighted, averaged over steps and samples."""
        if not self.pretraining:
            return {}
        cfg, h = self.cfg, self.cfg.horizon
        eps = torch.randn(u.action.shape, device=self.device)  # (B, H, A)
        with self.autocast():
            action, log_prob, _, log_std = self.wm.pi(zs[:, :h], u.task, eps)
        log_prob, entropy, bc = self.prior_parts(action, log_prob, log_std, eps, u)  # each (B, H)
        prior = ((bc - cfg.entropy_coef * entropy) * u.valid * self.pi_rho[:h]).mean()  # upstream: .mean() of (H, B)
        self.pretrain_metrics = {"pi/bc": (bc * u.valid).mean().detach(), "pi/entropy": (-log_prob).mean().detach(),
                                 "pi/scaled_entropy": entropy.mean().detach(),
                                 "pi/std": log_std.detach().float().exp().mean()}
        return {"prior": (prior, cfg.prior_coef)}

    def prior_parts(self, action: torch.Tensor, log_prob: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor,
                    u: Unroll) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's sampled actions (B, T, A) with their log-prob (B, T), log-std and noise -> upstream's log-prob
        with the padded dims counted (B, T), the scaled entropy (B, T), and the behaviour cloning of the first H
        actions to the replayed ones (B, H): shared by the online policy step and the pretraining prior."""
        mask = self.action_mask[u.task]  # (B, A)
        log_prob = log_prob.float() + (~mask).sum(-1, keepdim=True).float() * PADDED_LOG_PROB
        entropy = self.policy_entropy(log_prob, log_std.float(), eps, u.task)
        bc = masked_bc(action[:, :self.cfg.horizon].float(), u.action.float(), mask)
        return log_prob, entropy, bc

    def step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        self.warm_up_lr()  # every online update at its warm-up rate (pretrain sets its own)
        return super().step(sample)

    def choose(self, z: torch.Tensor, task: torch.Tensor, contexts: list[FrameContext], greedy: bool) -> torch.Tensor:
        """With demonstrations, the policy alone acts until the first online update (upstream: mpc=False while
        seeding); then TD-MPC2's choice (MPPI)."""
        if self.cfg.demos and self.updates == 0:
            sampled, _, mean, _ = self.wm.pi(z, task, self.noise(contexts, (self.action_dim,)))
            return mean if greedy else sampled
        return super().choose(z, task, contexts, greedy)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"pretrained": self.pretrained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pretrained = int(state["pretrained"])

    def task_vectors(self, tasks: list[TaskInfo]) -> torch.Tensor | None:
        if self.cfg.task_embedding == "learned":
            return None
        return language_vectors([t.name for t in tasks])

    def world_model_kwargs(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> dict:
        kwargs = super().world_model_kwargs(tasks, action_mask)
        if self.cfg.task_embedding == "learned" and len(tasks) == 1:
            kwargs["task_dim"] = self.cfg.task_dim  # the ablation's learned vector also for one task
        return kwargs

    # ---- learning ----
    def train_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """Upstream Newt's order: the world model's step, the target Qs' Polyak step, the policy's step (with
        behaviour cloning of the replayed actions)."""
        u = self.unroll(sample(self.batch_size(), self.cfg.batch_length))
        metrics, zs = self.model_step(u)
        self.wm.update_targets(self.cfg.tau)
        return metrics | self.policy_update(zs.detach(), u)

    def policy_update(self, zs: torch.Tensor, u: Unroll) -> Metrics:
        """Newt's policy step on detached latents zs (B, H+1, L): per sample, sum_{t<H} rho_t bc_t +
        sum_{t<=H} rho_t (-entropy_coef * scaled entropy - Q_avg / S), averaged over the batch; S as before this
        batch (scale_update=after) and updated from Q at t = 0 after the step."""
        cfg, wm, task = self.cfg, self.wm, u.task
        h = cfg.horizon
        wm.qs.requires_grad_(False)
        eps = torch.randn(*zs.shape[:2], self.action_dim, device=self.device)
        with self.autocast():
            action, log_prob, _, log_std = wm.pi(zs, task, eps)
            q = pair_values(wm.value(wm.Q(zs, action, task)), torch.randperm(cfg.n_q)[:2], "avg")  # (B, H+1)
        wm.qs.requires_grad_(True)
        if cfg.scale_update == "before":
            self.scale.update(q[:, 0])
        scale_used = self.scale.value.clamp(min=1.0)  # what self.scale divides by
        log_prob, entropy, bc = self.prior_parts(action, log_prob, log_std, eps, u)  # (B, H+1), (B, H+1), (B, H)
        objective = cfg.entropy_coef * entropy + self.scale(q.float())  # (B, H+1)
        prior = (bc * u.valid * self.pi_rho[:h]).sum(1)  # (B,)
        loss = (cfg.bc_coef * prior - (objective * self.pi_rho).sum(1)).mean()
        self.pi_optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(wm.policy.parameters(), cfg.grad_clip)
        self.pi_optim.step()
        if cfg.scale_update == "after":
            self.scale.update(q[:, 0])
        std = log_std.detach().float().exp()  # padded dims: log-std 0, std 1 (as upstream reports it)
        return {"pi/loss": loss.detach(), "pi/bc": prior.mean().detach(), "pi/entropy": (-log_prob).mean().detach(),
                "pi/scaled_entropy": entropy.mean().detach(), "pi/std": std.mean(), "pi/max_std": std.max(),
                "pi/scale_used": scale_used, "pi/scale": self.scale.value, "pi/grad_norm": grad_norm}

    def policy_entropy(self, log_prob: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor, task: torch.Tensor
                       ) -> torch.Tensor:
        """TD-MPC2's entropy term (B, T) with upstream Newt's Gaussian log-prob, in which each padded dim counts
        as a standard normal at 0 (-log(2 pi) / 2): log_prob (B, T) already counts them (policy_update)."""
        if self.cfg.entropy == "squashed":
            return -log_prob
        mask = self.action_mask[task][:, None].float()  # (B, 1, A)
        gaussian = ((-0.5 * eps.pow(2) - log_std - HALF_LOG_2PI) * mask).sum(-1) - (1 - mask).sum(-1) * HALF_LOG_2PI
        scaled = gaussian * mask.sum(-1)
        return -log_prob * scaled / (log_prob + 1e-8)

    # ---- acting ----
    def initial_plan(self, contexts: list[FrameContext], z: torch.Tensor, task: torch.Tensor,
                     pi_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TD-MPC2's start, pulled towards the policy prior's trajectories (B, P, H, A) with weight w:
        mean = w * their mean + (1 - w) * warm start; std = w * their std clamped into [min_std, max_std] +
        (1 - w) * max_std (padded dims too, as upstream; every sample is masked there)."""
        mean, std = super().initial_plan(contexts, z, task, pi_actions)
        cfg = self.cfg
        w = constraint_weight(self.updates, cfg.constrain_full_updates, cfg.constrain_zero_updates)
        if w == 0.0 or pi_actions.shape[1] < 2:
            return mean, std
        prior_std = pi_actions.std(1).clamp(cfg.min_std, cfg.max_std)
        return w * pi_actions.mean(1) + (1 - w) * mean, w * prior_std + (1 - w) * std


@register_agent("newt-nodemo", NewtNoDemoConfig, multi_task=True)
class NewtNoDemoAgent(NewtAgent):
    """Newt without demonstrations (NewtNoDemoConfig): everything else as `newt`."""

    cfg: NewtNoDemoConfig
    DEPARTURES = ("no demonstrations: no pretraining, no demonstration half of each batch, no learning-rate warm-up "
                  "(upstream's use_demos=False path)", *DEPARTURES[1:])


# ---- the published code's weights and numbers (python -m mowbench.verify agent=newt; docs/verify.md) ----

# the upstream protocol the reference follows: Meta-World's agent steps, the published settings (the reference's
# sizes replace the sizes)
VERIFY_DEFAULTS = ("env=metaworld", "preset=paper")
VERIFY_REFERENCE = "newt"  # newt-nodemo replays it too (its online updates and planning)
# upstream's constrained-planning schedule in env steps (config.py's defaults, as recorded): weight 1 before
# `start`, then 1 - (step - start) / `final`, so 0 from start + final
UPSTREAM_CONSTRAINT = {"start": 2_000_000, "final": 10_000_000}

# Upstream (nicklashansen/newt: common/world_model.py's WorldModel) parameter and buffer names -> ours, the first
# matching rule applies ("{last}": the state encoder's last layer, max(num_enc_layers - 1, 1)). Its MLPs are
# NormedLinear layers (Linear with a LayerNorm `ln`), ours [Linear, LayerNorm, Mish] per hidden layer in `hidden` and
# the output Linear `last` (its LayerNorm before SimNorm in `last_norm`). Its Q heads are one MLP each
# (`_Qs.online._Qs.<head>.<layer>`); ours are stacked per layer, so a rule names the head after '#' and
# from_upstream stacks the heads: weights (out, in) -> ours (n_q, in, out), biases and LayerNorm parameters
# (width,) -> (n_q, 1, width). Upstream's dynamics, reward and Q heads take [z, e, a] (task vector before the
# action), ours [z, a, e]: their first layers' input columns are reordered. The frozen language vectors are our
# TaskEmbedding's buffer, the action masks ours.
UPSTREAM_NAMES: tuple[tuple[str, str], ...] = (
    (r"_task_emb\.weight", r"task_embedding.vectors"),
    (r"_action_masks", r"action_mask"),
    (r"_encoder\.state\.{last}\.ln\.(weight|bias)", r"trunk.last_norm.\1"),
    (r"_encoder\.state\.{last}\.(weight|bias)", r"trunk.last.\1"),
    (r"_encoder\.state\.(\d+)\.ln\.(weight|bias)", r"trunk.hidden.{3*\1+1}.\2"),
    (r"_encoder\.state\.(\d+)\.(weight|bias)", r"trunk.hidden.{3*\1}.\2"),
    *MLP_RULES,
    (r"_Qs\.(online|target)\._Qs\.(\d+)\.(\d+)\.ln\.weight", r"\1.norms_w.\3#\2"),
    (r"_Qs\.(online|target)\._Qs\.(\d+)\.(\d+)\.ln\.bias", r"\1.norms_b.\3#\2"),
    (r"_Qs\.(online|target)\._Qs\.(\d+)\.(\d+)\.weight", r"\1.weights.\3#\2"),
    (r"_Qs\.(online|target)\._Qs\.(\d+)\.(\d+)\.bias", r"\1.biases.\3#\2"),
)
# upstream module names -> ours (the prefixes the rules above keep)
UPSTREAM_MODULES = {"dynamics": "dynamics", "reward": "reward_head", "pi": "policy", "online": "qs",
                    "target": "target_qs"}
# upstream's modules, by which the reference sums its weights and gradient norms -> our prefixes
OUR_GROUPS = {"_encoder": "trunk.", "_dynamics": "dynamics.", "_reward": "reward_head.", "_pi": "policy.",
              "_Qs.online": "qs.", "_Qs.target": "target_qs."}
# why each tolerance (mowbench.verify prints those a table uses)
TOLERANCES = {
    "fp32": "rtol 1e-5: fp32 rounding where our kernels add in another order (one batched matmul for the Q "
            "heads where upstream runs one MLP per head, SimNorm written out on CPU, the padded dims' constant "
            "added to the log-prob after the sum, Adam without fusion); measured <= 1.3e-6 (the encoder's weight "
            "change after update 1), the losses <= 2.3e-7, the gradient norms <= 8.3e-7, the planner <= 7.1e-7, "
            "and no larger after 3 updates than after 1",
    "init": "0.1 of upstream's std: our freshly initialised weights are other random draws from the same "
            "distribution, compared by the std of each module's Linear weights (9,000 to 45,000 values: sampling "
            "error ~1%; measured <= 5.6e-3); torch's default initialisation is 1.7x to 2.4x wider here",
    "exact": "equal or not: parameter counts, initial biases (0), the action masks, the per-task discounts, the "
             "horizon weights, the log-std range (constants) and the chosen elites",
}
RTOL = 1e-5


def upstream_rules(enc_layers: int) -> tuple[tuple[str, str], ...]:
    """UPSTREAM_NAMES for a state encoder of upstream's num_enc_layers = enc_layers."""
    last = str(max(enc_layers - 1, 1))
    return tuple((pattern.replace("{last}", last), template) for pattern, template in UPSTREAM_NAMES)


def from_upstream(state: dict[str, torch.Tensor], sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An upstream Newt WorldModel state_dict (or part of one) under our names and layouts (UPSTREAM_NAMES), at the
    reference's `sizes`: the one place where the two meet. The Q heads of a layer are stacked (every head of it must
    be in `state`); target Qs absent from `state` (they equal the Qs at initialisation) are the Qs'. Constants are
    left out."""
    rules = upstream_rules(sizes["num_enc_layers"])
    latent, e, a = sizes["latent_dim"], sizes["task_dim"], sizes["action_dim"]
    # ours [z, a, e] <- upstream's [z, e, a]: the columns of the layers that take an action
    columns = torch.cat([torch.arange(latent), torch.arange(latent + e, latent + e + a),
                         torch.arange(latent, latent + e)])
    takes_action = re.compile(r"_(dynamics|reward)\.0\.weight|_Qs\.(online|target)\._Qs\.\d+\.0\.weight")
    out: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[int, torch.Tensor]] = {}
    for name, value in state.items():
        if name in UPSTREAM_CONSTANTS:
            continue
        if takes_action.fullmatch(name):
            value = value[:, columns]
        ours = upstream_name(name, rules, UPSTREAM_MODULES)
        if "#" in ours:
            stacked, _, head = ours.partition("#")
            heads.setdefault(stacked, {})[int(head)] = value.t() if ".weights." in stacked else value[None, :]
        else:
            out[ours] = value.bool() if ours == "action_mask" else value
    for stacked, per_head in heads.items():
        out[stacked] = torch.stack([per_head[i] for i in range(len(per_head))])
    for name in [n for n in out if n.startswith("qs.")]:
        out.setdefault("target_" + name, out[name])
    return out


def reference_config(reference: dict[str, Any], agent_values: dict[str, Any], lr_warmup: int = 0) -> NewtConfig:
    """Our config for the reference run: the composed values (behaviour) with the reference's sizes on top (state
    observations, upstream's state encoder; the constrained-planning schedule in upstream's env steps)."""
    s = reference["sizes"]
    sizes = {"model_size": "custom", "obs": "state", "state_dim": s["obs_dim"], "enc_dim": s["enc_dim"],
             "enc_layers": s["num_enc_layers"], "latent_dim": s["latent_dim"], "mlp_dim": s["mlp_dim"],
             "simnorm_group": s["simnorm_dim"], "frames": 1, "bins": s["num_bins"], "horizon": s["horizon"],
             "batch_size": s["batch"], "batch_multi_task": s["batch"], "n_q": s["num_q"],
             "iterations": s["iterations"], "num_samples": s["num_samples"], "num_elites": s["num_elites"],
             "num_pi_trajs": s["num_pi_trajs"], "constrain_full_updates": UPSTREAM_CONSTRAINT["start"],
             "constrain_zero_updates": UPSTREAM_CONSTRAINT["start"] + UPSTREAM_CONSTRAINT["final"],
             # the online updates: upstream's path after pretraining (or without it) at a constant learning rate
             "lr_warmup": lr_warmup}
    from mowbench.agents.base import build_config, get_agent

    name = "newt" if agent_values.get("demos", NewtConfig.demos) else "newt-nodemo"
    return build_config(get_agent(name), {**agent_values, **sizes})


def reference_agent(reference: dict[str, Any], cfg: NewtConfig) -> NewtAgent:
    """Our Newt on the reference's tasks (their action dims in the reference's padded action space, their episode
    lengths) with the reference's task vectors (random vectors of the CLIP vectors' size) instead of Meta-World's."""
    s = reference["sizes"]
    tasks = [TaskInfo("metaworld", f"upstream-{k}", k, 64, ActionSpace(False, n), {"episode_length": length})
             for k, (n, length) in enumerate(zip(s["action_dims"], s["episode_lengths"], strict=True))]

    class ReferenceNewt(NewtAgent):
        def task_vectors(self, tasks: list[TaskInfo]) -> torch.Tensor | None:
            return None if self.cfg.task_embedding == "learned" else reference["task_vectors"].float()

        def padded_action_dim(self, tasks: list[TaskInfo]) -> int:
            return int(s["action_dim"])

    torch.manual_seed(0)  # our initialisation, compared by its distribution
    return ReferenceNewt(cfg, tasks, torch.device("cpu"), "fp32")


def init_rows(init: dict[str, torch.Tensor], wm: torch.nn.Module, sizes: dict[str, Any]) -> list[Any]:
    """Our fresh initialisation against upstream's: per MLP module, the std of its (not zero-initialised) Linear
    weights; the largest |bias| of every Linear (upstream: 0)."""
    from mowbench.verify import scalar_row

    ours = dict(wm.named_parameters())

    def our_names(part: dict[str, torch.Tensor]) -> list[str]:
        return [n for n in from_upstream(part, sizes) if not n.startswith("target_")]

    rows, biases = [], []
    for group in ("_encoder", "_dynamics", "_reward", "_pi", "_Qs.online"):
        linear = {k: v for k, v in init.items() if k.startswith(group + ".") and ".ln." not in k}
        weights = {k: v for k, v in linear.items() if k.endswith("weight") and v.abs().max() > 0}
        up = torch.cat([v.double().flatten() for v in weights.values()]).std()
        mine = torch.cat([ours[n].detach().double().flatten() for n in our_names(weights)]).std()
        rows.append(scalar_row(f"initial {group.strip('_')} Linear weights std", up, mine, 0.1, "init"))
        biases += [ours[n].detach().abs().max() for n in our_names({k: v for k, v in linear.items()
                                                                     if k.endswith("bias")})]
    rows.append(scalar_row("initial Linear biases, largest |b|", 0.0, max(biases), 0.0, "exact"))
    return rows


@contextmanager
def grad_norms(wm: torch.nn.Module) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Inside, each torch.nn.utils.clip_grad_norm_ call also records the gradient norm before clipping per upstream
    module (OUR_GROUPS; modules whose clipped parameters have no gradient left out), as the reference does."""
    original = torch.nn.utils.clip_grad_norm_
    named = list(wm.named_parameters())
    norms: list[dict[str, torch.Tensor]] = []

    def clip(parameters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        parameters = list(parameters)
        ids = {id(p) for p in parameters}
        out = {}
        for group, prefix in OUR_GROUPS.items():
            grads = [p.grad for n, p in named if n.startswith(prefix) and id(p) in ids and p.grad is not None]
            if grads:
                out[group] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norms.append(out)
        return original(parameters, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield norms
    finally:
        torch.nn.utils.clip_grad_norm_ = original


def verify_reference(reference: dict[str, Any], agent_values: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """mowbench.verify's hook: the reference's online updates and plans replayed through our Newt -> (rows, reasons).
    The reference's demonstration-pretraining updates (`pretrain`) are not replayed: there are no demonstrations
    here (the module docstring)."""
    from mowbench.ops import log_std_range
    from mowbench.verify import Row, draws_from, exact_row, recording, scalar_row, tensor_row

    s = reference["sizes"]
    cfg = reference_config(reference, agent_values)
    agent = reference_agent(reference, cfg)
    wm, h = agent.wm, s["horizon"]
    init = reference["init"]
    frozen = ("_task_emb.weight", "_action_masks", *UPSTREAM_CONSTANTS)  # not learnt upstream
    rows: list[Row] = []
    count = sum(v.numel() for k, v in init.items() if k not in frozen)
    ours_count = count_parameters(p for n, p in wm.named_parameters() if not n.startswith("target_qs."))
    rows.append(scalar_row("world model parameters (learnt)", count, ours_count, 0.0, "exact"))
    try:
        rows += init_rows(init, wm, s)
    except KeyError as err:  # another architecture (an override): the parameter count above says how
        rows.append(Row(f"initial weights by module ({str(err).splitlines()[0][:80]})", float("nan"), float("nan"),
                        float("inf"), 0.0, "exact"))
    low, dif = float(init["log_std_min"]), float(init["log_std_dif"])
    ends = log_std_range(torch.tensor([-30.0, 30.0]))  # tanh saturates: the range's ends
    rows += [
        scalar_row("policy log-std minimum", low, ends[0], 0.0, "exact"),
        scalar_row("policy log-std maximum", low + dif, ends[1], 0.0, "exact"),
        exact_row("action masks (task x padded dims)", reference["action_masks"], wm.action_mask, "exact"),
        tensor_row(f"discounts (episode lengths {', '.join(map(str, s['episode_lengths']))})",
                   reference["discounts"], agent.discount, 0.0, "exact"),
        tensor_row("rho, policy loss (H+1 steps)", reference["rho"], agent.pi_rho, 0.0, "exact"),
        tensor_row("rho, model losses (H steps)", reference["rho"][:h], agent.rho, 0.0, "exact"),
    ]
    ours_init = from_upstream(init, s)
    try:
        wm.load_state_dict({**dict(wm.named_buffers()), **ours_init})  # ours: bins
    except (RuntimeError, KeyError) as err:
        rows.append(Row(f"upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                        float("nan"), float("inf"), 0.0, "exact"))
        return rows, TOLERANCES

    def checksums() -> dict[str, torch.Tensor]:
        """Per upstream module: float64 sum and sum of squares of the weights and of their change since init."""
        named = dict(wm.named_parameters())
        out = {}
        for group, prefix in OUR_GROUPS.items():
            names = [n for n in named if n.startswith(prefix)]
            flat = torch.cat([named[n].detach().double().flatten() for n in names])
            change = torch.cat([(named[n].detach().double() - ours_init[n].double()).flatten() for n in names])
            out[group] = torch.stack([flat.sum(), flat.pow(2).sum()])
            out[group + "/change"] = torch.stack([change.sum(), change.pow(2).sum()])
        return out

    agent.scale.value = torch.tensor(float(s["scale_init"]))  # as the reference sets it (its SOURCES.md)
    module = sys.modules[__name__]
    for k, upd in enumerate(reference["updates"]):
        tag = f"update {k + 1}"
        t, b, _ = upd["obs"].shape
        action = torch.zeros(b, t, s["action_dim"])
        action[:, :h] = upd["action"].transpose(0, 1)
        reward = torch.zeros(b, t)
        reward[:, :h] = upd["reward"].transpose(0, 1)
        task = upd["task"][0].long()  # (B,): one task per row
        batch = Batch(upd["obs"].transpose(0, 1).contiguous(), action, reward, torch.zeros(b, t), task,
                      torch.ones(b, s["action_dim"], dtype=torch.bool), extras={"first": torch.zeros(b, t)},
                      task_counts=tuple(int((task == i).sum()) for i in range(len(s["action_dims"]))))
        draws = {"randn": [upd["td_eps"].transpose(0, 1), upd["pi_eps"].transpose(0, 1)],
                 "randperm": [torch.cat([upd["td_pair"], _others(upd["td_pair"], s["num_q"])]),
                              torch.cat([upd["pi_pair"], _others(upd["pi_pair"], s["num_q"])])]}
        try:
            with draws_from(torch, draws), grad_norms(wm) as norms, recording(module, "masked_bc") as bcs:
                metrics = agent.step(lambda n, length, batch=batch: batch)
        except (RuntimeError, IndexError) as err:  # ours drew otherwise (another override): one failing row
            rows.append(Row(f"{tag}: upstream's draws replayed ({str(err).splitlines()[0][:80]})", float("nan"),
                            float("nan"), float("inf"), 0.0, "exact"))
            return rows, TOLERANCES
        up = upd["losses"]
        model_norms = norms[0] if norms else {}
        pi_norms = norms[1] if len(norms) > 1 else {}
        rows += [
            scalar_row(f"{tag}: consistency loss", up["consistency_loss"], metrics["wm/consistency"], RTOL, "fp32"),
            scalar_row(f"{tag}: reward loss", up["reward_loss"], metrics["wm/reward"], RTOL, "fp32"),
            scalar_row(f"{tag}: value loss", up["value_loss"], metrics["wm/value"], RTOL, "fp32"),
            scalar_row(f"{tag}: total loss", up["total_loss"], metrics["wm/loss"], RTOL, "fp32"),
            scalar_row(f"{tag}: model grad norm before clipping", up["grad_norm"], metrics["wm/grad_norm"], RTOL,
                       "fp32"),
        ]
        rows += [scalar_row(f"{tag}: {group.strip('_')} grad norm before clipping", value,
                            model_norms.get(group, float("nan")), RTOL, "fp32")
                 for group, value in upd["grad_norms"].items()]
        bc = bcs[0].detach().transpose(0, 1) if bcs else torch.full_like(upd["bc_per_step"], float("nan"))
        rows += [
            tensor_row(f"{tag}: behaviour cloning per step and sample", upd["bc_per_step"], bc, RTOL, "fp32"),
            scalar_row(f"{tag}: policy prior (BC) loss", up["pi_prior_loss"], metrics.get("pi/bc", 0.0), RTOL,
                       "fp32"),
            scalar_row(f"{tag}: policy loss", up["pi_loss"], metrics["pi/loss"], RTOL, "fp32"),
            scalar_row(f"{tag}: policy entropy (-log-prob)", up["pi_entropy"], metrics["pi/entropy"], RTOL, "fp32"),
            scalar_row(f"{tag}: policy scaled entropy", up["pi_scaled_entropy"], metrics["pi/scaled_entropy"], RTOL,
                       "fp32"),
            scalar_row(f"{tag}: policy std (mean)", up["pi_std"], metrics["pi/std"], RTOL, "fp32"),
            scalar_row(f"{tag}: policy std (max)", up["pi_max_std"], metrics["pi/max_std"], RTOL, "fp32"),
            scalar_row(f"{tag}: scale S used by the policy loss", upd["scale_before"], metrics["pi/scale_used"],
                       RTOL, "fp32"),
            scalar_row(f"{tag}: scale S after the update", upd["scale_after"], metrics["pi/scale"], RTOL, "fp32"),
            scalar_row(f"{tag}: policy grad norm before clipping", up["pi_grad_norm"],
                       pi_norms.get("_pi", float("nan")), RTOL, "fp32"),
        ]
        ours = checksums()
        for group in OUR_GROUPS:
            rows.append(scalar_row(f"{tag}: {group.strip('_')} weights sum of squares", upd["checksums"][group][1],
                                   ours[group][1], RTOL, "fp32"))
        for group in OUR_GROUPS:
            rows.append(scalar_row(f"{tag}: {group.strip('_')} change sum of squares",
                                   upd["checksums"][group + "/change"][1], ours[group + "/change"][1], RTOL, "fp32"))
    if cfg.WITH_DEMOS:  # newt-nodemo has no pretraining
        rows += pretrain_rows(reference, agent_values)
    rows += plan_rows(reference, agent)
    return rows, TOLERANCES


def pretrain_rows(reference: dict[str, Any], agent_values: dict[str, Any]) -> list[Any]:
    """The reference's two demonstration-pretraining updates (its `pretrain`: prior_coef 1, no max-Q policy step,
    learning-rate warm-up over pretrain_warmup_steps) on a fresh agent from upstream's initialisation, with the
    batches of its first two online updates and its draws, through our NewtAgent.pretrain."""
    from mowbench.verify import Row, draws_from, recording, scalar_row, tensor_row

    s = reference["sizes"]
    cfg = reference_config(reference, agent_values, lr_warmup=int(s["pretrain_warmup_steps"]))
    agent = reference_agent(reference, cfg)
    wm, h = agent.wm, s["horizon"]
    ours_init = from_upstream(reference["init"], s)
    wm.load_state_dict({**dict(wm.named_buffers()), **ours_init})
    agent.scale.value = torch.tensor(float(s["scale_init"]))
    module = sys.modules[__name__]
    rows: list[Row] = []
    for k, pre in enumerate(reference["pretrain"]):
        tag = f"pretrain {k + 1}"
        upd = reference["updates"][k]
        t, b, _ = upd["obs"].shape
        action = torch.zeros(b, t, s["action_dim"])
        action[:, :h] = upd["action"].transpose(0, 1)
        reward = torch.zeros(b, t)
        reward[:, :h] = upd["reward"].transpose(0, 1)
        task = upd["task"][0].long()
        batch = Batch(upd["obs"].transpose(0, 1).contiguous(), action, reward, torch.zeros(b, t), task,
                      torch.ones(b, s["action_dim"], dtype=torch.bool), extras={"first": torch.zeros(b, t)},
                      task_counts=tuple(int((task == i).sum()) for i in range(len(s["action_dims"]))))
        draws = {"randn": [pre["td_eps"].transpose(0, 1), pre["bc_eps"].transpose(0, 1)],
                 "randperm": [torch.cat([pre["td_pair"], _others(pre["td_pair"], s["num_q"])])]}
        try:
            with draws_from(torch, draws), grad_norms(wm) as norms, recording(module, "masked_bc") as bcs:
                metrics = agent.pretrain(lambda n, length, batch=batch: batch)
        except (RuntimeError, IndexError) as err:
            rows.append(Row(f"{tag}: upstream's draws replayed ({str(err).splitlines()[0][:80]})", float("nan"),
                            float("nan"), float("inf"), 0.0, "exact"))
            return rows
        up = pre["losses"]
        bc = bcs[0].detach().transpose(0, 1) if bcs else torch.full_like(pre["bc_per_step"], float("nan"))
        pairs = [("consistency_loss", "wm/consistency"), ("reward_loss", "wm/reward"), ("value_loss", "wm/value"),
                 ("pi_prior_loss", "wm/prior"), ("total_loss", "wm/loss"), ("bc_loss", "pi/bc"),
                 ("pi_entropy", "pi/entropy"), ("pi_scaled_entropy", "pi/scaled_entropy"), ("pi_std", "pi/std"),
                 ("grad_norm", "wm/grad_norm"), ("lr_enc", "lr/encoder"), ("lr", "lr/model"), ("lr_pi", "lr/pi")]
        rows += [scalar_row(f"{tag}: {theirs}", up[theirs], metrics.get(ours, float("nan")), RTOL, "fp32")
                 for theirs, ours in pairs]
        rows.append(scalar_row(f"{tag}: entropy_loss (-entropy_coef x scaled entropy)", up["entropy_loss"],
                               -cfg.entropy_coef * float(metrics.get("pi/scaled_entropy", float("nan"))), RTOL,
                               "fp32"))
        rows.append(tensor_row(f"{tag}: behaviour cloning per step and sample", pre["bc_per_step"], bc, RTOL, "fp32"))
        model_norms = norms[0] if norms else {}
        rows += [scalar_row(f"{tag}: {group.strip('_')} grad norm before clipping", value,
                            model_norms.get(group, float("nan")), RTOL, "fp32")
                 for group, value in pre["grad_norms"].items()]
        named = dict(wm.named_parameters())
        for group, prefix in OUR_GROUPS.items():
            names = [n for n in named if n.startswith(prefix)]
            change = torch.cat([(named[n].detach().double() - ours_init[n].double()).flatten() for n in names])
            rows.append(scalar_row(f"{tag}: {group.strip('_')} change sum of squares",
                                   pre["checksums"][group + "/change"][1], change.pow(2).sum(), RTOL, "fp32"))
    rows.append(scalar_row("pretraining leaves S unchanged", float(s["scale_init"]), agent.scale.value, 0.0,
                           "exact"))
    return rows


def plan_rows(reference: dict[str, Any], agent: NewtAgent) -> list[Any]:
    """MPPI with constrained planning on the reference's fixed model (the updated one with its reward, policy and Q
    output layers) for two environments (one per task) with upstream's draws: our noise vector built from them
    (TDMPC2Agent.plan's layout), the Q pairs as normals that argsort to them, the elite choice as the uniform in the
    middle of upstream's chosen elite's CDF interval (upstream samples it by Gumbel-max from the same weights).
    Two calls: the first of an episode in both environments (evaluation and exploring, from the same draws), then
    the next one, where environment 0 starts from its previous plan shifted and environment 1 from a new episode."""
    from mowbench.baselines import tdmpc2 as base  # where TDMPC2Agent.plan looks up MPPI's steps
    from mowbench.verify import exact_row, recording, tensor_row

    s, wm, cfg = reference["sizes"], agent.wm, agent.cfg
    with torch.no_grad():
        plan_weights = {k: v.float() for k, v in reference["plan_weights"].items()}
        for name, value in from_upstream(plan_weights, s).items():
            if not name.startswith("target_"):
                wm.get_parameter(name).copy_(value)
    obs, task = reference["plan_obs"], reference["plan_task"].long()
    with torch.no_grad():
        z = wm.encode(obs, task)
    agent.updates = s["plan_step"]  # our schedule counts updates: the reference's env steps stand for them
    rows = [tensor_row("plan: latent z", reference["plan"]["z"], z, RTOL, "fp32")]
    contexts = None
    for key, label in (("plan", "plan"), ("plan_second", "plan, next call")):
        plan = reference[key]
        noise = plan_noise(plan, cfg, s)
        agent.noise = lambda contexts, shape, noise=noise: noise.clone()  # the instance's only planning noise
        starts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        initial = agent.initial_plan

        def record_start(contexts: list[FrameContext], z: torch.Tensor, task: torch.Tensor, pi_actions: torch.Tensor,
                         initial: Callable[..., Any] = initial, starts: list[Any] = starts
                         ) -> tuple[torch.Tensor, torch.Tensor]:
            mean, std = initial(contexts, z, task, pi_actions)
            starts.append((pi_actions.clone(), mean.clone(), std.clone()))
            return mean, std

        agent.initial_plan = record_start
        outputs = {}
        try:
            for greedy in ((True, False) if "greedy_action" in plan else (False,)):
                if key == "plan" or contexts is None:
                    contexts = [agent.new_context(int(i)) for i in task]
                else:
                    for c, t0 in zip(contexts, plan["t0"].tolist(), strict=True):
                        if t0:
                            agent.episode_start(c)
                with recording(base, "mppi_moments") as moments, recording(base, "mppi_elites") as elites, \
                        recording(base, "sample_categorical") as chosen, torch.inference_mode():
                    action = agent.plan(z, task, contexts, greedy)
                outputs[greedy] = (action, moments[-1][1], torch.as_tensor(np.stack([c.carry for c in contexts])),
                                   elites[-1][1], chosen[0], starts[-1])
        finally:
            del agent.noise, agent.initial_plan
        action, std, mean, score, index, (pi_actions, init_mean, init_std) = outputs[False]
        rows += [
            tensor_row(f"{label}: policy trajectories' actions", plan["pi_actions"], pi_actions.transpose(1, 2),
                       RTOL, "fp32"),
            tensor_row(f"{label}: initial mean (constrained planning)", plan["init_mean"], init_mean, RTOL, "fp32"),
            tensor_row(f"{label}: initial std (constrained planning)", plan["init_std"], init_std, RTOL, "fp32"),
            tensor_row(f"{label}: final elite weights", plan["score"], score, RTOL, "fp32"),
            exact_row(f"{label}: chosen elites", plan["chosen"], index, "exact"),
            tensor_row(f"{label}: final mean", plan["mean"], mean, RTOL, "fp32"),
            tensor_row(f"{label}: final std", plan["std"], std, RTOL, "fp32"),
        ]
        if True in outputs:
            rows.append(tensor_row(f"{label}: action (eval)", plan["greedy_action"], outputs[True][0], RTOL, "fp32"))
        rows.append(tensor_row(f"{label}: action (exploring)", plan["action"], action, RTOL, "fp32"))
    return rows


def plan_noise(plan: dict[str, torch.Tensor], cfg: NewtConfig, s: dict[str, Any]) -> torch.Tensor:
    """Upstream's planning draws as the noise TDMPC2Agent.plan splits, per environment (B, draws): policy-trajectory
    noise (B, P, H, A), sampling noise (B, it, N - P, H, A), the horizon's policy noise (B, it, N, A), per iteration
    normals whose argsort starts with upstream's Q pair (B, it, n_q), the normal whose CDF is the uniform that picks
    upstream's chosen elite (B, 1), the exploration noise (B, A)."""
    b, p, n_q = len(plan["chosen"]), cfg.num_pi_trajs, cfg.n_q
    it = len(plan["pairs"])
    pi_eps = plan["pi_eps"].reshape(b, p, *plan["pi_eps"].shape[1:])  # env-major rows -> (B, P, H, A)
    sample_eps = plan["sample_eps"].permute(1, 0, 3, 2, 4)  # (it, B, H, N-P, A) -> (B, it, N-P, H, A)
    value_eps = plan["value_eps"].transpose(0, 1)  # (it, B, N, A) -> (B, it, N, A)
    order = torch.arange(n_q, dtype=torch.float32).repeat(it, 1)  # (it, n_q): argsort -> the pair first
    order.scatter_(1, plan["pairs"].long(), torch.tensor([[-2.0, -1.0]]).expand(it, 2))
    cdf = plan["score"].double().cumsum(1)  # (B, E)
    c = plan["chosen"].long()
    below = torch.where(c > 0, cdf.gather(1, (c - 1).clamp(min=0)[:, None])[:, 0], torch.zeros(b, dtype=torch.float64))
    u = (below + cdf.gather(1, c[:, None])[:, 0]) / 2 / cdf[:, -1]  # (B,)
    explore = plan.get("explore_eps", torch.zeros(b, s["action_dim"]))
    return torch.cat([pi_eps.flatten(1), sample_eps.flatten(1), value_eps.flatten(1),
                      order.flatten()[None].expand(b, -1), torch.special.ndtri(u).float()[:, None], explore], 1)
