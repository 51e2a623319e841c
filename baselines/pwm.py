"""PWM (Georgiev et al., "PWM: Policy Learning with Multi-Task World Models", imgeorgiev/PWM; spec baselines.md),
online, from pixels: a TD-MPC2-style world model (encoder, dynamics, reward; no Q, no policy prior) trained with
horizon 16 and rho 0.99, and per task an actor and three critics trained by first-order gradients through the
world model: 16-step imagined returns differentiated through the (frozen for that step) dynamics and reward, and
TD(lambda) critics on the imagined rollouts. Acting: the task's actor, no planning.

`pwm` here is the online variant: the published multi-task results pretrain the world model offline for about
two weeks on TD-MPC2's datasets; here it trains online from the per-task replays (Dyna-style), which the paper
leaves open. Other choices, each for a reason:
- The symlog-reward quirk is the default (symlog_reward=true): upstream's differentiable reward is the bins'
  expectation in symlog space, without symexp, so the actor maximises symlog rewards; false: real rewards.
- Return normalisation: the actor loss is divided by a running (EMA, rate ret_norm_rate) std of the imagined
  returns, the simplest faithful reading of "normalised by the running std of returns".
- Critic targets use the critics' minimum at the rollout (no separate target critics; the spec names none).
- The learning-rate decay (5e-4 -> 1e-5, linear) runs over lr_decay_updates (150k: one update per round of the
  MT50 budget of 150k agent steps per task).
- Pixels with tasks: as tdmpc2 (e_k after the conv trunk). Discrete-action suites are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mowbench.agents.base import Metrics, count_parameters, register_agent
from mowbench.agents.imagination import check_positive
from mowbench.agents.latent import FrameContext, LatentAgent, LatentConfig
from mowbench.envs.base import TaskInfo
from mowbench.models.tdmpc import TaskMLP, TDMPCWorldModel
from mowbench.ops import lambda_returns, stack_frames, symexp
from mowbench.replay import Batch


@dataclass
class PWMConfig(LatentConfig):
    """PWM's settings (spec baselines.md); the world-model fields are LatentConfig's with PWM's horizon and rho."""

    horizon: int = 16  # world-model unroll (the authors stress 16 and rho 0.99)
    rho: float = 0.99
    actor_hidden: tuple[int, ...] = (400, 200, 100)  # per-task actor MLP (Mish + LayerNorm)
    critic_hidden: tuple[int, ...] = (400, 200)  # per-task critic MLPs
    n_critics: int = 3  # critics per task; bootstrap with their minimum
    log_std_init: float = -1.0  # state-independent log-std of the actor
    log_std_min: float = -1.427  # its floor
    starts_per_task: int = 512  # imagination start states of each task per update
    imag_horizon: int = 16  # imagined steps of the first-order policy update
    gamma: float = 0.99
    lam: float = 0.95  # TD(lambda) of the critic targets
    critic_epochs: int = 8
    critic_minibatches: int = 4
    actor_lr: float = 5e-4
    critic_lr: float = 5e-4
    lr_end: float = 1e-5  # both learning rates decay linearly to this
    lr_decay_updates: int = 150_000
    actor_grad_clip: float = 1.0
    critic_grad_clip: float = 100.0
    symlog_reward: bool = True  # the authors' quirk: the actor maximises symlog rewards (see the module docstring)
    ret_norm_rate: float = 0.01  # rate of the running std of imagined returns

    def check(self) -> None:
        super().check()
        check_positive(self, ("n_critics", "starts_per_task", "imag_horizon", "critic_epochs", "critic_minibatches",
                              "actor_lr", "critic_lr", "lr_end", "lr_decay_updates", "actor_grad_clip",
                              "critic_grad_clip", "ret_norm_rate"))
        if not self.actor_hidden or not self.critic_hidden:
            raise ValueError("actor_hidden and critic_hidden; allowed: non-empty lists of widths")
        if self.starts_per_task * self.imag_horizon % self.critic_minibatches:
            raise ValueError(f"critic_minibatches={self.critic_minibatches}; allowed: a divisor of starts_per_task x "
                             f"imag_horizon = {self.starts_per_task * self.imag_horizon}")
        for name in ("gamma", "lam"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 0 < {name} <= 1")


@register_agent("pwm", PWMConfig, multi_task=True)
class PWMAgent(LatentAgent):
    """PWM (see the module docstring)."""

    cfg: PWMConfig

    def __init__(self, cfg: PWMConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        super().__init__(cfg, tasks, device, precision)
        k, latent, a = len(tasks), cfg.sizes()[2], self.action_dim
        self.actor = TaskMLP(k, latent, tuple(cfg.actor_hidden), a).to(device)
        self.log_std = torch.nn.Parameter(torch.full((k, 1, a), cfg.log_std_init, device=device))
        self.critics = torch.nn.ModuleList(TaskMLP(k, latent, tuple(cfg.critic_hidden), 1)
                                           for _ in range(cfg.n_critics)).to(device)
        self.optim = torch.optim.Adam(self.world_model_groups(list(self.wm.parameters())), lr=cfg.lr)
        betas = (0.7, 0.95)
        self.actor_optim = torch.optim.Adam([*self.actor.parameters(), self.log_std], lr=cfg.actor_lr, betas=betas)
        self.critic_optim = torch.optim.Adam(self.critics.parameters(), lr=cfg.critic_lr, betas=betas)
        self.ret_var = torch.ones((), device=device)

    def build_world_model(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> TDMPCWorldModel:
        return TDMPCWorldModel(**self.world_model_kwargs(tasks, action_mask), n_q=0, policy=False)

    # ---- the maths ----
    def policy(self, z: torch.Tensor, eps: torch.Tensor | None, task: torch.Tensor | None = None) -> torch.Tensor:
        """Actions tanh(mu(z) + std * eps): z (K, M, L) grouped by task, or (B, 1, L) with `task` (B,); eps None:
        the mean action tanh(mu). Padded action dims are 0."""
        mu = self.actor(z, task)  # (K or B, M, A)
        mask = self.action_mask if task is None else self.action_mask[task]
        if eps is not None:
            log_std = self.log_std if task is None else self.log_std[task]
            mu = mu + log_std.clamp(min=self.cfg.log_std_min).exp() * eps
        return torch.tanh(mu) * mask[:, None].float()

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """min over the critics: z (K, M, L) -> (K, M)."""
        return torch.stack([c(z).squeeze(-1) for c in self.critics]).min(0).values

    def differentiable_reward(self, logits: torch.Tensor) -> torch.Tensor:
        """The reward the actor's gradient flows through: the bins' expectation in symlog space (PWM's quirk) or
        its symexp (real rewards)."""
        r = (torch.softmax(logits.float(), -1) * self.wm.bins).sum(-1)
        return r if self.cfg.symlog_reward else symexp(r)

    def imagine(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the actors H steps through the world model from z0 (K, M, L) -> latents (K, M, H+1, L) and
        rewards (K, M, H), differentiable in the actors' parameters."""
        k, m, latent = z0.shape
        task = torch.arange(k, device=self.device).repeat_interleave(m)  # rows grouped by task
        zs, rewards, z = [z0], [], z0
        for _ in range(self.cfg.imag_horizon):
            a = self.policy(z, torch.randn(k, m, self.action_dim, device=self.device))
            flat_z, flat_a = z.reshape(k * m, latent), a.reshape(k * m, -1)
            rewards.append(self.differentiable_reward(self.wm.reward(flat_z, flat_a, task)).view(k, m))
            z = self.wm.next(flat_z, flat_a, task).view(k, m, latent)
            zs.append(z)
        return torch.stack(zs, 2), torch.stack(rewards, 2)

    # ---- learning ----
    def train_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        cfg = self.cfg
        self.set_rates()
        u = self.unroll(sample(self.batch_size(), cfg.batch_length))
        terms, _, _ = self.world_model_terms(u)
        loss = cfg.consistency_coef * terms["consistency"] + cfg.reward_coef * terms["reward"]
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm.parameters(), cfg.grad_clip)
        self.optim.step()
        return {f"wm/{k}": v.detach() for k, v in terms.items()} | {"wm/loss": loss.detach(), "wm/grad_norm": grad_norm,
                                                                  **self.policy_step(sample)}

    def start_states(self, sample: Callable[[int, int], Batch]) -> torch.Tensor:
        """starts_per_task replayed states of every task, encoded: (K, M, L), rows grouped by task."""
        k, m = len(self.tasks), self.cfg.starts_per_task
        batch = sample(k * m, self.cfg.frames)  # stratified: exactly m rows per task
        order = torch.argsort(batch.task, stable=True)  # grouped by task (the replay's order already)
        obs = stack_frames(batch.obs[order], batch.extras["first"][order], self.cfg.frames)[:, -1]  # (K*M, 3k, S, S)
        with torch.no_grad(), self.autocast():
            return self.wm.encode(obs, batch.task[order]).float().view(k, m, -1)

    def policy_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """First-order actor update through the frozen world model, then the critics on the same rollout."""
        cfg = self.cfg
        z0 = self.start_states(sample)
        self.wm.requires_grad_(False)
        with self.autocast():
            zs, rewards = self.imagine(z0)
        self.wm.requires_grad_(True)
        discounts = cfg.gamma ** torch.arange(cfg.imag_horizon + 1, device=self.device, dtype=torch.float32)
        returns = (rewards.float() * discounts[:-1]).sum(-1) + discounts[-1] * self.value(zs[:, :, -1].float())
        self.ret_var = torch.lerp(self.ret_var, returns.detach().var(), cfg.ret_norm_rate)
        actor_loss = -returns.mean() / (self.ret_var.sqrt() + 1e-6)
        self.actor_optim.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_norm = torch.nn.utils.clip_grad_norm_([*self.actor.parameters(), self.log_std], cfg.actor_grad_clip)
        self.actor_optim.step()
        self.critics.zero_grad(set_to_none=True)  # the actor's backward reached them through the bootstrap
        critic_loss = self.critic_step(zs.detach().float(), rewards.detach().float())
        return {"pi/loss": actor_loss.detach(), "pi/return": returns.mean().detach(), "pi/grad_norm": actor_norm,
                "critic/loss": critic_loss}

    def critic_step(self, zs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        """TD(lambda) targets on the rollout zs (K, M, H+1, L), rewards (K, M, H); critic_epochs x
        critic_minibatches regression steps over its K x M x H states (each minibatch holds every task)."""
        cfg = self.cfg
        k, m, h1, latent = zs.shape
        with torch.no_grad():
            values = self.value(zs.reshape(k, m * h1, latent)).view(k * m, h1)
            targets = lambda_returns(rewards.reshape(k * m, h1 - 1), values, torch.ones_like(values[:, 1:]),
                                     cfg.gamma, cfg.lam, "next").view(k, m * (h1 - 1))
        states = zs[:, :, :-1].reshape(k, m * (h1 - 1), latent)
        n = states.shape[1]
        size = n // cfg.critic_minibatches
        for _ in range(cfg.critic_epochs):
            order = torch.randperm(n, device=self.device)
            for j in range(cfg.critic_minibatches):
                idx = order[j * size:(j + 1) * size]
                x, y = states[:, idx], targets[:, idx]
                loss = sum((c(x).squeeze(-1) - y).pow(2).mean() for c in self.critics)
                self.critic_optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.critics.parameters(), cfg.critic_grad_clip)
                self.critic_optim.step()
        return loss.detach()

    def set_rates(self) -> None:
        """Both learning rates: linear from their start to lr_end over lr_decay_updates updates."""
        frac = min(self.updates / self.cfg.lr_decay_updates, 1.0)
        for opt, start in ((self.actor_optim, self.cfg.actor_lr), (self.critic_optim, self.cfg.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = start + frac * (self.cfg.lr_end - start)

    # ---- acting ----
    def choose(self, z: torch.Tensor, task: torch.Tensor, contexts: list[FrameContext], greedy: bool) -> torch.Tensor:
        """The task's actor: its mean action (greedy) or a sample."""
        eps = None if greedy else self.noise(contexts, (1, self.action_dim))
        return self.policy(z[:, None], eps, task)[:, 0]

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return {"wm": self.wm.state_dict(), "actor": self.actor.state_dict(), "log_std": self.log_std.detach(),
                "critics": self.critics.state_dict(), "optim": self.optim.state_dict(),
                "actor_optim": self.actor_optim.state_dict(), "critic_optim": self.critic_optim.state_dict(),
                "ret_var": self.ret_var, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.actor.load_state_dict(state["actor"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.critics.load_state_dict(state["critics"])
        self.optim.load_state_dict(state["optim"])
        self.actor_optim.load_state_dict(state["actor_optim"])
        self.critic_optim.load_state_dict(state["critic_optim"])
        self.ret_var = state["ret_var"].to(self.device)
        self.updates = int(state["updates"])

    def per_task_batch(self) -> dict[str, int]:
        return super().per_task_batch() | {"imagination_starts": self.cfg.starts_per_task}

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts() | {
            "actors": count_parameters(self.actor.parameters()) + self.log_std.numel(),
            "critics": count_parameters(self.critics.parameters())}
        return counts | {"total": sum(counts.values())}
