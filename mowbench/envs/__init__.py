"""Environment suites built by name; each suite is imported lazily so a missing optional dependency
(ale-py, metaworld/mujoco, minatar) breaks only that suite."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from mowbench.envs.base import ActionSpace, Step, TaskEnv, TaskInfo, reset_all, step_all

TASK_SEED_STRIDE = 1000  # the env of task i in a run seeded s is seeded s + 1000 * i

# suite name -> module defining TASKS, DEFAULT_TASKS, EVAL_ENVS, DISCRETE_ACTIONS, check(cfg) and
# make(task, index, cfg, seed, ...)
SUITES: dict[str, str] = {
    "atari100k": "mowbench.envs.atari",
    "metaworld": "mowbench.envs.metaworld",
    "minatar": "mowbench.envs.minatar",
}

__all__ = ["ActionSpace", "Step", "TaskEnv", "TaskInfo", "SUITES", "suite_module", "resolve_tasks", "make_envs",
           "make_env", "step_all", "reset_all"]


def suite_module(suite: str) -> Any:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; allowed: {', '.join(sorted(SUITES))}")
    return importlib.import_module(SUITES[suite])


def resolve_tasks(suite: str, tasks: str | Sequence[str] | None) -> list[str]:
    """Task names of a run: one name, a list, a named set of the suite (e.g. 'MT10'), or None (default)."""
    mod = suite_module(suite)
    if tasks is None:
        return list(mod.DEFAULT_TASKS)
    if isinstance(tasks, str):
        tasks = mod.TASK_SETS.get(tasks, [tasks]) if hasattr(mod, "TASK_SETS") else [tasks]
    names = list(tasks)
    if not names:
        raise ValueError(f"empty task list for suite {suite!r}")
    for name in names:
        if name not in mod.TASKS:
            raise ValueError(f"unknown task {name!r} for suite {suite!r}; allowed: {', '.join(mod.TASKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tasks in {names}")
    return names


def make_envs(suite: str, tasks: Sequence[str], cfg: dict[str, Any], seed: int, evaluation: bool = False
              ) -> list[TaskEnv]:
    """One env per task, task index = position in `tasks`; `cfg` is the suite's config section, plus
    `run_seed` (the run's seed) where a suite shares randomness across a run's envs (Meta-World's goal sets)."""
    suite_module(suite).check(cfg)
    return [make_env(suite, tasks, i, cfg, seed, evaluation) for i in range(len(tasks))]


def make_env(suite: str, tasks: Sequence[str], index: int, cfg: dict[str, Any], seed: int, evaluation: bool = False
             ) -> TaskEnv:
    """The env of task `index` of `tasks` (the one make_envs makes there, seeded seed + TASK_SEED_STRIDE * index)."""
    mod = suite_module(suite)
    try:
        return mod.make(tasks[index], index, cfg, seed=seed + TASK_SEED_STRIDE * index, evaluation=evaluation,
                        n_tasks=len(tasks))
    except ImportError as err:  # an optional dependency of this suite only
        raise ImportError(f"suite {suite!r} needs the package {err.name!r}, which is not importable: "
                          f"install it (pip install -c constraints.txt -e .)") from err

