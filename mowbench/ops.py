"""Small pure functions carrying the maths of STORM-style agents (symlog, two-hot, returns, KL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * ln(1 + |x|) (DreamerV3 eq. 9); compresses large rewards and values."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of symlog: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def uniform_bins(n_bins: int = 255, low: float = -20.0, high: float = 20.0) -> torch.Tensor:
    """Bin centres for two-hot targets, uniformly spaced in symlog space (STORM: 255 in [-20, 20])."""
    return torch.linspace(low, high, n_bins)


def twohot_encode(y: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Two-hot encoding of y (already in bin space) over sorted `bins`: (...,) -> (..., n_bins).

    The two neighbouring bins share the mass so that sum(weights * bins) == y inside the range;
    values outside the range put all mass on the nearest end bin.
    """
    n = bins.numel()
    y = y.clamp(bins[0], bins[-1])
    upper = torch.searchsorted(bins, y.contiguous(), right=False).clamp(1, n - 1)  # (...,)
    lower = upper - 1
    b_lo, b_hi = bins[lower], bins[upper]
    w_hi = (y - b_lo) / (b_hi - b_lo)
    out = torch.zeros(*y.shape, n, dtype=y.dtype, device=y.device)
    out.scatter_(-1, lower.unsqueeze(-1), (1.0 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, upper.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_decode(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Expected value in *real* space of symlog two-hot logits: (..., n_bins) -> (...,)."""
    return symexp((torch.softmax(logits.float(), dim=-1) * bins).sum(-1))


def symlog_twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between logits (..., n_bins) and the two-hot of symlog(target) (...,); mean."""
    target_dist = twohot_encode(symlog(target.float()), bins)
    return -(target_dist * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def unimix_logits(logits: torch.Tensor, mix: float = 0.01) -> torch.Tensor:
    """STORM/DreamerV3 'unimix': probs = (1-mix)*softmax + mix/classes, returned as log-probs."""
    probs = torch.softmax(logits.float(), dim=-1)
    probs = (1.0 - mix) * probs + mix / logits.shape[-1]
    return torch.log(probs)


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """Index samples of categorical probs (..., C) -> (...,) by inverse CDF: one uniform per row.

    Exact, and several times faster on CPU than torch.multinomial for many small rows.
    """
    u = torch.rand(*probs.shape[:-1], 1, device=probs.device, dtype=torch.float32)
    cdf = probs.float().cumsum(-1)
    return (cdf < u * cdf[..., -1:]).sum(-1).clamp_(max=probs.shape[-1] - 1)


def sample_onehot_st(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample of categorical logits (..., C) with straight-through gradients."""
    probs = torch.softmax(logits, dim=-1)
    onehot = F.one_hot(sample_categorical(probs), probs.shape[-1]).to(probs.dtype)
    return onehot + probs - probs.detach()


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for logits (..., V, C) of V categoricals, summed over V: -> (...,)."""
    p_log = F.log_softmax(p_logits.float(), dim=-1)
    q_log = F.log_softmax(q_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=(-2, -1))


def kl_free_bits(p_logits: torch.Tensor, q_logits: torch.Tensor, free_nats: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """STORM's clipped KL: max(free_nats, mean over batch/time of KL summed over variables).

    Returns (clipped loss, unclipped mean KL); the clip is applied to the *mean*, as in STORM,
    not per element as in DreamerV3.
    """
    kl = categorical_kl(p_logits, q_logits).mean()
    return torch.clamp(kl, min=free_nats), kl


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor,
                   gamma: float, lam: float, value_index: str = "next") -> torch.Tensor:
    """TD(lambda) returns over an imagined trajectory.

    rewards, continues: (B, H) for steps t = 0..H-1; values: (B, H+1) for states s_0..s_H.
    Returns (B, H) with R_H = V(s_H) as bootstrap and
        R_t = r_t + gamma * c_t * ((1 - lam) * V_x + lam * R_{t+1}),
    where V_x = V(s_{t+1}) ("next", the textbook/DreamerV3 form) or V(s_t) ("current", what STORM's
    reference implementation computes; kept as an option for exact comparisons).
    """
    if value_index not in ("next", "current"):
        raise ValueError(f"value_index={value_index!r}; allowed: 'next', 'current'")
    horizon = rewards.shape[1]
    assert values.shape[1] == horizon + 1, (values.shape, rewards.shape)
    boot = values[:, 1:] if value_index == "next" else values[:, :-1]  # (B, H)
    out = []
    ret = values[:, -1]
    for t in reversed(range(horizon)):
        ret = rewards[:, t] + gamma * continues[:, t] * ((1.0 - lam) * boot[:, t] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1], dim=1)


def ema_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """In-place EMA of parameters: target = decay * target + (1 - decay) * source."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s, 1.0 - decay)
