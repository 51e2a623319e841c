"""Evaluation: a policy (an agent, or uniformly random legal actions) played on fresh envs for complete episodes,
batched over every task's streams, in the suite's mode: `full` (each episode its own env; all episodes counted)
or `reference` (STORM's: a few envs per task in lockstep, the first episodes to finish, each without its last
reward). Each stream's seed derives from the run's seed, the evaluation, the task and the episode, so the results
depend on neither batching nor which episodes run beside it. The trainer's periodic and final evaluations, the
random baseline and the bench's projection use this module.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from mowbench.agents.base import Agent
from mowbench.envs.base import Step, TaskEnv, reset_all, step_all

EVAL_MODES = ("full", "reference")


class EvalSettings(Protocol):
    """What evaluate_in_mode reads of the trainer's settings (mowbench.trainer.TrainConfig has these fields)."""

    eval_mode: str
    eval_envs: int
    eval_parallel: int
    eval_max_steps: int


@dataclass
class Stream:
    """One env and its episode in progress: the trainer's training streams, and (EvalStream) evaluation's."""

    env: TaskEnv
    context: Any
    obs: np.ndarray | None = None
    ret: float = 0.0
    length: int = 0
    success: float | None = None
    last_return: float | None = None


EnvMaker = Callable[[int, int], TaskEnv]  # (copy, task index) -> a new evaluation env of that task
RANDOM_EVAL_KEY = 10_000  # the random policy's evaluation key (the agent's evaluations are 0, 1, 2, ...)


def eval_env_seed(seed: int, evaluation: int, copy: int) -> int:
    """The seed of evaluation `evaluation`'s env `copy` (episode or parallel copy) in a run seeded `seed`: apart
    from every other evaluation's and from the training envs' (seed + 1000 * task index)."""
    return seed + 7919 * (evaluation + 1) + 104_729 * copy


def stream_seed(*keys: int) -> int:
    """The seed of one evaluation stream from its keys (run seed, evaluation, task, episode or copy)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(2))


@dataclass
class EvalStream(Stream):
    """An evaluation stream: its context is the agent's, or the random policy's generator."""

    task: int = 0
    index: int = 0  # full mode: the episode it plays; reference mode: its copy


def open_streams(agent: Agent | None, opened: list[tuple[TaskEnv, int, int, int]]) -> list[EvalStream]:
    """Streams on new envs, (env, task, index, acting seed) each, their first frames reset at once (envs in
    worker processes in parallel)."""
    for env, *_ in opened:
        env.observe = agent is not None  # a random policy needs no frames
    streams = [EvalStream(env, agent.new_context(task, seed) if agent else np.random.default_rng(seed), task=task,
                          index=index) for env, task, index, seed in opened]
    restart(agent, streams)
    return streams


def restart(agent: Agent | None, streams: list[Any]) -> None:
    """New episodes in `streams` (Stream or EvalStream), their envs reset at once."""
    for s, obs in zip(streams, reset_all([s.env for s in streams]), strict=True):
        s.obs, s.ret, s.length, s.success = obs, 0.0, 0, None
        if agent:
            agent.episode_start(s.context)


def act_round(agent: Agent | None, streams: list[EvalStream], greedy: bool) -> list[Any]:
    """One action per stream: the agent acting on all of them at once, or uniformly random legal actions."""
    if agent:
        return agent.act_batch([s.context for s in streams], [s.obs for s in streams], greedy)
    return [s.env.info.action.sample(s.context) for s in streams]


def advance(streams: list[Any], actions: list[Any], max_steps: int = 0) -> list[tuple[Step, bool]]:
    """Step every stream's env (at once: envs in worker processes in parallel); per stream, the step and whether
    its episode is over (done, or max_steps reached)."""
    out = []
    for s, step in zip(streams, step_all([s.env for s in streams], actions), strict=True):
        s.length += 1
        if step.success is not None:
            s.success = max(s.success or 0.0, step.success)  # success at any step of the episode
        out.append((step, bool(step.done or (max_steps and s.length >= max_steps))))
    return out


class EvaluationInterrupted(Exception):
    """An evaluation stopped by a preemption signal before its episodes finished (its envs closed)."""


def _check_stop(stop: Callable[[], bool] | None, streams: list[EvalStream]) -> None:
    if stop is not None and stop():
        for s in streams:
            s.env.close()
        raise EvaluationInterrupted


def evaluate(agent: Agent | None, make_env: EnvMaker, n_tasks: int, episodes: int, greedy: bool, max_steps: int,
             seed: int, max_envs: int = 64, stop: Callable[[], bool] | None = None
             ) -> list[list[tuple[float, int, float | None]]]:
    """Per task, `episodes` x (return, length, success) of complete episodes. agent=None: uniformly random
    legal actions. Up to `max_envs` episodes of all tasks run at once, the agent acting on all of them in one
    batch; episode i of task t has its own env make_env(i, t) and its own acting seed, so the results do not
    depend on max_envs or on which episodes run beside it. `stop()` true before a round: EvaluationInterrupted."""
    pending = deque((t, i) for i in range(episodes) for t in range(n_tasks))  # every task's first episode first
    results: list[list[Any]] = [[None] * episodes for _ in range(n_tasks)]
    live: list[EvalStream] = []
    while pending or live:
        _check_stop(stop, live)
        opened = []
        while pending and len(live) + len(opened) < max_envs:
            t, i = pending.popleft()
            opened.append((make_env(i, t), t, i, stream_seed(seed, t, i)))
        live += open_streams(agent, opened)
        for s, (step, over) in zip(live, advance(live, act_round(agent, live, greedy), max_steps), strict=True):
            s.ret += step.reward
            s.obs = step.obs
            if over:
                results[s.task][s.index] = (s.ret, s.length, s.success)
                s.env.close()
        live = [s for s in live if results[s.task][s.index] is None]
    return results


def evaluate_reference(agent: Agent | None, make_env: EnvMaker, n_tasks: int, episodes: int, greedy: bool,
                       max_steps: int, seed: int, parallel: int = 5, stop: Callable[[], bool] | None = None
                       ) -> list[list[tuple[float, int, float | None]]]:
    """STORM's reference evaluation (the one behind the published STORM and MoW numbers): per task, `parallel`
    envs (make_env(copy, task)) step in lockstep, each episode's return is summed *without its last step's
    reward*, and the first `episodes` episodes to finish are kept (ties within a round in env order), so
    long episodes are under-represented. All tasks' envs step together, the agent acting on all of them in one
    batch. Per task, `episodes` x (return, length, success)."""
    streams = open_streams(agent, [(make_env(c, t), t, c, stream_seed(seed, t, c))
                                   for t in range(n_tasks) for c in range(parallel)])
    results: list[list[tuple[float, int, float | None]]] = [[] for _ in range(n_tasks)]
    live = streams
    while live:
        _check_stop(stop, streams)
        ended = []
        for s, (step, over) in zip(live, advance(live, act_round(agent, live, greedy), max_steps), strict=True):
            if over:
                if len(results[s.task]) < episodes:
                    results[s.task].append((s.ret, s.length, s.success))  # the last reward is not added
                ended.append(s)
            else:
                s.ret += step.reward
                s.obs = step.obs
        restart(agent, ended)
        live = [s for s in live if len(results[s.task]) < episodes]
    for s in streams:
        s.env.close()
    return results


def evaluate_in_mode(cfg: EvalSettings, agent: Agent | None, make_env: EnvMaker, n_tasks: int, episodes: int,
                     greedy: bool, seed: int, stop: Callable[[], bool] | None = None
                     ) -> list[list[tuple[float, int, float | None]]]:
    """`episodes` per task in cfg.eval_mode (full: evaluate, cfg.eval_envs at once; reference: evaluate_reference,
    cfg.eval_parallel envs per task), episodes capped at cfg.eval_max_steps."""
    if cfg.eval_mode == "full":
        return evaluate(agent, make_env, n_tasks, episodes, greedy, cfg.eval_max_steps, seed, cfg.eval_envs, stop)
    return evaluate_reference(agent, make_env, n_tasks, episodes, greedy, cfg.eval_max_steps, seed, cfg.eval_parallel,
                              stop)
