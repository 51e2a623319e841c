"""One environment interface for single- and multi-task use: pixels in, task index, action masks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ActionSpace:
    """Discrete: `n` actions with a `legal` mask (per-task legal subset of a shared action set).
    Continuous: `n` dims in [low, high]."""

    discrete: bool
    n: int
    legal: tuple[bool, ...] | None = None
    low: float = -1.0
    high: float = 1.0

    def legal_mask(self) -> np.ndarray:
        """(n,) bool; all True for continuous spaces or when every action is legal."""
        return np.asarray(self.legal if self.legal is not None else [True] * self.n, dtype=bool)

    def sample(self, rng: np.random.Generator) -> np.ndarray | int:
        if self.discrete:
            return int(rng.choice(np.flatnonzero(self.legal_mask())))
        return rng.uniform(self.low, self.high, size=self.n).astype(np.float32)


@dataclass(frozen=True)
class TaskInfo:
    """What an agent needs to know of a task: its suite, name, index among the run's tasks, sizes."""

    suite: str
    name: str
    index: int
    image_size: int
    action: ActionSpace
    protocol: dict[str, Any] = field(default_factory=dict)


@dataclass
class Step:
    """One agent step. `terminated`: the episode really ended; `life_loss`: a life was lost (Atari)
    and the episode goes on; `train_terminal` is what the replay stores for world-model training."""

    obs: np.ndarray  # (S, S, 3) uint8
    reward: float
    terminated: bool
    truncated: bool
    life_loss: bool = False
    success: float | None = None

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


class TaskEnv(ABC):
    """A pixel environment for one task. Observations are (S, S, 3) uint8 RGB."""

    info: TaskInfo
    life_loss_terminal: bool = False  # protocol: store life loss as termination for training
    # False: reset and step may return a blank frame instead of rendering one (a random policy looks at none;
    # a suite whose frames cost time, such as Meta-World's software rendering, skips them)
    observe: bool = True

    @abstractmethod
    def reset(self) -> np.ndarray: ...

    @abstractmethod
    def step(self, action: np.ndarray | int) -> Step: ...

    def get_state(self) -> Any:
        """Everything needed to continue the current episode exactly (None: not supported)."""
        return None

    def set_state(self, state: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot restore a mid-episode state")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def expert_action(self) -> np.ndarray | int:
        """The suite's scripted expert's action for the current state (demonstrations, mowbench.offline); a suite
        without experts says so."""
        raise NotImplementedError(f"suite {self.info.suite} has no scripted expert policies")

    def train_terminal(self, step: Step) -> bool:
        return step.terminated or (self.life_loss_terminal and step.life_loss)



def step_all(envs: list[TaskEnv], actions: list[Any]) -> list[Step]:
    """Step every env with its action. Envs living in worker processes (mowbench.envs.workers) step at the same
    time: every worker gets its requests before any reply is read, and the envs of this process step meanwhile."""
    return _each(envs, "step", actions)


def reset_all(envs: list[TaskEnv]) -> list[np.ndarray]:
    """Reset every env (their first frames); envs in worker processes reset at the same time, as in step_all."""
    return _each(envs, "reset", [None] * len(envs))


def _each(envs: list[TaskEnv], op: str, args: list[Any]) -> list[Any]:
    pools: dict[int, tuple[Any, list[int]]] = {}
    for i, env in enumerate(envs):
        if (workers := getattr(env, "workers", None)) is not None:
            pools.setdefault(id(workers), (workers, []))[1].append(i)
    sent = [(w, idx, w.send(op, [envs[i] for i in idx], [args[i] for i in idx])) for w, idx in pools.values()]
    out: list[Any] = [None] * len(envs)
    for i, env in enumerate(envs):
        if getattr(env, "workers", None) is None:
            out[i] = env.step(args[i]) if op == "step" else env.reset()
    for workers, idx, ticket in sent:
        for i, value in zip(idx, workers.gather(ticket), strict=True):
            out[i] = value
    return out
