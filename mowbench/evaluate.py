"""`python -m mowbench.evaluate RUN_DIR [key=value ...]` (or `mowbench evaluate`): evaluate a finished run's weights
again, under another protocol, with more episodes or other seeds, and write the result beside the run's own files,
never into them: RUN_DIR/evaluations/<name>/ holds the evaluation's config.yaml, eval.csv (the run's format, at the
run's final step), summary.json, metadata.json and DONE.json. The run's files stay byte for byte as they were.

Keys (all optional):
  name=NAME              the evaluation's folder (default: `default` without overrides, else the overrides joined)
  checkpoint=PATH        weights to load instead of RUN_DIR/model.pt: a model.pt or a run's checkpoint.pt
  seed=N                 evaluation seed (default: the run's seed; with the run's protocol the evaluation then
                         replays the run's final evaluation exactly, the same envs and acting seeds)
  env.KEY=VALUE          evaluation protocol settings, e.g. env.protocol=standard (not image_size, action_set)
  train.eval_episodes=N  train.eval_greedy=B  train.eval_mode=full|reference  train.eval_max_steps=N
  train.eval_envs=N      train.eval_parallel=N
  device=auto|cpu|cuda   precision=auto|fp32|bf16   threads=N   train.env_workers=N (envs in N processes)
`python -m mowbench.analysis --evaluation NAME` then reads these evaluations instead of the runs' final ones.
"""

from __future__ import annotations

import hashlib
import random
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from mowbench import machine, results
from mowbench.agents.base import Agent, make_agent
from mowbench.config import Plan, plan
from mowbench.envs import make_env
from mowbench.envs.base import TaskEnv
from mowbench.envs.workers import env_maker
from mowbench.evaluation import eval_env_seed, evaluate_in_mode, stream_seed

EVALUATIONS = "evaluations"  # RUN_DIR/evaluations/<name>/
OWN_KEYS = ("name", "checkpoint")  # this command's own keys; the others override the run's config
EVAL_KEYS = ("train.eval_episodes", "train.eval_greedy", "train.eval_mode", "train.eval_max_steps",
             "train.eval_envs", "train.eval_parallel")
# how, not what: never part of an evaluation's name
MACHINE_KEYS = ("device", "precision", "threads", "train.env_workers")
FIXED_ENV_KEYS = ("suite", "image_size", "action_set")  # what the weights were trained to see


@dataclass
class LoadedRun:
    """A finished run's agent with its weights, and what evaluating it needs."""

    folder: Path
    plan: Plan  # the run's configuration with the overrides, validated
    tasks: list[str]
    agent: Agent
    env_cfg: dict[str, Any]
    weights: Path
    final_step: int
    final_key: int  # the key of the run's final evaluation (its env and acting seeds)


def parse(argv: list[str]) -> tuple[Path, dict[str, str], dict[str, str]]:
    """RUN_DIR, this command's own keys and the config overrides; one-line errors for anything else."""
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        raise ValueError("usage: mowbench evaluate RUN_DIR [key=value ...] (RUN_DIR first: a finished run's folder)")
    own, overrides = {}, {}
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ValueError(f"{arg!r}: expected key=value; allowed keys: {', '.join(allowed_keys())}")
        if key in OWN_KEYS:
            own[key] = value
        elif key in EVAL_KEYS or key in MACHINE_KEYS or key == "seed" or key.startswith("env."):
            if key.removeprefix("env.") in FIXED_ENV_KEYS and key.startswith("env."):
                raise ValueError(f"{key}={value}: changes what the weights were trained on; allowed env keys: the "
                                 f"evaluation protocol's (e.g. env.protocol), not {', '.join(FIXED_ENV_KEYS)}")
            overrides[key] = value
        else:
            raise ValueError(f"{key}={value}: not an evaluation setting; allowed keys: {', '.join(allowed_keys())}")
    return Path(argv[0]), own, overrides


def allowed_keys() -> list[str]:
    return [*OWN_KEYS, "seed", "env.<protocol key>", *EVAL_KEYS, *MACHINE_KEYS]


def evaluation_name(own: dict[str, str], overrides: dict[str, str]) -> str:
    """name=, else `default` for the run's own protocol, else the result-changing overrides joined."""
    if "name" in own:
        return results.check_name("name", own["name"])
    parts = [f"{k.removeprefix('train.')}={v}" for k, v in sorted(overrides.items()) if k not in MACHINE_KEYS]
    name = ",".join(parts) or "default"
    if not results.NAME_PATTERN.fullmatch(name):
        raise ValueError(f"the overrides make no folder name ({name!r}); give one with name=NAME "
                         f"({results.NAME_RULE})")
    return name


def run_config(folder: Path, overrides: dict[str, str]) -> dict[str, Any]:
    """The run's config.yaml with the overrides applied (the eval seed aside: the run's seed stays, as it also fixes
    e.g. Meta-World's goal variations); an override of a key the config lacks is refused."""
    path = folder / "config.yaml"
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - any parse failure: the file is named, not a traceback
        raise ValueError(f"{path} is unreadable ({type(err).__name__}); the run cannot be evaluated") from None
    flat = results.flat_items(OmegaConf.to_container(cfg, resolve=False))
    for key in overrides:
        if key != "seed" and key not in flat:
            raise ValueError(f"{key}: the run's config has no such key; allowed: "
                             f"{', '.join(k for k in flat if k.startswith('env.'))}, {', '.join(EVAL_KEYS)}")
    dotlist = [f"{k}={v}" for k, v in overrides.items() if k != "seed"]
    return OmegaConf.to_container(OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist)), resolve=True)


def read_weights(path: Path) -> dict[str, Any]:
    """An agent's state from a model.pt or a run's checkpoint.pt; a corrupt or foreign file is one line."""
    if not path.is_file():
        raise ValueError(f"checkpoint={path}: no such file; allowed: a run's model.pt or checkpoint.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated, garbage: named, not a traceback
        raise ValueError(f"{path} is corrupt ({type(err).__name__}); the run cannot be evaluated from it") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no agent state (a {type(state).__name__}); allowed: model.pt, checkpoint.pt")
    return state["agent"] if "agent" in state and "counters" in state else state  # a trainer checkpoint's agent


def final_evaluation(folder: Path) -> tuple[int, int]:
    """(the run's final step, the key of its final evaluation): the run numbered its evaluations 0, 1, ... in
    order, one step each, so the final one's key is the count of evaluated steps less one."""
    step = int(results.read_json(folder / results.DONE).get("step"))
    _, rows = results.read_csv_rows(folder / "eval.csv", ("step",))
    steps = sorted({int(float(row["step"])) for _, row in rows})
    if step not in steps:
        raise ValueError(f"{folder}/eval.csv has no final evaluation (step {step}); the run's files are incomplete")
    return step, len(steps) - 1


def load_run(folder: Path, overrides: dict[str, str], checkpoint: str | None = None) -> LoadedRun:
    """A finished run's agent with its final (or `checkpoint`'s) weights, its configuration with the overrides,
    checked before any env or network is built. One-line errors for an unfinished, failed or corrupt run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such run folder; allowed: a run's folder, e.g. "
                         "results/minatar/storm/breakout/seed_0")
    if (folder / results.FAILED).exists():
        raise ValueError(f"{folder} failed ({results.FAILED}); only a finished run can be evaluated")
    if not results.is_done(folder):
        raise ValueError(f"{folder} is not finished (no {results.DONE}); finish it (rerun its command) first")
    cfg = run_config(folder, overrides)
    p = plan(cfg)
    meta = results.read_json(folder / "metadata.json", "the run cannot be evaluated without it")
    tasks = list(meta["tasks"])
    final_step, final_key = final_evaluation(folder)
    weights = Path(checkpoint) if checkpoint else folder / "model.pt"
    state = read_weights(weights)
    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    if (warning := machine.thread_warning(int(cfg.get("threads") or 0), torch.get_num_threads())) is not None:
        print(warning, file=sys.stderr)
    env_cfg = {**cfg["env"], "run_seed": p.seed}
    infos = []  # the tasks' infos (action spaces, image sizes): one env at a time, not 50 renderers at once
    for k in range(len(tasks)):
        env = make_env(p.suite, tasks, k, env_cfg, p.seed)
        infos.append(env.info)
        env.close()
    agent = make_agent(p.agent, dict(cfg["agent"]), infos, p.device, p.precision)
    try:
        agent.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - keys or shapes that do not fit: the file is named
        raise ValueError(f"{weights} does not fit the run's {p.agent} agent ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:160]})") from None
    return LoadedRun(folder, p, tasks, agent, env_cfg, weights, final_step, final_key)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluate_run(run: LoadedRun, eval_seed: int) -> list[dict[str, Any]]:
    """The eval.csv rows of the run's agent under its (overridden) protocol, seeded as the run's final evaluation
    with `eval_seed` in place of the run's seed."""
    p, train = run.plan, run.plan.train
    torch.manual_seed(eval_seed)
    random.seed(eval_seed)
    np.random.seed(eval_seed)

    with ExitStack() as opened:
        make, _ = env_maker(train.env_workers, p.suite, run.tasks, run.env_cfg, opened)

        def eval_env(copy: int, task: int) -> TaskEnv:
            return make(task, eval_env_seed(eval_seed, run.final_key, copy), evaluation=True)

        episodes = evaluate_in_mode(train, run.agent, eval_env, len(run.tasks), train.eval_episodes,
                                    train.eval_greedy, stream_seed(eval_seed, run.final_key))
    return [{"step": run.final_step, "task": task, "episode": i, "return": ret, "length": length,
             "success": "" if success is None else success, "mode": train.eval_mode}
            for task, rows in zip(run.tasks, episodes, strict=True) for i, (ret, length, success) in enumerate(rows)]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        out = evaluate_command(args)
    except ValueError as err:  # bad input: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    print(f"[mowbench.evaluate] wrote {out}")


def evaluate_command(args: list[str]) -> Path:
    """Run the command; returns the evaluation's folder."""
    folder, own, overrides = parse(args)
    name = evaluation_name(own, overrides)
    out = folder / EVALUATIONS / name
    eval_seed = None
    if "seed" in overrides:
        if not overrides["seed"].isdigit():
            raise ValueError(f"seed={overrides['seed']}; allowed: a non-negative integer")
        eval_seed = int(overrides["seed"])
    run = load_run(folder, overrides, own.get("checkpoint"))
    eval_seed = run.plan.seed if eval_seed is None else eval_seed
    record = {"source": str(folder), "weights": str(run.weights), "weights_sha256": sha256(run.weights),
              "overrides": overrides, "eval_seed": eval_seed, "evaluation_key": run.final_key,
              "step": run.final_step}
    if results.is_done(out):
        old = results.read_json(out / "metadata.json")
        same = {k: old.get(k) for k in ("weights_sha256", "overrides", "eval_seed")}
        if same == {k: record[k] for k in same}:
            print(f"[mowbench.evaluate] {out} is already done; nothing to do (delete it to evaluate again)")
            print_table(results.read_json(out / "summary.json"))
            return out
        raise ValueError(f"{out} holds an evaluation with other settings or weights; give another name=NAME or "
                         "delete that folder")
    lock = results.RunLock(out)
    out.mkdir(parents=True, exist_ok=True)
    if not lock.acquire():
        raise ValueError(f"{out} is being evaluated by another process ({lock.owner}); wait for it")
    try:
        results.remove_partial_writes(out)
        rows = evaluate_run(run, eval_seed)
        p = run.plan
        column = "success" if p.suite == "metaworld" else "return"
        mean = {t: float(np.mean([r["return"] for r in rows if r["task"] == t])) for t in run.tasks}
        summary = {"final_return": mean, "step": run.final_step}
        if column == "success":
            summary["final_success"] = {t: float(np.mean([float(r["success"]) for r in rows if r["task"] == t]))
                                        for t in run.tasks}
        meta = results.read_json(folder / "metadata.json")
        record |= {"suite": p.suite, "method": meta.get("method"), "agent": p.agent, "tasks": run.tasks,
                   "seed": p.seed, "precision": p.precision, "git": machine.git_state(),
                   "versions": machine.versions(), "device": machine.device_description(p.device),
                   "departures": meta.get("departures"),
                   "evaluation": {**(meta.get("evaluation") or {}), "mode": p.train.eval_mode,
                                  "episodes": p.train.eval_episodes, "greedy": p.train.eval_greedy,
                                  "parallel_envs": p.train.eval_parallel if p.train.eval_mode == "reference" else 1}}
        results.atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(p.cfg)))
        results.atomic_write_csv(out / "eval.csv", ["step", "task", "episode", "return", "length", "success", "mode"],
                                 rows)
        results.atomic_write_json(out / "summary.json", summary)
        results.atomic_write_json(out / "metadata.json", record)
        results.atomic_write_json(out / results.DONE, {"step": run.final_step,
                                                       "schema_version": results.SCHEMA_VERSION})
    finally:
        lock.release()
    print_table(summary)
    return out


def print_table(summary: dict[str, Any]) -> None:
    print(f"\n{'task':<24} {'return':>12} {'success':>10}")
    for task, ret in summary["final_return"].items():
        success = summary.get("final_success", {}).get(task)
        print(f"{task:<24} {ret:>12.2f} {'' if success is None else f'{success:.2f}':>10}")


if __name__ == "__main__":
    main()
