"""TD-MPC2 (Hansen, Su and Wang, ICLR 2024, arXiv 2310.16828) from pixels, online, single- or multi-task: the
world model of mowbench.models.tdmpc (SimNorm latents, 101-bin reward and 5-head Q ensemble, policy prior),
trained by latent consistency, reward and TD value losses over an H = 3 unroll; the policy prior by maximising
scaled Q plus entropy; acting by MPPI with policy-prior trajectories. Documented in docs/methods/tdmpc2.md.

Deviations from upstream, each for a reason:
- Multi-task TD-MPC2 upstream trains offline on released datasets; here it trains online from the per-task
  replays (the runs of this harness), with every task in every batch (batch_multi_task rows, even per task).
- Pixels with tasks: e_k joins after the conv trunk (upstream concatenates it to raw states; docs/methods/tdmpc2.md,
  departures).
- A replayed sequence may cross an episode end (our replay is a ring per task); transitions past the end of the
  episode of the unroll's first step are masked out of every loss (the `first` flags the trainer stores).
- Evaluation follows the suite protocol like every agent: `greedy` (train.eval_greedy=true) is upstream's
  evaluation (the chosen elite's first action, no exploration noise); the MT50 protocol's sampled evaluation
  adds the plan's std as noise, as TD-MPC2 does while training.
- Modes as upstream: the model is in eval mode while planning and train mode only inside an update
  (TDMPCFamilyAgent.step), and the target Qs are always in eval mode (TDMPCWorldModel.train), so Q dropout acts on the
  predicted Qs and the policy's Q only (an earlier version also dropped out in the TD targets).
- Acting encodes the frames unshifted; upstream's encoder applies its random shift while planning too (its ShiftAug
  ignores the mode), so its acting latents are randomised (kept: not compared by mowbench.verify).
- Checked against the published code by `python -m mowbench.verify agent=tdmpc2` (docs/verify.md): the defaults
  follow it (entropy, scale S, the dynamics' output LayerNorm, the initialisation); ablations squashed_entropy,
  unclamped_scale, no_dynamics_norm and torch_init restore what this file did before.
- `paper` = 5M: TD-MPC2's default size and the size of its single-task Meta-World runs; its 48M-317M multi-task
  models were trained offline on 545M transitions, far beyond an online 300k-steps-per-task budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mowbench.agents.base import Metrics, count_parameters, register_agent
from mowbench.agents.tdmpc_family import FrameContext, TDMPCFamilyAgent, TDMPCFamilyConfig, Unroll
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.models.tdmpc import TDMPCWorldModel, pair_values
from mowbench.ops import mppi_elites, mppi_moments, rho_weights, sample_categorical, symlog_twohot_ce, tdmpc_discount
from mowbench.replay import Batch

# known departures from the paper and the published code (one line each; docs/methods/tdmpc2.md has them
# as a table): recorded in every run's metadata.json and printed in the analysis's notes
DEPARTURES = (
    "multi-task training online from per-task replays (upstream: offline on released datasets)",
    "the task vector joins after the conv trunk (upstream concatenates it to states)",
    "seed_updates 1000 at the first update (upstream: as many updates as seeding steps)",
    "acting frames unshifted (upstream's random shift applies while planning too)",
)


@dataclass
class TDMPC2Config(TDMPCFamilyConfig):
    """TD-MPC2's hyperparameters (docs/methods/tdmpc2.md); the world-model fields are TDMPCFamilyConfig's."""

    n_q: int = 5  # Q ensemble heads
    q_dropout: float = 0.01  # dropout in the Q heads' first layer
    value_coef: float = 0.1  # value cross-entropy weight (over all heads)
    tau: float = 0.01  # Polyak rate of the target Q heads
    entropy_coef: float = 1e-4  # policy entropy bonus weight
    # scaled_gaussian: upstream's entropy, -log-prob x (valid dims x Gaussian log-prob before the squash) / log-prob
    # (~ -dims x the Gaussian log-prob) | squashed: -log-prob after the squash, unscaled (ablation squashed_entropy)
    entropy: str = "scaled_gaussian"
    pi_lr: float = 3e-4  # policy Adam learning rate (eps 1e-5)
    scale_tau: float = 0.01  # rate of the running 5-95 percentile range S of Q in the policy loss
    # range: upstream's S, the running average of max(range, 1) | value: of the raw range, used as max(S, 1)
    # (ablation unclamped_scale)
    scale_clamp: str = "range"
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
        self.check_positive(("n_q", "iterations", "num_samples", "num_elites", "min_std", "max_std", "temperature",
                              "pi_lr"))
        self.check_non_negative(("num_pi_trajs", "value_coef", "entropy_coef"))
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
        if self.entropy not in ("scaled_gaussian", "squashed"):
            raise ValueError(f"entropy={self.entropy!r}; allowed: scaled_gaussian, squashed")
        if self.scale_clamp not in ("range", "value"):
            raise ValueError(f"scale_clamp={self.scale_clamp!r}; allowed: range, value")
        if not 0.0 <= self.discount < 1.0:
            raise ValueError(f"discount={self.discount}; allowed: 0 (per task) or 0 < discount < 1")


class RunningScale:
    """TD-MPC2's policy-loss scale S: a running (rate tau) 5-95 percentile range of Q, each range clamped to >= 1
    before the average as upstream (clamp "range"; S stays >= 1), or the raw ranges averaged and S used as
    max(S, 1) (clamp "value", ablation unclamped_scale)."""

    def __init__(self, tau: float, device: torch.device, clamp: str = "range") -> None:
        self.tau, self.value, self.clamp = tau, torch.ones((), device=device), clamp

    def update(self, x: torch.Tensor) -> None:
        q = torch.quantile(x.detach().float().flatten(), torch.tensor([0.05, 0.95], device=x.device))
        spread = q[1] - q[0]
        self.value = torch.lerp(self.value, spread.clamp(min=1.0) if self.clamp == "range" else spread, self.tau)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.value.clamp(min=1.0)


@register_agent("tdmpc2", TDMPC2Config, multi_task=True)
class TDMPC2Agent(TDMPCFamilyAgent):
    """TD-MPC2 (see the module docstring); Newt (baselines/newt.py) is this agent with other settings."""

    cfg: TDMPC2Config

    def __init__(self, cfg: TDMPC2Config, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        super().__init__(cfg, tasks, device, precision)
        wm = self.wm
        self.discount = torch.tensor([self.task_discount(t) for t in tasks], device=device)  # (K,)
        self.wm_params = [p for n, p in wm.named_parameters() if not n.startswith(("policy.", "target_qs."))]
        self.optim = torch.optim.Adam(self.world_model_groups(self.wm_params), lr=cfg.lr)
        self.pi_optim = torch.optim.Adam(wm.policy.parameters(), lr=cfg.pi_lr, eps=1e-5)
        self.scale = RunningScale(cfg.scale_tau, device, cfg.scale_clamp)
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
        """The world model's step, the policy's on its latents, then the target Qs' Polyak step (upstream's order;
        Newt's differs)."""
        u = self.unroll(sample(self.batch_size(), self.cfg.batch_length))
        metrics, zs = self.model_step(u)
        metrics |= self.policy_step(zs.detach(), u.task)
        self.wm.update_targets(self.cfg.tau)
        return metrics

    def model_step(self, u: Unroll) -> tuple[Metrics, torch.Tensor]:
        """One optimiser step of the world model (consistency, reward and TD value losses; the policy is not
        trained here) -> its metrics and the unrolled latents zs (B, H+1, L), still attached to the graph."""
        cfg, wm = self.cfg, self.wm
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
        extra = self.model_extra_terms(u, zs)  # name -> (weighted term, its coefficient); Newt's pretraining prior
        for name, (term, coef) in extra.items():
            terms[name] = term
            loss = loss + coef * term
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm_params, cfg.grad_clip)
        self.optim.step()
        metrics = {f"wm/{k}": v.detach() for k, v in terms.items()}
        return metrics | {"wm/loss": loss.detach(), "wm/grad_norm": grad_norm}, zs

    def model_extra_terms(self, u: Unroll, zs: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
        """Terms a method adds to the world model's loss (name -> (term, coefficient)), zs (B, H+1, L) attached to
        the graph. TD-MPC2: none."""
        return {}

    def policy_step(self, zs: torch.Tensor, task: torch.Tensor) -> Metrics:
        """Maximise Q_avg / S + entropy_coef * entropy on detached latents zs (B, H+1, L), rho-weighted over t."""
        cfg, wm = self.cfg, self.wm
        wm.qs.requires_grad_(False)
        eps = torch.randn(*zs.shape[:2], self.action_dim, device=self.device)
        with self.autocast():
            action, log_prob, _, log_std = wm.pi(zs, task, eps)
            q = pair_values(wm.value(wm.Q(zs, action, task)), torch.randperm(cfg.n_q)[:2], "avg")  # (B, H+1)
        wm.qs.requires_grad_(True)
        self.scale.update(q[:, 0])
        entropy = self.policy_entropy(log_prob.float(), log_std.float(), eps, task)  # (B, H+1)
        objective = cfg.entropy_coef * entropy + self.scale(q.float())  # (B, H+1)
        loss = -(objective * self.pi_rho).sum(1).mean()
        self.pi_optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(wm.policy.parameters(), cfg.grad_clip)
        self.pi_optim.step()
        return {"pi/loss": loss.detach(), "pi/entropy": (-log_prob).mean().detach(),
                "pi/scaled_entropy": entropy.mean().detach(), "pi/scale": self.scale.value, "pi/grad_norm": grad_norm}

    def policy_entropy(self, log_prob: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor, task: torch.Tensor
                       ) -> torch.Tensor:
        """The entropy term of the policy loss (B, T) from the squashed log-prob (B, T), the log-std and noise
        (B, T, A). "scaled_gaussian", upstream's (WorldModel.pi's scaled_entropy): -log_prob x s / (log_prob +
        1e-8) with s the Gaussian log-prob before the squash times the task's number of action dims, which is
        -s up to the 1e-8 (gradients through both parts, as upstream); "squashed": -log_prob."""
        if self.cfg.entropy == "squashed":
            return -log_prob
        mask = self.action_mask[task][:, None].float()  # (B, 1, A)
        gaussian = ((-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)) * mask).sum(-1)  # (B, T)
        scaled = gaussian * mask.sum(-1)
        return -log_prob * scaled / (log_prob + 1e-8)

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


# ---- the published code's weights and numbers (python -m mowbench.verify agent=tdmpc2; docs/verify.md) ----

# the upstream protocol the reference follows: Meta-World (100-step episodes), TD-MPC2's published settings
VERIFY_DEFAULTS = ("env=metaworld", "preset=paper")

# Upstream (nicklashansen/tdmpc2: common/world_model.py's WorldModel) parameter names -> ours, the first matching
# rule applies. Upstream's rgb encoder is [ShiftAug, PixelPreprocess, conv, ReLU, conv, ReLU, conv, ReLU, conv,
# Flatten, SimNorm]: its convolutions are ours at index - 2. Its MLPs are NormedLinear layers (Linear with a LayerNorm
# `ln`), ours [Linear, LayerNorm, Mish] per hidden layer in `hidden` and the output Linear `last` (with the
# dynamics' LayerNorm before SimNorm in `last_norm`). The Q ensemble's stacked weights (n_q, out, in) are ours
# transposed (n_q, in, out), its biases and LayerNorm parameters (n_q, width) ours (n_q, 1, width) (from_upstream).
# the dynamics, reward and policy MLPs, named alike in TD-MPC2 and its descendants (Newt)
MLP_RULES: tuple[tuple[str, str], ...] = (
    (r"_(dynamics|reward|pi)\.2\.ln\.(weight|bias)", r"\1.last_norm.\2"),
    (r"_(dynamics|reward|pi)\.2\.(weight|bias)", r"\1.last.\2"),
    (r"_(dynamics|reward|pi)\.(\d+)\.ln\.(weight|bias)", r"\1.hidden.{3*\2+1}.\3"),
    (r"_(dynamics|reward|pi)\.(\d+)\.(weight|bias)", r"\1.hidden.{3*\2}.\3"),
)
UPSTREAM_NAMES: tuple[tuple[str, str], ...] = (
    (r"_encoder\.rgb\.(\d+)\.(weight|bias)", r"trunk.net.{\1-2}.\2"),
    *MLP_RULES,
    (r"_(Qs|target_Qs)(?:\.params|_params)\.(\d+)\.weight", r"\1.weights.\2"),
    (r"_(Qs|target_Qs)(?:\.params|_params)\.(\d+)\.bias", r"\1.biases.\2"),
    (r"_(Qs|target_Qs)(?:\.params|_params)\.(\d+)\.ln\.weight", r"\1.norms_w.\2"),
    (r"_(Qs|target_Qs)(?:\.params|_params)\.(\d+)\.ln\.bias", r"\1.norms_b.\2"),
)
# upstream module names -> ours (the prefixes the rules above keep)
UPSTREAM_MODULES = {"dynamics": "dynamics", "reward": "reward_head", "pi": "policy", "Qs": "qs",
                    "target_Qs": "target_qs"}
# upstream's buffers that are constants here (mowbench.ops.log_std_range's defaults): checked, not loaded
UPSTREAM_CONSTANTS = ("log_std_min", "log_std_dif")


def upstream_name(name: str, rules: tuple[tuple[str, str], ...] = UPSTREAM_NAMES,
                  modules: dict[str, str] | None = None) -> str:
    """Our name of an upstream parameter (`rules`: UPSTREAM_NAMES, or another method's, e.g. Newt's, with its
    module names `modules`); KeyError for a name no rule maps."""
    modules = UPSTREAM_MODULES if modules is None else modules
    for pattern, template in rules:
        match = re.fullmatch(pattern, name)
        if match:
            out = match.expand(template)
            out = re.sub(r"\{(\d+)\*(\d+)\+(\d+)\}", lambda m: str(int(m[1]) * int(m[2]) + int(m[3])), out)
            out = re.sub(r"\{(\d+)\*(\d+)\}", lambda m: str(int(m[1]) * int(m[2])), out)
            out = re.sub(r"\{(\d+)-(\d+)\}", lambda m: str(int(m[1]) - int(m[2])), out)
            head, dot, rest = out.partition(".")
            return f"{modules.get(head, head)}{dot}{rest}"
    raise KeyError(f"no rule of UPSTREAM_NAMES maps upstream's {name!r}")


def from_upstream(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An upstream WorldModel state_dict under our names and layouts (UPSTREAM_NAMES): the one place where the two
    meet. Upstream's constant buffers (UPSTREAM_CONSTANTS) are left out; target Qs absent from `state` (they equal
    the Qs at initialisation) are the Qs'."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name in UPSTREAM_CONSTANTS:
            continue
        ours = upstream_name(name)
        if ours.startswith(("qs.", "target_qs.")):
            value = value.transpose(1, 2) if ".weights." in ours else value[:, None, :]
        out[ours] = value
    for name in [n for n in out if n.startswith("qs.")]:
        out.setdefault("target_" + name, out[name])
    return out


# upstream's modules, by which the reference sums its weights
UPSTREAM_GROUPS = ("_encoder", "_dynamics", "_reward", "_pi", "_Qs", "_target_Qs_params")
OUR_GROUPS = {"_encoder": "trunk.", "_dynamics": "dynamics.", "_reward": "reward_head.", "_pi": "policy.",
              "_Qs": "qs.", "_target_Qs_params": "target_qs."}
# why each tolerance (mowbench.verify prints those a table uses)
TOLERANCES = {
    "fp32": "rtol 1e-5: fp32 rounding where our kernels add in another order (one batched matmul for the Q "
            "ensemble where upstream vmaps one per head, the random shift as a gather where upstream samples a grid, "
            "SimNorm written out on CPU, Adam); measured <= 3.1e-6 (the encoder's weight change after 3 updates), "
            "the losses and gradient norms <= 3e-7, and no larger after 3 updates than after 1",
    "cancel": "rtol 1e-5 of the loss's entropy part (entropy_coef x |scaled entropy|): the policy loss is that part "
              "minus the scaled Q, nearly cancelling (loss ~2e-4, parts ~2e-3), so its fp32 rounding is relative "
              "to the parts; measured 1e-6; the unscaled squashed entropy moves it by 0.3 of the part",
    "init": "0.1 of upstream's std: our freshly initialised weights are other random draws from the same "
            "distribution, compared by the std of each module's Linear weights (3,000 to 16,000 values: sampling "
            "error ~2%; measured <= 2.4e-2); torch's default initialisation (uniform in +-1 / sqrt(fan_in)) is "
            "4x to 4.5x wider here",
    "exact": "equal or not: parameter counts, initial biases (0), the Q dropout masks applied, the chosen elite, "
             "the log-std range and the discount (constants)",
}
RTOL = 1e-5


class ReplayedDropout(nn.Module):
    """Dropout with recorded keep masks (upstream's (n_q, T, B, width), time-major) instead of drawn ones, on our
    stacked ensemble's (n_q, B * T, width) rows: x * keep / (1 - p), as torch's dropout."""

    def __init__(self, p: float, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.p, self.masks = p, list(masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.masks.pop(0)
        keep = keep.permute(0, 2, 1, 3).reshape(x.shape)
        return x * keep.to(x.dtype).div_(1 - self.p)


def init_rows(init: dict[str, torch.Tensor], wm: TDMPCWorldModel) -> list[Any]:
    """Our fresh initialisation against upstream's: per MLP module, the std of its (not zero-initialised) Linear
    weights; the largest |bias| of every Linear (upstream: 0)."""
    from mowbench.verify import scalar_row

    ours = dict(wm.named_parameters())
    rows, biases = [], []
    for group in ("_dynamics", "_reward", "_pi", "_Qs"):
        names = [k for k in init if k.startswith(group + ".") and ".ln." not in k]
        weights = [k for k in names if k.endswith("weight") and init[k].abs().max() > 0]
        up = torch.cat([init[k].double().flatten() for k in weights]).std()
        mine = torch.cat([ours[upstream_name(k)].detach().double().flatten() for k in weights]).std()
        rows.append(scalar_row(f"initial {group.strip('_')} Linear weights std", up, mine, 0.1, "init"))
        biases += [ours[upstream_name(k)].detach().abs().max() for k in names if k.endswith("bias")]
    rows.append(scalar_row("initial Linear biases, largest |b|", 0.0, max(biases), 0.0, "exact"))
    return rows


def reference_config(reference: dict[str, Any], agent_values: dict[str, Any]) -> TDMPC2Config:
    """Our config for the reference run: the composed values (behaviour) with the reference's sizes on top."""
    s = reference["sizes"]
    sizes = {"model_size": "custom", "latent_dim": s["latent_dim"], "mlp_dim": s["mlp_dim"],
             "simnorm_group": s["simnorm_dim"], "frames": s["frames"], "channels": s["channels"],
             "bins": s["num_bins"], "horizon": s["horizon"], "batch_size": s["batch"], "n_q": s["num_q"],
             "iterations": s["iterations"], "num_samples": s["num_samples"], "num_elites": s["num_elites"],
             "num_pi_trajs": s["num_pi_trajs"]}
    from mowbench.agents.base import build_config, get_agent

    return build_config(get_agent("tdmpc2"), {**agent_values, **sizes})


def verify_reference(reference: dict[str, Any], agent_values: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """mowbench.verify's hook: the reference's updates and plan replayed through our TD-MPC2 -> (rows, reasons)."""
    import sys

    from mowbench.ops import log_std_range
    from mowbench.verify import Row, draws_from, scalar_row

    module = sys.modules[__name__]
    s = reference["sizes"]
    cfg = reference_config(reference, agent_values)
    info = TaskInfo("metaworld", "upstream", 0, s["image_size"], ActionSpace(False, s["action_dim"]),
                    {"episode_length": s["episode_length"]})
    torch.manual_seed(0)  # our initialisation, compared by its distribution
    agent = TDMPC2Agent(cfg, [info], torch.device("cpu"), "fp32")
    wm = agent.wm
    init = reference["init"]
    rows: list[Row] = []
    count = sum(v.numel() for k, v in init.items() if k not in UPSTREAM_CONSTANTS)
    ours_count = count_parameters(p for n, p in wm.named_parameters() if not n.startswith("target_qs."))
    rows.append(scalar_row("world model parameters", count, ours_count, 0.0, "exact"))
    rows += init_rows(init, wm)
    low, dif = float(init["log_std_min"]), float(init["log_std_dif"])
    probe = torch.tensor([-30.0, 30.0])  # tanh saturates: the range's ends
    ends = log_std_range(probe)
    rows.append(scalar_row("policy log-std minimum", low, ends[0], 0.0, "exact"))
    rows.append(scalar_row("policy log-std maximum", low + dif, ends[1], 0.0, "exact"))
    rows.append(scalar_row(f"discount (episode length {s['episode_length']})", reference["discount"],
                           agent.task_discount(info), 0.0, "exact"))
    try:
        wm.load_state_dict({**dict(wm.named_buffers()), **from_upstream(init)})  # ours: bins, action mask
    except (RuntimeError, KeyError) as err:
        rows.append(Row(f"upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                        float("nan"), float("inf"), 0.0, "exact"))
        return rows, TOLERANCES

    ours_init = from_upstream(init)

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

    def upsample(frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, s, s) frames at the reference's base size -> (B, T, S, S, 3) ours, upsampled as recorded."""
        k = s["image_size"] // s["obs_base"]
        return frames.repeat_interleave(k, 3).repeat_interleave(k, 4).permute(0, 1, 3, 4, 2).contiguous()

    k_frames, h = s["frames"], s["horizon"]
    for k, upd in enumerate(reference["updates"]):
        tag = f"update {k + 1}"
        b, t = upd["frames"].shape[:2]
        action = torch.zeros(b, t, s["action_dim"])
        action[:, k_frames - 1:k_frames - 1 + h] = upd["action"].transpose(0, 1)
        reward = torch.zeros(b, t)
        reward[:, k_frames - 1:k_frames - 1 + h] = upd["reward"].transpose(0, 1)
        batch = Batch(upsample(upd["frames"]), action, reward, torch.zeros(b, t), torch.zeros(b, dtype=torch.long),
                      torch.ones(b, s["action_dim"], dtype=torch.bool), extras={"first": torch.zeros(b, t)},
                      task_counts=(b,))
        # ours: offsets (row, column) of (B * (H+1)) stacks, batch-major; upstream's grid shift (column, row) per step
        offsets = upd["shift"].flip(-1).transpose(0, 1).reshape(-1, 2)
        draws = {"randint": [offsets], "randn": [upd["td_eps"].transpose(0, 1), upd["pi_eps"].transpose(0, 1)],
                 "randperm": [torch.cat([upd["td_pair"], _others(upd["td_pair"], s["num_q"])]),
                              torch.cat([upd["pi_pair"], _others(upd["pi_pair"], s["num_q"])])]}
        masks = [upd["value_dropout_keep"], upd["pi_dropout_keep"]]
        dropout = wm.qs.dropout
        replayed = ReplayedDropout(dropout.p if dropout is not None else 0.0, masks)
        if dropout is not None:
            wm.qs.dropout = replayed
        try:
            with draws_from(torch, draws):
                metrics = agent.step(lambda n, length, batch=batch: batch)
        except (RuntimeError, IndexError) as err:  # ours drew otherwise (another override): one failing row
            rows.append(Row(f"{tag}: upstream's draws replayed ({str(err).splitlines()[0][:80]})", float("nan"),
                            float("nan"), float("inf"), 0.0, "exact"))
            return rows, TOLERANCES
        finally:
            wm.qs.dropout = dropout
        up = upd["losses"]
        rows += [
            scalar_row(f"{tag}: Q dropout masks applied", len(masks), len(masks) - len(replayed.masks), 0.0, "exact"),
            scalar_row(f"{tag}: consistency loss", up["consistency_loss"], metrics["wm/consistency"], RTOL, "fp32"),
            scalar_row(f"{tag}: reward loss", up["reward_loss"], metrics["wm/reward"], RTOL, "fp32"),
            scalar_row(f"{tag}: value loss", up["value_loss"], metrics["wm/value"], RTOL, "fp32"),
            scalar_row(f"{tag}: total loss", up["total_loss"], metrics["wm/loss"], RTOL, "fp32"),
            scalar_row(f"{tag}: model grad norm before clipping", up["grad_norm"], metrics["wm/grad_norm"], RTOL,
                       "fp32"),
            # the policy loss is a difference of its entropy and Q parts: judged relative to the entropy part
            scalar_row(f"{tag}: policy loss", up["pi_loss"], metrics["pi/loss"], RTOL, "cancel",
                       cfg.entropy_coef * abs(up["pi_scaled_entropy"])),
            scalar_row(f"{tag}: policy entropy (-log-prob)", up["pi_entropy"], metrics["pi/entropy"], RTOL, "fp32"),
            scalar_row(f"{tag}: policy scaled entropy", up["pi_scaled_entropy"], metrics["pi/scaled_entropy"], RTOL,
                       "fp32"),
            scalar_row(f"{tag}: policy scale S", up["pi_scale"], metrics["pi/scale"], RTOL, "fp32"),
            scalar_row(f"{tag}: policy grad norm before clipping", up["pi_grad_norm"], metrics["pi/grad_norm"], RTOL,
                       "fp32"),
        ]
        ours = checksums()
        for group in UPSTREAM_GROUPS:
            rows.append(scalar_row(f"{tag}: {group.strip('_')} weights sum of squares", upd["checksums"][group][1],
                                   ours[group][1], RTOL, "fp32"))
        last = k == len(reference["updates"]) - 1
        for group in UPSTREAM_GROUPS if last else ():
            rows.append(scalar_row(f"{tag}: {group.strip('_')} change sum of squares",
                                   upd["checksums"][group + "/change"][1], ours[group + "/change"][1], RTOL, "fp32"))
    rows += plan_rows(reference, agent, module)
    return rows, TOLERANCES


def plan_rows(reference: dict[str, Any], agent: TDMPC2Agent, module: Any) -> list[Any]:
    """MPPI on the reference's fixed model (the updated one with its reward and Q output layers) with upstream's
    draws: our noise vector built from them (TDMPC2Agent.plan's layout), the Q pairs as normals that argsort to
    them, the elite choice as the uniform in the middle of upstream's chosen elite's CDF interval."""
    from mowbench.ops import random_shift, stack_frames
    from mowbench.verify import exact_row, recording, tensor_row

    s, plan, wm, cfg = reference["sizes"], reference["plan"], agent.wm, agent.cfg
    with torch.no_grad():
        for name, value in from_upstream({k: v.float() for k, v in reference["plan_weights"].items()}).items():
            if not name.startswith("target_"):
                wm.get_parameter(name).copy_(value)
    k = s["image_size"] // s["obs_base"]
    frames = plan["frames"].repeat_interleave(k, 3).repeat_interleave(k, 4).permute(0, 1, 3, 4, 2)  # (1, k, S, S, 3)
    obs = stack_frames(frames, torch.zeros(frames.shape[:2]), s["frames"])[:, 0]  # (1, 3k, S, S)
    obs = random_shift(obs, cfg.shift_pad, plan["shift"].flip(-1))  # upstream shifts while acting too
    task = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        z = wm.encode(obs, task)
    n_q = cfg.n_q
    order = torch.arange(n_q, dtype=torch.float32).repeat(len(plan["pairs"]), 1)  # (it, n_q): argsort -> the pair
    order.scatter_(1, plan["pairs"].long(), torch.tensor([[-2.0, -1.0]]).expand(len(plan["pairs"]), 2))
    cdf = plan["score"].double().cumsum(0)
    c = int(plan["chosen"])
    u = ((cdf[c - 1] if c else 0.0) + cdf[c]) / 2 / cdf[-1]
    noise = torch.cat([plan["pi_eps"].flatten(), plan["sample_eps"].permute(0, 2, 1, 3).flatten(),
                       plan["value_eps"].flatten(), order.flatten(), torch.special.ndtri(u).float().view(1),
                       plan["explore_eps"].flatten()])[None]
    agent.noise = lambda contexts, shape: noise.clone()  # the instance's only source of planning noise
    outputs = {}
    try:
        for greedy in (True, False):
            context = agent.new_context(0)
            with recording(module, "mppi_moments") as moments, recording(module, "mppi_elites") as elites, \
                    recording(module, "sample_categorical") as chosen, torch.inference_mode():
                action = agent.plan(z, task, [context], greedy)
            outputs[greedy] = (action[0], moments[-1][1][0], torch.as_tensor(context.carry), elites[-1][1][0],
                               chosen[0][0])
    finally:
        del agent.noise
    action, std, mean, score, index = outputs[True]
    return [
        tensor_row("plan: latent z (random shift as upstream)", plan["z"], z, RTOL, "fp32"),
        tensor_row("plan: final elite weights", plan["score"], score, RTOL, "fp32"),
        exact_row("plan: chosen elite", plan["chosen"], index, "exact"),
        tensor_row("plan: final mean", plan["mean"], mean, RTOL, "fp32"),
        tensor_row("plan: final std", plan["std"], std, RTOL, "fp32"),
        tensor_row("plan: action (eval)", plan["greedy_action"], action, RTOL, "fp32"),
        tensor_row("plan: action (exploring)", plan["action"], outputs[False][0], RTOL, "fp32"),
    ]


def _others(pair: torch.Tensor, n: int) -> torch.Tensor:
    """The heads other than `pair`, ascending: a permutation of n heads that starts with the pair."""
    return torch.tensor([i for i in range(n) if i not in pair.tolist()], dtype=pair.dtype)
