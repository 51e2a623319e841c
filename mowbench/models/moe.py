"""MoW's temporal-module pieces (spec mow.md section 2): experts (token mixer + small causal
Transformer) and the expert bank that runs the chosen (sequence, expert) pairs grouped by expert."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mowbench.models.transformer import CausalTransformer, KVCache, TokenStem
from mowbench.ops import Grouping


class Expert(nn.Module):
    """Expert j: token mixer m_j(z_t, a_t, e_k) -> width-D token, then its own causal Transformer f_j
    (absent when `transformer` is False: the 'no expert Transformers' ablation)."""

    def __init__(self, latent_dim: int, action_dim: int, embed_dim: int, width: int, depth: int, heads: int,
                 ffn: int, dropout: float, max_len: int, transformer: bool = True) -> None:
        super().__init__()
        self.mixer = TokenStem(latent_dim, action_dim, width, embed_dim)
        self.transformer = CausalTransformer(width, depth, heads, ffn, dropout, max_len) if transformer else None

    def forward(self, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """z (P, T, L), action (P, T, A), e (P, E) -> (P, T, D)."""
        x = self.mixer(z, action, e[:, None])
        return x if self.transformer is None else self.transformer(x, cache, key_mask)


@dataclass
class ExpertCache:
    """Inference state of an ExpertBank over a fixed set of pairs: the pair grouping (fixed for a
    rollout: task-level routing does not change within it; token-level routing runs every pair) and
    one KV cache per expert, sized to its group, created on the first call."""

    dtype: torch.dtype
    grouping: Grouping | None = None
    caches: dict[int, KVCache] = field(default_factory=dict)


class ExpertBank(nn.Module):
    """N_e experts. Input: pairs (row, expert); each expert runs once on all its pairs as one batch, so the
    Python loop is over the experts present (at most N_e), and the work grows with the number of pairs
    (B x TopK for task-level routing), never with the number of tasks."""

    def __init__(self, n_experts: int, **expert_args: object) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert(**expert_args) for _ in range(n_experts))  # type: ignore[arg-type]

    def forward(self, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor, pair_row: torch.Tensor,
                pair_expert: torch.Tensor, key_mask: torch.Tensor | None = None,
                cache: ExpertCache | None = None) -> torch.Tensor:
        """z (B, T, L), action (B, T, A), e (B, E); pair_row, pair_expert (P,); key_mask (P, T) or None
        -> outputs (P, T, D) in pair order."""
        if cache is not None and cache.grouping is not None:
            grouping = cache.grouping
        else:
            grouping = Grouping(pair_expert, len(self.experts))
            if cache is not None:
                cache.grouping = grouping
        outs = []
        for j, rows_slice in grouping.slices:
            pairs = grouping.rows(rows_slice)
            rows = pair_row[pairs]
            expert = self.experts[j]
            expert_cache = None
            if cache is not None and expert.transformer is not None:
                if j not in cache.caches:
                    cache.caches[j] = expert.transformer.empty_cache(len(rows), z.device, cache.dtype)
                expert_cache = cache.caches[j]
            mask = None if key_mask is None else key_mask[pairs]
            outs.append(expert(z[rows], action[rows], e[rows], expert_cache, mask))
        return grouping.merge(outs)
