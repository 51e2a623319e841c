"""PWM (Georgiev et al., "PWM: Policy Learning with Multi-Task World Models", imgeorgiev/PWM; docs/methods/pwm.md),
online, from pixels: a TD-MPC2-style world model (encoder, dynamics, reward; no Q, no policy prior) trained with
horizon 16 and rho 0.99, and per task an actor and three critics trained by first-order gradients through the
world model: 16-step imagined returns differentiated through the (frozen for that step) dynamics and reward, and
critics regressed on one-step targets of the imagined rollouts. Acting: the task's actor, no planning.

`pwm-online` as built is the ONLINE variant of PWM, not the published method: the published multi-task results pretrain
a 48M world model offline (TD-MPC2's loss on TD-MPC2's datasets) and then freeze it (`finetune_wm: False`) while one run
per task trains that task's actor and critics, with no env interaction. Here the world model trains online from the
per-task replays (Dyna-style, TD-MPC2's loss, the paper preset's 5M model), interleaved with the actor and critic
updates; the offline pretraining is not built, and the learning-rate decay runs over lr_decay_updates (150k, one update
per round of the MT50 budget) where upstream's runs over its 10k epochs of a frozen model.

Checked against the published code by `python -m mowbench.verify agent=pwm-online` (docs/verify.md): its multi-task
flow with a given (frozen) world model, one task's updates replayed through ours. The defaults follow it; each
old behaviour of this file is an ablation (ablations/README.md):
- the actor's input latent detached (upstream `detach: True`; ablation attached_actor_input);
- the bootstrap gamma^(H+1) min_k V_k(z_H) after H discounted rewards (upstream's; ablation bootstrap_gamma_h:
  gamma^H);
- one-step critic targets r_t + gamma min_k V_k(z_{t+1}) from the critics before their update (upstream's
  TD(lambda) code with its done mask 1 at every step, as in its multi-task flow, reduces to these; ablation
  lambda_critic_targets: TD(lambda = lam));
- the return scale: a running variance of the per-sample actor loss accumulated by count (mean 0, variance 1,
  count 1e-4 at the start; the batch's population variance merged before use), the loss divided by
  sqrt(var + 1e-5) and averaged, no mean subtracted (ablation ema_return_norm: an EMA at ret_norm_rate of the
  unbiased variance from 1, loss / (std + 1e-6));
- the critic loss the mean squared error over critics and rows, 8 iterations over 4 fixed, unshuffled minibatches
  of the time-major rollout (ablations summed_critic_loss: per-critic MSEs summed; shuffled_critic_minibatches:
  a new permutation every iteration); NaN critic gradients zeroed before the clip, as upstream;
- actor and critic hidden layers Linear -> Mish -> LayerNorm (ablation norm_before_mish: LayerNorm before
  Mish); critics orthogonally initialised with gain sqrt(2), biases 0 (ablation uniform_critic_init: nn.Linear's
  uniform); actors nn.Linear's default (as upstream);
- the log-std floor clamps the parameter itself before every forward, the gradient passing (ablation
  graph_log_std_clamp: a clamp in the graph, no gradient below the floor);
- the actor's padded action dims enter the world model as they are (ablation masked_padded_actions: zeroed).
Upstream trains one task per run; here every task trains in one step, each per-task quantity per task
(per_task_statistics; ablation shared_task_statistics restores one over all tasks): the return statistics,
the actor and critic losses (summed over tasks, so each task's actor and critics get exactly their own gradient)
and the gradient clips (each task's slice of the actor, log-std and critic parameters by its own norm). Shared by
all tasks: the Adam optimisers (elementwise, so per task in effect), the learning-rate schedule, and the world
model with its update.

Other choices, each for a reason:
- The symlog-reward quirk is the default (symlog_reward=true): upstream's differentiable reward is the bins'
  expectation in symlog space, without symexp, so the actor maximises symlog rewards; false: real rewards.
- Pixels with tasks: as tdmpc2 (e_k after the conv trunk). Discrete-action suites are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mowbench.agents.base import Metrics, count_parameters, register_agent
from mowbench.agents.tdmpc_family import FrameContext, TDMPCFamilyAgent, TDMPCFamilyConfig
from mowbench.envs.base import TaskInfo
from mowbench.models.tdmpc import TaskMLP, TDMPCWorldModel
from mowbench.offline import OfflineSpec
from mowbench.ops import lambda_returns, stack_frames, symexp
from mowbench.replay import Batch

# known departures from the paper and the published code (one line each; docs/methods/pwm.md has them
# as a table): recorded in every run's metadata.json and printed in the analysis's notes
DEPARTURES = (
    "online: the world model trains beside the policy (upstream: pretrained offline, then frozen)",
    "a 5M world model at the paper preset (upstream's multi-task results: 48M)",
    "every task in one step, with per-task statistics and clips (upstream: one run per task)",
    "learning rates decay over 150k updates (upstream: over its 10k epochs)",
)


@dataclass
class PWMConfig(TDMPCFamilyConfig):
    """PWM's settings (docs/methods/pwm.md, upstream's pwm_48M.yaml); the world-model fields are TDMPCFamilyConfig's
    with PWM's horizon and rho. The choices after ret_norm_rate follow the published code (the module docstring)."""

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
    lam: float = 0.95  # TD(lambda) of the critic targets with critic_targets=lambda
    critic_epochs: int = 8
    critic_minibatches: int = 4
    actor_lr: float = 5e-4
    critic_lr: float = 5e-4
    lr_end: float = 1e-5  # both learning rates decay linearly to this
    lr_decay_updates: int = 150_000
    actor_grad_clip: float = 1.0
    critic_grad_clip: float = 100.0
    symlog_reward: bool = True  # the authors' quirk: the actor maximises symlog rewards (see the module docstring)
    ret_norm_rate: float = 0.01  # rate of the EMA return variance (return_norm=ema only)
    detach_actor_input: bool = True  # the actor sees z_t detached (ablation attached_actor_input)
    bootstrap: str = "gamma_h1"  # gamma_h1: gamma^(H+1) V(z_H) | gamma_h (ablation bootstrap_gamma_h)
    critic_targets: str = "one_step"  # one_step: r_t + gamma V(z_{t+1}) | lambda (ablation lambda_critic_targets)
    return_norm: str = "running"  # running: count-weighted variance | ema (ablation ema_return_norm)
    critic_loss: str = "mean"  # mean over critics and rows | sum of per-critic MSEs (ablation summed_critic_loss)
    critic_shuffle: bool = False  # reshuffle the critic minibatches each iteration (ablation shuffled_critic_...)
    mlp_order: str = "act_norm"  # act_norm: Linear, Mish, LayerNorm | norm_act (ablation norm_before_mish)
    critic_init: str = "orthogonal"  # orthogonal (gain sqrt 2, biases 0) | uniform (ablation uniform_critic_init)
    log_std_clamp: str = "parameter"  # parameter: clamp the weights in place | graph (ablation graph_log_std_clamp)
    mask_padded_actions: bool = False  # zero the actor's padded action dims (ablation masked_padded_actions)
    per_task_statistics: bool = True  # per task: return stats, losses, clips | shared (ablation shared_task_...)

    def check(self) -> None:
        super().check()
        self.check_positive(("n_critics", "starts_per_task", "imag_horizon", "critic_epochs", "critic_minibatches",
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
        for name, allowed in (("bootstrap", ("gamma_h1", "gamma_h")), ("critic_targets", ("one_step", "lambda")),
                              ("return_norm", ("running", "ema")), ("critic_loss", ("mean", "sum")),
                              ("mlp_order", ("act_norm", "norm_act")), ("critic_init", ("orthogonal", "uniform")),
                              ("log_std_clamp", ("parameter", "graph"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")


def clip_task_grads(params: list[torch.Tensor], max_norm: float, per_task: bool) -> torch.Tensor:
    """Clip the gradients of per-task parameters (each (K, ...), task first) as torch's clip_grad_norm_ does
    (coefficient max_norm / (norm + 1e-6), at most 1), each task's slices by their own norm (per_task: upstream
    trains one task per run) or all by one -> the norms before clipping, (K,) or ()."""
    grads = [p.grad for p in params if p.grad is not None]
    if per_task:
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads]),
                                         dim=0)  # (K,)
    else:
        norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)) if per_task else coef)
    return norms


def orthogonal_init(mlp: TaskMLP, gain: float) -> None:
    """Upstream's critic initialisation: every Linear weight orthogonal with `gain` (per task, on upstream's
    (out, in) layout), every bias 0."""
    with torch.no_grad():
        for weight, bias in zip(mlp.weights, mlp.biases, strict=True):
            for k in range(weight.shape[0]):
                w = torch.empty(weight.shape[2], weight.shape[1])
                torch.nn.init.orthogonal_(w, gain)
                weight[k].copy_(w.t())
            bias.zero_()


@register_agent("pwm-online", PWMConfig, multi_task=True)
class PWMAgent(TDMPCFamilyAgent):
    """PWM (see the module docstring)."""

    cfg: PWMConfig

    def __init__(self, cfg: PWMConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        super().__init__(cfg, tasks, device, precision)
        k, latent, a = len(tasks), cfg.sizes()[2], self.action_dim
        after = cfg.mlp_order == "act_norm"
        self.actor = TaskMLP(k, latent, tuple(cfg.actor_hidden), a, norm_after_act=after).to(device)
        self.log_std = torch.nn.Parameter(torch.full((k, 1, a), cfg.log_std_init, device=device))
        critics = [TaskMLP(k, latent, tuple(cfg.critic_hidden), 1, norm_after_act=after) for _ in range(cfg.n_critics)]
        if cfg.critic_init == "orthogonal":
            for critic in critics:
                orthogonal_init(critic, 2.0 ** 0.5)
        self.critics = torch.nn.ModuleList(critics).to(device)
        self.optim = torch.optim.Adam(self.world_model_groups(list(self.wm.parameters())), lr=cfg.lr)
        betas = (0.7, 0.95)
        self.actor_optim = torch.optim.Adam([*self.actor.parameters(), self.log_std], lr=cfg.actor_lr, betas=betas)
        self.critic_optim = torch.optim.Adam(self.critics.parameters(), lr=cfg.critic_lr, betas=betas)
        # per task: the return statistics (K,) (upstream's RunningMeanStd: mean 0, variance 1, count 1e-4)
        self.ret_mean = torch.zeros(k, device=device)
        self.ret_var = torch.ones(k, device=device)
        self.ret_count = torch.full((k,), 1e-4, dtype=torch.float64, device=device)

    def build_world_model(self, tasks: list[TaskInfo], action_mask: torch.Tensor) -> TDMPCWorldModel:
        return TDMPCWorldModel(**self.world_model_kwargs(tasks, action_mask), n_q=0, policy=False)

    # ---- the maths ----
    def policy(self, z: torch.Tensor, eps: torch.Tensor | None, task: torch.Tensor) -> torch.Tensor:
        """Actions tanh(mu(z) + std * eps): z (K', M, L) with task (K',) (rows grouped by task) or (B, 1, L) with
        task (B,); eps as z with A dims, or None: the mean action tanh(mu). Padded action dims as the actor gives
        them (zeroed with mask_padded_actions)."""
        mu = self.actor(z, task)  # (K' or B, M, A)
        if eps is not None:
            log_std = self.log_std[task]
            if self.cfg.log_std_clamp == "graph":
                log_std = log_std.clamp(min=self.cfg.log_std_min)
            mu = mu + log_std.exp() * eps
        action = torch.tanh(mu)
        return action * self.action_mask[task][:, None].float() if self.cfg.mask_padded_actions else action

    def clamp_log_std(self) -> None:
        """Upstream's floor (ActorStochasticMLP.clamp_std, before every forward): the parameter clamped in place,
        so the gradient of exp(log_std) passes even at the floor."""
        if self.cfg.log_std_clamp == "parameter":
            with torch.no_grad():
                self.log_std.clamp_(min=self.cfg.log_std_min)

    def value(self, z: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """min over the critics: z (K', N, L) with task (K',) -> (K', N)."""
        return torch.stack([c(z, task).squeeze(-1) for c in self.critics]).min(0).values

    def differentiable_reward(self, logits: torch.Tensor) -> torch.Tensor:
        """The reward the actor's gradient flows through: the bins' expectation in symlog space (PWM's quirk) or
        its symexp (real rewards)."""
        r = (torch.softmax(logits.float(), -1) * self.wm.bins).sum(-1)
        return r if self.cfg.symlog_reward else symexp(r)

    def imagine(self, z0: torch.Tensor, tasks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the actors H steps through the world model from z0 (K', M, L) of tasks (K',) -> latents
        (K', M, H+1, L) and rewards (K', M, H), differentiable in the actors' parameters."""
        k, m, latent = z0.shape
        task = tasks.repeat_interleave(m)  # (K'*M,): rows grouped by task
        zs, rewards, z = [z0], [], z0
        for _ in range(self.cfg.imag_horizon):
            a = self.policy(z.detach() if self.cfg.detach_actor_input else z,
                            torch.randn(k, m, self.action_dim, device=self.device), tasks)
            flat_z, flat_a = z.reshape(k * m, latent), a.reshape(k * m, -1)
            rewards.append(self.differentiable_reward(self.wm.reward(flat_z, flat_a, task)).view(k, m))
            z = self.wm.next(flat_z, flat_a, task).view(k, m, latent)
            zs.append(z)
        return torch.stack(zs, 2), torch.stack(rewards, 2)

    # ---- learning ----
    def train_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        self.set_rates()
        return self.world_model_step(sample) | self.policy_step(sample)

    def world_model_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """One optimiser step of the world model: the consistency and reward losses (TD-MPC2's, without Q)."""
        cfg = self.cfg
        u = self.unroll(sample(self.batch_size(), cfg.batch_length))
        terms, _, _ = self.world_model_terms(u)
        loss = cfg.consistency_coef * terms["consistency"] + cfg.reward_coef * terms["reward"]
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm.parameters(), cfg.grad_clip)
        self.optim.step()
        return {f"wm/{k}": v.detach() for k, v in terms.items()} | {"wm/loss": loss.detach(), "wm/grad_norm": grad_norm}

    def start_states(self, sample: Callable[[int, int], Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """starts_per_task replayed states of each task in the batch, encoded -> z0 (K', M, L), rows grouped by
        task, and those tasks (K',): every task in training (the replay is stratified); mowbench.verify's batch
        holds one task's rows, as upstream's one run per task."""
        k, m = len(self.tasks), self.cfg.starts_per_task
        batch = sample(k * m, self.cfg.frames)
        counts = batch.task_counts or tuple(torch.bincount(batch.task, minlength=k).tolist())
        present = [i for i, c in enumerate(counts) if c]
        if len({counts[i] for i in present}) != 1:
            raise ValueError(f"imagination starts per task {counts}; allowed: as many rows of each task present")
        order = torch.argsort(batch.task, stable=True)  # grouped by task (the replay's order already)
        if self.cfg.obs == "state":
            obs = batch.obs[order][:, -1].float()  # (K'*M, D)
        else:
            stacks = stack_frames(batch.obs[order], batch.extras["first"][order], self.cfg.frames)
            obs = stacks[:, -1]  # (K'*M, 3k, S, S)
        with torch.no_grad(), self.autocast():
            z0 = self.wm.encode(obs, batch.task[order]).float().view(len(present), counts[present[0]], -1)
        return z0, torch.tensor(present, device=self.device)

    def policy_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """First-order actor update through the frozen world model, then the critics on the same rollout."""
        cfg = self.cfg
        z0, tasks = self.start_states(sample)
        self.clamp_log_std()
        self.wm.requires_grad_(False)
        with self.autocast():
            zs, rewards = self.imagine(z0, tasks)
        self.wm.requires_grad_(True)
        rewards = rewards.float()
        # upstream's accumulation: sum_t gamma^t r_t, then the bootstrap gamma^(H+1) (or gamma^H) min_k V_k(z_H)
        total, discount = torch.zeros_like(rewards[..., 0]), torch.ones_like(rewards[..., 0])
        for t in range(cfg.imag_horizon):
            total = total + discount * rewards[..., t]
            discount = discount * cfg.gamma
        bootstrap = cfg.gamma * discount if cfg.bootstrap == "gamma_h1" else discount
        loss_per_sample = -total - bootstrap * self.value(zs[:, :, -1].float(), tasks)  # (K', M)
        task_loss = self.normalised_loss(loss_per_sample, tasks)  # (K',)
        actor_loss = task_loss.sum() if cfg.per_task_statistics else task_loss.mean()
        self.actor_optim.zero_grad(set_to_none=True)
        actor_loss.backward()
        actor_norm = clip_task_grads([*self.actor.parameters(), self.log_std], cfg.actor_grad_clip,
                                     cfg.per_task_statistics)
        self.actor_optim.step()
        self.critics.zero_grad(set_to_none=True)  # the actor's backward reached them through the bootstrap
        critic_loss = self.critic_step(zs.detach().float(), rewards.detach(), tasks)
        return {"pi/loss": task_loss.mean().detach(), "pi/return": -loss_per_sample.mean().detach(),
                "pi/grad_norm": actor_norm[tasks].mean() if actor_norm.dim() else actor_norm,
                "critic/loss": critic_loss}

    def normalised_loss(self, loss: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """The actor loss per task (K',) from the per-sample losses (K', M) = -(imagined return), scaled by each
        task's return statistics after merging the batch's (one statistic over all rows and tasks with
        per_task_statistics false): running, upstream's RunningMeanStd (parallel algorithm by count, population
        variance of the batch), loss / sqrt(var + 1e-5); ema, var <- lerp(var, unbiased batch var, ret_norm_rate),
        loss / (sqrt(var) + 1e-6)."""
        cfg = self.cfg
        x = loss.detach()
        groups = x if cfg.per_task_statistics else x.reshape(1, -1)  # (G, N)
        index = tasks if cfg.per_task_statistics else torch.arange(len(self.tasks), device=self.device)
        if cfg.return_norm == "ema":
            var = torch.lerp(self.ret_var[index], groups.var(1).expand(len(index)), cfg.ret_norm_rate)
            self.ret_var[index] = var
            scale = var.sqrt() + 1e-6
        else:
            n = groups.shape[1]
            batch_mean, batch_var = groups.double().mean(1), groups.double().var(1, unbiased=False)  # (G,)
            mean, var, count = self.ret_mean[index].double(), self.ret_var[index].double(), self.ret_count[index]
            delta = batch_mean - mean
            total = count + n
            m2 = var * count + batch_var * n + delta.square() * count * n / total
            self.ret_mean[index] = (mean + delta * n / total).float()
            self.ret_var[index] = (m2 / total).float()
            self.ret_count[index] = total
            scale = (self.ret_var[index] + 1e-5).sqrt()
        scale = scale[:, None] if cfg.per_task_statistics else scale[:1, None]  # (K', 1) or (1, 1)
        return (loss / scale).mean(1) if cfg.per_task_statistics else (loss / scale).mean().view(1)

    def critic_targets(self, zs: torch.Tensor, rewards: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Targets (K', H*M), time-major as upstream's buffers, from the rollout zs (K', M, H+1, L) and rewards
        (K', M, H) by the critics before their update: one_step r_t + gamma min_k V_k(z_{t+1}) or TD(lambda)."""
        cfg = self.cfg
        k, m, h1, latent = zs.shape
        values = self.value(zs.reshape(k, m * h1, latent), tasks).view(k, m, h1)
        if cfg.critic_targets == "one_step":
            targets = rewards + cfg.gamma * values[:, :, 1:]
        else:
            targets = lambda_returns(rewards.reshape(k * m, h1 - 1), values.view(k * m, h1),
                                     torch.ones_like(values.view(k * m, h1)[:, 1:]), cfg.gamma, cfg.lam,
                                     "next").view(k, m, h1 - 1)
        return targets.transpose(1, 2).reshape(k, (h1 - 1) * m)

    def critic_loss(self, x: torch.Tensor, y: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Per task (K',): the squared error of every critic on the states x (K', N, L) to the targets y (K', N),
        its mean over critics and rows (upstream) or the sum over critics of each one's mean."""
        err = (torch.stack([c(x, tasks).squeeze(-1) for c in self.critics]) - y).pow(2)  # (C, K', N)
        return err.mean((0, 2)) if self.cfg.critic_loss == "mean" else err.mean(2).sum(0)

    def critic_step(self, zs: torch.Tensor, rewards: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """critic_epochs x critic_minibatches regression steps on the rollout zs (K', M, H+1, L), rewards
        (K', M, H): each minibatch a fixed slice of the time-major (H*M) states of every task (reshuffled each
        epoch with critic_shuffle) -> the mean loss (upstream's value loss)."""
        cfg = self.cfg
        k, m, h1, latent = zs.shape
        with torch.no_grad():
            targets = self.critic_targets(zs, rewards, tasks)  # (K', H*M)
        states = zs[:, :, :-1].transpose(1, 2).reshape(k, (h1 - 1) * m, latent)  # (K', H*M, L): row t*M + m
        n = states.shape[1]
        size = n // cfg.critic_minibatches
        losses = []
        params = list(self.critics.parameters())
        for _ in range(cfg.critic_epochs):
            order = torch.randperm(n, device=self.device) if cfg.critic_shuffle else torch.arange(n, device=self.device)
            for j in range(cfg.critic_minibatches):
                idx = order[j * size:(j + 1) * size]
                task_loss = self.critic_loss(states[:, idx], targets[:, idx], tasks)  # (K',)
                self.critic_optim.zero_grad(set_to_none=True)
                (task_loss.sum() if cfg.per_task_statistics else task_loss.mean()).backward()
                for p in params:  # upstream's guard against NaN gradients (from its simulator)
                    if p.grad is not None:
                        p.grad.nan_to_num_(0.0, 0.0, 0.0)
                clip_task_grads(params, cfg.critic_grad_clip, cfg.per_task_statistics)
                self.critic_optim.step()
                losses.append(task_loss.detach())
        return torch.stack(losses).mean()

    def set_rates(self) -> None:
        """Both learning rates: linear from their start to lr_end over lr_decay_updates updates."""
        frac = min(self.updates / self.cfg.lr_decay_updates, 1.0)
        for opt, start in ((self.actor_optim, self.cfg.actor_lr), (self.critic_optim, self.cfg.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = start + frac * (self.cfg.lr_end - start)

    # ---- acting ----
    def choose(self, z: torch.Tensor, task: torch.Tensor, contexts: list[FrameContext], greedy: bool) -> torch.Tensor:
        """The task's actor: its mean action (greedy) or a sample."""
        self.clamp_log_std()  # upstream's actor clamps at every forward, acting's too
        eps = None if greedy else self.noise(contexts, (1, self.action_dim))
        return self.policy(z[:, None], eps, task)[:, 0]

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return {"wm": self.wm.state_dict(), "actor": self.actor.state_dict(), "log_std": self.log_std.detach(),
                "critics": self.critics.state_dict(), "optim": self.optim.state_dict(),
                "actor_optim": self.actor_optim.state_dict(), "critic_optim": self.critic_optim.state_dict(),
                "ret_mean": self.ret_mean, "ret_var": self.ret_var, "ret_count": self.ret_count,
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.actor.load_state_dict(state["actor"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.critics.load_state_dict(state["critics"])
        self.optim.load_state_dict(state["optim"])
        self.actor_optim.load_state_dict(state["actor_optim"])
        self.critic_optim.load_state_dict(state["critic_optim"])
        self.ret_mean = state["ret_mean"].to(self.device)
        self.ret_var = state["ret_var"].to(self.device)
        self.ret_count = state["ret_count"].to(self.device)
        self.updates = int(state["updates"])

    def per_task_batch(self) -> dict[str, int]:
        return super().per_task_batch() | {"imagination_starts": self.cfg.starts_per_task}

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts() | {
            "actors": count_parameters(self.actor.parameters()) + self.log_std.numel(),
            "critics": count_parameters(self.critics.parameters())}
        return counts | {"total": sum(counts.values())}


# ---- PWM's published recipe: a world model pretrained offline, then frozen while the policies are extracted ----

# known departures of `pwm` (the offline recipe) from the paper and the published code
OFFLINE_DEPARTURES = (
    "offline data from Meta-World's scripted experts (successful or not), the same with Gaussian action noise, and "
    "random actions (upstream: TD-MPC2's datasets, 345M-550M transitions of its training runs)",
    "pretraining scaled to the data: 20k world-model updates at the paper preset (upstream: 10M)",
    "the world model pretrained with the consistency and reward losses only (upstream: TD-MPC2's full loss, its Q "
    "heads and policy then dropped)",
    "a 5M world model at the paper preset (upstream's multi-task results: 48M)",
    "every task's actor and critics in one step, with per-task statistics and clips (upstream: one run per task)",
)


@dataclass
class PWMOfflineConfig(PWMConfig):
    """`pwm`: PWM's published multi-task recipe (docs/methods/pwm.md). Per task an offline dataset of `offline_demos`
    scripted-expert episodes (successful or not), `offline_noisy` of the expert with N(0, offline_noise_std^2)
    action noise and `offline_random` of uniform actions; `wm_pretrain_updates` world-model updates on all of it;
    then `policy_updates` updates of every task's actor and critics from its states with the world model frozen
    (finetune_wm false, upstream's setting) and no env step; the learning rates decay over those updates (upstream:
    over its 10k epochs)."""

    offline_demos: int = 20
    offline_noisy: int = 20
    offline_noise_std: float = 0.3
    offline_random: int = 20
    # upstream pretrains 10M updates on 345M+ transitions; 20k passes over 60 x 50 x 100 = 300k MT50 steps at batch
    # 256 ~17 times
    wm_pretrain_updates: int = 20_000
    policy_updates: int = 10_000  # upstream's epochs per task (max_epochs), here every task's in each update
    lr_decay_updates: int = 10_000
    finetune_wm: bool = False  # upstream: False, the world model stays as pretrained
    seed_updates: int = 0  # no burst: each policy update is one of upstream's epochs

    def check(self) -> None:
        super().check()
        self.check_positive(("wm_pretrain_updates", "policy_updates"))
        if self.offline_demos + self.offline_noisy + self.offline_random < 1:
            raise ValueError("offline_demos + offline_noisy + offline_random = 0; allowed: at least one episode")
        if self.offline_noise_std < 0:
            raise ValueError(f"offline_noise_std={self.offline_noise_std}; allowed: >= 0")


@register_agent("pwm", PWMOfflineConfig, multi_task=True)
class PWMOfflineAgent(PWMAgent):
    """PWM's published recipe (PWMOfflineConfig): pretraining (Agent.pretrain: the world model's step) on the offline
    data, then policy extraction (update: PWMAgent's actor and critic step, the world model's step only with
    finetune_wm) on it, with no env interaction."""

    cfg: PWMOfflineConfig
    DEPARTURES = OFFLINE_DEPARTURES

    def __init__(self, cfg: PWMOfflineConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        super().__init__(cfg, tasks, device, precision)
        self.pretrained = 0

    def offline_data(self) -> OfflineSpec:
        cfg = self.cfg
        return OfflineSpec(demos=cfg.offline_demos, noisy=cfg.offline_noisy, noise_std=cfg.offline_noise_std,
                           random=cfg.offline_random, success_only=False, pretrain_updates=cfg.wm_pretrain_updates,
                           online=False, updates=cfg.policy_updates)

    def pretrain(self, sample: Callable[[int, int], Batch]) -> Metrics:
        self.set_train(True)
        try:
            metrics = self.world_model_step(sample)
        finally:
            self.set_train(False)
        self.pretrained += 1
        return metrics

    def train_step(self, sample: Callable[[int, int], Batch]) -> Metrics:
        if self.cfg.finetune_wm:
            return super().train_step(sample)
        self.set_rates()
        return self.policy_step(sample)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"pretrained": self.pretrained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pretrained = int(state["pretrained"])


# ---- the published code's weights and numbers (python -m mowbench.verify agent=pwm-online; docs/verify.md) ----

# the upstream protocol: Meta-World's suite, PWM's published settings (the paper preset's dataclass defaults)
VERIFY_DEFAULTS = ("env=metaworld", "preset=paper")
VERIFY_REFERENCE = "pwm"  # mowbench/data/reference/pwm: recorded from PWM's published code

# Upstream (imgeorgiev/PWM: models/world_model.py's WorldModel after PWM.load_wm) world-model parameter names ->
# ours, the first matching rule applies ("{last}": the encoder's last layer, len(encoder_units)). Its MLPs are
# NormedLinear layers (Linear with a LayerNorm `ln`), ours [Linear, LayerNorm, Mish] per hidden layer in `hidden`
# and the output Linear `last` (its LayerNorm before SimNorm in `last_norm`; the reward's output is a plain
# Linear). Upstream's dynamics and reward take [z, e, a] (task vector before the action), ours [z, a, e]: their
# first layers' input columns are reordered (from_upstream). The encoder takes [state, e] in both.
UPSTREAM_NAMES: tuple[tuple[str, str], ...] = (
    (r"_task_emb\.weight", r"task_embedding.table.weight"),
    (r"_encoder\.{last}\.ln\.(weight|bias)", r"trunk.last_norm.\1"),
    (r"_encoder\.{last}\.(weight|bias)", r"trunk.last.\1"),
    (r"_encoder\.(\d+)\.ln\.(weight|bias)", r"trunk.hidden.{3*\1+1}.\2"),
    (r"_encoder\.(\d+)\.(weight|bias)", r"trunk.hidden.{3*\1}.\2"),
    (r"_(dynamics|reward)\.2\.ln\.(weight|bias)", r"\1.last_norm.\2"),
    (r"_(dynamics|reward)\.2\.(weight|bias)", r"\1.last.\2"),
    (r"_(dynamics|reward)\.(\d+)\.ln\.(weight|bias)", r"\1.hidden.{3*\2+1}.\3"),
    (r"_(dynamics|reward)\.(\d+)\.(weight|bias)", r"\1.hidden.{3*\2}.\3"),
)
UPSTREAM_MODULES = {"dynamics": "dynamics", "reward": "reward_head"}
# upstream's world-model modules, by which the reference sums its weights -> our prefixes
OUR_GROUPS = {"_task_emb": "task_embedding.", "_encoder": "trunk.", "_dynamics": "dynamics.",
              "_reward": "reward_head."}
# why each tolerance (mowbench.verify prints those a table uses)
TOLERANCES = {
    "fp32": "rtol 1e-5: fp32 rounding where our kernels add in another order (the actors and critics as one "
            "batched matmul per layer for every task, LayerNorm's affine written out, the world model's inputs "
            "[z, a, e] where upstream's are [z, e, a], the per-task clip norm, Adam) or in another precision (the "
            "return statistics merged in float64, upstream's in float32); measured <= 1.7e-6 (the return variance "
            "of update 2), the imagined latents, actions, rewards and critic targets <= 1.6e-6, the losses <= "
            "7.1e-7, the gradients and their norms <= 9e-7, the final actions 3.8e-7, and no larger after 3 updates "
            "than after 1",
    "init": "0.1 of upstream's std: our freshly initialised weights are other random draws from the same "
            "distribution, compared by the std of all Linear weights of a task's actor (1,700 values; measured "
            "7.6e-3) or critics (4,700, orthogonal: measured 2.2e-5); nn.Linear's uniform for the critics is 0.59 "
            "below upstream's orthogonal gain sqrt(2)",
    "exact": "equal or not: parameter counts, initial critic biases (0), the learning rates (the same linear "
             "schedule in Python floats), the return statistics' sample counts (float64)",
}
RTOL = 1e-5


def upstream_rules(encoder_layers: int) -> tuple[tuple[str, str], ...]:
    """UPSTREAM_NAMES for an encoder of `encoder_layers` hidden NormedLinear layers (upstream's encoder_units)."""
    return tuple((pattern.replace("{last}", str(encoder_layers)), template) for pattern, template in UPSTREAM_NAMES)


def actor_names(hidden: int) -> dict[str, str]:
    """Upstream's ActorStochasticMLP parameter names -> ours for `hidden` hidden layers: mu_net is [Linear, Mish,
    LayerNorm] per hidden layer, then Linear (and Identity): Linear i at mu_net.{3i}, LayerNorm i at
    mu_net.{3i+2}; logstd (A,) is our log_std[task] (1, A)."""
    names = {"logstd": "log_std"}
    for i in range(hidden + 1):
        names |= {f"mu_net.{3 * i}.weight": f"weights.{i}", f"mu_net.{3 * i}.bias": f"biases.{i}"}
        if i < hidden:
            names |= {f"mu_net.{3 * i + 2}.weight": f"norms_w.{i}", f"mu_net.{3 * i + 2}.bias": f"norms_b.{i}"}
    return names


def critic_names(param_names: list[str], hidden: int) -> dict[str, str]:
    """Upstream's vmapped critic Ensemble `params.j` (each (n_critics, ...), in CriticMLP's parameter order
    `param_names`: critic.{3i} Linear, critic.{3i+2} LayerNorm) -> our per-critic TaskMLP names."""
    layer = {f"critic.{3 * i}.weight": f"weights.{i}" for i in range(hidden + 1)}
    layer |= {f"critic.{3 * i}.bias": f"biases.{i}" for i in range(hidden + 1)}
    layer |= {f"critic.{3 * i + 2}.weight": f"norms_w.{i}" for i in range(hidden)}
    layer |= {f"critic.{3 * i + 2}.bias": f"norms_b.{i}" for i in range(hidden)}
    return {f"params.{j}": layer[name] for j, name in enumerate(param_names)}


def from_upstream(state: dict[str, torch.Tensor], sizes: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An upstream WorldModel state_dict under our names and layouts (UPSTREAM_NAMES)."""
    from mowbench.baselines.tdmpc2 import upstream_name

    rules = upstream_rules(len(sizes["encoder_units"]))
    latent, e, a = sizes["latent_dim"], sizes["task_dim"], sizes["action_dim"]
    columns = torch.cat([torch.arange(latent), torch.arange(latent + e, latent + e + a),
                         torch.arange(latent, latent + e)])  # ours [z, a, e] <- upstream's [z, e, a]
    out = {}
    for name, value in state.items():
        if name in ("_dynamics.0.weight", "_reward.0.weight"):
            value = value[:, columns]
        out[upstream_name(name, rules, UPSTREAM_MODULES)] = value
    return out


def to_ours(value: torch.Tensor, name: str) -> torch.Tensor:
    """One task's slice of a TaskMLP parameter from upstream's layout: Linear weights (out, in) -> (in, out),
    biases and LayerNorm parameters (width,) -> (1, width)."""
    return value.t() if name.startswith("weights.") else value[None]


def reference_config(reference: dict[str, Any], agent_values: dict[str, Any]) -> PWMConfig:
    """Our config for the reference run: the composed values (behaviour) with the reference's sizes on top (state
    observations through upstream's state encoder; the LR schedule over the reference's epochs)."""
    s = reference["sizes"]
    sizes = {"model_size": "custom", "obs": "state", "state_dim": s["obs_dim"], "enc_dim": s["encoder_units"][0],
             "enc_layers": len(s["encoder_units"]) + 1, "latent_dim": s["latent_dim"], "mlp_dim": s["units"][0],
             "task_dim": s["task_dim"], "simnorm_group": s["simnorm_dim"], "frames": 1, "bins": s["num_bins"],
             "vmin": s["vmin"], "vmax": s["vmax"], "actor_hidden": list(s["actor_units"]),
             "critic_hidden": list(s["critic_units"]), "n_critics": s["num_critics"], "starts_per_task": s["batch"],
             "imag_horizon": s["horizon"], "critic_epochs": s["critic_iterations"],
             "critic_minibatches": s["critic_batches"], "lr_decay_updates": s["max_epochs"]}
    from dataclasses import fields

    from mowbench.agents.base import build_config, get_agent

    shared = {f.name for f in fields(PWMConfig)}  # `pwm`'s offline fields do not apply to the replayed steps
    return build_config(get_agent("pwm-online"), {**{k: v for k, v in agent_values.items() if k in shared}, **sizes})


def verify_reference(reference: dict[str, Any], agent_values: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """mowbench.verify's hook: upstream's multi-task flow (one run trains one task's actor and critics on a frozen,
    given world model) replayed through our PWM -> (rows, reasons). Our agent holds the reference's three tasks
    (their action dims padded to the largest) and the world model's task table for all three; the batches hold the
    trained task's rows only, so our step trains that task's slices of the per-task actors and critics (the
    others get zero gradients, and Adam leaves them). Our world-model step (upstream's offline pretraining, not
    built) is not run: the policy step is, on upstream's "pretrained" weights. The `finetune` entries
    (finetune_wm=True, off in upstream's configs) are not replayed: upstream's finetune loss (gamma^t-weighted
    latent MSE plus the MSE of each reward logit to the raw reward, over H) is not ours (TD-MPC2's)."""
    from mowbench.envs.base import ActionSpace
    from mowbench.verify import Row, draws_from, exact_row, recording, scalar_row, tensor_row

    s = reference["sizes"]
    cfg = reference_config(reference, agent_values)
    tasks = [TaskInfo("metaworld", name, k, 64, ActionSpace(False, n))
             for k, (name, n) in enumerate(zip(s["tasks"], s["action_dims"], strict=True))]
    torch.manual_seed(0)  # our initialisation, compared by its distribution
    agent = PWMAgent(cfg, tasks, torch.device("cpu"), "fp32")
    wm, task_id = agent.wm, int(s["task_id"])
    init = reference["init"]
    rows: list[Row] = []
    up_actor, up_critic = init["actor"], init["critic"]
    rows += [
        scalar_row("world model parameters", sum(v.numel() for v in init["wm"].values()),
                   count_parameters(wm.parameters()), 0.0, "exact"),
        scalar_row("actor parameters (one task)", sum(v.numel() for v in up_actor.values()),
                   (count_parameters(agent.actor.parameters()) + agent.log_std.numel()) // len(tasks), 0.0, "exact"),
        scalar_row("critic parameters (one task)", sum(v.numel() for v in up_critic.values()),
                   count_parameters(agent.critics.parameters()) // len(tasks), 0.0, "exact"),
    ]
    actor_map = actor_names(len(s["actor_units"]))
    critic_map = critic_names(list(reference["critic_param_names"]), len(s["critic_units"]))

    def linear_std(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([v.double().flatten() for v in values]).std()

    ours_actor = dict(agent.actor.named_parameters())
    ours_critics = [dict(c.named_parameters()) for c in agent.critics]
    rows += [
        scalar_row("initial actor Linear weights std",
                   linear_std([v for k, v in up_actor.items() if actor_map[k].startswith("weights.")]),
                   linear_std([ours_actor[n][task_id] for n in actor_map.values() if n.startswith("weights.")]),
                   0.1, "init"),
        scalar_row("initial critic Linear weights std",
                   linear_std([v for k, v in up_critic.items() if critic_map[k].startswith("weights.")]),
                   linear_std([c[n][task_id] for c in ours_critics for n in critic_map.values()
                               if n.startswith("weights.")]), 0.1, "init"),
        scalar_row("initial critic biases, largest |b|", 0.0,
                   max(float(c[n].detach().abs().max()) for c in ours_critics for n in critic_map.values()
                       if n.startswith("biases.")), 0.0, "exact"),
    ]
    try:
        wm.load_state_dict({**dict(wm.named_buffers()), **from_upstream(init["wm"], s)})  # ours: bins, action mask
    except (RuntimeError, KeyError) as err:
        rows.append(Row(f"upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                        float("nan"), float("inf"), 0.0, "exact"))
        return rows, TOLERANCES
    with torch.no_grad():  # the trained task's slices of our per-task actor and critics
        for name, value in up_actor.items():
            target = agent.log_std if name == "logstd" else ours_actor[actor_map[name]]
            target[task_id].copy_(value[None] if name == "logstd" else to_ours(value, actor_map[name]))
        for name, value in up_critic.items():
            for c, ours in enumerate(ours_critics):
                ours[critic_map[name]][task_id].copy_(to_ours(value[c], critic_map[name]))
    wm_init = {k: v.detach().clone() for k, v in wm.named_parameters()}
    actor_init = {**{n: ours_actor[n][task_id].detach().clone() for n in actor_map.values() if n != "log_std"},
                  "log_std": agent.log_std[task_id].detach().clone()}
    critic_init = [{n: c[n][task_id].detach().clone() for n in critic_map.values()} for c in ours_critics]

    def sums(now: list[torch.Tensor], then: list[torch.Tensor]) -> tuple[float, float]:
        """Sum of squares of the weights and of their change."""
        flat = torch.cat([v.detach().double().flatten() for v in now])
        change = torch.cat([(v.detach().double() - w.double()).flatten() for v, w in zip(now, then, strict=True)])
        return float(flat.pow(2).sum()), float(change.pow(2).sum())

    def checksums() -> dict[str, tuple[float, float]]:
        """Per upstream module (the trained task's slices of ours): sum of squares of weights and change."""
        names = [n for n in actor_map.values() if n != "log_std"]
        out = {"actor.mu_net": sums([ours_actor[n][task_id] for n in names], [actor_init[n] for n in names]),
               "actor.logstd": sums([agent.log_std[task_id]], [actor_init["log_std"]]),
               "critic": sums([c[n][task_id] for c in ours_critics for n in critic_map.values()],
                              [ci[n] for ci in critic_init for n in critic_map.values()])}
        named = dict(wm.named_parameters())
        for group, prefix in OUR_GROUPS.items():
            keys = [n for n in named if n.startswith(prefix)]
            out["wm." + group] = sums([named[n] for n in keys], [wm_init[n] for n in keys])
        return out

    module = sys.modules[__name__]
    clip = module.clip_task_grads
    grads: list[dict[str, torch.Tensor]] = []

    def recorded_clip(params: list[torch.Tensor], max_norm: float, per_task: bool) -> torch.Tensor:
        """Our clip, after keeping the trained task's gradients before clipping (the actor's under upstream's
        names, the critics' per critic)."""
        if params[-1] is agent.log_std:
            grads.append({up: (agent.log_std.grad[task_id, 0] if ours == "log_std" else
                               ours_actor[ours].grad[task_id].t() if ours.startswith("weights.")
                               else ours_actor[ours].grad[task_id, 0]).clone()
                          for up, ours in actor_map.items()})
        else:
            grads.append({f"critic {c}": torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad[task_id]) for p in critic.parameters()]))
                for c, critic in enumerate(agent.critics)})
        return clip(params, max_norm, per_task)

    losses_in: list[torch.Tensor] = []
    normalise = agent.normalised_loss

    def recorded_loss(loss: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        """Our normalised_loss, after keeping its input (the per-sample actor loss (K', M))."""
        losses_in.append(loss.detach().clone())
        return normalise(loss, tasks)

    batch_task = torch.full((s["batch"],), task_id)
    counts = tuple(s["batch"] if k == task_id else 0 for k in range(len(tasks)))
    h = s["horizon"]
    for k, upd in enumerate(reference["updates"]):
        tag = f"update {k + 1}"
        agent.updates = int(upd["epoch"])  # upstream's update_lrs(epoch) before the update
        agent.set_rates()
        lrs = (agent.actor_optim.param_groups[0]["lr"], agent.critic_optim.param_groups[0]["lr"])
        before = (agent.log_std[task_id, 0].detach().clone(), agent.ret_mean[task_id].clone(),
                  agent.ret_var[task_id].clone(), agent.ret_count[task_id].clone())
        obs = reference["batches"][k]["obs"][0]  # (B, D): the rollouts start from obs[0] only
        b = s["batch"]
        batch = Batch(obs[:, None].contiguous(), torch.zeros(b, 1, s["action_dim"]), torch.zeros(b, 1),
                      torch.zeros(b, 1), batch_task, torch.ones(b, s["action_dim"], dtype=torch.bool),
                      extras={"first": torch.zeros(b, 1)}, task_counts=counts)
        grads.clear()
        module.clip_task_grads = recorded_clip
        try:
            with draws_from(torch, {"randn": [eps[None] for eps in upd["actor_eps"]]}), \
                    recording(agent, "imagine") as rollouts, recording(agent, "policy") as actions, \
                    recording(agent, "critic_targets") as targets, \
                    recording(agent, "critic_loss") as critic_losses, recording(module, "clip_task_grads") as norms:
                losses_in.clear()
                agent.normalised_loss = recorded_loss  # type: ignore[method-assign]
                metrics = agent.policy_step(lambda n, length, batch=batch: batch)
        except (RuntimeError, IndexError, ValueError) as err:  # ours drew otherwise (another override)
            rows.append(Row(f"{tag}: upstream's draws replayed ({str(err).splitlines()[0][:80]})", float("nan"),
                            float("nan"), float("inf"), 0.0, "exact"))
            return rows, TOLERANCES
        finally:
            module.clip_task_grads = clip
            agent.__dict__.pop("normalised_loss", None)
        ret = upd["ret_rms"]

        def task_norm(norm: torch.Tensor) -> torch.Tensor:
            return norm[task_id] if norm.dim() else norm

        zs, _ = rollouts[0]
        rows += [
            scalar_row(f"{tag}: actor learning rate", upd["lrs"][0], lrs[0], 0.0, "exact"),
            scalar_row(f"{tag}: critic learning rate", upd["lrs"][1], lrs[1], 0.0, "exact"),
            tensor_row(f"{tag}: log-std before the update", upd["logstd_before"], before[0], RTOL, "fp32"),
            tensor_row(f"{tag}: imagined latents z_0..z_H", upd["z"], zs[0].detach().transpose(0, 1), RTOL, "fp32"),
            tensor_row(f"{tag}: imagined actions", upd["action"], torch.cat([a.detach() for a in actions]), RTOL,
                       "fp32"),
            tensor_row(f"{tag}: imagined rewards (symlog)", upd["reward"], rollouts[0][1][0].detach().t(), RTOL,
                       "fp32"),
            tensor_row(f"{tag}: critic targets", upd["target_values"], targets[0][0].view(h, -1), RTOL, "fp32"),
            tensor_row(f"{tag}: actor loss per sample", ret["loss_per_sample"], losses_in[0][0], RTOL, "fp32"),
            scalar_row(f"{tag}: return mean before", ret["mean_before"], before[1], RTOL, "fp32"),
            scalar_row(f"{tag}: return variance before", ret["var_before"], before[2], RTOL, "fp32"),
            scalar_row(f"{tag}: return count before", ret["count_before"], before[3], 0.0, "exact"),
            scalar_row(f"{tag}: return mean after", ret["mean_after"], agent.ret_mean[task_id], RTOL, "fp32"),
            scalar_row(f"{tag}: return variance after", ret["var_after"], agent.ret_var[task_id], RTOL, "fp32"),
            scalar_row(f"{tag}: return count after", ret["count_after"], agent.ret_count[task_id], 0.0, "exact"),
            scalar_row(f"{tag}: actor loss", upd["actor_loss"], metrics["pi/loss"], RTOL, "fp32"),
            scalar_row(f"{tag}: actor grad norm before clipping", upd["actor_grad_norm"], task_norm(norms[0]), RTOL,
                       "fp32"),
            tensor_row(f"{tag}: actor grad norm per parameter", torch.stack(list(upd["actor_grad_norms"].values())),
                       torch.stack([torch.linalg.vector_norm(grads[0][n]) for n in upd["actor_grad_norms"]]), RTOL,
                       "fp32"),
            tensor_row(f"{tag}: actor gradients before clipping",
                       torch.cat([upd["actor_grads"][n].flatten() for n in upd["actor_grads"]]),
                       torch.cat([grads[0][n].flatten() for n in upd["actor_grads"]]), RTOL, "fp32"),
            tensor_row(f"{tag}: critic losses per minibatch step", upd["critic_losses"],
                       torch.stack([x.detach()[0] for x in critic_losses]), RTOL, "fp32"),
            tensor_row(f"{tag}: critic grad norms before clipping", upd["critic_grad_norm"],
                       torch.stack([task_norm(x) for x in norms[1:]]), RTOL, "fp32"),
            tensor_row(f"{tag}: critic grad norms per critic", upd["critic_grad_norm_per_critic"],
                       torch.stack([torch.stack(list(g.values())) for g in grads[1:]]), RTOL, "fp32"),
            scalar_row(f"{tag}: value loss", upd["value_loss"], metrics["critic/loss"], RTOL, "fp32"),
            tensor_row(f"{tag}: task vector after (max_norm renorm)", upd["task_emb_after"],
                       wm.task_embedding.table.weight[task_id].detach(), RTOL, "fp32"),
        ]
        ours = checksums()
        for group in upd["checksums"]:
            if group.endswith("/change"):
                continue
            rows.append(scalar_row(f"{tag}: {group} weights sum of squares", upd["checksums"][group][1],
                                   ours[group][0], RTOL, "fp32"))
        for group in upd["checksums"] if k == len(reference["updates"]) - 1 else ():
            if group.endswith("/change") and float(upd["checksums"][group][1]) > 0:  # the frozen modules: 0
                rows.append(scalar_row(f"{tag}: {group[:-7]} change sum of squares", upd["checksums"][group][1],
                                       ours[group[:-7]][1], RTOL, "fp32"))
    final = reference["ret_rms_final"]
    rows += [
        scalar_row("return variance after the updates", final["var"], agent.ret_var[task_id], RTOL, "fp32"),
        scalar_row("return count after the updates", final["count"], agent.ret_count[task_id], 0.0, "exact"),
    ]
    obs = reference["act_obs"]  # (2, D): PWM.act(obs, t0=True, deterministic=True, task)
    task = torch.full((obs.shape[0],), task_id)
    with torch.inference_mode():
        z = wm.encode(obs, task)
        act = agent.choose(z, task, [agent.new_context(task_id) for _ in range(obs.shape[0])], True)
    rows.append(tensor_row("act: mean action (all padded dims)", reference["act"], act, RTOL, "fp32"))
    frozen = [g for g in ("wm._encoder", "wm._dynamics", "wm._reward")
              if float(reference["updates"][-1]["checksums"][g + "/change"][1]) == 0.0]
    ours = checksums()
    rows += [exact_row(f"{g} unchanged (frozen)", torch.zeros(()), torch.tensor(ours[g][1] != 0.0), "exact")
             for g in frozen]
    return rows, TOLERANCES
