"""CUDA-graph replay of an agent's fixed-shape computations (imagination, the updates), with a check against eager
and a clean fallback: the launch overhead of ~170 small kernels a horizon step, not arithmetic, is what a GPU spends
on imagination (issue 14's H100 figures: 7 ms a step at batch 1024, 1.6% of matmul peak)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

Inputs = tuple[torch.Tensor | None, ...]
Outputs = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


@dataclass
class Captured:
    """One signature's graph: the static inputs it reads and the static outputs it writes (keys: a dict's)."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: Inputs
    outputs: tuple[torch.Tensor, ...]
    keys: tuple[str, ...] | None


def signature(inputs: Inputs) -> tuple:
    """What a graph is specific to: every input's shape, dtype and device (None: absent)."""
    return tuple(None if x is None else (tuple(x.shape), x.dtype, x.device) for x in inputs)


def flat(outputs: Outputs) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """A tuple of tensors, or a dict's values and keys."""
    if isinstance(outputs, dict):
        return tuple(outputs.values()), tuple(outputs)
    return tuple(outputs), None


def graphs_wanted(setting: bool | str, device: torch.device) -> bool:
    """An agent's `cuda_graphs` setting -> whether its calls try CUDA graphs: true always (off CUDA they run
    eagerly anyway), auto on a CUDA device, false never."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer's step changes in place (moments, step counts), for GraphedCall's `state`."""
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


class CudaGraphs:
    """What GraphedCall needs from the device: its RNG state, a side stream, a graph's capture and replay. CUDA's;
    tests swap in an eager stand-in to check GraphedCall's bookkeeping (undoing warm-ups, checking, refusing) on
    CPU, where no graph can be captured."""

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def get_rng_state(self, device: torch.device) -> torch.Tensor:
        return torch.cuda.get_rng_state(device)

    def set_rng_state(self, state: torch.Tensor, device: torch.device) -> None:
        torch.cuda.set_rng_state(state, device)

    def warm_up(self, fn: Callable[[], Outputs], device: torch.device, times: int = 3) -> None:
        """fn() `times` times on a side stream (lazy library set-up stays out of the graph; torch's whole-network
        example warms up 3 times), then joined."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(times):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def capture(self, fn: Callable[..., Outputs], inputs: Inputs) -> tuple[Any, Outputs]:
        """A graph of fn(*inputs) (its kernels recorded, not run) and the static outputs its replays write."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads' CUDA calls are theirs
            outputs = fn(*inputs)
        return graph, outputs

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)


class GraphedCall:
    """fn(*inputs) -> tuple or dict of tensors, replayed from one CUDA graph per input signature (opt-in, CUDA only;
    elsewhere, and when `enabled` is False, fn runs eagerly).

    fn must be capturable: no host synchronisation (no .item(), .tolist(), boolean-mask indexing, ...), no
    host-to-device copies, the same kernels for the same input shapes and key, and no state kept between calls
    other than tensors updated in place (parameters, buffers, optimizer moments; an optimizer needs
    capturable=True). Random draws come from the device's default generator, which a replay advances as eager
    calls do. fn may memoize on its inputs' identity within one call (MoW reuses a grouping and the task
    embedding across a rollout's steps): each call GraphedCall makes of fn gets input tensors of its own, so a
    memo filled by a warm-up is never found by the capture, which would then record no kernels for it and
    replay its stale values.

    A signature's graph is captured at its first call, or, with `state` (the tensors fn changes in place: a
    training step), at its second, after an eager call has made lazily created state (an optimizer's moments).
    fn is warmed up on a side stream (lazy library set-up stays out of the graph), captured, and checked: from
    one RNG state (and one `state`), a replay's outputs (and state) must equal an eager call's bitwise. Warm-up
    and check are undone (RNG and `state` restored), so a run draws the same numbers and takes the same steps
    with or without graphs. A capture that raises (a sync fn should not have) or a replay that differs makes that
    signature run eagerly from then on, after one warning naming why."""

    def __init__(self, fn: Callable[..., Outputs], name: str, enabled: bool = True,
                 state: Callable[[], list[torch.Tensor]] | None = None, backend: CudaGraphs | None = None,
                 max_graphs: int = 2) -> None:
        self.fn, self.name, self.enabled, self.state = fn, name, enabled, state
        self.backend = CudaGraphs() if backend is None else backend
        self.max_graphs = max_graphs  # graphs kept (each holds its memory pool); the oldest goes first
        self.reset()

    def reset(self) -> None:
        """Forget every graph: after the tensors fn changes in place were replaced rather than updated (an
        optimizer's load_state_dict makes new moments), a graph would read the old ones."""
        self.captured: dict[tuple, Captured | None] = {}  # None: this signature runs eagerly
        self.refused: dict[tuple, str] = {}  # why a signature runs eagerly
        self.seen: set[tuple] = set()  # signatures called once (with `state`: captured at the second call)

    def __call__(self, *inputs: torch.Tensor | None, key: Hashable = None) -> Outputs:
        """fn(*inputs); `key`: host-side facts beyond the inputs' shapes that fn's kernels depend on (MoW: rows per
        VAE cluster), so a graph is captured per distinct value."""
        device = next(x.device for x in inputs if x is not None)
        if not self.enabled or not self.backend.available(device):
            return self.fn(*inputs)
        sig = (signature(inputs), key)
        if sig not in self.captured and self.state is not None and sig not in self.seen:
            self.seen.add(sig)
            return self.fn(*inputs)
        first = sig not in self.captured
        if first:  # the capture's checking replay is this call's result
            graphs = [k for k, v in self.captured.items() if v is not None]
            for old in graphs[:max(0, len(graphs) - self.max_graphs + 1)]:  # e.g. MoW's layout before clustering
                del self.captured[old]
            self.captured[sig] = self.capture(inputs, sig, device)
        entry = self.captured[sig]
        if entry is None:
            return self.fn(*inputs)
        if not first:
            for static, x in zip(entry.inputs, inputs, strict=True):
                if static is not None:
                    static.copy_(x)
            entry.graph.replay()
        # copies: the next replay overwrites the static outputs, and callers may keep a result (the bench does)
        values = tuple(out.clone() for out in entry.outputs)
        return values if entry.keys is None else dict(zip(entry.keys, values, strict=True))

    def capture(self, inputs: Inputs, sig: tuple, device: torch.device) -> Captured | None:
        backend = self.backend
        static = tuple(None if x is None else x.clone() for x in inputs)
        rng = backend.get_rng_state(device)
        state = [] if self.state is None else self.state()
        saved = [t.detach().clone() for t in state]

        @torch.no_grad()  # parameters among the state
        def rewind() -> None:  # the RNG and the state as this call found them
            backend.set_rng_state(rng, device)
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)

        def fresh() -> Inputs:  # new tensor objects with the static inputs' values (see the class's docstring)
            return tuple(None if x is None else x.clone() for x in static)

        try:
            backend.warm_up(lambda: self.fn(*fresh()), device)
            rewind()
            graph, captured = backend.capture(self.fn, static)
            outputs, keys = flat(captured)
            rewind()  # a capture runs nothing; its stand-in in tests does
            expected, _ = flat(self.fn(*fresh()))
            expected_state = [t.detach().clone() for t in state]
            rewind()
            graph.replay()
        except RuntimeError as err:  # an op the capture does not allow: this signature stays eager
            backend.synchronize(device)
            rewind()
            return self.refuse(sig, f"capture failed: {str(err).splitlines()[0]}")
        differ: list[int | str] = [i for i, (a, b) in enumerate(zip(outputs, expected, strict=True))
                                   if not torch.equal(a, b)]
        differ += [f"state {i}" for i, (a, b) in enumerate(zip(state, expected_state, strict=True))
                   if not torch.equal(a, b)]
        if differ:
            rewind()
            return self.refuse(sig, f"a replay's outputs {differ[:5]} differ from eager's")
        return Captured(graph, static, outputs, keys)

    def refuse(self, sig: tuple, why: str) -> None:
        """Record and warn (once per signature) that `sig` runs eagerly."""
        self.refused[sig] = why
        shapes = [None if s is None else s[0] for s in sig[0]]
        warnings.warn(f"cuda_graphs: {self.name} runs eagerly for inputs {shapes}: {why}", stacklevel=3)
        return None

    def status(self) -> dict[str, int]:
        """Signatures replayed from graphs and signatures run eagerly (for the bench and the run's log)."""
        return {"graphed": sum(v is not None for v in self.captured.values()), "eager": len(self.refused)}
