"""Entry point: `python -m mowbench.run [agent=.. env=.. task=.. seed=.. preset=..]` trains and evaluates.

With no arguments it runs the quickstart (QUICKSTART below): tiny STORM on MinAtar breakout and
space_invaders, one run per game, printing each game's final return beside a random policy's.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf, open_dict

from mowbench import results as R
from mowbench.agents.base import build_config, get_agent, make_agent
from mowbench.envs import make_envs, resolve_tasks, suite_module
from mowbench.trainer import CHECKPOINT, TrainConfig, Trainer

CONF = Path(__file__).parent / "conf"
# `python -m mowbench.run` with no arguments: tiny STORM on two MinAtar games, 2000 steps each (about
# 5 minutes each on 2 CPU cores); the table compares each game's final return with a random policy's.
QUICKSTART = ["env=minatar", "agent=storm", "preset=tiny", "task=[breakout,space_invaders]"]
GROUPS = ("env", "agent", "preset", "ablation")


def _group_dir(group: str) -> Path:
    if group == "ablation":
        import mowbench.ablations

        return Path(mowbench.ablations.__file__).parent / "ablation"
    return CONF / group


def check_group_choices(argv: list[str]) -> None:
    """One-line errors for unknown config-group choices, before Hydra prints a traceback."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in GROUPS and value:
            options = sorted(p.stem for p in _group_dir(key).glob("*.yaml"))
            if value not in options:
                raise ValueError(f"unknown {key} {value!r}; allowed: {', '.join(options)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r}; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; allowed here: auto, cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}; allowed: auto, cpu, cuda, cuda:N")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16"):
        raise ValueError(f"precision={name!r}; allowed: auto, fp32, bf16")
    return name


@dataclasses.dataclass
class Plan:
    """A fully validated run request: what to train, where, on what."""

    cfg: dict[str, Any]
    suite: str
    agent: str
    method: str
    tasks: list[str]
    runs: list[tuple[str, list[str]]]  # (results task name, tasks of that run)
    train: TrainConfig
    device: torch.device
    precision: str


def plan(cfg: dict[str, Any]) -> Plan:
    """Validate the whole configuration before any heavy work (envs, networks) starts."""
    env_cfg = dict(cfg["env"])
    suite = env_cfg.get("suite")
    mod = suite_module(suite)
    tasks = resolve_tasks(suite, cfg.get("task"))
    entry = get_agent(cfg["agent"]["name"])
    if env_cfg.get("action_set") == "auto":  # one shared action set when one agent plays several games
        env_cfg["action_set"] = "full" if entry.multi_task and len(tasks) > 1 else "minimal"
        cfg = {**cfg, "env": env_cfg}
    mod.check(env_cfg)
    agent_cfg = build_config(entry, dict(cfg["agent"]))
    if hasattr(agent_cfg, "check_image_size"):
        agent_cfg.check_image_size(int(env_cfg.get("image_size", 64)))
    if hasattr(agent_cfg, "check_tasks"):
        agent_cfg.check_tasks(len(tasks))
    train_values = dict(cfg["train"])
    proto = mod.eval_protocol(env_cfg)
    for key in ("eval_episodes", "eval_greedy", "eval_mode"):
        if train_values.get(key) is None:
            train_values[key] = proto[key]
    unknown = sorted(set(train_values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown train option(s) {unknown}; allowed: "
                         f"{', '.join(f.name for f in dataclasses.fields(TrainConfig))}")
    train = TrainConfig(**train_values)
    train.check()
    if train.replay_capacity < getattr(agent_cfg, "batch_length", 1):
        raise ValueError(f"train.replay_capacity={train.replay_capacity} is smaller than a sequence "
                         f"(batch_length={agent_cfg.batch_length})")
    if train.warmup < getattr(agent_cfg, "batch_length", 1) and train.steps > train.warmup:
        raise ValueError(f"train.warmup={train.warmup} must be >= batch_length={agent_cfg.batch_length} "
                         "so the first update finds whole sequences")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}; allowed: a non-negative integer")
    device = resolve_device(str(cfg.get("device", "auto")))
    precision = resolve_precision(str(cfg.get("precision", "auto")), device)
    if precision == "bf16" and device.type == "cpu":
        raise ValueError("precision=bf16 on cpu is not supported (CPU runs in fp32); allowed: auto, fp32")
    method = cfg.get("method") or entry.name
    if entry.multi_task:
        runs = [(tasks[0] if len(tasks) == 1 else f"all{len(tasks)}", tasks)]
    else:
        runs = [(t, [t]) for t in tasks]
    return Plan(cfg, suite, entry.name, method, tasks, runs, train, device, precision)


def run_one(p: Plan, name: str, tasks: list[str]) -> dict[str, Any] | None:
    """Train and evaluate one run folder; a finished run is never touched again."""
    cfg, seed = p.cfg, int(p.cfg["seed"])
    folder = R.run_dir(cfg["results_dir"], p.suite, p.method, name, seed)
    if R.is_done(folder):
        print(f"[mowbench] {folder} is already finished; nothing to do (delete the folder to rerun)")
        return R.read_summary(folder)
    lock = R.RunLock(folder)
    if not lock.acquire():
        print(f"[mowbench] {folder} is being trained by another process ({lock.owner}); skipping it")
        return None
    try:
        return _train_run(p, folder, tasks)
    finally:
        lock.release()


def _train_run(p: Plan, folder: Path, tasks: list[str]) -> dict[str, Any] | None:
    cfg, seed = p.cfg, int(p.cfg["seed"])
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    env_cfg = dict(cfg["env"])
    envs = make_envs(p.suite, tasks, env_cfg, seed)
    agent = make_agent(p.agent, dict(cfg["agent"]), [e.info for e in envs], p.device, p.precision)

    def make_eval_envs(k: int, copy: int) -> list:  # evaluation k's envs; copy > 0: reference mode's extra envs
        return make_envs(p.suite, tasks, env_cfg, seed + 7919 * (k + 1) + 104_729 * copy, evaluation=True)

    folder.mkdir(parents=True, exist_ok=True)
    resuming = (folder / CHECKPOINT).exists()
    meta_path = folder / "metadata.json"
    meta = R.read_json(meta_path) if resuming and meta_path.exists() else {
        "schema_version": R.SCHEMA_VERSION, "suite": p.suite, "method": p.method, "agent": p.agent,
        "tasks": tasks, "seed": seed, "preset": cfg.get("preset_name"), "started": _now(), "sessions": []}
    meta.update({"git": R.git_state(), "versions": R.versions(), "device": R.device_description(p.device),
                 "precision": p.precision, "protocol": {e.info.name: e.info.protocol for e in envs},
                 "parameters": agent.parameter_counts(),
                 "per_task_signal": per_task_signal(agent.per_task_batch(), p.train),
                 "evaluation": {"mode": p.train.eval_mode, "episodes": p.train.eval_episodes,
                                "greedy": p.train.eval_greedy, "parallel_envs": p.train.eval_parallel
                                if p.train.eval_mode == "reference" else 1}})
    R.atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
    trainer = Trainer(agent, envs, make_eval_envs, p.train, folder, p.device, seed)
    meta["sessions"].append({"started": _now(), "resumed_from_step": trainer.resumed_from,
                             "env_restart": trainer.env_restore_failed})
    R.atomic_write_json(meta_path, meta)
    t0 = time.time()
    summary = trainer.train()
    meta["sessions"][-1].update({"ended": _now(), "seconds": time.time() - t0, "last_step": summary["step"]})
    if summary["preempted"]:
        R.atomic_write_json(meta_path, meta)
        trainer.log.close()
        print(f"[mowbench] {folder}: checkpointed at step {summary['step']}; rerun the same command to resume")
        return None
    meta.update({"finished": _now(), "wall_time_s": trainer.counters.wall_time, "updates": summary["updates"]})
    R.atomic_torch_save(folder / "model.pt", agent.state_dict())
    R.atomic_write_json(folder / "summary.json", summary)
    R.atomic_write_json(meta_path, meta)
    trainer.log.close()
    R.atomic_write_json(folder / R.DONE, {"finished": meta["finished"], "step": summary["step"],
                                          "schema_version": R.SCHEMA_VERSION})
    if not p.train.keep_checkpoint:
        (folder / CHECKPOINT).unlink(missing_ok=True)
    for env in envs:
        env.close()
    return summary


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


def print_summary(rows: list[tuple[str, dict[str, Any] | None]]) -> None:
    print(f"\n{'task':<20} {'final return':>14} {'random policy':>14}")
    for name, summary in rows:
        if summary is None:
            print(f"{name:<20} {'(preempted)':>14}")
            continue
        for task, ret in summary["final_return"].items():
            rand = summary.get("random_return", {}).get(task)
            print(f"{task:<20} {ret:>14.2f} {'' if rand is None else f'{rand:.2f}':>14}")


def execute(cfg: dict[str, Any], p: Plan | None = None) -> list[tuple[str, dict[str, Any] | None]]:
    """Train every run of `cfg` (its plan, if already made) and print the results table."""
    p = plan(cfg) if p is None else p
    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    out = []
    for name, tasks in p.runs:
        out.append((name, run_one(p, name, tasks)))
    print_summary(out)
    return out


def config_values(cfg: DictConfig, choices: Any) -> dict[str, Any]:
    """Resolved run configuration as a plain dict, with the preset chosen (recorded in metadata)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    values["preset_name"] = choices.get("preset")
    return values


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The configuration the CLI would run for `overrides`, without starting Hydra's app (bench, tests)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_group_choices(overrides)
    try:
        with initialize_config_module("mowbench.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:  # e.g. an unknown key: one line, no traceback
        text = f"{err}\n{err.__cause__ or ''}"
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        detail = next((line for line in lines[1:] if "not in struct" in line or "Key" in line), "")
        raise ValueError(f"{lines[0]} {detail}".strip() + "; allowed: the keys of mowbench/conf/config.yaml "
                         "and of the chosen env/agent files (e.g. seed, task, train.steps, agent.width)") from None
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return config_values(cfg, choices)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        execute(config_values(cfg, HydraConfig.get().runtime.choices))
    except ValueError as err:  # bad input: one line, no traceback
        raise SystemExit(f"error: {err}") from None


def main() -> None:
    if len(sys.argv) == 1:
        print(f"[mowbench] quickstart: python -m mowbench.run {' '.join(QUICKSTART)}")
        sys.argv += QUICKSTART
    if any(arg.startswith("grid=") for arg in sys.argv[1:]):  # a named grid: dispatch it (mowbench.grid)
        from mowbench.grid import main as grid_main

        grid_main(["submit", *sys.argv[1:]])
        return
    try:
        compose_config(sys.argv[1:])  # bad groups or keys: one line here, not Hydra's traceback
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    _hydra_main()


if __name__ == "__main__":
    main()
