"""Stacked experts: n independent layers with their weights stacked along a leading expert dimension, so that
the chosen experts run together (MoW's temporal-module experts, models/mow.py; ScaleZero-lite's MoE feed-forwards,
models/unizero.py).

A call takes (sequence, expert) pairs; the pairs are sorted by expert (PairLayout) so that each expert's pairs are
one contiguous slice, and every projection runs each expert's weights on its own slice only: the work is that of
the real pairs, with no padding of small groups to the largest one. Two kernels do this, with equal results
(tests/test_moe.py):
- `grouped`: one grouped matmul (torch's F.grouped_mm) per projection; no host synchronisation at all. Used
  where the call fits the kernel (rows of 16-byte multiples; on CPU in any precision, on CUDA in bf16). An input
  width that does not fit (MoW's token mixer reads z + a + e_k, 1106 wide at the paper preset on Atari) is padded
  with zero columns on CUDA (`pad_inputs`), so that no projection falls back to the loop and its host read; equal
  up to float rounding. On CPU, where a host read costs nothing, such a projection takes the loop (exact).
- `loop`: a Python loop over the experts present, one matmul per slice (the slice sizes are read from the
  device once per layout: a rollout or a training batch).
`auto` takes auto_kernel's choice for the device. Attention is per sequence and needs no expert weights, so it
runs over all pairs at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mowbench.models.transformer import KVCache, attend
from mowbench.ops import Grouping, counts_of

KERNELS = ("auto", "grouped", "loop")


@dataclass
class PairLayout:
    """Pairs sorted by expert (ops.Grouping of the pairs by their expert): order (P,) the pair in each sorted
    slot, inverse (P,) the slot of each pair, expert (P,) each slot's expert, ends (N_e,) int32 where each
    expert's slots end (empty experts included), and the kernel, 'grouped' or 'loop'."""

    grouping: Grouping
    expert: torch.Tensor
    ends: torch.Tensor
    kernel: str
    pad_inputs: bool = False  # grouped: pad input widths that do not fit F.grouped_mm instead of looping

    @classmethod
    def of(cls, pair_expert: torch.Tensor, n_experts: int, kernel: str, pad_inputs: bool | None = None
           ) -> PairLayout:
        """pad_inputs None: on CUDA only (module docstring)."""
        grouping = Grouping(pair_expert, n_experts)
        kernel = resolve_kernel(kernel, pair_expert.device)
        pad = pair_expert.device.type == "cuda" if pad_inputs is None else pad_inputs
        return cls(grouping, pair_expert[grouping.order], grouping.counts.cumsum(0).to(torch.int32), kernel, pad)

    @property
    def order(self) -> torch.Tensor:
        return self.grouping.order

    @property
    def inverse(self) -> torch.Tensor:
        return self.grouping.inverse

    def slot_counts(self) -> list[int]:
        """Slots per expert, empty ones included (host ints: the 'loop' kernel reads them once per layout)."""
        return self.grouping.sizes


def auto_kernel(device: torch.device) -> str:
    """'grouped' on CPU and on Hopper or newer GPUs (capability 9+), where it measured faster than 'loop' for MoW's
    experts at the paper preset (docs/performance.md); 'loop' on older GPUs, where grouped_mm's CUDA kernels are not
    measured (or not built)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "loop"
    return "grouped"


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The kernel `kernel` (one of KERNELS) runs on `device`: 'auto' becomes auto_kernel's choice."""
    return auto_kernel(device) if kernel == "auto" else kernel


def fits_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether F.grouped_mm takes x (R, in) @ weight (N_e, in, out): its rows must be 16-byte multiples."""
    size = x.element_size()
    return x.dtype == weight.dtype and (x.shape[-1] * size) % 16 == 0 and (weight.shape[-1] * size) % 16 == 0


@torch.compiler.disable  # F.grouped_mm's compile-time shape check wants bf16 (CUDA); eager takes fp32 on CPU too
def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (R, in) @ weight (N_e, in, out), rows of expert j in [ends[j-1], ends[j]) -> (R, out)."""
    y = F.grouped_mm(x.contiguous(), weight, offs=ends)
    if y.requires_grad:  # its backward refuses the broadcast (stride-0) gradients that sums produce
        y.register_hook(torch.Tensor.contiguous)
    return y


def pad_inner(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (R, in) and weight (N_e, in, out) with `in` grown by zero columns / rows to a multiple of 16 bytes: the
    same products (the added terms are 0 x 0), in a shape F.grouped_mm takes."""
    pad = -x.shape[-1] % (16 // x.element_size())
    return F.pad(x, (0, pad)), F.pad(weight, (0, 0, 0, pad))


def expert_matmul(x: torch.Tensor, weight: torch.Tensor, layout: PairLayout) -> torch.Tensor:
    """x (P, T, in) in slot order @ each slot's expert's weight (N_e, in, out) -> (P, T, out)."""
    p, t, _ = x.shape
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm: cast here
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    flat = x.reshape(p * t, x.shape[-1])
    if layout.kernel == "grouped" and layout.pad_inputs and not fits_grouped_mm(flat, weight):
        flat, weight = pad_inner(flat, weight)
    if layout.kernel == "grouped" and fits_grouped_mm(flat, weight):
        y = grouped_matmul(flat, weight, layout.ends * t)
    else:
        counts = [c * t for c in layout.slot_counts()]
        y = torch.cat([xs @ w for xs, w, c in zip(flat.split(counts), weight.unbind(0), counts, strict=True) if c])
    return y.view(p, t, weight.shape[-1])


class StackedLinear(nn.Module):
    """n independent Linear layers, weight (n, in, out): x (P, T, in) in slot order -> (P, T, out), each slot
    through its expert's layer. Initialised as nn.Linear (uniform in +-1/sqrt(in))."""

    def __init__(self, n: int, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, out_dim).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        y = expert_matmul(x, self.weight, layout)
        return y if self.bias is None else y + self.bias[layout.expert][:, None].to(y.dtype)


class StackedNorm(nn.Module):
    """n independent LayerNorms over the last dim (affine per expert): x (P, T, D) in slot order."""

    def __init__(self, n: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n, dim))
        self.bias = nn.Parameter(torch.zeros(n, dim))

    def forward(self, x: torch.Tensor, layout: PairLayout) -> torch.Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return y * self.weight[layout.expert][:, None] + self.bias[layout.expert][:, None]


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

    def forward(self, x: torch.Tensor, layout: PairLayout, cache: KVCache | None, layer: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x (P, T, D) in slot order; attention within each sequence, each projection by its expert's weights."""
        p, t, width = x.shape
        qkv = self.qkv(x, layout).view(p, t, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3x (P, H, T, d)
        attn = attend(q, k, v, cache, layer, mask, self.attn_dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(p, t, width)
        x = self.norm1(x + self.drop(self.out(attn, layout)), layout)
        return self.norm2(x + self.drop(self.ffn_out(F.relu(self.ffn_in(x, layout)), layout)), layout)


def padding_ratio(pair_expert: torch.Tensor, n_experts: int) -> float:
    """The work of running the experts present on groups padded to the largest one, over the real pairs:
    G x max group / P (what this bank did before its pairs were sorted; 1.0 means no padding)."""
    counts = counts_of(pair_expert, n_experts)
    return float((counts > 0).sum() * counts.max()) / len(pair_expert)
