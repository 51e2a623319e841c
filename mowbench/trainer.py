"""The training loop: act in one env per task, store to replay, update the agent, evaluate, checkpoint.

It knows only the Agent interface (mowbench.agents.base) and TaskEnv (mowbench.envs.base); its evaluations (periodic,
final, the random baseline) are mowbench.evaluation's.
Checkpoints hold everything needed to continue exactly: agent (models, optimizers), replay, RNG
states, counters, env states, acting contexts and log rows. They are plain dicts of tensors, numbers and
strings that load with `torch.load(weights_only=True)`; only the env emulator states and the agents' acting
contexts (arbitrary Python objects) are pickled, explicitly, into one `objects` bytes field.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mowbench.agents.base import Agent, Metrics, read_metrics
from mowbench.envs.base import TaskEnv
from mowbench.evaluation import (
    EVAL_MODES,
    RANDOM_EVAL_KEY,
    EvaluationInterrupted,
    Stream,
    advance,
    eval_env_seed,
    evaluate_in_mode,
    restart,
    stream_seed,
)
from mowbench.logger import RunLog
from mowbench.machine import host_memory_available
from mowbench.offline import KINDS, collect, fill, mixed_sampler
from mowbench.replay import Batch, Replay, check_host_memory, replay_bytes, replay_device
from mowbench.results import atomic_torch_save

CHECKPOINT = "checkpoint.pt"
# the offline data's envs: evaluation.eval_env_seed(seed, -1, 1 + kind) = seed + 104,729 x (1 + kind), apart from the
# training envs (seed + 1000 x task) and below the largest seed the evaluations derive, so the seed limit stays exact
OFFLINE_EVAL_KEY = -1
# signals that make the trainer checkpoint at the end of the current step and leave
PREEMPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR2", "SIGTERM") if hasattr(signal, name))
ARTIFACTS = "artifacts"  # agent-specific files (MoW: routing heatmaps, cluster assignment)


@dataclass
class TrainConfig:
    """Budgets and schedules, all counted in agent steps per task (one agent step = frame_skip frames
    on Atari, action_repeat simulator steps on Meta-World)."""

    steps: int = 100_000  # agent steps per task (Atari 100k: 100k = 400k frames)
    warmup: int = 1024  # random-action steps per task before training starts
    updates_per_step: float = 1.0  # agent.update() calls per env step after warm-up (STORM: 1)
    replay_capacity: int = 100_000  # transitions per task
    # keep replay on the training device (GPU) instead of CPU memory; None: on the GPU when the full replay takes
    # at most half its free memory (replay.replay_device), else in pinned-copy CPU memory; a CPU run: CPU
    replay_on_device: bool | None = None
    eval_every: int = 0  # periodic evaluation interval (0: only the final evaluation)
    eval_episodes: int | None = None  # episodes of the final evaluation (None: the suite protocol's number)
    periodic_eval_episodes: int = 5  # episodes of each periodic evaluation
    eval_greedy: bool | None = None  # greedy (mode) instead of sampled actions (None: the protocol's; STORM samples)
    # full: every started episode counted with its whole return | reference: as STORM's reference evaluates
    # (eval_parallel envs in lockstep, the first `episodes` to finish, each without its last step's reward);
    # None: the protocol's (Atari with the STORM protocol: reference)
    eval_mode: str | None = None
    eval_parallel: int = 5  # reference mode: envs per task run in parallel (STORM's reference: 5)
    # full mode: episodes (of all tasks) played at once, each with its own env and seed, so the results do not
    # depend on it; None: the suite's EVAL_ENVS (what fits in memory: an Atari env takes ~3 MiB, a Meta-World
    # env with its renderer ~160 MiB)
    eval_envs: int | None = None
    eval_max_steps: int = 0  # cap per evaluation episode in agent steps (0: the env's own cap)
    random_baseline: bool = True  # also evaluate a uniformly random policy at the end
    # its episodes per task (None: eval_episodes, filled by config.plan). A random policy's return varies widely
    # between episodes and its episodes cost no agent (and no renderer on Meta-World), so a ratio to it is steadier
    # with more of them
    random_episodes: int | None = None
    checkpoint_every: int = 10_000  # steps between checkpoints (0: none until the end)
    stop_at: int = 0  # leave after checkpointing at this step (simulates preemption; 0: off)
    log_every: int = 250  # steps between scalar logs
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # also write TensorBoard events
    # every N-th evaluation, each task's policy episode and (methods with a decoder) its open-loop prediction as
    # GIFs in TensorBoard (mowbench.video; 0: never). The global random state is set aside while it runs: the
    # run's numbers are the same either way
    video_every: int = 0
    keep_checkpoint: bool = False  # keep the full resume checkpoint (with replay) after finishing
    # N > 0: the run's envs (training streams, evaluations, the random baseline, offline data) live in N worker
    # processes that step and render them at the same time (mowbench.envs.workers); the same seeds give the same
    # frames and results as 0, in this process. Worth it where frames cost time: Meta-World from pixels
    env_workers: int = 0

    def check(self) -> None:
        """After the protocol filled eval_episodes, eval_greedy, eval_mode and random_episodes (config.plan)."""
        for name in ("steps", "replay_capacity", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}; allowed: a positive integer")
        for name in ("eval_episodes", "periodic_eval_episodes"):  # an evaluation of no episode has no return
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}; allowed: a positive integer")
        for name in ("warmup", "eval_every", "checkpoint_every", "stop_at", "eval_max_steps", "video_every",
                     "env_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)}; allowed: a non-negative integer")
        if self.updates_per_step < 0:
            raise ValueError(f"train.updates_per_step={self.updates_per_step}; allowed: >= 0")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"train.eval_mode={self.eval_mode!r}; allowed: {', '.join(EVAL_MODES)}")
        for name in ("eval_parallel", "eval_envs", "random_episodes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}; allowed: a positive integer")


@dataclass
class Counters:
    step: int = 0  # agent steps taken per task
    updates: int = 0
    update_credit: float = 0.0
    episodes: list[int] = field(default_factory=list)
    wall_time: float = 0.0  # seconds of training accumulated over all sessions of this run
    evals: int = 0
    pretrain_updates: int = 0  # Agent.pretrain calls done (before step 0; methods with offline data)


class Diverged(ValueError):
    """Training produced a non-finite loss or gradient norm: the run is failed, not finished (a rerun with the
    same settings and seed diverges again)."""

    def __init__(self, message: str, step: int, names: list[str]) -> None:
        super().__init__(message)
        self.step, self.names = step, names
        self.last_checkpoint = ""  # where the run can be resumed from (filled by the runner)


class DivergenceGuard:
    """Watches every update's metrics (losses, gradient norms) for NaN or inf without a device sync per update:
    each update adds a few device ops that keep the first non-finite update's step on the device; the host reads
    it only where it syncs anyway (log intervals) and before anything is saved (checkpoints, the final
    evaluation), so no checkpoint ever holds diverged weights."""

    def __init__(self) -> None:
        self.first_bad: dict[torch.device, torch.Tensor] = {}  # per device: the first bad update's step, or -1
        self.host_bad: tuple[int, list[str]] | None = None  # a non-tensor metric that was not finite

    def observe(self, metrics: Metrics, step: int) -> None:
        tensors: dict[torch.device, list[torch.Tensor]] = {}
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(value.device, []).append(value.detach().float().reshape(1))
            elif self.host_bad is None and not np.isfinite(value):
                self.host_bad = (step, [name])
        for device, values in tensors.items():
            first = self.first_bad.get(device)
            if first is None:
                first = self.first_bad[device] = torch.full((), -1, dtype=torch.int64, device=device)
            finite = torch.isfinite(torch.cat(values)).all()
            first.copy_(torch.where(finite | (first >= 0), first, step))  # in place: a CUDA graph may hold it

    def check(self, metrics: Metrics, now: int) -> None:
        """Raise Diverged if any update so far had a non-finite metric (one sync per device)."""
        steps = [int(first) for first in self.first_bad.values()]
        bad = [s for s in steps if s >= 0] + ([self.host_bad[0]] if self.host_bad else [])
        if not bad:
            return
        step = min(bad)
        values = read_metrics(metrics)
        names = [k for k, v in values.items() if not np.isfinite(v)] or (self.host_bad[1] if self.host_bad else [])
        names.sort(key=lambda k: ("loss" not in k, "grad_norm" not in k))  # losses first, then gradient norms
        shown = ", ".join(f"{k}={values.get(k, float('nan'))}" for k in names[:3])
        what = ((shown + (f" and {len(names) - 3} more metrics" if len(names) > 3 else "")) if names else
                f"a loss or gradient norm (finite again by step {now})")
        raise Diverged(f"training diverged: {what} (first non-finite update at step {step}, detected at step {now})",
                       step, names)


def rng_state() -> dict[str, Any]:
    """Global RNG states as plain data (numpy's key as a tensor), loadable with weights_only=True."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": torch.from_numpy(numpy_state["state"]["key"].copy())}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    key = numpy_state["state"]["key"].cpu().numpy()  # stored as a tensor (rng_state)
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"], "key": key}})
    torch.set_rng_state(state["torch"].cpu())  # (a checkpoint loaded with map_location=cuda moves it)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


SEED_LIMIT = 2**32 - 1  # numpy's legacy seeding (np.random.seed, MinAtar, Meta-World) takes seeds up to this


def largest_derived_seed(seed: int, cfg: TrainConfig, n_tasks: int, task_stride: int) -> int:
    """The largest env seed a run derives from `seed` (training and every evaluation, random policy included), so
    that a seed too large for numpy is refused before any work instead of failing at the final evaluation."""
    evaluations = (cfg.steps // cfg.eval_every if cfg.eval_every else 0) + 1
    key = max(evaluations - 1, RANDOM_EVAL_KEY if cfg.random_baseline else 0)
    copies = max(cfg.eval_episodes, cfg.periodic_eval_episodes, cfg.random_episodes or 1, cfg.eval_parallel)
    # offline data (methods that ask for it) plays one env per episode kind under its own key: below the evaluations'
    # largest seed unless a run has a single small evaluation and no random baseline
    largest = max(eval_env_seed(seed, key, copies - 1), eval_env_seed(seed, OFFLINE_EVAL_KEY, len(KINDS)))
    return largest + task_stride * (n_tasks - 1)


class Trainer:
    def __init__(self, agent: Agent, envs: list[TaskEnv], make_eval_env: Callable[[int, int, int], TaskEnv],
                 cfg: TrainConfig, folder: Path, device: torch.device, seed: int,
                 offline_cache: Path | None = None) -> None:
        """make_eval_env(evaluation, copy, task index): a new evaluation env (seeded by all three). offline_cache:
        where offline datasets (mowbench.offline) are kept for every run that shares them (None: not kept)."""
        self.agent, self.cfg, self.folder, self.device, self.seed = agent, cfg, folder, device, seed
        self.make_eval_env = make_eval_env
        self.tasks = [e.info for e in envs]
        fields = agent.replay_fields()
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        step_bytes = replay_bytes(1, self.tasks, fields)  # one step of every task
        store = replay_device(cfg.replay_on_device, device, cfg.replay_capacity * step_bytes, free)
        if store.type == "cpu":  # a GPU's replay is reserved at once (an out-of-memory error now, not hours later)
            check_host_memory(cfg.replay_capacity, min(cfg.replay_capacity, cfg.steps),  # never more than its steps
                              step_bytes, len(self.tasks), host_memory_available())
        self.replay = Replay(cfg.replay_capacity, self.tasks, store, seed, fields, train_device=device)
        self.sample: Callable[[int, int], Batch] = self.replay.sample  # what each update draws from
        self.offline_spec = agent.offline_data()
        self.offline: Replay | None = None
        self.offline_stats: dict[str, Any] = {}
        if self.offline_spec is not None:  # collected (or read from the cache) before any step; replay state as new
            self.offline, self.offline_stats = collect(
                self.offline_spec, self.tasks, lambda copy, task: make_eval_env(OFFLINE_EVAL_KEY, 1 + copy, task),
                seed + 2, fields, store, device, offline_cache)
            if self.offline_spec.into_replay:
                fill(self.replay, self.offline)  # a resumed run's checkpoint then replaces the replay's state
            self.sample = (mixed_sampler(self.replay.sample, self.offline.sample, self.offline_spec.share)
                           if self.offline_spec.online else self.offline.sample)
        # an offline method takes no env step: each step of the loop is an update on the offline data
        self.online = self.offline_spec is None or self.offline_spec.online
        self.steps = cfg.steps if self.online else self.offline_spec.updates  # the loop's length
        self.streams = [Stream(env, agent.new_context(env.info.index)) for env in envs]
        self.counters = Counters(episodes=[0] * len(envs))
        self.rng = np.random.default_rng(seed + 1)  # warm-up actions
        self.last_metrics: Metrics = {}  # the latest update's, read from the device at log intervals only
        self.guard = DivergenceGuard()
        self.checkpointed: int | None = None  # the step of the last checkpoint on disk (all of them are finite)
        self.preempted = False
        self.resumed_from: int | None = None
        self.env_restore_failed: list[str] = []
        if (folder / CHECKPOINT).exists():
            self.load(folder / CHECKPOINT)
        # TensorBoard drops events at steps >= purge_step: those a killed run wrote after its checkpoint at step
        # S, not the ones logged at S itself (before the checkpoint), which the resumed run does not log again
        self.log = RunLog(folder, cfg.tensorboard, purge_step=self.counters.step + 1 if self.resumed_from else None)
        if self.resumed_from is not None:
            self.log.load_state_dict(self._loaded_log)

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "agent": self.agent.state_dict(), "replay": self.replay.state_dict(), "rng": rng_state(),
            "trainer_rng": self.rng.bit_generator.state, "counters": dataclasses.asdict(self.counters),
            "streams": [{"obs": None if s.obs is None else torch.from_numpy(np.array(s.obs)), "ret": float(s.ret),
                         "length": s.length, "success": s.success, "last_return": s.last_return}
                        for s in self.streams],
            # env emulator states and acting contexts are the envs' and the agent's own objects: pickled here
            "objects": pickle.dumps([{"env": s.env.get_state(), "context": s.context} for s in self.streams]),
            "log": self.log.state_dict(), "last_metrics": read_metrics(self.last_metrics),
            "offline_rng": None if self.offline is None else self.offline.rng.bit_generator.state,
        }

    def save(self) -> None:
        """Checkpoint, after checking that no update so far diverged (Diverged): a checkpoint is always good."""
        self.guard.check(self.last_metrics, self.counters.step)
        atomic_torch_save(self.folder / CHECKPOINT, self.state_dict())
        self.checkpointed = self.counters.step
        self.log.flush()

    def load(self, path: Path) -> None:
        try:
            state, objects = self._read_checkpoint(path)
        except Exception as err:  # noqa: BLE001 - truncated, garbage: named with the recovery, not a traceback
            raise ValueError(f"{path} is corrupt ({type(err).__name__}); delete it to restart this run from step 0 "
                             "(its folder's other files are rewritten)") from None
        self.agent.load_state_dict(state["agent"])
        self.replay.load_state_dict(state["replay"])
        set_rng_state(state["rng"])
        self.rng.bit_generator.state = state["trainer_rng"]
        self.counters = Counters(**state["counters"])
        if self.offline is not None:
            self.offline.rng.bit_generator.state = state["offline_rng"]
        for stream, s, o in zip(self.streams, state["streams"], objects, strict=True):
            if o["env"] is not None:
                stream.env.set_state(o["env"])
                stream.obs = None if s["obs"] is None else np.asarray(torch.as_tensor(s["obs"]).cpu())
                stream.ret, stream.length, stream.success = s["ret"], s["length"], s["success"]
            else:  # this env cannot restore a mid-episode state: the episode restarts (recorded in metadata)
                self.env_restore_failed.append(stream.env.info.name)
            stream.context, stream.last_return = o["context"], s["last_return"]
        self._loaded_log = state["log"]
        self.last_metrics = state["last_metrics"]
        self.resumed_from = self.checkpointed = self.counters.step

    def _read_checkpoint(self, path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The checkpoint's plain state and its streams' pickled objects (env state, acting context)."""
        state = torch.load(path, map_location=self.device, weights_only=True)  # plain data only (state_dict)
        return state, pickle.loads(state["objects"])  # written by this trainer (see state_dict)

    # ---- loop ----
    def _round(self, training: bool) -> None:
        """One env step in every task: the agent acts on all streams in one batch (warm-up: random actions)."""
        restart(self.agent, [s for s in self.streams if s.obs is None])
        if training or (self.offline_spec is not None and self.offline_spec.act_in_warmup):
            actions = self.agent.act_batch([s.context for s in self.streams], [s.obs for s in self.streams])
        else:
            actions = [s.env.info.action.sample(self.rng) for s in self.streams]
        extras: list[dict[str, Any]] = []  # what the replay stores beside each transition, as of before the step
        for s in self.streams:
            extras.append(self.agent.step_extras(s.context) if training and self.replay.fields else {})
            if "first" in self.replay.fields:
                extras[-1]["first"] = float(s.length == 0)
        for k, (s, action, (step, _)) in enumerate(zip(self.streams, actions, advance(self.streams, actions),
                                                       strict=True)):
            self.replay.add(k, s.obs, action, step.reward, s.env.train_terminal(step), **extras[k])
            s.ret += step.reward
            s.obs = step.obs
            if step.done:
                self.counters.episodes[k] += 1
                s.last_return = s.ret
                self.log.episode(self.counters.step + 1, s.env.info.name, s.ret, s.length, s.success)
                s.obs = None

    def _episodes(self, agent: Agent | None, key: int, episodes: int, greedy: bool
                  ) -> dict[str, list[tuple[float, int, float | None]]]:
        """Evaluation episodes per task name on new eval envs (seeded by `key`), in the configured mode."""
        cfg, n = self.cfg, len(self.tasks)

        def make_env(copy: int, task: int) -> TaskEnv:
            return self.make_eval_env(key, copy, task)

        results = evaluate_in_mode(cfg, agent, make_env, n, episodes, greedy, stream_seed(self.seed, key),
                                   stop=lambda: self.preempted)
        return {info.name: rows for info, rows in zip(self.tasks, results, strict=True)}

    def _evaluate(self, episodes: int) -> dict[str, float]:
        """The agent's evaluation at the current step, logged; returns the mean return per task."""
        results = self._episodes(self.agent, self.counters.evals, episodes, self.cfg.eval_greedy)
        self.counters.evals += 1
        means = {}
        for task, rows in results.items():
            for i, (ret, length, success) in enumerate(rows):
                self.log.evaluation(self.counters.step, task, i, ret, length, success, self.cfg.eval_mode)
            means[task] = float(np.mean([r[0] for r in rows]))
            self.log.scalars(self.counters.step, {f"eval_return/{task}": means[task]})
        key = self.counters.evals - 1
        if self.cfg.video_every and self.log.writer is not None and key % self.cfg.video_every == 0:
            self._log_videos(key)
        return means

    def _log_videos(self, key: int) -> None:
        """Each task's policy episode (on evaluation `key`'s first env) and open-loop prediction, as TensorBoard GIFs;
        the global random states are restored afterwards, so training goes on as without it."""
        from mowbench.frames import VIDEO_STEPS, open_loop_panel, task_videos, upscale

        np_state = np.random.get_state()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for k, info in enumerate(self.tasks):
                videos = task_videos(self.agent, lambda task: self.make_eval_env(key, 0, task), k,
                                     self.cfg.eval_greedy, VIDEO_STEPS, self.seed)
                self.log.gif(f"policy/{info.name}", upscale(videos["policy"], 2), self.counters.step)
                if videos["open_loop"] is not None:
                    self.log.gif(f"open_loop/{info.name}", open_loop_panel(*videos["open_loop"], 2),
                                 self.counters.step)
        np.random.set_state(np_state)

    def _handle_signal(self, signum: int, frame: Any) -> None:
        self.preempted = True  # checkpoint at the end of the current step, then leave
        self.signalled = signum

    def train(self, on_preempt: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Run until `steps`; returns a summary. Leaves early (preempted=True) after `stop_at`, SIGUSR2
        (SLURM's pre-timeout signal) or SIGTERM (what schedulers send first), having checkpointed and called
        `on_preempt(step)`. It then hands the signal to the handler installed before it, if any (under
        submitit: checkpoint(), requeue and exit), so whoever launched the run sees the signal as if the
        trainer had not been there; a SIGTERM with no handler before it ends the process with status 143."""
        cfg, c = self.cfg, self.counters
        self.signalled = 0
        old = {sig: signal.signal(sig, self._handle_signal) for sig in PREEMPT_SIGNALS}
        # in a log file (e.g. a SLURM job's output) redraw rarely instead of several times a second
        bar = tqdm(total=self.steps, initial=c.step, disable=not cfg.progress, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 60.0, desc="/".join(t.name for t in self.tasks)[:40])
        start = time.time()
        last_log = (start, c.step)
        try:
            if self.offline_spec is not None and c.pretrain_updates < self.offline_spec.pretrain_updates:
                if not self._pretrain(on_preempt, old):
                    return {"preempted": True, "step": c.step}
                start = time.time()
            while c.step < self.steps:
                training = c.step >= cfg.warmup or not self.online
                if self.online:
                    self._round(training)
                c.step += 1
                if training and (len(self.replay) >= 1 or not self.online):
                    c.update_credit += cfg.updates_per_step
                    while c.update_credit >= 1.0:
                        self.last_metrics = self.agent.update(self.sample)
                        self.guard.observe(self.last_metrics, c.step)
                        c.updates += 1
                        c.update_credit -= 1.0
                if c.step % cfg.log_every == 0:
                    now = time.time()
                    sps = (c.step - last_log[1]) / max(now - last_log[0], 1e-9)  # over the last interval
                    last_log = (now, c.step)
                    self.log.scalars(c.step, {**read_metrics(self.last_metrics), "perf/steps_per_s": sps})
                    self.guard.check(self.last_metrics, c.step)  # after logging them: the log shows the NaN
                    last = [s.last_return for s in self.streams if s.last_return is not None]
                    bar.set_postfix(sps=f"{sps:.1f}", ret=f"{np.mean(last):.2f}" if last else "-")
                    self.agent.write_artifacts(self.folder / ARTIFACTS, final=False)
                bar.update(1)
                if cfg.eval_every and c.step % cfg.eval_every == 0 and c.step < self.steps:
                    self.guard.check(self.last_metrics, c.step)  # no evaluation of diverged weights is logged
                    self._evaluate(cfg.periodic_eval_episodes)
                    self.log.flush()  # so progress can be watched; a resume rewrites these files anyway
                if (cfg.checkpoint_every and c.step % cfg.checkpoint_every == 0 and c.step < self.steps) or \
                        (cfg.stop_at and c.step == cfg.stop_at) or self.preempted:
                    c.wall_time += time.time() - start
                    start = time.time()
                    self.save()
                    if self.preempted or (cfg.stop_at and c.step == cfg.stop_at):
                        self.preempted = True
                        if on_preempt is not None:
                            on_preempt(c.step)
                        if self.signalled:
                            self._hand_on(old, c.step)
                        return {"preempted": True, "step": c.step}
            c.wall_time += time.time() - start
            if self.checkpointed != c.step:
                # training is over: the final evaluation starts from a checkpoint, so a signal during it (handled
                # below) or a kill loses no training, and the evaluation is redone exactly from here
                self.save()
            self.agent.write_artifacts(self.folder / ARTIFACTS, final=True)
            try:
                final = self._evaluate(cfg.eval_episodes)
                rand = (self._episodes(None, RANDOM_EVAL_KEY, cfg.random_episodes, False)
                        if cfg.random_baseline else None)
            except EvaluationInterrupted:
                if on_preempt is not None:
                    on_preempt(c.step)
                self._hand_on(old, c.step)
                return {"preempted": True, "step": c.step}
            summary: dict[str, Any] = {"preempted": False, "step": c.step, "updates": c.updates,
                                       "final_return": final, "episodes": dict(zip([t.name for t in self.tasks],
                                                                                   c.episodes, strict=True))}
            if rand is not None:
                summary["random_return"] = {task: float(np.mean([r[0] for r in rows])) for task, rows in rand.items()}
            if cfg.keep_checkpoint:
                self.save()  # the final state, e.g. to continue training with a larger budget
            self.log.flush()
            return summary
        finally:
            bar.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _pretrain(self, on_preempt: Callable[[int], None] | None, old: dict[int, Any]) -> bool:
        """The agent's pretraining on the offline data (before step 0), checkpointed at its end and when preempted;
        logged at step 0 under pretrain/ every log_every updates. False: preempted (checkpointed, signal handed on)."""
        spec, c = self.offline_spec, self.counters
        assert spec is not None and self.offline is not None
        start = time.time()
        bar = tqdm(total=spec.pretrain_updates, initial=c.pretrain_updates, disable=not self.cfg.progress,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 60.0, desc="pretraining")
        try:
            while c.pretrain_updates < spec.pretrain_updates:
                metrics = self.agent.pretrain(self.offline.sample)
                self.guard.observe(metrics, 0)
                c.pretrain_updates += 1
                bar.update(1)
                last = c.pretrain_updates == spec.pretrain_updates
                if c.pretrain_updates % self.cfg.log_every == 0 or last:
                    self.log.scalars(0, {f"pretrain/{k}": v for k, v in read_metrics(metrics).items()})
                    self.guard.check(metrics, 0)
                if last or self.preempted:
                    c.wall_time += time.time() - start
                    start = time.time()
                    self.save()
                if self.preempted and not last:
                    if on_preempt is not None:
                        on_preempt(c.step)
                    if self.signalled:
                        self._hand_on(old, c.step)
                    return False
            return True
        finally:
            bar.close()

    def _hand_on(self, old: dict[int, Any], step: int) -> None:
        """After the checkpoint: give the signal to the handler installed before the trainer's."""
        hand_on(old, self.signalled, f"[mowbench] {self.folder}: SIGTERM; checkpointed at step {step}; rerun the same "
                "command to resume")


def hand_on(old: dict[int, Any], signum: int, leaving: str | None = None) -> None:
    """Restore the handlers in `old` and give `signum` to the one installed before ours (chained: e.g. submitit
    requeues the job and exits). A SIGTERM with no handler before it leaves as a terminated process would (128 + 15),
    printing `leaving` first, through the callers' cleanup (lock, envs, logs). The trainer and a packed grid job
    (which forwards the signal to its runs first) both end this way."""
    for sig, handler in old.items():
        signal.signal(sig, handler)
    before = old[signum]
    if callable(before):
        before(signum, None)
    elif signum == signal.SIGTERM and before == signal.SIG_DFL:
        if leaving:
            print(leaving, flush=True)
        raise SystemExit(128 + signal.SIGTERM)
