"""Seed x ablation grids dispatched with submitit: expand, validate, skip finished or queued runs, submit
the rest as one SLURM job array, show status; jobs checkpoint and requeue on SLURM's pre-timeout signal.

    python -m mowbench.run grid=ablate_clusters [seeds=[0,1]] [task=[Pong,Breakout]] [slurm=local]
    python -m mowbench.grid status grid=ablate_clusters

A grid (mowbench/conf/grid/<name>.yaml) is `seeds` x the Cartesian product of `axes` (config key ->
values) and `variants` (name -> an ablation file's name, or a list of overrides), on top of `overrides`
applied to every cell. A cell is one configuration and seed; it holds one run folder per results task
(`plan(cfg).runs`: STORM one per game, multi-task agents one), and each run folder is one job ("unit").
Submissions are recorded in `<results_dir>/grids/<grid>/jobs.json`, so a resubmission knows which units are
queued or running. With `slurm.runs_per_gpu=K` one array task trains K units at once (PackedGridJob), each in its
own process; status and resubmission stay per unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mowbench import machine, results
from mowbench.config import compose_config, plan, quote_hint, quoted_override
from mowbench.experiments import cell_method, cells, grid_names, load_grid
from mowbench.logger import duration
from mowbench.runner import execute, settings_diff, signal_name
from mowbench.trainer import PREEMPT_SIGNALS, hand_on

LAUNCHERS = ("auto", "slurm", "local", "debug")
SLURM_KEYS = {"partition", "account", "qos", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min",
              "signal_delay_s", "max_requeues", "array_parallelism", "runs_per_gpu", "setup", "additional"}
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED"}
# preempted: checkpointed and left (SIGTERM, or a signal with nothing to requeue it), to be resubmitted; mismatch:
# the folder holds a run of other settings than the cell's (never submitted over)
STATES = ("done", "running", "pending", "preempted", "failed", "mismatch", "missing")
RESUBMIT = ("missing", "failed", "preempted")
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
    mismatch: list[str] = dataclasses.field(default_factory=list)  # settings in which the folder's run differs
    plan: Any = None  # its validated config.Plan (expand made it; mowbench.cost projects from it)


@dataclasses.dataclass
class Request:
    grid: str
    spec: dict[str, Any]
    overrides: list[str]  # applied to every cell (command line)
    launcher: str
    slurm: dict[str, Any]
    wait: bool
    results_dir: Path
    argv: list[str] = dataclasses.field(default_factory=list)  # the grid's arguments, as given


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
    settings["runs_per_gpu"] = check_runs_per_gpu(settings.get("runs_per_gpu", 1))  # older copies lack it
    return settings


def check_runs_per_gpu(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"slurm runs_per_gpu={value!r}; allowed: a positive integer (the runs one job trains at "
                         "once on its GPU; 1: one run per job)")
    return value


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
    spec = load_grid(results.check_name("grid", grid))
    if seeds is not None:
        spec["seeds"] = seeds
    swept = spec.get("axes") or {}
    for key, value in axes.items():  # a swept key given on the command line replaces its values
        if key in swept:
            parsed = _parse(value)
            spec["axes"][key] = parsed if isinstance(parsed, list) else [parsed]
            overrides.remove(f"{key}={value}")
    given = [o for o in [*spec.get("overrides", []), *overrides] if o.startswith("results_dir=")]
    results_dir = Path(override_value(given[-1]) if given else compose_config([])["results_dir"]).resolve()
    overrides = [o for o in overrides if not o.startswith("results_dir=")]  # each cell gets it, quoted
    return Request(grid, spec, overrides, launcher, load_slurm(slurm_choice, slurm_fields), wait, results_dir,
                   list(argv))


def override_value(arg: str) -> str:
    """The value of a key=value override as Hydra reads it (quotes removed: results_dir='my runs' is my runs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        value = OverridesParser.create().parse_override(arg).value()
    except Exception as err:  # noqa: BLE001 - Hydra's grammar errors: one line with the fix
        raise ValueError(quote_hint(arg, err)) from None
    if not isinstance(value, str):
        raise ValueError(f"{arg}: not one path (Hydra reads {value!r}); quote it: \"{quoted_override(arg)}\"")
    return value


def hydra_quote(value: str) -> str:
    """`value` as a quoted Hydra override value that reads back as exactly `value` (spaces, non-ASCII, commas)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    quoted = "'" + value.replace("'", "\\'") + "'"
    try:
        back = OverridesParser.create().parse_override(f"v={quoted}").value()
    except Exception:  # noqa: BLE001
        back = None
    if back != value:
        raise ValueError(f"results_dir={value!r} cannot be passed through Hydra intact (a backslash before a quote); "
                         "allowed: a path without backslashes")
    return quoted


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
                cell = [*[o for o in spec.get("overrides", []) if not o.startswith("results_dir=")],
                        *(spec.get("agent_overrides") or {}).get(agent, []), f"logger.group={req.grid}",
                        *req.overrides, *defining,
                        f"seed={seed}", f"method='{results.check_name('method', method)}'",
                        f"results_dir={hydra_quote(str(req.results_dir))}"]
                p = plan(compose_config(cell))
                for name, tasks in p.runs:
                    folder = p.run_dir(name)
                    extra = [f"task={tasks[0]}"] if len(p.runs) > 1 else []
                    units.append(Unit(str(folder.relative_to(req.results_dir)), f"{p.method}/seed_{seed}",
                                      cell + extra, folder, folder_mismatch(p.cfg, folder, tasks), p))
            except Exception as err:  # noqa: BLE001 - every bad cell is reported, then nothing submitted
                errors.append(f"{' '.join(base)} seed={seed}: {err}")
                continue
    if errors:
        raise ValueError(f"grid {req.grid}: {len(errors)} invalid cell(s), nothing submitted; first: {errors[0]}")
    return unique_units(units)


def folder_mismatch(cfg: dict[str, Any], folder: Path, tasks: list[str]) -> list[str]:
    """How the run in `folder` differs from the cell's settings; an unreadable config.yaml or metadata.json counts
    as a difference (named), so that status still lists the grid and a submission does not train over it."""
    try:
        return settings_diff(cfg, folder, tasks)
    except ValueError as err:
        return [str(err)]


def unique_units(units: list[Unit]) -> list[Unit]:
    """One unit per run folder (seeds=[0,0], or two cells that compose the same run, would train one folder
    twice at once); two cells that land in one folder with different settings are an error."""
    seen: dict[Path, Unit] = {}
    for u in units:
        first = seen.setdefault(u.folder, u)
        if first is not u and first.overrides != u.overrides:
            raise ValueError(f"two cells of the grid write the same run folder {u.key} with different overrides "
                             f"({' '.join(first.overrides)} | {' '.join(u.overrides)}); allowed: cells with "
                             "distinct method names (a variant or swept value that changes the name)")
    return list(seen.values())


# ---- state ----
def jobs_path(req: Request) -> Path:
    return req.results_dir / "grids" / req.grid / "jobs.json"


def read_jobs(req: Request) -> dict[str, Any]:
    path = jobs_path(req)
    try:
        return results.read_json(path) if path.exists() else {}
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
        state, reason = "missing", None
        failure = failure_reason(u.folder)
        if u.mismatch:
            state, reason = "mismatch", "other settings: " + "; ".join(u.mismatch)
        elif failure:
            state, reason = "failed", failure
        elif results.is_done(u.folder):
            state = "done"
        elif results.lock_owner(u.folder / results.LOCK) is not None:
            state = "running"
        elif job:
            if job["launcher"] == "slurm":
                q = queue.get(job["job_id"])
                state = "pending" if q in QUEUED else "running" if q in ACTIVE else "failed"
            else:
                state = "running" if results.pid_alive(job.get("pid")) else "failed"
            if state == "running" and cell_left(job):  # its packed job goes on with the other runs
                state = "failed"
            preempted = last_preemption(u.folder) if state == "failed" else None
            if preempted:
                state, reason = "preempted", f"checkpointed on {preempted}; resubmit the grid to resume it"
        step, score = progress(u.folder)
        rows.append({"unit": u.key, "state": state, "step": step, "eval": score, "reason": reason,
                     "job": job["job_id"] if job else None, "log": job.get("stderr") if job else None})
    return rows


def cell_left(job: dict[str, Any]) -> bool:
    """Whether the process of a packed unit (unfinished: the caller knows its folder is not done) has ended on its
    own while its job may train the others. An exit after a signal to the job is the job's to answer for: it is
    requeued (pending), or has left (preempted or failed as an unpacked job)."""
    path = job.get("exit_record")
    if not path:
        return False
    try:
        record = results.read_json(Path(path))
    except (OSError, ValueError):  # being replaced, or cut: the job itself still answers for the unit
        return False
    return isinstance(record, dict) and record.get("returncode") is not None and not record.get("signalled")


def failure_reason(folder: Path) -> str | None:
    """Why the run in `folder` failed (its results.FAILED record: it diverged), or None."""
    try:
        failure = results.read_failure(folder)
    except ValueError as err:
        return str(err)
    return None if failure is None else str(failure.get("reason"))


def last_preemption(folder: Path) -> str | None:
    """What preempted the run's last session (a signal, or train.stop_at), if it ended by checkpointing and
    leaving; None if it ended otherwise (crashed, killed) or never started."""
    try:
        sessions = results.read_json(folder / "metadata.json").get("sessions") or []
    except (OSError, ValueError, AttributeError):
        return None
    return sessions[-1].get("preempted") if sessions else None


def progress(folder: Path) -> tuple[int | None, float | None]:
    """Last logged step and the mean return of the last evaluation (over tasks), from the run's files; a
    corrupt file there is a warning (that run shows no figures), so one bad folder does not hide the grid."""
    try:
        return read_progress(folder)
    except ValueError as err:
        print(f"[mowbench] warning: {err}", file=sys.stderr)
        return None, None


def read_progress(folder: Path) -> tuple[int | None, float | None]:
    summary = results.read_summary(folder)
    if summary:
        final = summary.get("final_return") or {}
        return summary.get("step"), (sum(final.values()) / len(final)) if final else None
    step = None
    metrics = folder / "metrics.csv"
    if metrics.exists():
        lines = metrics.read_text().splitlines()
        step = int(lines[-1].split(",")[0]) if len(lines) > 1 else None
    final = results.last_evaluation(folder)
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
        folder = p.run_dir(name)
        if not results.is_done(folder):  # stopped by train.stop_at, or no handler to hand the signal to
            return {"unit": str(folder), "state": "preempted"}
        return {"unit": str(folder), "state": "done", "summary": summary}

    def checkpoint(self, overrides: list[str]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, overrides)  # resume happens from the run folder


def cell_files(folder: Path, k: int) -> tuple[Path, Path]:
    """Unit k of a packed array task: its log and its exit record, in that task's submitit log folder."""
    return folder / f"cell_{k}.log", folder / f"cell_{k}.json"


def chunked(items: list[Any], k: int) -> list[list[Any]]:
    return [items[i:i + k] for i in range(0, len(items), k)]


def threads_share(runs: int) -> int:
    """Torch CPU threads for each of `runs` runs started at once on this task's CPUs: an equal share. Each run would
    otherwise take torch's default, every usable CPU, and K runs would oversubscribe them K times (on 2 CPUs, 2 tiny
    STORM runs at 2 threads each trained at a quarter of one run's speed, half the pair's throughput)."""
    return max(1, machine.usable_cpus() // max(1, runs))


class PackedGridJob:
    """What each task of a packed array (slurm.runs_per_gpu=K) runs: up to K units at once on the task's GPU, each
    `python -m mowbench.run` in its own process (own run folder, lock, checkpoints, log), so that small runs share
    a GPU and one failing run leaves the others alone. The task fails (raises) only if a unit failed, once every
    unit has ended.

    SLURM's pre-timeout or preemption signal (USR2, SIGTERM) is forwarded to every live run, which checkpoints at
    the end of its step and leaves. Once all have left, the signal goes on to the handler installed before this
    job's (submitit's: checkpoint(), requeue, exit) if a unit is unfinished, so the requeued task starts all K
    again; the finished ones return at once (the runner skips a finished run).

    Each run gets `threads=` an equal share of the task's CPUs (threads_share) unless its overrides set threads, and
    OMP_NUM_THREADS the same unless the environment sets it."""

    def __init__(self, logs: str) -> None:
        self.logs = logs  # the executor's folder pattern (logs/%j): the task's own log folder once its id is known

    def __call__(self, chunk: list[list[str]], folders: list[str]) -> list[dict[str, Any]]:
        folder = self.log_folder()
        folder.mkdir(parents=True, exist_ok=True)
        procs: dict[int, subprocess.Popen[bytes]] = {}
        records: dict[int, dict[str, Any]] = {}
        got: list[int] = []  # the signals received

        def send(proc: subprocess.Popen[bytes], signum: int) -> None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

        def forward(signum: int, frame: Any) -> None:
            got.append(signum)
            for proc in list(procs.values()):
                send(proc, signum)

        old = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
        share = threads_share(len(chunk))
        env = {"OMP_NUM_THREADS": str(share), **os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            for k, overrides in enumerate(chunk):
                if got:  # not started: the requeued task starts it
                    break
                log, record = cell_files(folder, k)
                threads = next((o for o in reversed(overrides) if o.startswith("threads=")), f"threads={share}")
                run = overrides if threads in overrides else [*overrides, threads]
                with open(log, "ab") as out:  # appended: a requeued task's log follows the earlier one's
                    proc = subprocess.Popen([sys.executable, "-m", "mowbench.run", *run], stdout=out,
                                            stderr=subprocess.STDOUT, env=env)
                procs[k] = proc
                if got:  # a signal between the start and the line above
                    send(proc, got[0])
                records[k] = {"unit": folders[k], "pid": proc.pid, "started": _now(), "returncode": None,
                              "threads": threads.partition("=")[2]}
                results.atomic_write_json(record, records[k])
            running = set(procs)
            while running:
                for k in sorted(running):
                    code = procs[k].poll()
                    if code is not None:
                        running.discard(k)
                        records[k].update({"returncode": code, "ended": _now(), "killed_by": exit_signal(code),
                                           "signalled": signal_name(got[0]) if got else None})
                        results.atomic_write_json(cell_files(folder, k)[1], records[k])
                if running:
                    time.sleep(0.2)
            out = []
            for k, unit in enumerate(folders):
                code = records.get(k, {}).get("returncode")
                state = ("done" if results.is_done(Path(unit)) else "failed" if code is not None and code != 0 and
                         not got else "preempted")
                out.append({"unit": unit, "state": state, "returncode": code, "log": str(cell_files(folder, k)[0])})
            if got and any(o["state"] != "done" for o in out):
                for k, record in records.items():  # their exits belong to a job stopped by a signal: the job answers
                    record["signalled"] = signal_name(got[0])
                    results.atomic_write_json(cell_files(folder, k)[1], record)
                hand_on(old, got[0])
            failed = [o for o in out if o["state"] == "failed"]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(out)} runs of this job failed: " + "; ".join(
                    f"{o['unit']} (exit {o['returncode']}; log {o['log']})" for o in failed))
            return out
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for proc in procs.values():  # left early (an error here): the runs checkpoint and leave too
                send(proc, signal.SIGTERM)
            for proc in procs.values():
                proc.wait()

    def log_folder(self) -> Path:
        from submitit import JobEnvironment
        from submitit.core.utils import JobPaths

        try:
            job_id = JobEnvironment().job_id
        except RuntimeError:  # called outside a submitit job
            job_id = str(os.getpid())
        return JobPaths(self.logs, job_id=job_id).folder

    def checkpoint(self, chunk: list[list[str]], folders: list[str]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, chunk, folders)  # each run resumes from its folder


def exit_signal(code: int) -> str | None:
    """The signal that killed a child (Popen's negative return code), by name."""
    return signal_name(-code) if code < 0 else None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")  # to the millisecond: tells runs' overlap


def check_partition(settings: dict[str, Any]) -> None:
    """Before submitting: the partition exists (sinfo knows it), and has GPUs if GPUs are asked for (its GRES)."""
    if shutil.which("sinfo") is None:
        return
    part = settings.get("partition")
    cmd = ["sinfo", "-h", "-o", "%P %G"] + (["-p", part] if part else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()
    if not out:
        known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60).stdout.split()
        known = [k.rstrip("*") for k in known]  # sinfo marks the default partition with *
        raise ValueError(f"slurm partition={part!r} not found by sinfo; allowed: {', '.join(known) or 'none listed'}")
    gpus = int(settings.get("gpus_per_node") or 0)
    gres = " ".join(out[1::2])
    if gpus > 0 and "gpu" not in gres:
        raise ValueError(f"slurm gpus_per_node={gpus} but partition {part or out[0]} has no "
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
    """Submit every unit that is missing, failed (its job died) or preempted; skip done, running and pending ones,
    and those that failed in a way a rerun repeats (diverged). A unit whose folder holds a run of other settings
    refuses the whole submission. One submission of a grid at a time (a lock on its record). Returns counts."""
    units = expand(req)
    mismatched = [u for u in units if u.mismatch]
    if mismatched:
        u = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ValueError(f"grid {req.grid}: cell {u.key}{more} holds a run of other settings ({'; '.join(u.mismatch)})"
                         "; nothing submitted: use another results_dir for these settings, or delete "
                         "those folders to train them again")
    record_dir = jobs_path(req).parent
    record_dir.mkdir(parents=True, exist_ok=True)
    with results.exclusive(record_dir / ".submit.lock"):  # a second submission waits, then sees this one's jobs
        out = _submit(req, units)
    if out["submitted"] and req.wait:
        watch(req, units)
    return out


def _submit(req: Request, units: list[Unit]) -> dict[str, Any]:
    states = unit_states(req, units)
    diverged = [s["unit"] for s in states if s["state"] == "failed" and s["reason"]]  # reason: its FAILED record
    todo = [u for u, s in zip(units, states, strict=True) if s["state"] in RESUBMIT and s["unit"] not in diverged]
    counts = count_states(states)
    logs = req.results_dir / "grids" / req.grid / "logs"
    if todo:
        executor = make_executor(req, logs)
        if executor.cluster == "slurm":
            check_partition(req.slurm)
        record = read_jobs(req)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        per_task = int(req.slurm.get("runs_per_gpu", 1))
        if per_task == 1:
            jobs = submit_array(executor, GridJob(), [[u.overrides for u in todo]], logs)
            for u, job in zip(todo, jobs, strict=True):
                record[u.key] = {"job_id": str(job.job_id), "launcher": executor.cluster, "submitted": now,
                                 "stderr": str(job.paths.stderr), "stdout": str(job.paths.stdout),
                                 "pid": local_pid(executor.cluster, str(job.job_id))}
        else:  # each task trains a chunk of the units still to train; each unit keeps its own log and state
            chunks = chunked(todo, per_task)
            args = [[[u.overrides for u in c] for c in chunks], [[str(u.folder) for u in c] for c in chunks]]
            jobs = submit_array(executor, PackedGridJob(str(logs / "%j")), args, logs)
            for chunk, job in zip(chunks, jobs, strict=True):
                for k, u in enumerate(chunk):
                    log, exit_record = cell_files(job.paths.folder, k)
                    record[u.key] = {"job_id": str(job.job_id), "launcher": executor.cluster, "submitted": now,
                                     "cell": k, "stderr": str(log), "stdout": str(log),
                                     "exit_record": str(exit_record), "task_log": str(job.paths.stderr),
                                     "pid": local_pid(executor.cluster, str(job.job_id))}
        results.atomic_write_json(jobs_path(req), record)
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        packed = f" in {len(jobs)} task(s) of up to {per_task} runs" if per_task > 1 else ""
        print(f"[mowbench] grid {req.grid}: submitted {len(todo)} run(s){packed} as job(s) {', '.join(ids)} "
              f"({executor.cluster}); skipped {counts['done']} done, {counts['running']} running, "
              f"{counts['pending']} pending")
    else:
        print(f"[mowbench] grid {req.grid}: nothing to submit ({counts['done']} done, {counts['running']} running, "
              f"{counts['pending']} pending of {len(units)})")
    if diverged:
        print(f"[mowbench] grid {req.grid}: {len(diverged)} failed run(s) not resubmitted (they diverged, and would "
              f"again; see status): {', '.join(diverged[:3])}{' ...' if len(diverged) > 3 else ''}")
    print(f"[mowbench] logs: {logs}; status: {status_command(req)}")
    return {"submitted": len(todo), **{f"skipped_{k}": counts[k] for k in ("done", "running", "pending")},
            "units": len(units)}


def submit_array(executor: Any, job: Any, args: list[list[Any]], logs: Path) -> list[Any]:
    """executor.map_array(job, *args), with a refusal by SLURM (sbatch's error) as one line and the submission files
    it left (a script and pickles in the logs folder) removed."""
    before = set(logs.rglob("*")) if logs.exists() else set()
    try:
        return executor.map_array(job, *args)
    except Exception as err:  # noqa: BLE001 - submitit wraps sbatch's failure in several exception types
        for path in sorted(set(logs.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                with contextlib.suppress(OSError):
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else type(err).__name__)
        raise ValueError(f"SLURM refused the submission ({reason}); nothing submitted") from None


def status_command(req: Request) -> str:
    """The command that shows this grid's status: every argument that finds its runs, results_dir absolute."""
    args = [a for a in req.argv if a.partition("=")[0] not in ("wait", "results_dir")]
    return shlex.join(["python", "-m", "mowbench.grid", "status", *args, f"results_dir={req.results_dir}"])


def count_states(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {s: sum(r["state"] == s for r in rows) for s in STATES}


def local_pid(launcher: str, job_id: str) -> int | None:
    """The process of a job run by submitit's local launcher: its public job id is the process id; other
    launchers (slurm: queue ids; debug: in-process) have none."""
    return int(job_id) if launcher == "local" and job_id.isdigit() else None


def watch(req: Request, units: list[Unit], interval: float = 10.0) -> None:
    """Live progress until every unit is done or failed; polls after 1 s, then less often, up to `interval`."""
    delay, start = 1.0, time.time()
    while True:
        rows = unit_states(req, units)
        counts = count_states(rows)
        line = " ".join(f"{k} {v}" for k, v in counts.items() if k != "missing")
        print(f"\r[mowbench] {req.grid}: {line} of {len(units)} ({duration(time.time() - start)})", end="", flush=True)
        if counts["done"] + counts["failed"] + counts["preempted"] + counts["mismatch"] == len(units):
            print()
            return
        time.sleep(delay)
        delay = min(interval, delay * 1.5)


def print_status(req: Request) -> list[dict[str, Any]]:
    rows = unit_states(req, expand(req))
    width = max([len(r["unit"]) for r in rows] + [4])
    print(f"{'run':<{width}}  {'state':<9} {'step':>8} {'eval':>9}  job / log / reason")
    for r in rows:
        step = "" if r["step"] is None else str(r["step"])
        score = "" if r["eval"] is None else f"{r['eval']:.2f}"
        where = r["reason"] or (r["log"] if r["state"] == "failed" else r["job"]) or ""
        print(f"{r['unit']:<{width}}  {r['state']:<9} {step:>8} {score:>9}  {where}")
    counts = count_states(rows)
    print(" ".join(f"{k}: {v}" for k, v in counts.items()))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        from mowbench.config import usage
        from mowbench.experiments import grid_names

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
