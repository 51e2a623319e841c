"""TD-MPC2 (Hansen, Su and Wang, ICLR 2024, arXiv 2310.16828) from pixels, online, single- or multi-task: the
world model of mowbench.models.tdmpc (SimNorm latents, 101-bin reward and 5-head Q ensemble, policy prior),
trained by latent consistency, reward and TD value losses over an H = 3 unroll; the policy prior by maximising
scaled Q plus entropy; acting by MPPI with policy-prior trajectories. Facts from spec baselines.md.

Deviations from upstream, each for a reason:
- Multi-task TD-MPC2 upstream trains offline on released datasets; here it trains online from the per-task
  replays (the runs of this harness), with every task in every batch (batch_multi_task rows, even per task).
- Pixels with tasks: e_k joins after the conv trunk (upstream concatenates it to raw states; spec pitfall).
- A replayed sequence may cross an episode end (our replay is a ring per task); transitions past the end of the
  episode of the unroll's first step are masked out of every loss (the `first` flags the trainer stores).
- Evaluation follows the suite protocol like every agent: `greedy` (train.eval_greedy=true) is upstream's
  evaluation (the chosen elite's first action, no exploration noise); the MT50 protocol's sampled evaluation
  adds the plan's std as noise, as TD-MPC2 does while training.
- Modes as upstream: the model is in eval mode while planning and train mode only inside an update
  (LatentAgent.step), and the target Qs are always in eval mode (TDMPCWorldModel.train), so Q dropout acts on the
  predicted Qs and the policy's Q only (an earlier version also dropped out in the TD targets).
- `paper` = 5M: TD-MPC2's default size and the size of its single-task Meta-World runs; its 48M-317M multi-task
  models were trained offline on 545M transitions, far beyond an online 300k-steps-per-task budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mowbench.agents.base import Metrics, count_parameters, register_agent
from mowbench.agents.imagination import check_non_negative, check_positive
from mowbench.agents.latent import FrameContext, LatentAgent, LatentConfig
from mowbench.envs.base import TaskInfo
from mowbench.models.tdmpc import TDMPCWorldModel, pair_values
from mowbench.ops import mppi_elites, mppi_moments, rho_weights, sample_categorical, symlog_twohot_ce, tdmpc_discount
from mowbench.replay import Batch


@dataclass
class TDMPC2Config(LatentConfig):
    """TD-MPC2's hyperparameters (spec baselines.md); the world-model fields are LatentConfig's."""

    n_q: int = 5  # Q ensemble heads
    q_dropout: float = 0.01  # dropout in the Q heads' first layer
    value_coef: float = 0.1  # value cross-entropy weight (over all heads)
    tau: float = 0.01  # Polyak rate of the target Q heads
    entropy_coef: float = 1e-4  # policy entropy bonus (log-prob summed over the task's action dims)
    pi_lr: float = 3e-4  # policy Adam learning rate (eps 1e-5)
    scale_tau: float = 0.01  # rate of the running 5-95 percentile range S of Q in the policy loss
    mpc: bool = True  # plan with MPPI (False: act with the policy prior)
    iterations: int = 6  # MPPI iterations
    num_samples: int = 512  # action sequences per iteration, policy trajectories included
    num_elites: int = 64  # elites per iteration
    num_pi_trajs: int = 24  # of the samples, sequences rolled out by the policy prior
    min_std: float = 0.05  # MPPI std floor
    max_std: float = 2.0  # MPPI std ceiling (and initial std)
    temperature: float = 0.5  # MPPI score = exp(temperature * (value - max))
    discount: float = 0.0  # 0: per task from its episode length (tdmpc_discount: 0.95 on Meta-World), else this

    def check(self) -> None:
        super().check()
        check_positive(self, ("n_q", "iterations", "num_samples", "num_elites", "min_std", "max_std", "temperature",
                              "pi_lr"))
        check_non_negative(self, ("num_pi_trajs", "value_coef", "entropy_coef"))
        if self.n_q < 2:
            raise ValueError(f"n_q={self.n_q}; allowed: >= 2 (Q min and mean over two random heads)")
        if self.num_elites > self.num_samples or self.num_pi_trajs >= self.num_samples:
            raise ValueError(f"num_elites={self.num_elites}, num_pi_trajs={self.num_pi_trajs}; allowed: at most "
                             f"num_samples={self.num_samples} (policy trajectories: fewer)")
        if self.min_std > self.max_std:
            raise ValueError(f"min_std={self.min_std} > max_std={self.max_std}; allowed: min_std <= max_std")
        for name in ("q_dropout", "tau", "scale_tau"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 0 <= {name} <= 1")
        if not 0.0 <= self.discount < 1.0:
            raise ValueError(f"discount={self.discount}; allowed: 0 (per task) or 0 < discount < 1")


class RunningScale:
    """TD-MPC2's policy-loss scale S: a running (rate tau) 5-95 percentile range of Q, used as max(S, 1)."""

    def __init__(self, tau: float, device: torch.device) -> None:
        self.tau, self.value = tau, torch.ones((), device=device)

    def update(self, x: torch.Tensor) -> None:
        q = torch.quantile(x.detach().float().flatten(), torch.tensor([0.05, 0.95], device=x.device))
        self.value = torch.lerp(self.value, q[1] - q[0], self.tau)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.value.clamp(min=1.0)


@register_agent("tdmpc2", TDMPC2Config, multi_task=True)
class TDMPC2Agent(LatentAgent):
    """TD-MPC2 (see the module docstring); Newt (baselines/newt.py) is this agent with other settings."""

    cfg: TDMPC2Config

    def __init__(self, cfg: TDMPC2Config, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        super().__init__(cfg, tasks, device, precision)
        wm = self.wm
        self.discount = torch.tensor([self.task_discount(t) for t in tasks], device=device)  # (K,)
        self.wm_params = [p for n, p in wm.named_parameters() if not n.startswith(("policy.", "target_qs."))]
        self.optim = torch.optim.Adam(self.world_model_groups(self.wm_params), lr=cfg.lr)
        self.pi_optim = torch.optim.Adam(wm.policy.parameters(), lr=cfg.pi_lr, eps=1e-5)
        self.scale = RunningScale(cfg.scale_tau, device)
        self.pi_rho = rho_weights(cfg.horizon + 1, cfg.rho, cfg.rho_normalise).to(device)  # (H+1,)

    def build_world_model(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> TDMPCWorldModel:
        kwargs = self.world_model_kwargs(tasks, action_mask)
        return TDMPCWorldModel(**kwargs, n_q=self.cfg.n_q, q_dropout=self.cfg.q_dropout, policy=True)

    def task_discount(self, task: TaskInfo) -> float:
        if self.cfg.discount:
            return self.cfg.discount
        return tdmpc_discount(int(task.protocol.get("episode_length", 500)))

    # ---- learning ----
    def train_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        cfg, wm = self.cfg, self.wm
        u = self.unroll(sample(self.batch_size(), cfg.batch_length))
        b, h, a = u.action.shape
        terms, zs, next_z = self.world_model_terms(u)
        gamma = self.discount[u.task][:, None]  # (B, 1)
        with torch.no_grad(), self.autocast():  # TD targets r + gamma * Q_target_min(z', pi(z'))
            a_next = wm.pi(next_z, u.task, torch.randn(b, h, a, device=self.device))[0]
            q_next = wm.value(wm.Q(next_z, a_next, u.task, target=True))  # (n_q, B, H)
            td = u.reward + gamma * pair_values(q_next, torch.randperm(cfg.n_q)[:2], "min")  # (B, H)
        with self.autocast():
            q_logits = wm.Q(zs[:, :-1], u.action, u.task)  # (n_q, B, H, bins)
        value = symlog_twohot_ce(q_logits, td.expand(cfg.n_q, b, h), wm.bins).mean(0)  # (B, H), mean over heads
        terms["value"] = self.weighted(value, u.valid)
        loss = cfg.consistency_coef * terms["consistency"] + cfg.reward_coef * terms["reward"] + \
            cfg.value_coef * terms["value"]
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm_params, cfg.grad_clip)
        self.optim.step()
        pi_terms = self.policy_step(zs.detach(), u.task)
        wm.update_targets(cfg.tau)
        return {f"wm/{k}": v.detach() for k, v in terms.items()} | {"wm/loss": loss.detach(), "wm/grad_norm": grad_norm,
                                                                  **pi_terms}

    def policy_step(self, zs: torch.Tensor, task: torch.Tensor) -> Metrics:
        """Maximise Q_avg / S + entropy_coef * entropy on detached latents zs (B, H+1, L), rho-weighted over t."""
        cfg, wm = self.cfg, self.wm
        wm.qs.requires_grad_(False)
        with self.autocast():
            action, log_prob, _, _ = wm.pi(zs, task, torch.randn(*zs.shape[:2], self.action_dim, device=self.device))
            q = pair_values(wm.value(wm.Q(zs, action, task)), torch.randperm(cfg.n_q)[:2], "avg")  # (B, H+1)
        wm.qs.requires_grad_(True)
        self.scale.update(q[:, 0])
        objective = cfg.entropy_coef * (-log_prob.float()) + self.scale(q.float())  # (B, H+1)
        loss = -(objective * self.pi_rho).sum(1).mean()
        self.pi_optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(wm.policy.parameters(), cfg.grad_clip)
        self.pi_optim.step()
        return {"pi/loss": loss.detach(), "pi/entropy": (-log_prob).mean().detach(), "pi/scale": self.scale.value,
                "pi/grad_norm": grad_norm}

    # ---- acting ----
    def choose(self, z: torch.Tensor, task: torch.Tensor, contexts: list[FrameContext], greedy: bool) -> torch.Tensor:
        if self.cfg.mpc:
            return self.plan(z, task, contexts, greedy)
        sampled, _, mean, _ = self.wm.pi(z, task, self.noise(contexts, (self.action_dim,)))
        return mean if greedy else sampled

    def initial_plan(self, contexts: list[FrameContext], z: torch.Tensor, task: torch.Tensor,
                     pi_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MPPI's starting mean and std (B, H, A): the previous plan's mean shifted by one step (zeros at an
        episode start and for the new last step), std max_std. Newt overrides it (constrained planning)."""
        b, h, a = z.shape[0], self.cfg.horizon, self.action_dim
        mean = np.zeros((b, h, a), dtype=np.float32)
        for i, c in enumerate(contexts):
            if c.carry is not None:
                mean[i, :-1] = c.carry[1:]
        mean = torch.as_tensor(mean, device=self.device)  # one copy to the device for every stream
        return mean, torch.full_like(mean, self.cfg.max_std)

    def plan(self, z: torch.Tensor, task: torch.Tensor, contexts: list[FrameContext], greedy: bool) -> torch.Tensor:
        """MPPI over H-step action sequences for every stream at once: z (B, L) -> first actions (B, A). Each
        stream's noise comes from its own generator (FrameContext.rng), drawn in one call per step."""
        cfg, wm = self.cfg, self.wm
        b, h, a, n, p, e = z.shape[0], cfg.horizon, self.action_dim, cfg.num_samples, cfg.num_pi_trajs, cfg.num_elites
        it = cfg.iterations
        sizes = [p * h * a, it * (n - p) * h * a, it * n * a, it * cfg.n_q, 1, a]
        draws = self.noise(contexts, (sum(sizes),)).split(sizes, dim=1)
        pi_eps = draws[0].view(b, p, h, a)
        sample_eps = draws[1].view(b, it, n - p, h, a)
        value_eps = draws[2].view(b, it, n, a)
        pairs = draws[3].view(b, it, cfg.n_q).argsort(-1)[..., :2]  # (B, it, 2): two random Q heads per stream
        choice_u = torch.special.ndtr(draws[4])  # (B, 1) uniform
        mask = self.action_mask[task][:, None, None].float()  # (B, 1, 1, A)
        pi_actions = torch.zeros(b, p, h, a, device=self.device)
        with self.autocast():
            if p:
                zp = z[:, None].expand(b, p, z.shape[-1])
                for t in range(h):
                    pi_actions[:, :, t] = wm.pi(zp, task, pi_eps[:, :, t])[0].float()
                    if t < h - 1:
                        zp = wm.next(zp, pi_actions[:, :, t], task)
        mean, std = self.initial_plan(contexts, z, task, pi_actions)
        for i in range(it):
            sampled = (mean[:, None] + std[:, None] * sample_eps[:, i]).clamp(-1, 1) * mask  # (B, n-p, H, A)
            actions = torch.cat([pi_actions, sampled], dim=1)  # (B, n, H, A)
            value = self.estimate_value(z, actions, task, value_eps[:, i], pairs[:, i]).nan_to_num(0.0)  # (B, n)
            index, score = mppi_elites(value, e, cfg.temperature)
            elites = actions.gather(1, index[:, :, None, None].expand(b, e, h, a))  # (B, E, H, A)
            mean, std = mppi_moments(elites, score, cfg.min_std, cfg.max_std)
            mean, std = mean * mask[:, 0], std * mask[:, 0]
        chosen = sample_categorical(score, choice_u)  # (B,): one elite sequence, by score
        action = elites[torch.arange(b, device=self.device), chosen, 0]  # (B, A)
        if not greedy:
            action = (action + std[:, 0] * draws[5]).clamp(-1, 1) * mask[:, 0, 0]
        carry = mean.cpu().numpy()  # one copy from the device for every stream
        for i, c in enumerate(contexts):
            c.carry = carry[i]
        return action

    def estimate_value(self, z: torch.Tensor, actions: torch.Tensor, task: torch.Tensor, eps: torch.Tensor,
                       pair: torch.Tensor) -> torch.Tensor:
        """Discounted predicted rewards of each sequence plus gamma^H Q_avg(z_H, pi(z_H)) over the stream's two
        heads: z (B, L), actions (B, N, H, A), eps (B, N, A), pair (B, 2) -> (B, N)."""
        wm = self.wm
        b, n, h, _ = actions.shape
        gamma = self.discount[task][:, None]  # (B, 1)
        zt = z[:, None].expand(b, n, z.shape[-1])
        total, disc = torch.zeros(b, n, device=self.device), torch.ones(b, 1, device=self.device)
        with self.autocast():
            for t in range(h):
                total = total + disc * wm.value(wm.reward(zt, actions[:, :, t], task))
                zt = wm.next(zt, actions[:, :, t], task)
                disc = disc * gamma
            a_h = wm.pi(zt, task, eps)[0]
            q = wm.value(wm.Q(zt, a_h, task, heads=pair)).mean(0)  # (B, N): the mean of each stream's two heads
        return total + disc * q

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return {"wm": self.wm.state_dict(), "optim": self.optim.state_dict(), "pi_optim": self.pi_optim.state_dict(),
                "scale": self.scale.value, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.optim.load_state_dict(state["optim"])
        self.pi_optim.load_state_dict(state["pi_optim"])
        self.scale.value = state["scale"].to(self.device)
        self.updates = int(state["updates"])

    def parameter_counts(self) -> dict[str, int]:
        wm = self.wm
        counts = super().parameter_counts() | {"policy": count_parameters(wm.policy.parameters()),
                                               "q_ensemble": count_parameters(wm.qs.parameters())}
        return counts | {"total": sum(counts.values()), "target_q": count_parameters(wm.target_qs.parameters())}
