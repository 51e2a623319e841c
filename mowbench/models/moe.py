"""MoW's temporal-module experts (spec mow.md section 2): N_e experts, each a token mixer followed by a
small causal Transformer, with their weights stacked so that the chosen experts run in parallel.

Every parameter has a leading expert dimension. A call takes (sequence, expert) pairs; the pairs are
grouped by expert, padded to the largest group, and the G experts present run together as batched
matmuls on (G, pairs, T, ...) tensors. No Python loop over experts or tasks: the work grows with the
number of pairs (B x TopK for task-level routing) and the op count is that of one expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mowbench.models.transformer import KVCache, attend, layer_mask
from mowbench.ops import Grouping


def pick(stacked: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
    """The rows of a stacked parameter for the experts present (None: all of them, in order: no copy)."""
    return stacked if experts is None else stacked[experts]


class StackedLinear(nn.Module):
    """n independent Linear layers, weight (n, in, out): x (G, ..., in) through the experts (G,) -> (G, ..., out).
    Initialised as nn.Linear (uniform in +-1/sqrt(in))."""

    def __init__(self, n: int, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, out_dim).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
        w = pick(self.weight, experts)  # (G, in, out)
        y = torch.matmul(x.flatten(1, -2), w).view(*x.shape[:-1], w.shape[-1])
        if self.bias is not None:
            y = y + pick(self.bias, experts).view(x.shape[0], *[1] * (x.dim() - 2), -1)
        return y


class StackedNorm(nn.Module):
    """n independent LayerNorms over the last dim (affine per expert)."""

    def __init__(self, n: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, dim))
        self.bias = nn.Parameter(torch.zeros(n, dim))

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
        shape = (x.shape[0], *[1] * (x.dim() - 2), x.shape[-1])
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * pick(self.weight, experts).view(shape) + pick(self.bias, experts).view(shape)


class StackedBlock(nn.Module):
    """The post-LN block of models.transformer.Block, one per expert: x = LN(x + Drop(Attn(x)));
    x = LN(x + Drop(FFN(x))); projections without bias, FFN with; attention-probability dropout and the
    blocks' LayerNorm eps as in Block."""

    def __init__(self, n: int, width: int, heads: int, ffn: int, dropout: float, attn_dropout: float = 0.0,
                 ln_eps: float = 1e-5) -> None:
        super().__init__()
        assert width % heads == 0, f"width={width} not divisible by heads={heads}"
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = StackedLinear(n, width, 3 * width, bias=False)
        self.out = StackedLinear(n, width, width, bias=False)
        self.norm1 = StackedNorm(n, width, eps=ln_eps)
        self.ffn_in = StackedLinear(n, width, ffn)
        self.ffn_out = StackedLinear(n, ffn, width)
        self.norm2 = StackedNorm(n, width, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None, cache: KVCache | None, layer: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (G, P, T, D); attention over the G*P sequences, each projection by its expert's weights."""
        g, p, t, width = x.shape
        qkv = self.qkv(x, experts).view(g * p, t, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3x (G*P, H, T, d)
        attn = attend(q, k, v, cache, layer, mask, self.attn_dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(g, p, t, width)
        x = self.norm1(x + self.drop(self.out(attn, experts)), experts)
        return self.norm2(x + self.drop(self.ffn_out(F.relu(self.ffn_in(x, experts)), experts)), experts)


@dataclass
class ExpertCache:
    """Inference state of an ExpertBank over a fixed set of pairs (a rollout: task-level routing does not
    change within it; token-level routing runs every pair): the pair layout and one KV cache over all
    padded pairs, created on the first call."""

    dtype: torch.dtype
    layout: PairLayout | None = None
    kv: KVCache | None = None


@dataclass
class PairLayout:
    """Pairs grouped by expert and padded: pairs (G, P) indices into the pair list (short groups repeat
    their last pair), experts (G,) the experts present (None when all are, in order), valid (G*P,) which
    padded slots are real, and inverse (n_pairs,) which real slot holds each pair."""

    pairs: torch.Tensor
    experts: torch.Tensor | None
    valid: torch.Tensor
    inverse: torch.Tensor = field(repr=False)

    @classmethod
    def of(cls, pair_expert: torch.Tensor, n_experts: int) -> PairLayout:
        grouping = Grouping(pair_expert, n_experts)  # one device sync per layout
        longest = max(s.stop - s.start for _, s in grouping.slices)
        slots = torch.arange(longest, device=pair_expert.device)
        padded, valid = [], []
        for _, s in grouping.slices:  # once per layout (a rollout, or a training batch), not per token
            rows = grouping.rows(s)
            padded.append(torch.cat([rows, rows[-1:].expand(longest - len(rows))]))
            valid.append(slots < len(rows))
        experts = None if grouping.groups == list(range(n_experts)) else torch.tensor(grouping.groups,
                                                                                     device=pair_expert.device)
        return cls(torch.stack(padded), experts, torch.cat(valid), grouping.inverse)


class ExpertBank(nn.Module):
    """N_e experts j = token mixer m_j(z_t, a_t, e_k) (STORM's stem: Linear -> LN -> ReLU -> Linear -> LN)
    followed by a causal Transformer f_j (learned positions, LN, post-LN blocks; absent when
    `transformer` is False: the 'no expert Transformers' ablation), all with stacked weights."""

    def __init__(self, n_experts: int, latent_dim: int, action_dim: int, embed_dim: int, width: int, depth: int,
                 heads: int, ffn: int, dropout: float, max_len: int, transformer: bool = True,
                 attn_dropout: float = 0.0, ln_eps: float = 1e-5) -> None:
        super().__init__()
        n = self.n_experts = n_experts
        self.depth, self.heads, self.width, self.max_len = depth, heads, width, max_len
        self.mix_in = StackedLinear(n, latent_dim + action_dim + embed_dim, width, bias=False)
        self.mix_norm1 = StackedNorm(n, width)
        self.mix_out = StackedLinear(n, width, width, bias=False)
        self.mix_norm2 = StackedNorm(n, width)
        self.transformer = transformer
        if transformer:
            self.position = nn.Parameter(torch.randn(n, max_len, width))  # as nn.Embedding's N(0, 1)
            self.norm = StackedNorm(n, width, eps=1e-6)
            self.blocks = nn.ModuleList(StackedBlock(n, width, heads, ffn, dropout, attn_dropout, ln_eps)
                                        for _ in range(depth))

    def expert_parameters(self, j: int) -> list[torch.Tensor]:
        """Views of expert j's parameters (for inspection and tests)."""
        return [p[j] for p in self.parameters()]

    def forward(self, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor, pair_row: torch.Tensor,
                pair_expert: torch.Tensor, key_mask: torch.Tensor | None = None,
                cache: ExpertCache | None = None) -> torch.Tensor:
        """z (B, T, L), action (B, T, A), e (B, E); pair_row, pair_expert (P,); key_mask (P, T) or None
        -> outputs (P, T, D) in pair order."""
        if cache is not None and cache.layout is not None:
            layout = cache.layout
        else:
            layout = PairLayout.of(pair_expert, self.n_experts)
            if cache is not None:
                cache.layout = layout
        experts = layout.experts
        rows = pair_row[layout.pairs]  # (G, P)
        t = z.shape[1]
        inputs = torch.cat([z[rows], action[rows], e[rows][:, :, None].expand(-1, -1, t, -1)], -1)  # (G, P, T, in)
        x = self.mix_norm2(self.mix_out(F.relu(self.mix_norm1(self.mix_in(inputs, experts), experts)), experts),
                           experts)  # (G, P, T, D)
        if self.transformer:
            kv = None
            if cache is not None:
                if cache.kv is None:
                    cache.kv = KVCache.empty(self.depth, rows.numel(), self.heads, self.max_len,
                                             self.width // self.heads, z.device, cache.dtype)
                kv = cache.kv
            start = 0 if kv is None else kv.length
            mask = layer_mask(kv, None if key_mask is None else key_mask[layout.pairs].flatten(0, 1), t,
                              self.max_len, z.device)
            x = self.norm(x + pick(self.position, experts)[:, None, start:start + t], experts)
            for i, block in enumerate(self.blocks):
                x = block(x, experts, kv, i, mask)
            if kv is not None:
                kv.length += t
        return x.flatten(0, 1)[layout.valid][layout.inverse]  # (P, T, D) in pair order
