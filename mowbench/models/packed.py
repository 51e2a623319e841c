"""nn.Linear and nn.Conv2d whose inference on CPU reuses a copy of the weight packed for oneDNN."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# torch's CPU matmul (MKL) repacks the weight at every call, and its convolution reorders the weight to oneDNN's
# layout at every call: at acting's few rows (one frame, 16 tokens) that costs more than the product, and MKL's
# kernels on AMD CPUs are slower than oneDNN's (docs/performance.md has the timings). oneDNN takes a weight
# packed once (torch's inductor does the same on CPU).
ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
          and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))
# Linear weights of fewer elements stay with F.linear: oneDNN's fixed cost a call outweighs what packing saves
# below about 2^17-2^18 elements (docs/performance.md). The tiny preset's networks are below it, the paper's
# Transformer, encoder, heads and actor-critic above.
PACK_MIN_ELEMENTS = 1 << 18
# The linear packing's row-count hint. oneDNN picks its kernel from it for one-row inputs, so it is a constant: a
# run's numbers must not depend on which call packed first.
PACK_ROWS = 16


def packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The packed path serves calls without gradients on CPU in fp32, outside torch.compile and CPU autocast."""
    return (ONEDNN and not torch.is_grad_enabled() and x.numel() > 0 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu"))


@contextlib.contextmanager
def unpacked() -> Iterator[None]:
    """Calls inside run torch's own ops, never the packed path: the same maths, in ops that FLOP counters
    (torch.utils.flop_counter, the bench's) know; oneDNN's packed ops count as nothing there."""
    global ONEDNN
    saved, ONEDNN = ONEDNN, False
    try:
        yield
    finally:
        ONEDNN = saved


class PackedWeights(dict):
    """A module's packed weights: name -> ((storage, version) of the weight it was packed from, packed weight).

    The key is the weight's storage and autograd version counter, which every in-place change bumps: optimizer
    steps (mowbench.agents.base.adam bumps it after fused Adam, whose kernel does not), EMA's lerp_,
    load_state_dict's copy_. A write that bypasses the counter (`weight.data.copy_(...)`, or assigning `.data`
    twice after packing, which can reuse the first storage under the same version) would leave the copy stale;
    tests/test_registry.py checks that every registered agent's update and restore bump it. Copies of the module
    (deepcopy, pickle) start empty: their weights are new tensors."""

    def get_packed(self, name: Hashable, weight: torch.Tensor, pack: Callable[[torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        entry = self.get(name)
        if entry is None or entry[0] != key:
            entry = self[name] = (key, pack(weight))
        return entry[1]

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedWeights:
        return PackedWeights()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return PackedWeights, ()


class Linear(nn.Linear):
    """nn.Linear (same parameters, initialisation and state_dict keys) whose calls without gradients on CPU in fp32
    (acting, evaluation, imagination, planning) use a oneDNN-packed copy of a weight of PACK_MIN_ELEMENTS or more,
    made at the first such call and kept while the weight is unchanged (PackedWeights). Everything else (training
    passes, CUDA, autocast, torch.compile, small weights) is F.linear. The maths are the same; the float rounding
    differs from MKL's (~1e-6 relative)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packed = PackedWeights()  # (first, last) output rows -> packed weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, 0, self.out_features)

    def rows(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """x (..., in) -> (..., last - first): output features first:last only (e.g. Q, or K and V, of a fused
        projection), the same values as forward's columns first:last."""
        whole = (first, last) == (0, self.out_features)
        weight = self.weight if whole else self.weight[first:last]  # (last - first, in)
        bias = None if self.bias is None else self.bias if whole else self.bias[first:last]
        if weight.numel() < PACK_MIN_ELEMENTS or not packable(x, weight):
            return F.linear(x, weight, bias)
        packed = self.packed.get_packed((first, last), weight, lambda w: torch.ops.mkldnn._reorder_linear_weight(
            w.contiguous(), PACK_ROWS))
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        return torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "").view(*x.shape[:-1], -1)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict keys) whose calls without gradients on CPU in fp32 use a copy of
    the weight reordered once for oneDNN (PackedWeights), instead of at every call: the same bits as nn.Conv2d's
    (tested), and faster at acting's batch 1. Zero padding only (the encoder's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert self.padding_mode == "zeros" and not isinstance(self.padding, str), "packed convs pad with zeros"
        self.packed = PackedWeights()
        # padding, stride, dilation, groups: as oneDNN's packing and convolution take them
        self.geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not packable(x, self.weight) or x.dim() != 4:
            return super().forward(x)
        packed = self.packed.get_packed("weight", self.weight, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
            w, *self.geometry, [1, *x.shape[1:]]))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *self.geometry, "none", [], "")
