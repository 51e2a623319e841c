"""nn.Linear whose inference on CPU reuses a copy of its weight packed for oneDNN."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torch's CPU matmul (MKL) repacks the weight at every call: at a few rows (batch-1 acting, 16 tokens) that packing
# and MKL's kernels on AMD CPUs cost more than the product (STORM's 16-row qkv: 0.23 ms with F.linear, 0.13 ms
# packed, on 2 EPYC cores). oneDNN's linear takes a weight packed once (torch's inductor does the same on CPU).
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Weights of fewer elements stay with F.linear: oneDNN's ~15 us a call outweighs what packing saves below ~2^17-2^18
# (F.linear vs packed at 1 / 16 / 1024 rows on 2 EPYC cores: 256 x 256: 7 / 22 / 685 us vs 19 / 27 / 647 us;
# 512 x 512: 27 / 79 / 2744 us vs 25 / 58 / 2444 us). The tiny preset's networks are below it, the paper's
# Transformer, encoder, heads and actor-critic above.
PACK_MIN_ELEMENTS = 1 << 18
# The packing's row-count hint. oneDNN picks its kernel from it for one-row inputs, so it is a constant: a run's
# numbers must not depend on which call packed first.
PACK_ROWS = 16


def packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The packed path serves weights of PACK_MIN_ELEMENTS or more, called without gradients on CPU in fp32, outside
    torch.compile and CPU autocast."""
    return (ONEDNN and weight.numel() >= PACK_MIN_ELEMENTS and not torch.is_grad_enabled() and x.numel() > 0
            and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


class Linear(nn.Linear):
    """nn.Linear (same parameters, initialisation and state_dict keys) whose calls without gradients on CPU in fp32
    (acting, evaluation, imagination, planning) use a oneDNN-packed copy of the weight, made at the first such call
    and kept while the weight is unchanged. Everything else (training passes, CUDA, autocast, torch.compile) is
    F.linear. The maths are the same; the float rounding differs from MKL's (~1e-6 relative).

    The copy is keyed on the weight's storage and autograd version counter, which every in-place change bumps:
    optimizer steps (mowbench.agents.base.adam bumps it after fused Adam, whose kernel does not), EMA's lerp_,
    load_state_dict's copy_. A write that bypasses the counter (`weight.data.copy_(...)`) would leave the copy
    stale; tests/test_linear.py checks every registered agent's update and restore bump it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (first, last) output rows -> ((storage, version) it was packed from, packed weight)
        self.packed: dict[tuple[int, int], tuple[tuple[int, int], torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, 0, self.out_features)

    def rows(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """x (..., in) -> (..., last - first): output features first:last only (e.g. Q, or K and V, of a fused
        projection), the same values as forward's columns first:last."""
        whole = (first, last) == (0, self.out_features)
        weight = self.weight if whole else self.weight[first:last]  # (last - first, in)
        bias = None if self.bias is None else self.bias if whole else self.bias[first:last]
        if not packable(x, weight):
            return F.linear(x, weight, bias)
        key = (weight.data_ptr(), weight._version)
        entry = self.packed.get((first, last))
        if entry is None or entry[0] != key:
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS))
            self.packed[(first, last)] = entry
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        return torch.ops.mkldnn._linear_pointwise(flat, entry[1], bias, "none", [], "").view(*x.shape[:-1], -1)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) start without packed weights: they would be packed from the original's."""
        return {**self.__dict__, "packed": {}}
