"""The agent interface the trainer knows, and the registry baselines add themselves to."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mowbench.envs.base import TaskInfo
from mowbench.offline import OfflineSpec
from mowbench.replay import Batch, StepField


def adam(params: Any, lr: float, eps: float = 1e-8, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with the fused kernel (CPU and CUDA): the same update as the default per-parameter loop, one kernel for
    all parameters (much faster on CPU for models of a few hundred small tensors). capturable (CUDA): its step can
    be captured in a CUDA graph (agents.graphs); the fused kernel reads its step count from the device either
    way."""
    return bumps_versions(torch.optim.Adam(params, lr=lr, eps=eps, fused=True, capturable=capturable))


def bumps_versions(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer, bumping its parameters' autograd version counters after every step. Fused kernels change the
    parameters without bumping them, and packed inference weights (mowbench.models.packed) are kept while the
    counter is unchanged."""
    def bump(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        torch.autograd.graph.increment_version([p for group in opt.param_groups for p in group["params"]])

    optimizer.register_step_post_hook(bump)
    return optimizer


class PicklesGenerator:
    """Mixin for acting contexts with an `rng` attribute (a torch.Generator or None): checkpoints pickle contexts,
    and a Generator pickles as its state."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["rng"] = None if state["rng"] is None else state["rng"].get_state()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["rng"] is not None:
            gen = torch.Generator()
            gen.set_state(state["rng"])
            state["rng"] = gen
        self.__dict__.update(state)


class Autocast:
    """Mixin of agents with a device and a precision: `autocast()` is bf16 autocast on the run's device when the run's
    precision is bf16 (CUDA), else a no-op context. The agent sets `device` and `autocast_bf16`."""

    device: torch.device
    autocast_bf16: bool = False

    def autocast_cache(self) -> bool:
        """Whether the cast weights are cached across a context (torch's default); off under CUDA graph capture."""
        return True

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16,
                              cache_enabled=self.autocast_cache())


Metrics = dict[str, float | torch.Tensor]  # what an update returns: names -> numbers or 0-dim tensors


def read_metrics(metrics: Metrics) -> dict[str, float]:
    """An update's metrics as floats, the tensors among them read in one copy per device."""
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(k)
    for names in by_device.values():
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in names]).tolist()
        out |= dict(zip(names, values, strict=True))
    return {k: out[k] for k in metrics}  # in the agent's order


class Agent(ABC):
    """What the trainer calls. Everything else (models, losses, optimizers) is the agent's own."""

    multi_task: bool = False  # False: the runner makes one run per task (STORM); True: one run for all

    @abstractmethod
    def new_context(self, task: int, seed: int | None = None) -> Any:
        """Fresh acting state for one env stream (e.g. the last frames and actions). `seed`: the stream's own
        random numbers, so that its actions do not depend on the streams acting beside it (evaluation gives
        each episode one); None: drawn from torch's global generator."""

    @abstractmethod
    def act(self, context: Any, obs: np.ndarray, greedy: bool = False) -> np.ndarray | int:
        """Choose an action for `obs` (S, S, 3) uint8 and record (obs, action) in `context`."""

    def act_batch(self, contexts: list[Any], obs: list[np.ndarray], greedy: bool = False) -> list[np.ndarray | int]:
        """`act` for several streams at once (the trainer's and the evaluation's only call): one action per
        (context, obs). Default: one `act` after another; an agent overrides it with one batched pass."""
        return [self.act(c, o, greedy) for c, o in zip(contexts, obs, strict=True)]

    def episode_start(self, context: Any) -> None:  # noqa: B027 - optional hook
        """Called when a new episode starts on a stream."""

    def replay_fields(self) -> dict[str, StepField]:
        """Optional per-step fields this method stores in replay beside (obs, action, reward, terminal), e.g.
        MCTS visit counts or root values; they arrive in `Batch.extras`. `first` (1.0 at an episode's first
        step) is filled by the trainer; the others by `step_extras`. Default: none."""
        return {}

    def step_extras(self, context: Any) -> dict[str, Any]:
        """Values of the declared replay fields (but `first`) for the step `act` just chose on `context`.
        Steps the agent did not choose (random warm-up actions) hold zeros. Default: none."""
        return {}

    @abstractmethod
    def update(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """One training step; `sample(batch, length)` draws sequences from replay. Metric values may be
        (detached, 0-dim) tensors: the trainer reads them at log intervals (read_metrics), so an update on a GPU
        never waits for the device to report a number."""

    def offline_data(self) -> OfflineSpec | None:
        """Offline data this method learns from (demonstrations and other scripted episodes; mowbench.offline):
        the trainer collects it, calls `pretrain` on it spec.pretrain_updates times before the first env step, and
        draws spec.share of every update's batch from it. Default: none."""
        return None

    def pretrain(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """One pretraining update on offline data (`sample` draws from it only); for methods whose offline_data
        asks for pretraining."""
        raise NotImplementedError(f"{type(self).__name__} has no pretraining")

    def open_loop_window(self) -> tuple[int, int] | None:
        """(default context, longest segment) of `open_loop`: the real frames it is given by default and the most
        steps it predicts in one segment; None for a method without a decoder (default)."""
        return None

    def open_loop(self, obs: np.ndarray, action: np.ndarray, task: int, context: int
                  ) -> tuple[np.ndarray, np.ndarray] | None:
        """The world model's open-loop prediction of a real segment (mowbench.video): obs (T, S, S, 3) uint8 and
        the actions taken, (T,) or (T, A). The first `context` frames are encoded (their reconstructions come
        back), then every later frame is predicted from the actions alone. Returns the frames (T, S, S, 3) uint8
        and the predicted reward of each step's action (T,); None for a method without a decoder (default)."""
        return None

    def per_task_batch(self) -> dict[str, int]:
        """What each task contributes to one update (e.g. world-model sequences, imagination starts);
        recorded with the update ratio in each run's metadata. Empty when the agent has no such batches."""
        return {}

    def bench_phases(self, sample: Callable[[int, int], Batch]) -> dict[str, Callable[[], Any]]:
        """The phases of one training step as named callables, timed and FLOP-counted by mowbench.bench; the
        step is their sum. Batches are drawn from `sample` here, once. Default: the whole update."""
        return {"update": lambda: self.update(sample)}

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """Figures of the agent's own that the bench adds (e.g. a comparison with a reference implementation);
        `time(fn)` gives seconds per call, `figures` what the bench measured so far. Default: none."""
        return {}

    def bench_status(self) -> dict[str, Any]:
        """Figures of the agent's own that the bench reads last, after acting and evaluation ran (e.g. which calls
        CUDA graphs hold). Default: none."""
        return {}

    def write_artifacts(self, folder: Path, final: bool) -> None:  # noqa: B027 - optional hook
        """Save agent-specific files (figures, data) under `folder`; the trainer calls it at every log
        interval and once at the end (final=True). Must be cheap when there is nothing new."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def parameter_counts(self) -> dict[str, int]: ...


@dataclass
class AgentConfig:
    """Base of every agent's config dataclass (its fields are the agent's hyperparameters, its defaults the paper
    preset): the checks mowbench.config runs on it before any env or network is built. Each raises a one-line
    ValueError naming the bad value and what is allowed; the defaults accept everything."""

    def check(self) -> None:
        """The fields on their own (sizes > 0, coefficients in range)."""

    def check_image_size(self, image_size: int) -> None:
        """The suite's observation side in pixels (e.g. an encoder whose strides need a multiple of 16)."""

    def check_suite(self, suite: str, discrete: bool) -> None:
        """The suite and whether its actions are discrete (e.g. continuous-action methods refuse MinAtar)."""

    def check_tasks(self, n_tasks: int) -> None:
        """The run's task count (e.g. MoW's clusters cannot outnumber its tasks)."""

    def check_positive(self, names: tuple[str, ...]) -> None:
        """One-line errors for fields that must be > 0."""
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: > 0")

    def check_non_negative(self, names: tuple[str, ...]) -> None:
        """One-line errors for fields that must be >= 0."""
        for name in names:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: >= 0")


@dataclass(frozen=True)
class AgentEntry:
    name: str
    cls: type[Agent]
    config: type[AgentConfig]  # dataclass of hyperparameters; its defaults are the 'paper' preset
    multi_task: bool


AGENTS: dict[str, AgentEntry] = {}


def register_agent(name: str, config: type[AgentConfig],
                   multi_task: bool = False) -> Callable[[type[Agent]], type[Agent]]:
    """Class decorator: a baseline file registers itself under `name` with its config dataclass."""

    if not (dataclasses.is_dataclass(config) and issubclass(config, AgentConfig)):
        raise TypeError(f"agent {name!r}: its config {config!r} must be a dataclass deriving from AgentConfig")

    def wrap(cls: type[Agent]) -> type[Agent]:
        if name in AGENTS:
            raise ValueError(f"agent {name!r} registered twice ({AGENTS[name].cls} and {cls})")
        cls.multi_task = multi_task
        AGENTS[name] = AgentEntry(name, cls, config, multi_task)
        return cls

    return wrap


def registered_agents() -> dict[str, AgentEntry]:
    """Every registered agent: importing mowbench.baselines imports (and so registers) each baseline file."""
    import mowbench.baselines  # noqa: F401

    return AGENTS


def get_agent(name: str) -> AgentEntry:
    if name not in registered_agents():
        raise ValueError(f"unknown agent {name!r}; allowed: {', '.join(sorted(AGENTS))}")
    return AGENTS[name]


def known_departures(name: str) -> list[str]:
    """The method's known departures from its paper and published code: its agent class's DEPARTURES where a file
    registers variants (newt-nodemo), else its baseline file's (one line each; the method's docs page has them as a
    table). Recorded in every run's metadata and printed in the analysis's notes, so that a table never shows a
    method's numbers without saying what it is not."""
    import inspect

    cls = get_agent(name).cls
    return list(cls.__dict__.get("DEPARTURES", getattr(inspect.getmodule(cls), "DEPARTURES", ())))


def build_config(entry: AgentEntry, values: dict[str, Any]) -> Any:
    """Agent config dataclass from a mapping, refusing unknown keys with the allowed ones."""
    fields = {f.name: f for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(values) - set(fields) - {"name"})
    if unknown:
        raise ValueError(f"unknown {entry.name} option(s) {unknown}; allowed: {', '.join(sorted(fields))}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
    cfg = entry.config(**kwargs)
    try:
        cfg.check()
    except ValueError as err:  # "width=0; allowed: > 0" -> "agent.width=0; ...": the key as it is typed
        text = str(err)
        raise ValueError(f"agent.{text}" if text.split("=", 1)[0] in fields else text) from None
    return cfg


def count_parameters(params: Any) -> int:
    return sum(p.numel() for p in params)


def make_agent(name: str, values: dict[str, Any], tasks: list[TaskInfo], device: torch.device,
               precision: str) -> Agent:
    entry = get_agent(name)
    return entry.cls(build_config(entry, values), tasks, device, precision)
