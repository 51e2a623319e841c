"""STORM's sequence model: token stem and a post-LN causal Transformer with a projected-K/V cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mowbench.models.packed import Linear


class TokenStem(nn.Module):
    """concat(z_t, a_t [, cond]) -> width-D token: Linear(no bias) -> LN -> ReLU -> Linear(no bias) -> LN.

    In MoW this is the per-expert 'token mixer' m_j(z_t, a_t, e_k) (cond_dim = task-embedding size).
    """

    def __init__(self, latent_dim: int, action_dim: int, width: int, cond_dim: int = 0) -> None:
        super().__init__()
        self.in_dim = latent_dim + action_dim + cond_dim
        self.net = nn.Sequential(
            Linear(self.in_dim, width, bias=False), nn.LayerNorm(width), nn.ReLU(),
            Linear(width, width, bias=False), nn.LayerNorm(width))

    def forward(self, z: torch.Tensor, action: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        parts = [z, action] if cond is None else [z, action, cond.expand(*z.shape[:-1], cond.shape[-1])]
        return self.net(torch.cat(parts, dim=-1))  # (B, T, D)


@dataclass
class KVCache:
    """Projected keys/values of every layer for the tokens seen so far (inference only).

    k, v: (n_layers, B, heads, max_len, head_dim); `length` tokens are filled. Keeping projected K/V
    (not layer inputs, as STORM's reference does) makes each new token cost O(T) instead of O(T^2).
    valid (B, max_len) bool, only with key masks: which cached tokens later queries may attend to.
    offset (B,) long or None: rows of different lengths in one cache (batched acting), left-padded: row i's
    tokens start at slot offset[i], take positions slot - offset[i], and never attend to the slots before.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    valid: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @classmethod
    def empty(cls, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
              device: torch.device, dtype: torch.dtype, offset: torch.Tensor | None = None) -> KVCache:
        shape = (n_layers, batch, heads, max_len, head_dim)  # slots past `length` are never read
        return cls(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype),
                   offset=offset)


def positions(cache: KVCache | None, length: int, device: torch.device) -> torch.Tensor:
    """Positions of `length` new tokens: (T,) after the cached ones, or (B, T) with per-row offsets (slots of the
    left padding take position 0; nothing attends to them)."""
    start = 0 if cache is None else cache.length
    pos = torch.arange(start, start + length, device=device)
    if cache is None or cache.offset is None:
        return pos
    return (pos - cache.offset[:, None]).clamp(min=0)


def position_embedding(table: torch.Tensor, cache: KVCache | None, length: int) -> torch.Tensor:
    """Learned positions of `length` new tokens from table (max_len, D): (T, D), a slice of the table when every
    row starts at one position (the same values as a lookup, without its gather kernel and the index scatter of
    its backward: one kernel fewer each way at every call), or (B, T, D) with per-row offsets (see positions)."""
    if cache is None or cache.offset is None:
        start = 0 if cache is None else cache.length
        return table[start:start + length]
    return F.embedding(positions(cache, length, table.device), table)


def attention_mask(new: int, start: int, key_mask: torch.Tensor | None, device: torch.device
                   ) -> torch.Tensor | None:
    """Boolean mask (True = attend) for `new` queries at positions start.. over start+new keys.

    Causal; with key_mask (B, start+new) a query also skips keys marked False, except itself (MoW's
    token routing: an expert sees only the tokens routed to it). None means "no mask needed".
    """
    if key_mask is None:
        return None if new == 1 else torch.ones(new, start + new, dtype=torch.bool, device=device).tril(start)
    causal = torch.ones(new, start + new, dtype=torch.bool, device=device).tril(start)  # (new, S)
    own = torch.zeros_like(causal)
    own[torch.arange(new), start + torch.arange(new)] = True
    return (causal & key_mask[:, None, :]) | own  # (B, new, S)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
           mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of q (B, H, Tq, d), k, v (B, H, T, d) -> (B, H, Tq, d): Tq = T, or 1 (the last
    token's query, which attends to every key). With a cache, k and v are written after the cached tokens and
    the queries attend to all of them. mask from attention_mask() ((Tq, S) or (B, Tq, S)); None: plain causal.
    `dropout`: on the attention probabilities (training only; the caller passes 0 in eval mode)."""
    mask = None if mask is None else (mask if mask.dim() == 2 else mask[:, None])  # broadcast over heads
    if cache is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              dropout_p=dropout)
    start, new = cache.length, k.shape[2]  # new keys; with `last` a single query
    cache.k[layer, :, :, start:start + new] = k.to(cache.k.dtype)
    cache.v[layer, :, :, start:start + new] = v.to(cache.v.dtype)
    keys = cache.k[layer, :, :, :start + new].to(q.dtype)
    values = cache.v[layer, :, :, :start + new].to(q.dtype)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def layer_mask(cache: KVCache | None, key_mask: torch.Tensor | None, length: int, max_len: int,
               device: torch.device) -> torch.Tensor | None:
    """The attention mask of `length` new tokens (see attention_mask), after checking they fit in
    max_len. With a cache and a key mask (B, T) the mask is recorded in cache.valid for later queries; a cache
    with row offsets masks each row's left padding."""
    start = 0 if cache is None else cache.length
    if start + length > max_len:
        raise ValueError(f"sequence length {start + length} exceeds max_len={max_len}")
    if cache is not None and cache.offset is not None:
        real = torch.arange(start, start + length, device=device) >= cache.offset[:, None]  # (B, T)
        key_mask = real if key_mask is None else key_mask & real
    if cache is not None and key_mask is not None:
        if cache.valid is None:
            cache.valid = torch.zeros(key_mask.shape[0], max_len, dtype=torch.bool, device=device)
        cache.valid[:, start:start + length] = key_mask
        key_mask = cache.valid[:, :start + length]
    if cache is None and key_mask is None:
        return None  # is_causal fast path
    return attention_mask(length, start, key_mask, device)


class Block(nn.Module):
    """Post-LN block: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x))). Projections have no bias.

    STORM's reference (the code behind the published numbers) also drops attention probabilities
    (`attn_dropout`, 0.1 there) and uses LayerNorm eps 1e-6 in its blocks (`ln_eps`); torch's default eps
    is 1e-5. Both are arguments so the textbook block stays one config value away."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float, attn_dropout: float = 0.0,
                 ln_eps: float = 1e-5) -> None:
        super().__init__()
        assert width % heads == 0, f"width={width} not divisible by heads={heads}"
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = Linear(width, 3 * width, bias=False)
        self.out = Linear(width, width, bias=False)
        self.norm1 = nn.LayerNorm(width, eps=ln_eps)
        self.ffn = nn.Sequential(Linear(width, ffn), nn.ReLU(), Linear(ffn, width))
        self.norm2 = nn.LayerNorm(width, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, last: bool = False) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); mask from attention_mask() ((T, S) or (B, T, S)), None: plain causal.

        last: only the last token's output (B, 1, D). Every token's key and value is still computed (and cached),
        the query, attention, projections and FFN only for the last token, which attends to all the others:
        the same maths as the full pass's last row, for about a sixth of a block's work at T = 16."""
        b, t, width = x.shape
        heads = (self.heads, width // self.heads)
        if last:  # K, V of every token (B, H, T, d); Q of the last (B, H, 1, d), which attends to all of them
            k, v = self.qkv.rows(x, width, 3 * width).view(b, t, 2, *heads).permute(2, 0, 3, 1, 4)
            x, t = x[:, -1:], 1  # the residual stream goes on for the last token only
            q = self.qkv.rows(x, 0, width).view(b, 1, *heads).transpose(1, 2)
            mask = None if mask is None else mask[..., -1:, :]
        else:
            q, k, v = self.qkv(x).view(b, t, 3, *heads).permute(2, 0, 3, 1, 4)  # 3x (B, H, T, d)
        attn = attend(q, k, v, cache, layer, mask, self.attn_dropout if self.training else 0.0)
        x = self.norm1(x + self.drop(self.out(attn.transpose(1, 2).reshape(b, t, width))))
        return self.norm2(x + self.drop(self.ffn(x)))


class CausalTransformer(nn.Module):
    """Tokens (B, T, D) -> h (B, T, D): learned positions, LayerNorm(eps 1e-6), post-LN causal blocks."""

    def __init__(self, width: int, depth: int, heads: int, ffn: int, dropout: float = 0.1,
                 max_len: int = 64, attn_dropout: float = 0.0, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.width, self.depth, self.heads, self.max_len = width, depth, heads, max_len
        self.position = nn.Embedding(max_len, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.blocks = nn.ModuleList(Block(width, heads, ffn, dropout, attn_dropout, ln_eps) for _ in range(depth))

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype = torch.float32,
                    offset: torch.Tensor | None = None) -> KVCache:
        return KVCache.empty(self.depth, batch, self.heads, self.max_len, self.width // self.heads, device, dtype,
                             offset)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                key_mask: torch.Tensor | None = None, last: bool = False) -> torch.Tensor:
        """Full causal pass (cache=None) or append tokens after the cached ones and return their h (B, T, D).

        key_mask (B, T) bool: tokens later queries may attend to (None: all); see attention_mask().
        last: h of the last token only (B, 1, D), which is all acting and imagination's context pass need; the
        final block then computes only the keys and values of the others (see Block)."""
        length = tokens.shape[1]
        mask = layer_mask(cache, key_mask, length, self.max_len, tokens.device)
        x = self.norm(tokens + position_embedding(self.position.weight, cache, length))  # layer_mask checked T
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, mask, last and i == self.depth - 1)
        if cache is not None:
            cache.length += length
        return x  # (B, T, D)
