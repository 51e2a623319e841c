"""`python -m mowbench.verify agent=NAME [overrides]`: does our implementation compute what the method's published
code computes? Reference numbers recorded from the upstream code (mowbench/data/reference/<agent>/: reference.pt
and SOURCES.md, which names the upstream commit and how the file was made) are replayed through our code: the
upstream initial weights (mapped onto ours by the baseline file's name map), the same inputs and the same random
draws, the same updates. Prints one row per quantity (upstream, ours, relative difference, tolerance, verdict)
and exits non-zero if any is outside its tolerance.

Overrides are those of `python -m mowbench.run` (composed the same way, on top of the method's upstream protocol:
its baseline file's VERIFY_DEFAULTS, else env=atari100k preset=paper, unless the command names its own env or
preset); the reference's sizes are applied on top of them, so a behavioural override (e.g.
ablation=textbook_returns) changes what runs and can fail the check.
Runs on the CPU in fp32 on one thread, deterministically, whatever device, precision and threads say.

`--all` verifies every agent with reference data. A method is added by its data (reference.pt, SOURCES.md) and a
hook in its baseline file: `verify_reference(reference, agent_values) -> list[Row]` (see baselines/storm.py). A
baseline file may name another method whose data it replays, `VERIFY_REFERENCE = "storm"` (MoW, which has no
published code: a MoW that reduces to STORM replays STORM's data); its hook then gets that method's reference."""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"
# the upstream protocol: Atari-sized frames and the published hyperparameters (a command naming its own wins); a
# baseline file's VERIFY_DEFAULTS replaces it for its method (TD-MPC2: Meta-World)
DEFAULT_OVERRIDES = ("env=atari100k", "preset=paper")
HOOK = "verify_reference"


@dataclass(frozen=True)
class Row:
    """One compared quantity. upstream/ours: the values shown (for a tensor, its mean); difference: the relative
    difference that is judged (scalars |ours - upstream| / max(|upstream|, floor); tensors max |ours - upstream| /
    max(max |upstream|, floor); discrete draws the fraction that differ); tolerance: the largest difference
    allowed; why: the key of the reason for that tolerance (the method's TOLERANCES)."""

    quantity: str
    upstream: float
    ours: float
    difference: float
    tolerance: float
    why: str

    @property
    def ok(self) -> bool:
        return math.isfinite(self.difference) and self.difference <= self.tolerance


def scalar_row(quantity: str, upstream: float, ours: float, tolerance: float, why: str, floor: float = 1e-12) -> Row:
    """A scalar compared relative to its upstream value (`floor`: the smallest scale, for values near zero)."""
    upstream, ours = float(upstream), float(ours)
    return Row(quantity, upstream, ours, abs(ours - upstream) / max(abs(upstream), floor), tolerance, why)


def tensor_row(quantity: str, upstream: torch.Tensor, ours: torch.Tensor, tolerance: float, why: str,
               floor: float = 1e-12) -> Row:
    """A tensor compared elementwise: the largest difference relative to the largest upstream magnitude."""
    upstream, ours = upstream.detach().double().cpu(), ours.detach().double().cpu()
    if upstream.shape != ours.shape:
        return Row(f"{quantity} (shape {tuple(ours.shape)} vs {tuple(upstream.shape)})", float("nan"), float("nan"),
                   float("inf"), tolerance, why)
    scale = max(upstream.abs().max().item(), floor)
    return Row(quantity, upstream.mean().item(), ours.mean().item(), (ours - upstream).abs().max().item() / scale,
               tolerance, why)


def exact_row(quantity: str, upstream: torch.Tensor, ours: torch.Tensor, why: str) -> Row:
    """Discrete values (sampled indices, flags) that must be equal: the fraction that differ, tolerance 0."""
    upstream, ours = upstream.detach().cpu().long(), ours.detach().cpu().long()
    if upstream.shape != ours.shape:
        return Row(f"{quantity} (shape {tuple(ours.shape)} vs {tuple(upstream.shape)})", float("nan"), float("nan"),
                   float("inf"), 0.0, why)
    differ = (upstream != ours).double().mean().item()
    return Row(quantity, upstream.double().mean().item(), ours.double().mean().item(), differ, 0.0, why)


@contextlib.contextmanager
def recording(module: Any, name: str) -> Iterator[list[Any]]:
    """Inside, calls of the function `module.name` (as the module looks it up) also append what they return to the
    yielded list: a hook reads intermediate values of our code (e.g. lambda-returns) without changing it."""
    original = getattr(module, name)
    values: list[Any] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        value = original(*args, **kwargs)
        values.append(value)
        return value

    setattr(module, name, wrapper)
    try:
        yield values
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def draws_from(module: Any, draws: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Inside, each call of `module.NAME` (e.g. torch.randn, torch.randperm) for NAME in `draws` returns the next
    of draws[NAME] instead of a new draw: another implementation's random draws replayed through our code in the
    order of the calls. Raises if a call finds none left or one of another shape than it asks for, and at the end
    if some are left over."""
    queues = {name: list(values) for name, values in draws.items()}
    originals = {name: getattr(module, name) for name in draws}

    def replay(name: str) -> Callable[..., torch.Tensor]:
        def draw(*args: Any, **kwargs: Any) -> torch.Tensor:
            drawn = originals[name](*args, **kwargs)  # the draw ours asks for: its shape, dtype and device
            if not queues[name]:
                raise RuntimeError(f"no recorded {name} draw left for a call of shape {tuple(drawn.shape)}")
            value = queues[name].pop(0)
            if value.shape != drawn.shape:
                raise RuntimeError(f"recorded {name} draw of shape {tuple(value.shape)} for a call of shape "
                                   f"{tuple(drawn.shape)}")
            return value.to(drawn.device, drawn.dtype, copy=True)

        return draw

    for name in draws:
        setattr(module, name, replay(name))
    try:
        yield
        left = {name: len(queue) for name, queue in queues.items() if queue}
        if left:
            raise RuntimeError(f"recorded draws not used: {left}")
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def format_table(title: str, rows: list[Row], reasons: dict[str, str]) -> str:
    """The printed table, then the reason of each tolerance used."""
    width = max([len("quantity"), *(len(r.quantity) for r in rows)])
    head = f"{'quantity':<{width}}  {'upstream':>14}  {'ours':>14}  {'rel. diff':>9}  {'tolerance':>9}  verdict"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.quantity:<{width}}  {r.upstream:>14.7g}  {r.ours:>14.7g}  {r.difference:>9.2e}  "
                     f"{r.tolerance:>9.1e}  {'ok' if r.ok else 'FAIL'}  [{r.why}]")
    failed = [r for r in rows if not r.ok]
    lines.append(f"{len(rows) - len(failed)}/{len(rows)} within tolerance" + (
        f"; FAILED: {', '.join(r.quantity for r in failed)}" if failed else ""))
    lines.append("tolerances:")
    lines += [f"  [{key}] {reasons[key]}" for key in sorted({r.why for r in rows}) if key in reasons]
    return "\n".join(lines)


def reference_of(agent: str) -> str:
    """Whose reference data the agent replays: its baseline file's VERIFY_REFERENCE, else its own."""
    from mowbench.agents.base import registered_agents

    entry = registered_agents().get(agent)
    return agent if entry is None else getattr(inspect.getmodule(entry.cls), "VERIFY_REFERENCE", agent)


def reference_path(agent: str) -> Path:
    return REFERENCE_DIR / reference_of(agent) / "reference.pt"


def hook_of(agent: str) -> Callable[..., Any] | None:
    """The method's verify hook, defined in its baseline file (the module of its registered class)."""
    from mowbench.agents.base import registered_agents

    entry = registered_agents().get(agent)
    return None if entry is None else getattr(inspect.getmodule(entry.cls), HOOK, None)


def defaults_of(agent: str) -> tuple[str, ...]:
    """The overrides a verify run composes first: the baseline file's VERIFY_DEFAULTS, else DEFAULT_OVERRIDES."""
    from mowbench.agents.base import registered_agents

    return tuple(getattr(inspect.getmodule(registered_agents()[agent].cls), "VERIFY_DEFAULTS", DEFAULT_OVERRIDES))


def agents_with_reference() -> list[str]:
    """Registered agents with reference data and a verify hook."""
    from mowbench.agents.base import registered_agents

    return sorted(name for name in registered_agents() if reference_path(name).exists() and hook_of(name))


def load_reference(agent: str) -> dict[str, Any]:
    return torch.load(reference_path(agent), map_location="cpu", weights_only=True)


def verify(agent: str, overrides: list[str]) -> tuple[list[Row], str]:
    """Compose the configuration as `mowbench.run` would, replay the reference through our code: (rows, table)."""
    from mowbench.config import compose_config

    overrides = [o for o in overrides if not o.startswith("agent=")]
    names = {o.partition("=")[0] for o in overrides}
    defaults = [d for d in defaults_of(agent) if d.partition("=")[0] not in names]
    cfg = compose_config([*defaults, *overrides, f"agent={agent}"])
    reference = load_reference(agent)
    hook = hook_of(agent)
    assert hook is not None
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # one reduction order on every machine (and no contention for cores)
    rows, reasons = hook(reference, dict(cfg["agent"]))
    shared = "" if reference_of(agent) == agent else f", {reference_of(agent)}'s reference data"
    title = (f"{agent}: ours vs {reference['upstream_repository']} @ {reference['upstream_commit']}"
             f" (overrides: {' '.join(overrides) or 'none'}{shared})")
    return rows, format_table(title, rows, reasons)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    every = "--all" in args
    args = [a for a in args if a != "--all"]
    available = agents_with_reference()
    listed = ", ".join(available) or "none"
    named = [a.partition("=")[2] for a in args if a.startswith("agent=")]
    if every:
        agents = available
    elif not named:
        raise SystemExit(f"error: name an agent (agent=NAME) or pass --all; agents with reference data: {listed}")
    else:
        agents = named[-1:]
    from mowbench.agents.base import registered_agents

    for agent in agents:
        if agent not in available:
            what = "no reference data for agent" if agent in registered_agents() else "unknown agent"
            raise SystemExit(f"error: {what} {agent!r}; agents with reference data: {listed}")
    failed = []
    for agent in agents:
        try:
            rows, table = verify(agent, args)
        except ValueError as err:  # bad overrides: one line, as mowbench.run
            raise SystemExit(f"error: {err}") from None
        print(table)
        if not all(r.ok for r in rows):
            failed.append(agent)
    if failed:
        print(f"verify: outside tolerance against upstream: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
