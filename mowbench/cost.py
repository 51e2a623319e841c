"""`python -m mowbench.cost grid=NAME [device=h100|cpu] [measure=true] [grid arguments ...]` (or `mowbench cost`):
what a grid costs before it is submitted. Every run of every cell is projected by the bench's projection model
(mowbench.bench.projection: acting, updates, evaluation, the random baseline) from a recorded bench of its agent on
the device (mowbench/data/bench/<device>/<agent>_<suite>_<preset>.json, shipped with its date and machine), or,
with measure=true, from a bench made on the spot on this machine for each distinct agent, suite and preset. It
prints each cell's hours, the grid's total in device-hours, the SLURM array it would submit and which figures it
used; a cell without figures is named, never counted as free.

Other arguments are the grid's (seeds=[0,1], a swept key's values, any config override), as for `mowbench grid`.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from importlib import resources
from typing import Any

from mowbench.bench import EVAL_EPISODE_STEPS, projection
from mowbench.config import compose_config


def recorded_devices() -> list[str]:
    root = resources.files("mowbench.data").joinpath("bench")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def recorded(device: str, agent: str, suite: str, preset: str) -> tuple[dict[str, Any] | None, str]:
    """The shipped bench of an agent on a device, and its file's name (None where none was recorded)."""
    name = f"{agent}_{suite}_{preset}.json"
    path = resources.files("mowbench.data").joinpath("bench").joinpath(device).joinpath(name)
    if not path.is_file():
        return None, f"bench/{device}/{name}"
    return json.loads(path.read_text()), f"bench/{device}/{name}"


def parse(argv: list[str]) -> tuple[str, bool, list[str]]:
    device, measure, rest = "h100", False, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key == "device" and eq:
            device = value
        elif key == "measure" and eq:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"measure={value}; allowed: true, false")
            measure = value.lower() == "true"
        else:
            rest.append(arg)
    devices = recorded_devices()
    if not measure and device not in devices:
        raise ValueError(f"device={device}; allowed: {', '.join(devices)} (recorded benches), or measure=true to "
                         "bench on this machine")
    return device, measure, rest


def measured(overrides: list[str], cache: dict[tuple, dict[str, Any]], key: tuple) -> dict[str, Any]:
    """A bench on this machine of the cell's agent, suite and preset (once per distinct key: the first run's
    configuration, composed from its overrides, is benched)."""
    from mowbench.bench import BENCH_DEFAULTS, bench

    if key not in cache:
        print(f"[mowbench.cost] benching {key[0]} on {key[1]} ({key[2]}) here ...", file=sys.stderr, flush=True)
        cfg = compose_config(overrides)
        cache[key] = bench({**cfg, "bench": {**BENCH_DEFAULTS, "reference": False, "flops": False}})
    return cache[key]


def cost(argv: list[str]) -> dict[str, Any]:
    """The grid's projected hours per cell and in total, its SLURM array and the figures used."""
    from mowbench.grid import expand, parse_args

    device, measure, rest = parse(argv)
    req = parse_args(rest)
    units = expand(req)
    cells: dict[str, dict[str, Any]] = defaultdict(lambda: {"runs": 0, "hours": 0.0, "missing": 0})
    used: dict[str, str] = {}
    benches: dict[tuple, dict[str, Any]] = {}
    for unit in units:
        p = unit.plan  # validated by expand (one unit per run folder; a per-task agent's plan holds every task)
        preset = str(p.cfg.get("preset_name"))
        key = (p.agent, p.suite, preset)
        if measure:
            figures, source = measured(unit.overrides, benches, key), "measured here"
        else:
            figures, source = recorded(device, *key)
        cell = cells[unit.cell.rsplit("/seed_", 1)[0]]
        cell["runs"] += 1
        used[f"{p.agent} on {p.suite} ({preset})"] = source if figures else f"none recorded ({source})"
        if figures is None:
            cell["missing"] += 1
            continue
        hours = projection(figures, p.train, len(p.runs[0][1]) if p.runs else 1, EVAL_EPISODE_STEPS[p.suite])
        cell["hours"] += hours["total"]
        cell.setdefault("per_run", hours["total"])
        cell.setdefault("bottleneck", max(("acting", "updates", "evaluation", "random_baseline"), key=hours.get))
    total = sum(c["hours"] for c in cells.values())
    missing = sum(c["missing"] for c in cells.values())
    settings = req.slurm
    per_task = int(settings.get("runs_per_gpu", 1))
    return {"grid": req.grid, "device": "this machine" if measure else device, "cells": dict(cells),
            "runs": len(units), "total_hours": total, "runs_without_figures": missing,
            "slurm_array": {"tasks": -(-len(units) // per_task), "runs_per_task": per_task,
                            "gpus_per_task": settings.get("gpus_per_node"),
                            "cpus_per_task": settings.get("cpus_per_task"),
                            "timeout_min": settings.get("timeout_min"),
                            "array_parallelism": settings.get("array_parallelism")},
            "figures": used}


def print_cost(out: dict[str, Any]) -> None:
    width = max([len(c) for c in out["cells"]] + [4])
    print(f"grid {out['grid']} on {out['device']}: {out['runs']} runs")
    print(f"{'cell':<{width}}  {'runs':>5} {'h/run':>8} {'hours':>9}  bottleneck")
    for name, c in out["cells"].items():
        per = f"{c['per_run']:.2f}" if "per_run" in c else "—"
        hours = f"{c['hours']:.1f}" if not c["missing"] else f"{c['hours']:.1f}+?"
        print(f"{name:<{width}}  {c['runs']:>5} {per:>8} {hours:>9}  {c.get('bottleneck', 'no figures')}")
    unit = "device-hours" if out["device"] != "cpu" else "CPU-node hours"
    extra = f" (+ {out['runs_without_figures']} runs without figures)" if out["runs_without_figures"] else ""
    print(f"total: {out['total_hours']:.1f} {unit}{extra}")
    s = out["slurm_array"]
    k = s["runs_per_task"]
    packed = f" of up to {k} runs at once (hours above: one run per GPU)" if k > 1 else ""
    print(f"SLURM array: {s['tasks']} tasks{packed}, {s['gpus_per_task']} GPU and {s['cpus_per_task']} CPUs each, "
          f"{s['timeout_min']} min per job (then requeued), at most {s['array_parallelism']} at once")
    for what, source in out["figures"].items():
        print(f"figures: {what}: {source}")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print(f"Recorded devices: {', '.join(recorded_devices())}")
        return
    try:
        print_cost(cost(args))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
