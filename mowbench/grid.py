"""Seed x ablation grids dispatched with submitit: expand, validate, skip finished or queued runs, submit
the rest as one SLURM job array, show status; jobs checkpoint and requeue on SLURM's pre-timeout signal.

    python -m mowbench.run grid=ablate_clusters [seeds=[0,1]] [task=[Pong,Breakout]] [slurm=local]
    python -m mowbench.grid status grid=ablate_clusters

A grid (mowbench/conf/grid/<name>.yaml) is `seeds` x the Cartesian product of `axes` (config key ->
values) and `variants` (name -> an ablation file's name, or a list of overrides), on top of `overrides`
applied to every cell. A cell is one configuration and seed; it holds one run folder per results task
(`plan(cfg).runs`: STORM one per game, multi-task agents one), and each run folder is one job ("unit").
Submissions are recorded in `<results_dir>/grids/<grid>/jobs.json`, so a resubmission knows which units are
queued or running.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mowbench import results as R
from mowbench.config import compose_config, plan
from mowbench.gridspec import cell_method, cells, grid_names, load_grid
from mowbench.runner import execute

LAUNCHERS = ("auto", "slurm", "local", "debug")
SLURM_KEYS = {"partition", "account", "qos", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min",
              "signal_delay_s", "max_requeues", "array_parallelism", "setup", "additional"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED"}
STATES = ("done", "running", "pending", "failed", "missing")
ACTIVE = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def slurm_dir() -> Path:
    import mowbench.slurm

    return Path(mowbench.slurm.__file__).parent


@dataclasses.dataclass
class Unit:
    """One run folder of a grid: the overrides that train it and where it lands."""

    key: str  # results path below results_dir, e.g. minatar/mow-n_clusters=3/all5/seed_0
    cell: str  # method/seed label of its cell
    overrides: list[str]
    folder: Path


@dataclasses.dataclass
class Request:
    grid: str
    spec: dict[str, Any]
    overrides: list[str]  # applied to every cell (command line)
    launcher: str
    slurm: dict[str, Any]
    wait: bool
    results_dir: Path


# ---- parsing ----
def load_slurm(choice: str, fields: dict[str, Any]) -> dict[str, Any]:
    path = Path(choice) if choice.endswith((".yaml", ".yml")) else slurm_dir() / f"{choice}.yaml"
    if not path.exists():
        options = sorted(p.stem for p in slurm_dir().glob("*.yaml"))
        raise ValueError(f"unknown slurm settings {choice!r}; allowed: {', '.join(options)} or a .yaml path")
    settings = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    settings.update(fields)
    unknown = sorted(set(settings) - SLURM_KEYS)
    if unknown:
        raise ValueError(f"unknown slurm setting(s) {unknown} in {path}; allowed: {', '.join(sorted(SLURM_KEYS))}")
    return settings


def parse_args(argv: list[str]) -> Request:
    """grid=NAME, seeds=[..], <swept axis>=[..], launcher=, slurm=, slurm.<field>=, wait=; anything else
    is a config override applied to every cell."""
    grid, launcher, slurm_choice, wait = None, "auto", "default", False
    seeds, axes, slurm_fields, overrides = None, {}, {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ValueError(f"argument {arg!r} is not key=value")
        if key == "grid":
            grid = value
        elif key == "launcher":
            if value not in LAUNCHERS:
                raise ValueError(f"launcher={value!r}; allowed: {', '.join(LAUNCHERS)}")
            launcher = value
        elif key == "slurm":
            slurm_choice = value
        elif key.startswith("slurm."):
            slurm_fields[key[len("slurm."):]] = _parse(value)
        elif key == "wait":
            wait = value.lower() in ("1", "true", "yes")
        elif key == "seeds":
            seeds = _int_list(value, "seeds")
        else:
            axes[key] = value
            overrides.append(arg)
    if grid is None:
        raise ValueError(f"no grid given; allowed: grid=<{'|'.join(grid_names())}>")
    spec = load_grid(grid)
    if seeds is not None:
        spec["seeds"] = seeds
    swept = spec.get("axes") or {}
    for key, value in axes.items():  # a swept key given on the command line replaces its values
        if key in swept:
            parsed = _parse(value)
            spec["axes"][key] = parsed if isinstance(parsed, list) else [parsed]
            overrides.remove(f"{key}={value}")
    given = [o.partition("=")[2] for o in [*spec.get("overrides", []), *overrides] if o.startswith("results_dir=")]
    results_dir = Path(given[-1] if given else compose_config([])["results_dir"]).resolve()
    return Request(grid, spec, overrides, launcher, load_slurm(slurm_choice, slurm_fields), wait, results_dir)


def _parse(value: str) -> Any:
    """A command-line value as YAML would read it: 3 -> int, [1,2] -> list, true -> bool."""
    parsed = OmegaConf.from_dotlist([f"v={value}"])
    return OmegaConf.to_container(parsed)["v"]


def _int_list(value: str, name: str) -> list[int]:
    parsed = _parse(value)
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items or not all(isinstance(v, int) and v >= 0 for v in items):
        raise ValueError(f"{name}={value}; allowed: a list of non-negative integers, e.g. [0,1,2]")
    return items


# ---- expansion ----
def expand(req: Request) -> list[Unit]:
    """Every unit of the grid, each validated (compose + plan) before anything is submitted."""
    spec = req.spec
    units, errors = [], []
    for point, variant, defining in cells(spec):
        for seed in spec["seeds"]:
            # the grid's overrides, then the command line's, then what defines the cell (wins)
            base = [*spec.get("overrides", []), *req.overrides, *defining]
            try:
                agent, method = cell_method(spec, req.overrides, point, variant, defining)
                cell = [*spec.get("overrides", []), *(spec.get("agent_overrides") or {}).get(agent, []),
                        *req.overrides, *defining, f"seed={seed}", f"method='{method}'",
                        f"results_dir={req.results_dir}"]
                p = plan(compose_config(cell))
            except Exception as err:  # noqa: BLE001 - every bad cell is reported, then nothing submitted
                errors.append(f"{' '.join(base)} seed={seed}: {err}")
                continue
            for name, tasks in p.runs:
                folder = R.run_dir(req.results_dir, p.suite, p.method, name, seed)
                extra = [f"task={tasks[0]}"] if len(p.runs) > 1 else []
                units.append(Unit(str(folder.relative_to(req.results_dir)), f"{p.method}/seed_{seed}",
                                  cell + extra, folder))
    if errors:
        raise ValueError(f"grid {req.grid}: {len(errors)} invalid cell(s), nothing submitted; first: {errors[0]}")
    return units


# ---- state ----
def jobs_path(req: Request) -> Path:
    return req.results_dir / "grids" / req.grid / "jobs.json"


def read_jobs(req: Request) -> dict[str, Any]:
    path = jobs_path(req)
    try:
        return R.read_json(path) if path.exists() else {}
    except ValueError as err:  # the run folders are the truth: status and resubmission go on without the record
        print(f"[mowbench] warning: {err}; going on without it (runs are judged from their folders)", file=sys.stderr)
        return {}


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each queued job id (array tasks as <array>_<index>); absent ids have left the queue.

    When squeue cannot answer (controller down, timeout) this raises instead of reporting the jobs as
    gone: a resubmission would then queue a second copy of every pending job."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(sorted(set(job_ids)))],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        out = None
    if out is None or (out.returncode != 0 and "Invalid job id" not in out.stderr):  # all ids gone: rc 1
        reason = "timed out after 60 s" if out is None else (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"squeue failed ({reason}); cannot tell which recorded jobs are still queued, so "
                         "nothing is submitted or reported; retry when SLURM answers")
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        states[job] = state
    return states


def unit_states(req: Request, units: list[Unit]) -> list[dict[str, Any]]:
    """Per unit: state (done, running, pending, failed, missing), last step, last evaluation, log."""
    jobs = read_jobs(req)
    slurm_ids = [j["job_id"] for u in units if (j := jobs.get(u.key)) and j["launcher"] == "slurm"]
    queue = queue_states(slurm_ids)
    rows = []
    for u in units:
        job = jobs.get(u.key)
        state = "missing"
        if R.is_done(u.folder):
            state = "done"
        elif R.lock_owner(u.folder / R.LOCK) is not None:
            state = "running"
        elif job:
            if job["launcher"] == "slurm":
                q = queue.get(job["job_id"])
                state = "pending" if q in QUEUED else "running" if q in ACTIVE else "failed"
            else:
                state = "running" if R.pid_alive(job.get("pid")) else "failed"
        step, score = progress(u.folder)
        rows.append({"unit": u.key, "state": state, "step": step, "eval": score,
                     "job": job["job_id"] if job else None, "log": job.get("stderr") if job else None})
    return rows


def progress(folder: Path) -> tuple[int | None, float | None]:
    """Last logged step and the mean return of the last evaluation (over tasks), from the run's files; a
    corrupt file there is a warning (that run shows no figures), so one bad folder does not hide the grid."""
    try:
        return read_progress(folder)
    except ValueError as err:
        print(f"[mowbench] warning: {err}", file=sys.stderr)
        return None, None


def read_progress(folder: Path) -> tuple[int | None, float | None]:
    summary = R.read_summary(folder)
    if summary:
        final = summary.get("final_return") or {}
        return summary.get("step"), (sum(final.values()) / len(final)) if final else None
    step = None
    metrics = folder / "metrics.csv"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        step = int(lines[-1].split(",")[0]) if len(lines) > 1 else None
    final = R.last_evaluation(folder)
    score = sum(v for _, v in final.values()) / len(final) if final else None
    return step, score


# ---- submission ----
class GridJob:
    """What each job runs: train one unit (resuming it if a checkpoint exists). On SLURM's pre-timeout or
    preemption signal the trainer checkpoints at the end of its step and chains submitit's handler, which
    calls checkpoint() and requeues the job; the requeued job resumes."""

    def __call__(self, overrides: list[str]) -> dict[str, Any]:
        cfg = compose_config(overrides)
        p = plan(cfg)
        # a unit is one run folder; on SIGUSR2 the trainer checkpoints, then hands the signal on to submitit's
        # handler (checkpoint() below, requeue, exit), so a preempted job does not come back here
        [(name, summary)] = execute(cfg, p)
        folder = R.run_dir(p.cfg["results_dir"], p.suite, p.method, name, int(p.cfg["seed"]))
        if not R.is_done(folder):  # stopped by train.stop_at, or no handler to hand the signal to
            return {"unit": str(folder), "state": "preempted"}
        return {"unit": str(folder), "state": "done", "summary": summary}

    def checkpoint(self, overrides: list[str]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, overrides)  # resume happens from the run folder


def check_partition(settings: dict[str, Any]) -> None:
    """Refuse GPUs on a partition whose nodes have none (sinfo's GRES column), before submitting."""
    gpus = int(settings.get("gpus_per_node") or 0)
    if gpus <= 0 or shutil.which("sinfo") is None:
        return
    cmd = ["sinfo", "-h", "-o", "%P %G"] + (["-p", settings["partition"]] if settings.get("partition") else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()
    if not out:
        raise ValueError(f"slurm partition={settings.get('partition')!r} not found by sinfo")
    gres = " ".join(out[1::2])
    if "gpu" not in gres:
        raise ValueError(f"slurm gpus_per_node={gpus} but partition {settings.get('partition') or out[0]} has no "
                         f"GPUs (GRES: {gres or 'none'}); allowed there: gpus_per_node=0")


def make_executor(req: Request, logs: Path) -> Any:
    import submitit

    cluster = None if req.launcher == "auto" else req.launcher
    s = req.slurm
    executor = submitit.AutoExecutor(folder=logs / "%j", cluster=cluster, slurm_max_num_timeout=int(s["max_requeues"]))
    params: dict[str, Any] = {"timeout_min": int(s["timeout_min"]), "cpus_per_task": int(s["cpus_per_task"]),
                              "gpus_per_node": int(s["gpus_per_node"]), "mem_gb": float(s["mem_gb"]),
                              "name": f"mowbench-{req.grid}"}
    if executor.cluster == "slurm":
        params.update({"slurm_array_parallelism": int(s["array_parallelism"]),
                       "slurm_signal_delay_s": int(s["signal_delay_s"]),
                       "slurm_setup": list(s.get("setup") or []),
                       "slurm_additional_parameters": dict(s.get("additional") or {})})
        for key in ("partition", "account", "qos"):
            if s.get(key):
                params[f"slurm_{key}"] = s[key]
    executor.update_parameters(**params)
    return executor


def submit(req: Request) -> dict[str, Any]:
    """Submit every unit that is missing or failed; skip done, running and pending ones. Returns counts."""
    units = expand(req)
    states = unit_states(req, units)
    todo = [u for u, s in zip(units, states, strict=True) if s["state"] in ("missing", "failed")]
    counts = count_states(states)
    logs = req.results_dir / "grids" / req.grid / "logs"
    if todo:
        executor = make_executor(req, logs)
        if executor.cluster == "slurm":
            check_partition(req.slurm)
        jobs = executor.map_array(GridJob(), [u.overrides for u in todo])
        record = read_jobs(req)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        for u, job in zip(todo, jobs, strict=True):
            record[u.key] = {"job_id": str(job.job_id), "launcher": executor.cluster, "submitted": now,
                             "stderr": str(job.paths.stderr), "stdout": str(job.paths.stdout),
                             "pid": local_pid(executor.cluster, str(job.job_id))}
        R.atomic_write_json(jobs_path(req), record)
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        print(f"[mowbench] grid {req.grid}: submitted {len(todo)} run(s) as job(s) {', '.join(ids)} "
              f"({executor.cluster}); skipped {counts['done']} done, {counts['running']} running, "
              f"{counts['pending']} pending")
        if req.wait:
            watch(req, units)
    else:
        print(f"[mowbench] grid {req.grid}: nothing to submit ({counts['done']} done, {counts['running']} running, "
              f"{counts['pending']} pending of {len(units)})")
    print(f"[mowbench] logs: {logs}; status: python -m mowbench.grid status grid={req.grid}")
    return {"submitted": len(todo), **{f"skipped_{k}": counts[k] for k in ("done", "running", "pending")},
            "units": len(units)}


def count_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(r["state"] == s for r in rows) for s in STATES}


def local_pid(launcher: str, job_id: str) -> int | None:
    """The process of a job run by submitit's local launcher: its public job id is the process id; other
    launchers (slurm: queue ids; debug: in-process) have none."""
    return int(job_id) if launcher == "local" and job_id.isdigit() else None


def watch(req: Request, units: list[Unit], interval: float = 10.0) -> None:
    """Live progress until every unit is done or failed; polls after 1 s, then less often, up to `interval`."""
    delay = 1.0
    while True:
        rows = unit_states(req, units)
        counts = count_states(rows)
        line = " ".join(f"{k} {v}" for k, v in counts.items() if k != "missing")
        print(f"\r[mowbench] {req.grid}: {line} of {len(units)}", end="", flush=True)
        if counts["done"] + counts["failed"] == len(units):
            print()
            return
        time.sleep(delay)
        delay = min(interval, delay * 1.5)


def print_status(req: Request) -> list[dict[str, Any]]:
    rows = unit_states(req, expand(req))
    width = max([len(r["unit"]) for r in rows] + [4])
    print(f"{'run':<{width}}  {'state':<8} {'step':>8} {'eval':>9}  job / log")
    for r in rows:
        step = "" if r["step"] is None else str(r["step"])
        score = "" if r["eval"] is None else f"{r['eval']:.2f}"
        where = (r["log"] if r["state"] == "failed" else r["job"]) or ""
        print(f"{r['unit']:<{width}}  {r['state']:<8} {step:>8} {score:>9}  {where}")
    counts = count_states(rows)
    print(" ".join(f"{k}: {v}" for k, v in counts.items()))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        from mowbench.config import usage
        from mowbench.gridspec import grid_names

        print(__doc__)
        print(f"Grids (grid=name): {', '.join(grid_names())}")
        print("Grid options: seeds=[0,1] launcher=auto|slurm|local|debug slurm=<slurm/*.yaml name or path> "
              "wait=true|false; any config key below narrows or changes every cell (agent.n_clusters=[1,3] "
              "sweeps a grid axis)")
        print(usage())
        return
    action = args.pop(0) if args and args[0] in ("submit", "status") else "submit"
    try:
        req = parse_args(args)
        if action == "status":
            print_status(req)
        else:
            submit(req)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
