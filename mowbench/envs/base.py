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
