"""Small pure functions carrying the maths of STORM-style agents (symlog, two-hot, returns, KL), of MoW (TopK
routing, expert balance, harmonious weighting, per-task means, grouping rows by label) and of the TD-MPC2
family (SimNorm, discounts, rho weights, random shifts, frame stacks, squashed Gaussians, MPPI)."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


def symlog_twohot_ce(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between logits (..., n_bins) and the two-hot of symlog(target) (...,) -> (...,)."""
    target_dist = twohot_encode(symlog(target.float()), bins)
    return -(target_dist * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def symlog_twohot_loss(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Mean of symlog_twohot_ce over all elements."""
    return symlog_twohot_ce(logits, target, bins).mean()


def unimix_logits(logits: torch.Tensor, mix: float = 0.01) -> torch.Tensor:
    """STORM/DreamerV3 'unimix': probs = (1-mix)*softmax + mix/classes, returned as log-probs."""
    probs = torch.softmax(logits.float(), dim=-1)
    probs = (1.0 - mix) * probs + mix / logits.shape[-1]
    return torch.log(probs)


class UniformQueue:
    """Uniforms that sample_categorical calls bringing none take, in the order of the calls, instead of drawing
    from torch's generator (uniforms_from); `drawn` keeps the indices they picked."""

    def __init__(self, uniforms: list[torch.Tensor]) -> None:
        self.uniforms, self.drawn = list(uniforms), []

    def take(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if not self.uniforms:
            raise RuntimeError(f"no injected uniforms left for a draw of shape {shape}")
        u = self.uniforms.pop(0)
        if tuple(u.shape) != tuple(shape):
            raise RuntimeError(f"injected uniforms of shape {tuple(u.shape)} for a draw of shape {tuple(shape)}")
        return u.to(device)


_INJECTED: UniformQueue | None = None


@contextlib.contextmanager
def uniforms_from(uniforms: list[torch.Tensor]) -> Iterator[UniformQueue]:
    """Inside, every sample_categorical call without uniforms of its own (latent samples, actions) takes the next of
    `uniforms` (of its shape (..., 1)) instead of torch's: mowbench.verify replays another implementation's random
    draws through our code this way. Raises if a call finds none left or one of another shape, and at the end if
    some are left over."""
    global _INJECTED
    saved, _INJECTED = _INJECTED, UniformQueue(uniforms)
    try:
        yield _INJECTED
        if _INJECTED.uniforms:
            raise RuntimeError(f"{len(_INJECTED.uniforms)} injected uniforms were not used")
    finally:
        _INJECTED = saved


def sample_categorical(probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """Index samples of categorical probs (..., C) -> (...,) by inverse CDF: one uniform per row.

    Exact, and several times faster on CPU than torch.multinomial for many small rows. `u` (..., 1) in [0, 1):
    the uniforms to use (e.g. drawn from an env stream's own generator); None: drawn from torch's (or, inside
    uniforms_from, the next injected ones).
    """
    injected = _INJECTED if u is None else None
    if u is None:
        shape = (*probs.shape[:-1], 1)
        u = (torch.rand(shape, device=probs.device, dtype=torch.float32) if injected is None
             else injected.take(shape, probs.device))
    cdf = probs.float().cumsum(-1)
    index = (cdf < u * cdf[..., -1:]).sum(-1).clamp_(max=probs.shape[-1] - 1)
    if injected is not None:
        injected.drawn.append(index)
    return index


def one_hot(index: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """index (...,) long in [0, n) -> (..., n) one-hot of `dtype`. F.one_hot's values; F.one_hot checks the range
    by reading the index's min and max on CPU (not on CUDA), and this form reads nothing, so the host-read recorder
    of tests/test_graphs.py, which runs on CPU, sees only the reads a GPU would wait for."""
    return (index[..., None] == torch.arange(n, device=index.device)).to(dtype)


def sample_onehot_st(logits: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot sample of categorical logits (..., C) with straight-through gradients (`u`: see
    sample_categorical)."""
    probs = torch.softmax(logits, dim=-1)
    onehot = one_hot(sample_categorical(probs, u), probs.shape[-1], probs.dtype)
    return onehot + probs - probs.detach()


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) for logits (..., V, C) of V categoricals, summed over V: -> (...,)."""
    p_log = F.log_softmax(p_logits.float(), dim=-1)
    q_log = F.log_softmax(q_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=(-2, -1))


def free_bits(kl_mean: torch.Tensor, free_nats: float = 1.0) -> torch.Tensor:
    """STORM's free bits: max(free_nats, KL) applied to KL *means* (over the batch and time in STORM,
    over each task's rows in MoW), not per element as in DreamerV3. Elementwise over the given means."""
    return torch.clamp(kl_mean, min=free_nats)


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


def group_quantiles(values: torch.Tensor, group: torch.Tensor, n_groups: int, q: torch.Tensor,
                    method: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantiles q (Q,) of each group's values: values (R, ...) whose rows carry labels group (R,) in
    [0, n_groups) -> (quantiles (G, Q), present (G,) bool), without a Python loop over the groups or a host read:
    one sort by value, a stable one by label, and each group's ranks located from its offset. method 'linear':
    torch.quantile's, bitwise (rank q * (n - 1), interpolated); 'kth': STORM's reference (weipu-zhang/STORM
    agents.py:percentile), the floor(q * n)-th smallest value, torch.kthvalue's, no interpolation (computed in float64:
    pass q in float64, made from the Python floats, for Python's int(q * n); floor(q * n) = 0, where the reference
    fails, gives the smallest). An absent group's quantiles are 0; a group holding a NaN gets NaN (as
    torch.quantile)."""
    per_row = values[0].numel()
    flat = values.flatten()  # (R * per_row,)
    label = group.repeat_interleave(per_row, output_size=flat.numel())  # (R * per_row,), row-major like flat
    by_value, order = flat.sort()
    _, regroup = label[order].sort(stable=True)
    ordered = by_value[regroup]  # (R * per_row,): group 0's values ascending, then group 1's, ...
    counts = counts_of(group, n_groups) * per_row  # (G,)
    start = counts.cumsum(0) - counts  # (G,)
    last = max(flat.numel() - 1, 0)
    if method == "kth":
        kth = (q.double()[None, :] * counts[:, None].double()).floor().long()  # (G, Q): 1-based, as torch.kthvalue
        out = ordered[(start[:, None] + (kth - 1).clamp(min=0)).clamp(max=last)]
    elif method == "linear":
        ranks = q[None, :] * (counts - 1).clamp(min=0)[:, None].to(q.dtype)  # (G, Q)
        below = ranks.long()
        above = ranks.ceil().long()
        lo = ordered[(start[:, None] + below).clamp(max=last)]
        hi = ordered[(start[:, None] + above).clamp(max=last)]
        out = lo.lerp(hi, ranks - below)
    else:
        raise ValueError(f"method={method!r}; allowed: linear, kth")
    nan = counts_of(label, n_groups, flat.isnan()) > 0  # (G,)
    out = out.masked_fill(nan[:, None], float("nan"))
    return out.masked_fill(counts[:, None] == 0, 0.0), counts > 0


def ema_(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    """In-place EMA of parameters: target = decay * target + (1 - decay) * source."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s, 1.0 - decay)


# ---- MoW (docs/methods/mow.md) ----

@dataclass
class Routing:
    """TopK routing. dense (..., N_e): the sparse weight vector W (zeros outside the TopK);
    index, weight (..., K): the chosen experts in descending score order and their weights."""

    dense: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


def topk_route(logits: torch.Tensor, tau: float | torch.Tensor, k: int) -> Routing:
    """S = softmax(logits / tau); (W, J) = TopK(S, k). W keeps the softmax probabilities (not
    renormalised), as the paper writes it (docs/methods/mow.md), so the router receives gradient through the
    weights. tau: a number or a 0-dim tensor (MoW's buffer, divided on its device: reading it as a number would
    wait for the device)."""
    scores = torch.softmax(logits.float() / tau, dim=-1)  # (..., N_e)
    weight, index = scores.topk(k, dim=-1)  # (..., K), sorted descending
    dense = torch.zeros_like(scores).scatter(-1, index, weight)
    return Routing(dense, index, weight)


def balance_loss(weights: torch.Tensor, rows: float | None = None) -> torch.Tensor:
    """Expert balance ||load - uniform load||_2^2 with load = sum over rows of W (rows, N_e) -> ().

    The uniform load spreads the same total evenly over the N_e experts. `rows` rescales a mean over
    many rows (token routing: tokens) to that many rows (the task count), so both routings compare.
    """
    load = weights.float().sum(0) if rows is None else weights.float().mean(0) * rows  # (N_e,)
    return (load - load.mean()).pow(2).sum()


def harmonious_loss(task_losses: torch.Tensor, log_sigma: torch.Tensor, present: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """HarmonyDream (Ma et al., ICML 2024) weighting: sum_k L_k / sigma_k + ln(1 + sigma_k),
    sigma_k = exp(s_k). task_losses, log_sigma (K,) -> (); `present` (K,) bool: the tasks summed (None: all).
    Setting the derivative in sigma to zero gives sigma^2 / (1 + sigma) = L, i.e.
    sigma = (L + sqrt(L^2 + 4L)) / 2, which approaches L for large L."""
    sigma = log_sigma.exp()
    terms = task_losses / sigma + torch.log1p(sigma)
    return terms.sum() if present is None else torch.where(present, terms, 0.0).sum()


def counts_of(label: torch.Tensor, n_groups: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rows per label: label (R,) long in [0, n_groups) -> (n_groups,) long; with integer `weights` (R,), their sums
    per label. torch.bincount's values, without its reads of the labels' min and max back to the host on CUDA (two
    syncs a call)."""
    ones = torch.ones_like(label) if weights is None else weights.long()
    return torch.zeros(n_groups, dtype=torch.long, device=label.device).index_add_(0, label, ones)


def group_mean(values: torch.Tensor, label: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of values (R, ...) per label (R,) in [0, n_groups) -> (means (G, ...), present (G,) bool).

    Absent groups get mean 0 and present=False; one scatter, no Python loop over groups."""
    sums = torch.zeros(n_groups, *values.shape[1:], device=values.device, dtype=values.dtype)
    sums = sums.index_add(0, label, values)
    counts = counts_of(label, n_groups).to(values.dtype)
    return sums / counts.clamp(min=1).view(-1, *([1] * (values.dim() - 1))), counts > 0


class Grouping:
    """Rows grouped by an integer label (e.g. task -> VAE cluster, pair -> expert) so that each group
    runs as one batch through its own module: the Python loop is over groups present, never over rows.

    split(x) gives (group, rows of x) pairs in label order; merge(outputs) restores the row order. The sort and the
    counts run on the device without waiting for it; the group sizes, which the loop over groups needs, are read
    from it (one sync) when first needed, unless the caller knows them on the host (`sizes`)."""

    def __init__(self, label: torch.Tensor, n_groups: int, sizes: tuple[int, ...] | None = None) -> None:
        self.label = label
        self.order = torch.argsort(label, stable=True)  # (R,)
        self.inverse = torch.argsort(self.order)
        self.counts = counts_of(label, n_groups)  # (n_groups,) on the label's device
        if sizes is not None:
            assert len(sizes) == n_groups and sum(sizes) == len(label), (sizes, n_groups, len(label))
            self.sizes = list(sizes)

    @functools.cached_property
    def sizes(self) -> list[int]:
        """Rows of every group, empty ones included (host ints; one device sync per grouping)."""
        return self.counts.tolist()

    @functools.cached_property
    def slices(self) -> list[tuple[int, slice]]:
        """(group, its rows' slice of the sorted order) of every group present, in label order."""
        ends = list(itertools.accumulate(self.sizes))
        return [(g, slice(end - c, end)) for g, (c, end) in enumerate(zip(self.sizes, ends, strict=True)) if c]

    @property
    def groups(self) -> list[int]:
        return [g for g, _ in self.slices]

    def rows(self, group_slice: slice) -> torch.Tensor:
        return self.order[group_slice]

    def split(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        xs = x[self.order]
        return [(g, xs[s]) for g, s in self.slices]

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Outputs of the groups, in split() order -> rows in the original order."""
        dtype = parts[0].dtype
        return torch.cat([p.to(dtype) for p in parts])[self.inverse]

    def apply(self, fn: Callable[[int, list[torch.Tensor]], torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """merge([fn(g, [x[rows of g] for x in xs]) for each group g])."""
        sorted_xs = [x[self.order] for x in xs]
        return self.merge([fn(g, [x[s] for x in sorted_xs]) for g, s in self.slices])


# ---- TD-MPC2 family: TD-MPC2, Newt, PWM (docs/methods/) ----

def simnorm(x: torch.Tensor, group: int = 8) -> torch.Tensor:
    """TD-MPC2's simplicial normalisation: the last dim split into groups of `group`, a softmax within each.
    (..., L) -> (..., L), L divisible by `group`; each group sums to 1.

    On CPU written out (exp of x minus the group's max, over the group's sum), in fp32 at least: torch's CPU
    softmax runs row by row, which for rows of 8 is much slower than these vectorised ops. The max is detached: a
    softmax does not depend on the constant subtracted, so its gradient would be zero (rounding). Elsewhere
    torch.softmax, one fused kernel (fp32 under autocast, as the CPU path)."""
    shape = x.shape
    assert shape[-1] % group == 0, (shape, group)
    v = x.unflatten(-1, (shape[-1] // group, group))  # (..., L / group, group)
    if x.device.type != "cpu":
        return torch.softmax(v, dim=-1).flatten(-2)
    v = v.float() if v.element_size() < 4 else v  # bf16 in, fp32 out (fp64 stays fp64)
    e = torch.exp(v - v.detach().amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).flatten(-2)


def tdmpc_discount(episode_length: int, denominator: float = 5.0, low: float = 0.95, high: float = 0.995) -> float:
    """TD-MPC2's per-task discount from the episode length (in agent steps): frac = length / 5,
    clip((frac - 1) / frac, 0.95, 0.995). Meta-World's 100-step episodes (action repeat 2): 0.95."""
    frac = episode_length / denominator
    return float(min(max((frac - 1) / frac, low), high))


def rho_weights(horizon: int, rho: float, normalise: bool) -> torch.Tensor:
    """Weights (H,) of the per-step losses of an H-step unroll: rho^t / H (TD-MPC2: sum of rho^t-weighted
    losses divided by H) or rho^t / sum(rho^t) (Newt: normalised to sum 1)."""
    w = rho ** torch.arange(horizon, dtype=torch.float32)
    return w / w.sum() if normalise else w / horizon


def random_shift(x: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """DrQ-style random shift: x (B, C, S, S) replicate-padded by `pad`, then the S x S window at integer offsets
    (B, 2) in [0, 2 * pad] (row, column) cut out. Offsets pad, pad give x back."""
    b, _, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="replicate")  # (B, C, S+2p, S+2p)
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, S)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, S)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).to(x.dtype)  # advanced indexing put C last: (B, S, S, C) -> (B, C, S, S)


def stack_frames(obs: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Stacks of the last k frames, as the acting context builds them (the first frame of an episode repeated
    in place of frames before it): obs (B, T, S, S, C) with first (B, T) (1 at an episode's first step) ->
    (B, T - k + 1, k * C, S, S), oldest frame first; output j is the stack ending at input step j + k - 1."""
    b, t = first.shape
    steps = torch.arange(t, device=obs.device)
    last_first = torch.where(first > 0, steps, -1).cummax(dim=1).values  # (B, T) latest episode start <= i
    ends = steps[k - 1:]  # (T-k+1,)
    frames = [torch.maximum(ends - d, last_first[:, k - 1:]) for d in range(k - 1, -1, -1)]  # k x (B, T-k+1)
    index = torch.stack(frames, dim=-1)  # (B, T-k+1, k)
    picked = obs[torch.arange(b, device=obs.device)[:, None, None], index]  # (B, T-k+1, k, S, S, C)
    return picked.permute(0, 1, 2, 5, 3, 4).flatten(2, 3)  # (B, T-k+1, k*C, S, S)


def log_std_range(raw: torch.Tensor, low: float = -10.0, high: float = 2.0) -> torch.Tensor:
    """TD-MPC2's policy log-std: raw outputs mapped smoothly into [low, high] by tanh."""
    return low + 0.5 * (high - low) * (torch.tanh(raw) + 1.0)


def squashed_gaussian(mean: torch.Tensor, log_std: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A tanh-squashed Gaussian sample and its log-probability over the valid action dims.
    mean, log_std, eps (..., A), mask (..., A) bool (padded dims False: their actions are 0 and they add
    nothing) -> (action (..., A) in (-1, 1), log_prob (...,) summed over valid dims, with the tanh Jacobian)."""
    m = mask.to(mean.dtype)
    u = (mean + eps * log_std.exp()) * m
    gauss = -0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)  # (..., A)
    action = torch.tanh(u)
    log_prob = ((gauss - torch.log(F.relu(1 - action.pow(2)) + 1e-6)) * m).sum(-1)
    return action, log_prob


def mppi_elites(values: torch.Tensor, n_elites: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MPPI's elites and their weights: values (B, N) -> (index (B, E) of the E best, score (B, E)) with
    score = exp(temperature * (v - max v)) normalised to sum 1 (TD-MPC2's temperature multiplies)."""
    elite_value, index = values.topk(n_elites, dim=-1)  # (B, E)
    score = torch.exp(temperature * (elite_value - elite_value[:, :1]))
    return index, score / score.sum(-1, keepdim=True)


def mppi_moments(actions: torch.Tensor, score: torch.Tensor, min_std: float, max_std: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score-weighted mean and std of elite action sequences: actions (B, E, H, A), score (B, E) ->
    mean, std (B, H, A), std clamped into [min_std, max_std]."""
    w = score[:, :, None, None]
    mean = (w * actions).sum(1) / (score.sum(1)[:, None, None] + 1e-9)
    std = ((w * (actions - mean[:, None]).pow(2)).sum(1) / (score.sum(1)[:, None, None] + 1e-9)).sqrt()
    return mean, std.clamp(min_std, max_std)


# ---- MuZero / UniZero / ScaleZero (docs/methods/) ----

def muzero_h(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """MuZero's invertible scalar transform h(x) = sign(x) (sqrt(|x| + 1) - 1) + eps x (Pohlen et al. 2018),
    applied to values and rewards before their categorical support."""
    return torch.sign(x) * (torch.sqrt(x.abs() + 1.0) - 1.0) + eps * x


def muzero_h_inverse(y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The inverse of muzero_h: sign(y) (((sqrt(1 + 4 eps (|y| + 1 + eps)) - 1) / (2 eps))^2 - 1)."""
    root = (torch.sqrt(1.0 + 4.0 * eps * (y.abs() + 1.0 + eps)) - 1.0) / (2.0 * eps)
    return torch.sign(y) * (root.pow(2) - 1.0)


def support_bins(n_bins: int = 101) -> torch.Tensor:
    """MuZero's categorical support: the integers -(n-1)/2 .. (n-1)/2 (101 bins: -50 .. 50) in h-space."""
    half = (n_bins - 1) // 2
    return torch.arange(-half, half + 1, dtype=torch.float32)


def support_ce(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between logits (..., n_bins) and the two-hot of h(target) (...,) on the support -> (...,)."""
    target_dist = twohot_encode(muzero_h(target.float()), bins)
    return -(target_dist * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def support_value(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Scalar of support logits (..., n_bins): h^-1 of the expected bin -> (...,)."""
    return muzero_h_inverse((torch.softmax(logits.float(), dim=-1) * bins).sum(-1))
