"""STORM's actor-critic trained in imagination (REINFORCE, two-hot critic, slow critic, return norm)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mowbench.agents.base import adam
from mowbench.models.heads import MLP, ActionHead
from mowbench.ops import (
    Grouping,
    ema_,
    group_quantiles,
    lambda_returns,
    symlog_twohot_loss,
    twohot_decode,
    uniform_bins,
)


@dataclass
class Imagined:
    """An imagined rollout. feat (B, H+1, F) = [z, h]; action (B, H) or (B, H, A); reward,
    cont (B, H); legal (B, A) bool; critic (B,) long: which critic judges each row (MoW: cluster);
    norm (B,) long: which return scale S normalises each row's advantages (None: one S for all);
    critic_sizes: the rows of each critic, known on the host (the world model's host_layout; None: read from
    `critic` when several critics need them)."""

    feat: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    cont: torch.Tensor
    legal: torch.Tensor
    critic: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    critic_sizes: tuple[int, ...] | None = None


class ActorCritic(nn.Module):
    """Actor (shared) and `n_critics` critics with their EMA 'slow' copies; modules only."""

    def __init__(self, feat_dim: int, n_actions: int, discrete: bool, width: int, depth: int,
                 bins: int, n_critics: int = 1) -> None:
        super().__init__()
        self.actor = ActionHead(feat_dim, width, depth, n_actions, discrete)
        self.critics = nn.ModuleList(MLP(feat_dim, width, depth, bins) for _ in range(n_critics))
        self.slow_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self._sizes: tuple[int, ...] | None = None  # rows per critic inside critic_layout (critic_rows)

    @contextlib.contextmanager
    def critic_layout(self, sizes: tuple[int, ...] | None) -> Iterator[None]:
        """Inside, critic_rows takes `sizes` as the rows of each critic instead of reading them from the
        device, so an update with several critics waits for nothing (a CUDA graph can hold it)."""
        self._sizes = sizes
        try:
            yield
        finally:
            self._sizes = None

    def critic_rows(self, index: torch.Tensor | None) -> Grouping | None:
        """Rows grouped by their critic, index (B,) long (None with one critic): made once per update for the
        critics and their slow copies, with the rows per critic from critic_layout where given, else read."""
        if len(self.critics) == 1:
            return None
        assert index is not None, "several critics need a per-row critic index"
        return Grouping(index, len(self.critics), self._sizes)

    def critic_logits(self, feat: torch.Tensor, rows: Grouping | None, slow: bool = False) -> torch.Tensor:
        """feat (B, T, F), rows: critic_rows' grouping -> logits (B, T, bins). Several critics: one pass per critic
        present over its rows, sorted by critic (in their original order, as a boolean mask would select them:
        the same values), then put back in order."""
        critics = self.slow_critics if slow else self.critics
        if rows is None:
            return critics[0](feat)
        return rows.apply(lambda i, parts: critics[i](parts[0]), feat)


class ActorCriticLearner:
    """Losses and optimizer for ActorCritic (docs/methods/storm.md):
    value loss = CE(critic, R_lambda) + CE(critic, R_lambda of slow critic);
    policy loss = -mean(log pi(a) * sg((R_lambda - V) / max(1, S))) - entropy_coef * entropy,
    S = EMA(decay) of (95th - 5th percentile of R_lambda); percentiles 'kth' (STORM's reference: the int(qN)-th
    smallest return) or 'linear' (torch.quantile's interpolation).

    Multi-task: `norm_groups` return scales, one per group of rows (Imagined.norm, e.g. per task), each
    tracking the percentile range of its own rows' returns; groups absent from a batch keep their S.
    STORM has one task and one S; across tasks one S would be set by the game with the largest returns
    and shrink every other game's advantages (MinAtar space_invaders' range is ~5x breakout's)."""

    def __init__(self, model: ActorCritic, device: torch.device, lr: float = 3e-5, eps: float = 1e-5,
                 grad_clip: float = 100.0, gamma: float = 0.985, lam: float = 0.95,
                 lambda_value: str = "next", slow_decay: float = 0.98, norm_decay: float = 0.99,
                 norm_percentiles: tuple[float, float] = (5.0, 95.0), entropy_coef: float = 3e-4,
                 bins: int = 255, autocast: bool = False, norm_groups: int = 1, capturable: bool = False,
                 percentiles: str = "linear") -> None:
        self.model, self.device, self.capturable = model, device, capturable
        self.opt = adam([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps, capturable=capturable)
        self.grad_clip, self.gamma, self.lam, self.lambda_value = grad_clip, gamma, lam, lambda_value
        self.slow_decay, self.norm_decay = slow_decay, norm_decay
        self.entropy_coef, self.autocast = entropy_coef, autocast
        self.bins = uniform_bins(bins).to(device)
        self.return_scale = torch.zeros(norm_groups, device=device)  # S per group, starts at 0 as in STORM
        if percentiles not in ("kth", "linear"):
            raise ValueError(f"percentiles={percentiles!r}; allowed: kth, linear")
        # (2,); kth: float64 from the Python floats, so floor(q * N) is Python's int(q * N) as in the reference
        self.percentiles = percentiles
        self.quantiles = torch.tensor([p / 100 for p in norm_percentiles], device=device,
                                      dtype=torch.float64 if percentiles == "kth" else torch.float32)

    def update(self, traj: Imagined) -> dict[str, torch.Tensor]:
        feat = traj.feat.detach()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast,
                            cache_enabled=not self.capturable):  # a CUDA graph keeps no cast cache (same values)
            dist = self.model.actor(feat[:, :-1], traj.legal[:, None])
            rows = self.model.critic_rows(traj.critic)
            value_logits = self.model.critic_logits(feat, rows).float()  # (B, H+1, bins)
            with torch.no_grad():
                slow_logits = self.model.critic_logits(feat, rows, slow=True).float()
        value = twohot_decode(value_logits, self.bins)  # (B, H+1)
        slow_value = twohot_decode(slow_logits, self.bins)
        ret = lambda_returns(traj.reward, value.detach(), traj.cont, self.gamma, self.lam, self.lambda_value)
        slow_ret = lambda_returns(traj.reward, slow_value, traj.cont, self.gamma, self.lam, self.lambda_value)
        value_loss = symlog_twohot_loss(value_logits[:, :-1], ret, self.bins)
        slow_reg = symlog_twohot_loss(value_logits[:, :-1], slow_ret, self.bins)

        scale = self.update_return_scale(ret.detach().float(), traj.norm)  # (B, 1)
        advantage = (ret - value[:, :-1]).detach() / torch.clamp(scale, min=1.0)
        log_prob = dist.log_prob(traj.action)  # (B, H)
        entropy = dist.entropy().mean()
        policy_loss = -(log_prob * advantage).mean()
        loss = policy_loss + value_loss + slow_reg - self.entropy_coef * entropy

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], self.grad_clip)
        self.opt.step()
        ema_(self.model.slow_critics, self.model.critics, self.slow_decay)
        metrics = {"ac/policy_loss": policy_loss, "ac/value_loss": value_loss, "ac/slow_reg": slow_reg,
                   "ac/entropy": entropy, "ac/return_mean": ret.mean(), "ac/return_scale": self.return_scale.mean(),
                   "ac/grad_norm": grad_norm}
        return {k: v.detach() for k, v in metrics.items()}  # read at log intervals, not here (no device sync)

    def update_return_scale(self, ret: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        """EMA step of S from the returns ret (B, H) of each group present (None: all rows in group 0);
        -> each row's S (B, 1). No host read (ops.group_quantiles), so a CUDA graph can hold it."""
        group = torch.zeros(ret.shape[0], dtype=torch.long, device=ret.device) if group is None else group
        quantiles, present = group_quantiles(ret, group, len(self.return_scale), self.quantiles,
                                             self.percentiles)  # (G, 2), (G,)
        # S is updated in place: a CUDA graph of the update reads and writes this tensor
        new = self.norm_decay * self.return_scale + (1 - self.norm_decay) * (quantiles[:, 1] - quantiles[:, 0])
        self.return_scale.copy_(torch.where(present, new, self.return_scale))
        return self.return_scale[group][:, None]

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "return_scale": self.return_scale}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        # a checkpoint from before per-group scales holds one scalar S: it broadcasts to every group
        self.return_scale.copy_(state["return_scale"].reshape(-1).expand_as(self.return_scale))
