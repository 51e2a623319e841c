"""Offline data a method learns from before, beside or instead of its own experience: per task, episodes of the suite's
scripted expert (demonstrations), of the expert with Gaussian action noise, and of a uniformly random policy, played
through the run's own envs (the same pixels, action repeat and goal variations as training), stored in a Replay of
their own and cached on disk so that seeds and reruns sharing a dataset generate it once.

An agent asks for it through Agent.offline_data (an OfflineSpec); the trainer collects it (collect), pretrains the
agent on it (Agent.pretrain) and hands each update a batch of which `share` comes from it (mixed_sampler), or, for an
offline method, only batches from it and no env step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mowbench.envs.base import TaskEnv, TaskInfo
from mowbench.replay import Batch, Replay, StepField
from mowbench.results import atomic_torch_save

KINDS = ("demos", "noisy", "random")  # the episode kinds, in the order they are played and stored
DATA_VERSION = 2  # bump when what a cached file holds changes (or how its envs are seeded): older caches are then
# regenerated, not read
ATTEMPTS = 5  # a task's scripted expert may fail an episode: up to ATTEMPTS x demos + 5 tries for `demos` successes


@dataclass(frozen=True)
class OfflineSpec:
    """What an agent needs: per task `demos` successful episodes of the scripted expert (success_only=False keeps
    every expert episode), `noisy` expert episodes with N(0, noise_std^2) added to each action (clipped), `random`
    episodes of uniform actions; `pretrain_updates` Agent.pretrain calls before the first env step; `share` of every
    online update's batch drawn from them; `into_replay`: also stored in the online replay at the start (upstream
    Newt loads them into both); `act_in_warmup`: the agent acts during warm-up instead of random actions (it chooses
    how, e.g. with its policy prior alone). `online=False`: an offline method (PWM's policy extraction): after
    pretraining, `updates` updates that draw only from the offline data and no env step at all (train.steps,
    warm-up and share do not apply; evaluations are the env's as always)."""

    demos: int = 0
    noisy: int = 0
    noise_std: float = 0.3
    random: int = 0
    success_only: bool = True
    pretrain_updates: int = 0
    share: float = 0.0
    into_replay: bool = False
    act_in_warmup: bool = False
    online: bool = True
    updates: int = 0

    def check(self) -> None:
        for name in ("demos", "noisy", "random", "pretrain_updates", "updates"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: a non-negative integer")
        if self.demos + self.noisy + self.random == 0:
            raise ValueError("an offline dataset of no episode; allowed: demos, noisy or random > 0")
        if not self.online and self.updates < 1:
            raise ValueError(f"updates={self.updates}; allowed: a positive integer for an offline method")
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"share={self.share}; allowed: 0 <= share < 1 (the rest comes from the online replay)")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std}; allowed: >= 0")

    def episodes(self) -> dict[str, int]:
        return {"demos": self.demos, "noisy": self.noisy, "random": self.random}


@dataclass
class Episode:
    """One played episode: obs (T, S, S, 3) uint8, action (T, A) or (T,), reward, terminal (T,), and whether it
    succeeded."""

    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminal: np.ndarray
    success: bool

    @property
    def ret(self) -> float:
        return float(self.reward.sum(dtype=np.float64))


def play(env: TaskEnv, choose: Callable[[], Any]) -> Episode:
    """One episode on `env` from a reset, each action from choose() (called after the observation it acts on)."""
    obs, rows = env.reset(), []
    success = 0.0
    while True:
        action = choose()
        step = env.step(action)
        rows.append((obs, np.asarray(action), step.reward, float(env.train_terminal(step))))
        success = max(success, step.success or 0.0)
        obs = step.obs
        if step.done:
            break
    o, a, r, d = zip(*rows, strict=True)
    return Episode(np.stack(o), np.stack(a).astype(np.float32 if np.asarray(a[0]).dtype.kind == "f" else np.int64),
                   np.asarray(r, np.float32), np.asarray(d, np.float32), success >= 1.0)


def chooser(kind: str, env: TaskEnv, rng: np.random.Generator, noise_std: float) -> Callable[[], Any]:
    """The action source of one episode kind on `env`: the scripted expert, the expert plus N(0, noise_std^2) noise
    (clipped to [-1, 1]), or uniform random actions; noise and random actions drawn from `rng`."""
    if kind == "demos":
        return env.expert_action
    if kind == "random":
        return lambda: env.info.action.sample(rng)

    def noisy() -> np.ndarray:
        a = np.asarray(env.expert_action(), np.float32)
        return np.clip(a + rng.normal(0.0, noise_std, a.shape), -1.0, 1.0).astype(np.float32)

    return noisy


def task_episodes(spec: OfflineSpec, env: Callable[[int], TaskEnv], seed: int) -> tuple[list[Episode], dict[str, Any]]:
    """A task's episodes of every kind, in KINDS order, and what it took (tries, successes, mean returns).
    env(copy) makes the task's env for one kind (copy = its index in KINDS): each kind draws its goals and noise from
    its own seeds, so adding noisy episodes leaves the demonstrations unchanged."""
    out: list[Episode] = []
    stats: dict[str, Any] = {}
    for copy, kind in enumerate(KINDS):
        wanted = spec.episodes()[kind]
        if not wanted:
            continue
        e = env(copy)
        rng = np.random.default_rng([seed, copy])
        try:
            choose = chooser(kind, e, rng, spec.noise_std)
            kept, tries = [], 0
            limit = ATTEMPTS * wanted + 5 if kind == "demos" and spec.success_only else wanted
            while len(kept) < wanted and tries < limit:
                ep = play(e, choose)
                tries += 1
                if kind != "demos" or ep.success or not spec.success_only:
                    kept.append(ep)
        finally:
            e.close()
        if len(kept) < wanted:
            raise RuntimeError(f"task {e.info.name}: the scripted expert succeeded in {len(kept)} of {tries} episodes; "
                               f"{wanted} demonstrations were asked for (success_only)")
        out += kept
        stats[kind] = {"episodes": len(kept), "tries": tries, "steps": int(sum(len(k.reward) for k in kept)),
                       "mean_return": float(np.mean([k.ret for k in kept])),
                       "success_rate": float(np.mean([k.success for k in kept]))}
    return out, stats


def cache_key(spec: OfflineSpec, info: TaskInfo, seed: int) -> str:
    """What a task's dataset depends on: the spec's episode settings, the task and its env protocol (pixels, action
    repeat, goal seed, ...) and the seed its envs and noise are drawn from."""
    episodes = {k: v for k, v in asdict(spec).items() if k in ("demos", "noisy", "noise_std", "random", "success_only")}
    text = json.dumps({"version": DATA_VERSION, "episodes": episodes, "suite": info.suite, "task": info.name,
                       "image_size": info.image_size, "protocol": info.protocol, "seed": seed}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def collect(spec: OfflineSpec, tasks: list[TaskInfo], make_env: Callable[[int, int], TaskEnv], seed: int,
            fields: dict[str, StepField], device: torch.device, train_device: torch.device,
            cache: Path | None) -> tuple[Replay, dict[str, Any]]:
    """The offline Replay of `tasks` (capacity: the largest task's steps) and per-task statistics. make_env(copy,
    task index) makes a task's env; a task's episodes are read from `cache`/<suite>-<task>-<key>.pt when there,
    else played and written there (atomically, one file per task, so an interrupted collection keeps its finished
    tasks). Only the `first` field among `fields` is filled (1.0 at each episode's first step)."""
    spec.check()
    unknown = sorted(set(fields) - {"first"})
    if unknown:
        raise ValueError(f"offline data fills no replay field {unknown}; allowed: first")
    per_task: list[dict[str, torch.Tensor]] = []
    stats: dict[str, Any] = {}
    for k, info in enumerate(tasks):
        task_seed = seed * 7919 + k  # each task's own envs and noise
        path = None if cache is None else cache / f"{info.suite}-{info.name}-{cache_key(spec, info, task_seed)}.pt"
        if path is not None and path.exists():
            data = torch.load(path, weights_only=True)
        else:
            episodes, task_stats = task_episodes(spec, lambda copy, k=k: make_env(copy, k), task_seed)
            first = [np.eye(1, len(e.reward), dtype=np.float32)[0] for e in episodes]  # 1.0 at each first step
            data = {"obs": torch.from_numpy(np.concatenate([e.obs for e in episodes])),
                    "action": torch.from_numpy(np.concatenate([e.action for e in episodes])),
                    "reward": torch.from_numpy(np.concatenate([e.reward for e in episodes])),
                    "terminal": torch.from_numpy(np.concatenate([e.terminal for e in episodes])),
                    "first": torch.from_numpy(np.concatenate(first)), "stats": json.dumps(task_stats)}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(path, data)
        per_task.append(data)
        stats[info.name] = json.loads(data["stats"]) | ({"file": str(path)} if path is not None else {})
    capacity = max(len(d["reward"]) for d in per_task)
    replay = Replay(capacity, tasks, device, seed, fields, train_device=train_device)
    for buf, d in zip(replay.buffers, per_task, strict=True):  # each task's rows in order, as a saved replay holds them
        n = len(d["reward"])
        buf.load_state_dict({**d, "size": n, "head": n % capacity,
                             "extras": {name: d[name] for name in buf.extras}})
    return replay, stats


def fill(replay: Replay, offline: Replay) -> None:
    """Store every offline transition in `replay` too (task by task, in order), as if they had been played."""
    for k, buf in enumerate(offline.buffers):
        for i in range(buf.size):
            extras = {name: column[i] for name, column in buf.extras.items() if name in replay.fields}
            replay.add(k, buf.obs[i].cpu().numpy(), buf.action[i], float(buf.reward[i]), bool(buf.terminal[i]),
                       **extras)


def mixed_sampler(online: Callable[[int, int], Batch], offline: Callable[[int, int], Batch], share: float
                  ) -> Callable[[int, int], Batch]:
    """sample(n, length): round(share * n) sequences from `offline`, the rest from `online`, in that order (upstream
    Newt's halves: offline first); each part stratified by task by its own Replay."""
    def sample(n: int, length: int) -> Batch:
        n_off = int(round(share * n))
        if n_off == 0:
            return online(n, length)
        a, b = offline(n_off, length), online(n - n_off, length)
        counts = None if a.task_counts is None or b.task_counts is None else tuple(
            x + y for x, y in zip(a.task_counts, b.task_counts, strict=True))
        return Batch(*(torch.cat([x, y]) for x, y in zip(a.tensors(), b.tensors(), strict=True)),
                     extras={k: torch.cat([a.extras[k], b.extras[k]]) for k in a.extras}, task_counts=counts)

    return sample
