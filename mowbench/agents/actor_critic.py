"""STORM's actor-critic trained in imagination (REINFORCE, two-hot critic, slow critic, return norm)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mowbench.agents.base import adam
from mowbench.models.heads import MLP, ActionHead
from mowbench.ops import ema_, lambda_returns, symlog_twohot_loss, twohot_decode, uniform_bins


@dataclass
class Imagined:
    """An imagined rollout. feat (B, H+1, F) = [z, h]; action (B, H) or (B, H, A); reward,
    cont (B, H); legal (B, A) bool; critic (B,) long: which critic judges each row (MoW: cluster)."""

    feat: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    cont: torch.Tensor
    legal: torch.Tensor
    critic: torch.Tensor | None = None


class ActorCritic(nn.Module):
    """Actor (shared) and `n_critics` critics with their EMA 'slow' copies; modules only."""

    def __init__(self, feat_dim: int, n_actions: int, discrete: bool, width: int, depth: int,
                 bins: int, n_critics: int = 1) -> None:
        super().__init__()
        self.actor = ActionHead(feat_dim, width, depth, n_actions, discrete)
        self.critics = nn.ModuleList(MLP(feat_dim, width, depth, bins) for _ in range(n_critics))
        self.slow_critics = copy.deepcopy(self.critics).requires_grad_(False)

    def critic_logits(self, feat: torch.Tensor, index: torch.Tensor | None, slow: bool = False) -> torch.Tensor:
        critics = self.slow_critics if slow else self.critics
        if len(critics) == 1:
            return critics[0](feat)
        assert index is not None, "several critics need a per-row critic index"
        out = torch.zeros(*feat.shape[:-1], critics[0].net[-1].out_features, device=feat.device, dtype=feat.dtype)
        for i in torch.unique(index).tolist():  # one pass per critic present, rows grouped
            rows = index == i
            out[rows] = critics[i](feat[rows]).to(out.dtype)
        return out


class ActorCriticLearner:
    """Losses and optimizer for ActorCritic (STORM spec 'Agent'):
    value loss = CE(critic, R_lambda) + CE(critic, R_lambda of slow critic);
    policy loss = -mean(log pi(a) * sg((R_lambda - V) / max(1, S))) - entropy_coef * entropy,
    S = EMA(decay) of (95th - 5th percentile of R_lambda)."""

    def __init__(self, model: ActorCritic, device: torch.device, lr: float = 3e-5, eps: float = 1e-5,
                 grad_clip: float = 100.0, gamma: float = 0.985, lam: float = 0.95,
                 lambda_value: str = "next", slow_decay: float = 0.98, norm_decay: float = 0.99,
                 norm_percentiles: tuple[float, float] = (5.0, 95.0), entropy_coef: float = 3e-4,
                 bins: int = 255, autocast: bool = False) -> None:
        self.model, self.device = model, device
        self.opt = adam([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps)
        self.grad_clip, self.gamma, self.lam, self.lambda_value = grad_clip, gamma, lam, lambda_value
        self.slow_decay, self.norm_decay, self.percentiles = slow_decay, norm_decay, norm_percentiles
        self.entropy_coef, self.autocast = entropy_coef, autocast
        self.bins = uniform_bins(bins).to(device)
        self.return_scale = torch.zeros((), device=device)  # S, starts at 0 as in STORM

    def update(self, traj: Imagined) -> dict[str, float]:
        feat = traj.feat.detach()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            dist = self.model.actor(feat[:, :-1], traj.legal[:, None])
            value_logits = self.model.critic_logits(feat, traj.critic).float()  # (B, H+1, bins)
            with torch.no_grad():
                slow_logits = self.model.critic_logits(feat, traj.critic, slow=True).float()
        value = twohot_decode(value_logits, self.bins)  # (B, H+1)
        slow_value = twohot_decode(slow_logits, self.bins)
        ret = lambda_returns(traj.reward, value.detach(), traj.cont, self.gamma, self.lam, self.lambda_value)
        slow_ret = lambda_returns(traj.reward, slow_value, traj.cont, self.gamma, self.lam, self.lambda_value)
        value_loss = symlog_twohot_loss(value_logits[:, :-1], ret, self.bins)
        slow_reg = symlog_twohot_loss(value_logits[:, :-1], slow_ret, self.bins)

        lo, hi = torch.quantile(ret.detach().flatten().float(),
                                torch.tensor([p / 100 for p in self.percentiles], device=ret.device))
        self.return_scale = self.norm_decay * self.return_scale + (1 - self.norm_decay) * (hi - lo)
        advantage = (ret - value[:, :-1]).detach() / torch.clamp(self.return_scale, min=1.0)
        log_prob = dist.log_prob(traj.action)  # (B, H)
        entropy = dist.entropy().mean()
        policy_loss = -(log_prob * advantage).mean()
        loss = policy_loss + value_loss + slow_reg - self.entropy_coef * entropy

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"], self.grad_clip)
        self.opt.step()
        ema_(self.model.slow_critics, self.model.critics, self.slow_decay)
        return {"ac/policy_loss": policy_loss.item(), "ac/value_loss": value_loss.item(),
                "ac/slow_reg": slow_reg.item(), "ac/entropy": entropy.item(),
                "ac/return_mean": ret.mean().item(), "ac/return_scale": self.return_scale.item(),
                "ac/grad_norm": grad_norm.item()}

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "return_scale": self.return_scale}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.return_scale = state["return_scale"].to(self.device)
