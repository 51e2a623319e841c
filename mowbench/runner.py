"""The run lifecycle: one process's work on a run folder (lock, metadata, envs, agent, trainer, results),
with everything it opens closed on every path, preemption included. Trains a validated mowbench.config.Plan."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from mowbench import machine, results
from mowbench.agents.base import known_departures, make_agent
from mowbench.config import Plan, deterministic_kernels, plan
from mowbench.envs.workers import env_maker
from mowbench.evaluation import eval_env_seed
from mowbench.logger import start_wandb
from mowbench.trainer import CHECKPOINT, Diverged, TrainConfig, Trainer

# OS errors of writing the run's files that are the machine's state, not a bug: reported in one line
OFFLINE_DATA = "offline_data"  # results_dir/offline_data: offline datasets every run that shares one reads
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

def check_results_dir(root: Path) -> None:
    """Before any work: the results root is a folder this process can create and write in."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"results_dir={root} is a file; allowed: a folder (or a path to create)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"results_dir={root} cannot be written ({os.strerror(err.errno).lower() if err.errno else err}"
                         f" at {err.filename or root}); allowed: a writable folder") from None


def settings_diff(cfg: dict[str, Any], folder: Path, tasks: list[str]) -> list[str]:
    """'key: old -> new' for each result-changing setting (results.INERT_KEYS aside) in which `cfg` differs from
    the run in `folder` (its config.yaml; its tasks from metadata.json); [] for no difference or no run there.
    The one rule by which a rerun, a grid submission and grid status judge an existing run folder."""
    path = folder / "config.yaml"
    if not path.exists():
        return []
    try:
        old = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # noqa: BLE001 - any parse failure: the file is named, not a traceback
        raise ValueError(f"{path} is unreadable ({type(err).__name__}); restore it or delete the run folder "
                         f"{folder} to start the run again") from None
    diff = results.changed_settings(old, cfg)
    meta_path = folder / "metadata.json"
    if meta_path.exists():
        run_tasks = results.read_json(meta_path, "restore it, or delete the run folder to start again").get("tasks")
        if run_tasks is not None and list(run_tasks) != list(tasks):
            diff.insert(0, f"tasks: {run_tasks} -> {tasks}")
    return diff


def check_unchanged(p: Plan) -> None:
    """Before any work: refuse to continue (or report) an existing run with other settings than it was
    started with. A resumed run would otherwise mix the two, and a finished one would print its old result
    as the new settings'."""
    for name, tasks in p.runs:
        folder = p.run_dir(name)
        diff = settings_diff(p.cfg, folder, tasks)
        if diff:
            state = "finished" if results.is_done(folder) else "started"
            raise ValueError(f"{folder} was {state} with other settings ({'; '.join(diff)}); to run these settings "
                             f"use another results_dir or method=<name>, or delete that folder to start it again")


@dataclass
class Skipped:
    """A run another live process is training (its lock's owner)."""

    folder: Path
    owner: dict[str, Any]


@dataclass
class Failed:
    """A run that diverged, now or before (its results.FAILED record): never trained again with these settings."""

    folder: Path
    message: str  # one line: what went wrong and what to do


def run_one(p: Plan, name: str, tasks: list[str]) -> dict[str, Any] | Skipped | Failed | None:
    """Train and evaluate one run folder: its summary, None when preempted (checkpointed), Skipped when another
    live process holds it, or Failed when it diverged (now or in an earlier session: the same settings and seed
    diverge again). A finished run is never touched again."""
    folder = p.run_dir(name)
    failure = results.read_failure(folder)
    if failure is not None:
        return Failed(folder, f"{folder} failed ({failure.get('reason')}); the same settings and seed fail the same "
                              "way: change them under another method=<name> or results_dir (e.g. lower the learning "
                              "rates), try another seed, or delete that folder to run it again")
    if results.is_done(folder):
        print(f"[mowbench] {folder} is already finished; nothing to do (delete the folder to rerun)")
        return results.read_summary(folder)
    lock = results.RunLock(folder)
    if not lock.acquire():
        print(f"[mowbench] {folder} is being trained by another process ({lock.owner}); skipping it")
        return Skipped(folder, lock.owner or {})
    try:
        results.remove_partial_writes(folder)
        return _train_run(p, folder, tasks)
    except Diverged as err:  # a failed run, never a finished one: marked, and named in one line
        return Failed(folder, f"{folder}: {err}; {err.last_checkpoint}; marked failed in {results.FAILED} (lower the "
                              "learning rates or try another seed: see the docs' 'When a run fails')")
    except OSError as err:  # full disk, read-only or no permission: one line naming the file and what to do
        if err.errno in WRITE_ERRNOS:
            raise ValueError(f"{os.strerror(err.errno).lower()} while writing {Path(err.filename or folder).name} in "
                             f"{folder}; the files written before are kept (the last checkpoint included): free "
                             "space or fix the permissions, then rerun to resume") from None
        raise
    finally:
        lock.release()


def _train_run(p: Plan, folder: Path, tasks: list[str]) -> dict[str, Any] | None:
    """Train one run folder for one session: to the end, or until preempted (checkpointed, then None)."""
    cfg, seed = p.cfg, p.seed
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    deterministic_kernels(p.device, p.deterministic)
    env_cfg = {**cfg["env"], "run_seed": seed}  # randomness a suite shares across the run's envs (Meta-World goals)
    with ExitStack() as opened:  # envs and logs are closed on every path: finished, preempted, failed
        # in env worker processes (train.env_workers) or here; made with the same seeds either way
        make, _ = env_maker(p.train.env_workers, p.suite, tasks, env_cfg, opened)
        envs = [make(i, seed) for i in range(len(tasks))]
        opened.callback(lambda: [env.close() for env in envs])
        agent = make_agent(p.agent, dict(cfg["agent"]), [e.info for e in envs], p.device, p.precision)

        def make_eval_env(k: int, copy: int, index: int) -> Any:  # evaluation k's env `copy` of task `index`
            return make(index, eval_env_seed(seed, k, copy), evaluation=True)

        folder.mkdir(parents=True, exist_ok=True)
        resuming = (folder / CHECKPOINT).exists()
        meta_path = folder / "metadata.json"
        meta = results.read_json(meta_path, "restore it, or delete the run folder to start again") if (
            resuming and meta_path.exists()) else {
            "schema_version": results.SCHEMA_VERSION, "suite": p.suite, "method": p.method, "agent": p.agent,
            "tasks": tasks, "seed": seed, "preset": cfg.get("preset_name"), "started": _now(), "sessions": []}
        meta.update({"git": machine.git_state(), "versions": machine.versions(),
                     "device": machine.device_description(p.device),
                     "precision": p.precision, "protocol": {e.info.name: e.info.protocol for e in envs},
                     "parameters": agent.parameter_counts(),
                     "per_task_signal": per_task_signal(agent.per_task_batch(), p.train),
                     "step_budget": results.step_budget(cfg["env"], p.train.steps),
                     "departures": known_departures(p.agent),
                     "evaluation": {"mode": p.train.eval_mode, "episodes": p.train.eval_episodes,
                                    "greedy": p.train.eval_greedy, "parallel_envs": p.train.eval_parallel
                                    if p.train.eval_mode == "reference" else 1,
                                    "random_episodes": p.train.random_episodes if p.train.random_baseline else 0}})
        results.atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
        trainer = Trainer(agent, envs, make_eval_env, p.train, folder, p.device, seed,
                          offline_cache=p.results_dir / OFFLINE_DATA)
        if trainer.offline_spec is not None:  # what the method learnt from besides its own experience
            meta["offline_data"] = {"spec": dataclasses.asdict(trainer.offline_spec), "tasks": trainer.offline_stats}
            if not trainer.online:  # an offline method: no env step; its loop counts updates on the offline data
                meta["step_budget"] = results.step_budget(cfg["env"], 0, offline_updates=trainer.steps)
        # a failed session leaves the CSVs as of its last checkpoint; finished and preempted ones flush first
        opened.callback(trainer.log.close, flush=False)
        if (cfg.get("logger") or {}).get("wandb"):
            trainer.log.wandb = start_wandb(folder, cfg, meta, p.method, folder.parent.name, seed)
        meta["sessions"].append({"started": _now(), "resumed_from_step": trainer.resumed_from,
                                 "env_restart": trainer.env_restore_failed})
        results.atomic_write_json(meta_path, meta)
        t0 = time.time()

        def end_session(step: int) -> None:  # also called by the trainer before it hands a signal on
            meta["sessions"][-1].update({"ended": _now(), "seconds": time.time() - t0, "last_step": step,
                                      "peak_memory_gib": machine.peak_memory_gib(p.device)})
            if trainer.preempted:  # checkpointed and left, to be resumed: grid status shows it as preempted
                meta["sessions"][-1]["preempted"] = signal_name(trainer.signalled) or "train.stop_at"
            results.atomic_write_json(meta_path, meta)

        try:
            summary = trainer.train(on_preempt=end_session)
        except Diverged as err:
            where = (f"last good checkpoint: {folder / CHECKPOINT} (step {trainer.checkpointed})"
                     if trainer.checkpointed is not None else "no checkpoint was written before it")
            err.last_checkpoint = where
            trainer.log.flush()  # the metrics that show the divergence
            meta["sessions"][-1]["failed"] = str(err)
            end_session(trainer.counters.step)
            results.atomic_write_json(folder / results.FAILED, {
                "reason": str(err), "kind": "diverged", "step": err.step, "detected_at": trainer.counters.step,
                "metrics": err.names, "last_checkpoint": trainer.checkpointed, "failed": _now(),
                "schema_version": results.SCHEMA_VERSION})
            raise
        if summary["preempted"]:
            print(f"[mowbench] {folder}: checkpointed at step {summary['step']}; rerun the same command to resume")
            return None
        end_session(summary["step"])
        meta.update({"finished": _now(), "wall_time_s": trainer.counters.wall_time, "updates": summary["updates"]})
        results.atomic_torch_save(folder / "model.pt", agent.state_dict())
        results.atomic_write_json(folder / "summary.json", summary)
        results.atomic_write_json(meta_path, meta)
        trainer.log.flush()
        results.atomic_write_json(folder / results.DONE, {"finished": meta["finished"], "step": summary["step"],
                                              "schema_version": results.SCHEMA_VERSION})
        if not p.train.keep_checkpoint:
            (folder / CHECKPOINT).unlink(missing_ok=True)
        return summary


def signal_name(signum: int) -> str | None:
    return signal.Signals(signum).name if signum else None


def per_task_signal(batch: dict[str, int], train: TrainConfig) -> dict[str, float]:
    """The training signal each task gets, per update and per round (one env step in every task), from the
    agent's per-task batch and the update ratio: what makes multi-task runs comparable with single-task
    STORM (16 sequences of 64 steps, i.e. 1,024 replayed steps, and 1,024 imagination starts per env step)."""
    u = train.updates_per_step
    out: dict[str, float] = {"updates_per_round": u, "updates_total": u * max(0, train.steps - train.warmup)}
    out |= {f"{key}_per_update": value for key, value in batch.items()}
    if "world_model_sequences" in batch:
        out["world_model_sequences_per_round"] = u * batch["world_model_sequences"]
        out["replayed_steps_per_round"] = u * batch["world_model_sequences"] * batch.get("sequence_length", 1)
    if "imagination_starts" in batch:
        out["imagination_starts_per_round"] = u * batch["imagination_starts"]
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def print_summary(rows: list[tuple[str, dict[str, Any] | Skipped | Failed | None]]) -> None:
    print(f"\n{'task':<20} {'final return':>14} {'random policy':>14}")
    for name, summary in rows:
        if summary is None or isinstance(summary, Skipped | Failed):
            what = ("(preempted)" if summary is None else "(failed: see the error)" if isinstance(summary, Failed)
                    else "(skipped: held by another process)")
            print(f"{name:<20} {what:>14}")
            continue
        for task, ret in summary["final_return"].items():
            rand = summary.get("random_return", {}).get(task)
            print(f"{task:<20} {ret:>14.2f} {'' if rand is None else f'{rand:.2f}':>14}")


def execute(cfg: dict[str, Any], p: Plan | None = None) -> list[tuple[str, dict[str, Any] | None]]:
    """Train every run of `cfg` (its plan, if already made) and print the results table."""
    p = plan(cfg) if p is None else p
    check_results_dir(p.results_dir)
    check_unchanged(p)
    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    if (warning := machine.thread_warning(int(cfg.get("threads") or 0), torch.get_num_threads())) is not None:
        print(warning, file=sys.stderr)
    out = []
    for name, tasks in p.runs:
        out.append((name, run_one(p, name, tasks)))
    print_summary(out)
    failed = [s for _, s in out if isinstance(s, Failed)]
    if failed:  # the other runs of the command went on; the command fails, naming each
        raise ValueError(failed[0].message if len(failed) == 1 else
                         f"{len(failed)} runs failed: " + " | ".join(f.message for f in failed))
    skipped = [s for _, s in out if isinstance(s, Skipped)]
    if skipped:  # not trained here: a failure for this command (exit code 1), not a preemption
        raise ValueError(f"{len(skipped)} run(s) skipped, being trained by another process: "
                         + "; ".join(f"{s.folder} (pid {s.owner.get('pid')} on {s.owner.get('host')})" for s in skipped)
                         + "; rerun this command when it has finished or died")
    return out


