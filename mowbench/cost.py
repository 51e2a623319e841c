"""`python -m mowbench.cost grid=NAME [device=h100|cpu] [measure=true] [grid arguments ...]` (or `mowbench cost`):
what a grid costs before it is submitted. Every run of every cell is projected by the bench's projection model
(mowbench.bench.projection: acting, updates, evaluation, the random baseline) from a recorded bench of its agent on
the device (mowbench/data/bench/<device>/<agent>_<suite>_<preset>.json, shipped with its date and machine), or,
with measure=true, from a bench made on the spot on this machine for each distinct agent, suite and preset. It
prints each cell's hours, the grid's total in device-hours, the SLURM array it would submit and which figures it
used; a cell without figures is named, never counted as free. With slurm.runs_per_gpu=K, runs whose agent has a
recorded packing measurement for K on the device (bench/<device>/packing_<agent>_<suite>_<preset>.json) count
1/speedup of their hours, the others a whole GPU each, and it says which did.

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


def bench_dir(device: str) -> Any:
    """The folder of a device's recorded figures (a Traversable: shipped inside the package)."""
    return resources.files("mowbench.data").joinpath("bench").joinpath(device)


def recorded(device: str, agent: str, suite: str, preset: str) -> tuple[dict[str, Any] | None, str]:
    """The shipped bench of an agent on a device, and its file's name (None where none was recorded)."""
    name = f"{agent}_{suite}_{preset}.json"
    path = bench_dir(device).joinpath(name)
    if not path.is_file():
        return None, f"bench/{device}/{name}"
    return json.loads(path.read_text()), f"bench/{device}/{name}"


def packing_speedup(device: str, agent: str, suite: str, preset: str, k: int) -> tuple[float | None, str]:
    """How much more one GPU trains with k runs of an agent at once (slurm.runs_per_gpu=k) than with one: the
    summed training steps/s of k runs over one run's, from the recorded packing measurement
    (bench/<device>/packing_<agent>_<suite>_<preset>.json, as `scripts/gpu_figures.sh runs-per-gpu` writes it:
    {"aggregate_steps_per_s": {"1": ..., "2": ...}, ...}, only the k whose runs all finished). None where no
    figure for k (or for one run) was recorded: such runs are counted as one run per GPU."""
    name = f"bench/{device}/packing_{agent}_{suite}_{preset}.json"
    path = bench_dir(device).joinpath(f"packing_{agent}_{suite}_{preset}.json")
    if not path.is_file():
        return None, f"none recorded ({name})"
    aggregate = json.loads(path.read_text())["aggregate_steps_per_s"]
    if str(k) not in aggregate or "1" not in aggregate:
        return None, f"K={k} not measured (measured: {', '.join(sorted(aggregate, key=int))}; {name})"
    return aggregate[str(k)] / aggregate["1"], name


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


def measured(overrides: list[str], key: tuple) -> dict[str, Any]:
    """A bench on this machine of the cell's agent, suite and preset (`key`): the configuration of its first run,
    composed from that run's overrides (cost() asks once per distinct key)."""
    from mowbench.bench import BENCH_DEFAULTS, bench

    print(f"[mowbench.cost] benching {key[0]} on {key[1]} ({key[2]}) here ...", file=sys.stderr, flush=True)
    cfg = compose_config(overrides)
    return bench({**cfg, "bench": {**BENCH_DEFAULTS, "reference": False, "flops": False}})


def cost(argv: list[str]) -> dict[str, Any]:
    """The grid's projected hours per cell and in total, its SLURM array and the figures used."""
    from mowbench.grid import expand, parse_args

    device, measure, rest = parse(argv)
    req = parse_args(rest)
    units = expand(req)
    cells: dict[str, dict[str, Any]] = defaultdict(lambda: {"runs": 0, "hours": 0.0, "run_hours": 0.0, "missing": 0})
    used: dict[str, str] = {}
    packing: dict[str, str] = {}
    k = int(req.slurm.get("runs_per_gpu", 1))

    def lookup(key: tuple, overrides: list[str]) -> tuple[dict[str, Any] | None, float | None]:
        """An agent, suite and preset's figures and packing speedup (None: none), noted in `used` and `packing`."""
        label = f"{key[0]} on {key[1]} ({key[2]})"
        figures, source = (measured(overrides, key), "measured here") if measure else recorded(device, *key)
        used[label] = source if figures else f"none recorded ({source})"
        speedup = None
        if figures is not None and k > 1:
            speedup, source = (None, "not measured here") if measure else packing_speedup(device, *key, k)
            packing[label] = (f"{speedup:.2f}x one run's steps/s with {k} a GPU ({source})" if speedup
                              else f"{source}: counted as one run per GPU")
        return figures, speedup

    known: dict[tuple, tuple[dict[str, Any] | None, float | None]] = {}  # per key: read or benched once, not per run
    for unit in units:
        p = unit.plan  # validated by expand (one unit per run folder; a per-task agent's plan holds every task)
        key = (p.agent, p.suite, str(p.cfg.get("preset_name")))
        if key not in known:
            known[key] = lookup(key, unit.overrides)
        figures, speedup = known[key]
        cell = cells[unit.cell.rsplit("/seed_", 1)[0]]
        cell["runs"] += 1
        if figures is None:
            cell["missing"] += 1
            continue
        hours = projection(figures, p.train, len(p.runs[0][1]) if p.runs else 1, EVAL_EPISODE_STEPS[p.suite])
        # a device's hours: k runs share a GPU at `speedup` times one run's throughput, so each run holds it for
        # 1/speedup of its time alone (runs grouped in a task are taken to be of similar length)
        cell["run_hours"] += hours["total"]
        cell["hours"] += hours["total"] / (speedup or 1.0)
        cell.setdefault("per_run", hours["total"])
        cell.setdefault("bottleneck", max(("acting", "updates", "evaluation", "random_baseline"), key=hours.get))
    total = sum(c["hours"] for c in cells.values())
    missing = sum(c["missing"] for c in cells.values())
    settings = req.slurm
    return {"grid": req.grid, "device": "this machine" if measure else device, "cells": dict(cells),
            "runs": len(units), "total_hours": total, "runs_without_figures": missing,
            "run_hours": sum(c["run_hours"] for c in cells.values()), "packing": packing,
            "slurm_array": {"tasks": -(-len(units) // k), "runs_per_task": k,
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
    packed = f" of up to {k} runs at once" if k > 1 else ""
    if k > 1:
        print(f"runs_per_gpu={k}: {out['run_hours']:.1f} {unit} as one run per GPU")
        for what, how in out["packing"].items():
            print(f"packing: {what}: {how}")
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
