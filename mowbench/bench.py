"""Speed and size benchmark of any registered agent: `python -m mowbench.bench agent=storm preset=paper
[bench.repeats=3]`.

Prints one JSON object: parameter counts, seconds per phase of a training step as the agent names them
(`Agent.bench_phases`; STORM-style agents: world-model update, imagination, agent update) and their sum,
acting env-steps/s on the real env (Pong by default), the FLOPs of each phase with the device's matmul
rate (the step time no implementation of the same maths can beat here), the ops each phase dispatches (eager on a
GPU, about one kernel launch each), and whatever the agent adds
(`Agent.bench_extras`; STORM: the same imagination done the way its reference implementation caches, so
the speed-up is measured on the same machine, and the reference's parameter count). It knows no baseline.

Multi-task agents (`agent=mow`, `agent=monolithic`) are built for the suite's task list (Atari: the 26
games, full action set) and batches are spread over the tasks; their extras add the parameters of one
STORM per task with the same component sizes and the ratio. For MoW the first (untimed) update runs the
warm-up clustering; `agent.cluster_warmup_updates=0 agent.clustering=random` skips its cost without
changing what is timed (the clusters are then as balanced as gradient clustering's 'even' choice). The TD-MPC2
family's first update is its seeding burst (`seed_updates`, 1000 at `paper`); `agent.seed_updates=0` skips it
without changing what is timed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mowbench.agents.base import get_agent, make_agent
from mowbench.config import compose_config, deterministic_kernels, plan, resolve_device, resolve_precision
from mowbench.envs import reset_all, resolve_tasks, step_all
from mowbench.envs.workers import env_maker
from mowbench.evaluation import evaluate_in_mode
from mowbench.machine import peak_memory_gib, usable_cpus
from mowbench.models.packed import unpacked
from mowbench.replay import random_batch

# repeats: timed calls (median); task: task(s) (default: Pong, or the suite's list for a multi-task agent);
# reference: also the agent's own extras (STORM: its reference-style cache); act_steps: env steps per timed block
# of acting (`repeats` blocks, median); warm_up: one untimed agent.update() first (MoW: its warm-up clustering;
# see cluster_warmup_updates);
# flops: count each phase's matmul/conv FLOPs and its dispatched ops (one untimed pass) and measure the device's
# dense matmul rate in the run's precision, giving a lower bound on the step time (what no implementation of the
# same maths can beat on this device)
# eval_episodes, eval_steps: evaluation episodes per task timed and their cap in agent steps (past a full acting
# context, so that most steps act as a long episode's do); eval_episode_steps: the episode length the
# projection assumes (0: the suite's, EVAL_EPISODE_STEPS); profile: N > 0 adds each phase's N ops of most self time
# under torch.profiler (on CUDA: device time, and the host's calls, where waits on the device show), one untimed call
# only: "acting" measures acting alone (the agent's and random actions'), e.g. to compare train.env_workers values
BENCH_DEFAULTS = {"repeats": 3, "task": None, "reference": True, "act_steps": 200, "warm_up": True,
                  "flops": True, "eval_episodes": 2, "eval_steps": 40, "eval_episode_steps": 0, "profile": 0,
                  "only": None}
ONLY = (None, "acting")


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median seconds of `fn` over `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach a kernel (views and other aliasing ops, which compute nothing, apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def phase_counts(fn: Callable[[], Any]) -> tuple[float, int]:
    """One untimed call of `fn` -> (GFLOP of its matmuls, convolutions and attention, forward and backward, from
    torch's FlopCounterMode (elementwise ops are not counted); the non-view aten ops it dispatches). Eager on a GPU
    each of those ops is about one kernel launch, and a step of many small ones is bound by launches, not
    arithmetic (see README "GPU figures"); a CUDA-graph replay dispatches none."""
    with unpacked(), FlopCounterMode(display=False) as flops, OpCounter() as ops:  # CPU: aten's ops, which it counts
        fn()
    return flops.get_total_flops() / 1e9, ops.kernels


def profile_phase(fn: Callable[[], Any], device: torch.device, top: int) -> dict[str, Any]:
    """One call of `fn` under torch.profiler (the bench's phases are warm: timed() called them first): its wall ms
    under the profiler and the `top` ops of most self time, [name, ms, calls]: on CUDA by device time
    ("device_top", the kernels and copies behind the aten ops) and by host time ("host_top": launches, and
    synchronisations, cudaStreamSynchronize or DtoH memcpy, where the host waits for the device); on CPU by host
    time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    events = prof.key_averages()

    def ranked(attr: str) -> list[list[Any]]:
        best = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
        return [[e.key, round(getattr(e, attr) / 1e3, 3), e.count] for e in best if getattr(e, attr) > 0]

    out: dict[str, Any] = {"profiled_wall_ms": round(wall * 1e3, 3), "host_top": ranked("self_cpu_time_total")}
    if cuda:
        out["device_ms"] = round(sum(e.self_device_time_total for e in events) / 1e3, 3)
        out["device_top"] = ranked("self_device_time_total")
    return out


def matmul_gflop_per_s(device: torch.device, precision: str, n: int = 4096, repeats: int = 3) -> float:
    """Dense n x n matmul rate of the device in the run's precision (bf16 autocast -> bf16 operands)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: x @ x, repeats, device) / 1e9


def bench(cfg: dict[str, Any]) -> dict[str, Any]:
    opts = {**BENCH_DEFAULTS, **cfg.get("bench", {})}
    device = resolve_device(str(cfg.get("device", "auto")))
    precision = resolve_precision(str(cfg.get("precision", "auto")), device)
    if int(cfg.get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(0)
    multi_task = get_agent(cfg["agent"]["name"]).multi_task
    suite = cfg["env"]["suite"]
    if opts["task"]:
        cfg["task"] = opts["task"]
    elif not multi_task:  # one task; a multi-task agent gets the suite's task list (Atari: 26 games)
        cfg["task"] = "Pong" if suite == "atari100k" else resolve_tasks(suite, None)[0]
    p = plan(cfg)  # validates and resolves the env config (e.g. the shared Atari action set)
    deterministic_kernels(device, p.deterministic)  # as a run of this config would
    env_cfg = {**p.cfg["env"], "run_seed": 0}  # as a run of seed 0 (the runner adds its seed)
    if opts["only"] not in ONLY:
        raise ValueError(f"bench.only={opts['only']!r}; allowed: {', '.join(o for o in ONLY if o)} (unset: every "
                         "figure)")
    with ExitStack() as opened:
        make, workers = env_maker(p.train.env_workers, suite, p.tasks, env_cfg, opened)
        envs = [make(i, 0) for i in range(len(p.tasks))]
        opened.callback(lambda: [e.close() for e in envs])
        agent = make_agent(cfg["agent"]["name"], dict(cfg["agent"]), [e.info for e in envs], device, precision)
        if opts["only"] == "acting":
            return {"agent": cfg["agent"]["name"], "preset": cfg.get("preset_name"), "suite": suite,
                    "n_tasks": len(envs), "env_workers": p.train.env_workers, "device": str(device),
                    "torch_threads": torch.get_num_threads(), "usable_cpus": usable_cpus(),
                    **acting_figures(agent, envs, int(opts["act_steps"]), int(opts["repeats"])),
                    **acting_figures(None, envs, int(opts["act_steps"]), int(opts["repeats"]), "random_")}
        return measure(cfg, opts, p, agent, envs, make, workers, device, precision)


def measure(cfg: dict[str, Any], opts: dict[str, Any], p: Any, agent: Any, envs: list[Any], make: Any, workers: Any,
            device: torch.device, precision: str) -> dict[str, Any]:
    """Every figure of the bench (see the module's docstring) for `agent` on `envs`; `make` makes more of its envs
    (the evaluation's), in `workers` if any."""
    suite, env = p.suite, envs[0]
    infos, reps = [e.info for e in envs], int(opts["repeats"])

    fields = agent.replay_fields()

    def sample(n: int, length: int) -> Any:  # random sequences, every task in every batch
        return random_batch(infos, n, length, device, fields)

    if opts["warm_up"]:  # one untimed full update first (MoW: runs its warm-up clustering)
        t = time.perf_counter()
        agent.update(sample)
        warm_up_s = time.perf_counter() - t
    phases = agent.bench_phases(sample)  # name -> callable; batches drawn once, here
    out: dict[str, Any] = {
        "agent": cfg["agent"]["name"], "preset": cfg.get("preset_name"), "task": env.info.name,
        "n_tasks": len(envs), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "torch_threads": torch.get_num_threads(),
        "parameters": agent.parameter_counts(),
        "sizes": {"per_task": agent.per_task_batch(), "image_size": env.info.image_size,
                  "actions": env.info.action.n, "phases": list(phases)},
    }
    if opts["warm_up"]:
        out["s_first_update_with_warm_up"] = warm_up_s
    for name, fn in phases.items():
        out[f"s_per_{name}"] = timed(fn, reps, device)
    out["s_per_train_step"] = sum(out[f"s_per_{name}"] for name in phases)
    if opts["reference"]:
        out |= agent.bench_extras(sample, lambda fn: timed(fn, reps, device), out)
    if opts["flops"]:
        phase = {name: phase_counts(fn) for name, fn in phases.items()}
        # None: the phase replayed from a CUDA graph, whose kernels the counter does not see (not 0 FLOPs)
        counts = out["gflop"] = {name: c[0] or None for name, c in phase.items()}
        out["dispatched_ops"] = {name: c[1] for name, c in phase.items()}
        rate = out["matmul_gflop_per_s"] = matmul_gflop_per_s(device, precision)
        seen = None not in counts.values()
        out["s_per_train_step_at_matmul_rate"] = sum(counts.values()) / rate if seen else None  # the device's floor
    if int(opts["profile"]) > 0:
        out["profile"] = {name: profile_phase(fn, device, int(opts["profile"])) for name, fn in phases.items()}
    out |= acting_figures(agent, envs, int(opts["act_steps"]), reps)
    out |= evaluation_figures(agent, make, len(envs), p.train, opts, device, workers)
    out |= agent.bench_status()
    out["projected_hours"] = projection(out, p.train, len(envs), int(opts["eval_episode_steps"] or
                                                                     EVAL_EPISODE_STEPS[suite]))
    out["peak_memory_gib"] = peak_memory_gib(device)
    return out


# Agent steps per evaluation episode assumed by the projection (bench.eval_episode_steps overrides): Meta-World
# episodes have a fixed length (100 agent steps here); Atari 100k evaluation episodes of trained agents mostly
# last 500 to 5000 agent steps (27k cap), so 2000 is a round middle; MinAtar's are a few hundred.
EVAL_EPISODE_STEPS = {"atari100k": 2000, "metaworld": 100, "minatar": 500}


def acting_figures(agent: Any, envs: list[Any], act_steps: int, repeats: int = 1, prefix: str = "") -> dict[str, Any]:
    """Env steps per second of training-time acting: one stream per task (a multi-task agent: all its tasks)
    acting in one batch per round, all envs stepped at once (envs in worker processes in parallel), after a full
    acting window (e.g. STORM's 16 frames) and a few rounds more. agent=None: uniformly random legal actions, as in
    the warm-up (frames rendered). `repeats` blocks of about act_steps env steps each are timed; the figure is their
    median (one block's rate varies by +-15% on a shared CPU), the blocks' rates are listed beside it."""
    rng = np.random.default_rng(0)
    contexts = [agent.new_context(i) if agent else None for i in range(len(envs))]
    obs = reset_all(envs)

    def one_round() -> None:
        actions = (agent.act_batch(contexts, obs) if agent else [e.info.action.sample(rng) for e in envs])
        steps = step_all(envs, actions)
        done = [i for i, step in enumerate(steps) if step.done]
        for i, step in enumerate(steps):
            obs[i] = step.obs
        for i, first in zip(done, reset_all([envs[i] for i in done]), strict=True):
            obs[i] = first

    for _ in range(24):  # a full acting window (STORM: 16 frames) and a few rounds more (cuda_graphs: the capture)
        one_round()
    rounds = max(1, -(-act_steps // len(envs)))
    rates = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        for _ in range(rounds):
            one_round()
        rates.append(rounds * len(envs) / (time.perf_counter() - t))
    return {f"{prefix}acting_streams": len(envs), f"{prefix}acting_env_steps_per_s": float(np.median(rates)),
            f"{prefix}acting_env_steps_per_s_blocks": [round(r, 1) for r in rates]}


class CountedEnv:
    """An env whose steps are counted into `counter` (a one-element list); everything else is the env's."""

    def __init__(self, env: Any, counter: list[int]) -> None:
        self.env, self.counter = env, counter

    def step(self, action: Any) -> Any:
        self.counter[0] += 1
        return self.env.step(action)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("env", "counter"):
            object.__setattr__(self, name, value)
        else:  # e.g. the evaluation's `observe`
            setattr(self.env, name, value)


def evaluation_figures(agent: Any, make_task_env: Any, n_tasks: int, train: Any, opts: dict[str, Any],
                       device: torch.device, workers: Any = None) -> dict[str, Any]:
    """The trainer's evaluation in the run's mode (train.eval_mode: full, as many episodes at once as
    train.eval_envs allows; reference, train.eval_parallel envs per task in lockstep), episodes capped at
    bench.eval_steps: env steps per second net of making the envs, and seconds per env made (with env workers, the
    time to send the request: their making overlaps the steps). On CUDA one untimed evaluation first (CUDA graphs'
    captures, kernel autotuning), so that the timed one runs as a run's would."""
    made, stepped = [], [0]  # seconds of each env made (and later closed) inside the evaluation; env steps

    def make(copy: int, task: int) -> Any:
        t = time.perf_counter()
        env = make_task_env(task, 1000 + copy, evaluation=True)
        made.append(time.perf_counter() - t)
        return env if workers is not None else CountedEnv(env, stepped)  # workers count their own steps

    episodes, capped = int(opts["eval_episodes"]), dataclasses.replace(train, eval_max_steps=int(opts["eval_steps"]))

    def run(policy: Any) -> None:
        evaluate_in_mode(capped, policy, make, n_tasks, episodes, False, 0)

    out: dict[str, Any] = {"eval_mode": train.eval_mode, "eval_episodes_timed": episodes * n_tasks}
    # the agent's episodes, then the random baseline's (no agent; a Meta-World env then renders no frames)
    for policy, name in ((agent, "eval"), (None, "random")):
        if device.type == "cuda" and policy is not None:
            run(policy)
        made.clear()
        stepped[0] = 0
        before = workers.stepped if workers is not None else 0
        t = time.perf_counter()
        run(policy)
        seconds = time.perf_counter() - t
        if workers is not None:  # counted where the requests are sent
            stepped[0] = workers.stepped - before
        # the envs' making is timed where it happens (timing one env up front and subtracting it x episodes
        # over-subtracted when the first env, loading the emulator, was the slowest)
        out[f"{name}_env_steps_timed"] = stepped[0]
        out[f"{name}_env_steps_per_s"] = stepped[0] / max(seconds - sum(made), 1e-9)
        out[f"s_per_{name}_env"] = sum(made) / len(made)
    return out


def projection(figures: dict[str, Any], train: Any, n_tasks: int, eval_episode_steps: int) -> dict[str, float]:
    """Hours of the preset's full run on this device: acting (train.steps rounds of every task's env; warm-up
    acting counted as the agent's, an upper bound), updates (after warm-up, train.updates_per_step per step),
    evaluations (periodic and final episodes of every task, eval_episode_steps agent steps each, plus the envs
    made: a new one per episode in full mode, train.eval_parallel per task per evaluation in reference mode) and
    the random baseline's episodes at the end (train.random_episodes per task, as long as the agent's, when
    train.random_baseline)."""
    acting = train.steps * n_tasks / figures["acting_env_steps_per_s"]
    updates = (train.steps - train.warmup) * train.updates_per_step * figures["s_per_train_step"]
    periodic = (train.steps - 1) // train.eval_every if train.eval_every else 0
    episodes = n_tasks * (train.eval_episodes + periodic * train.periodic_eval_episodes)
    reference = train.eval_mode == "reference"

    def envs_made(evaluations: int, episodes: int) -> int:
        return evaluations * n_tasks * train.eval_parallel if reference else episodes

    evaluation = (episodes * eval_episode_steps / figures["eval_env_steps_per_s"]
                  + envs_made(1 + periodic, episodes) * figures["s_per_eval_env"])
    random_episodes = n_tasks * train.random_episodes if train.random_baseline else 0
    random = (random_episodes * eval_episode_steps / figures["random_env_steps_per_s"]
              + envs_made(int(train.random_baseline), random_episodes) * figures["s_per_random_env"])
    hours = {"acting": acting / 3600, "updates": updates / 3600, "evaluation": evaluation / 3600,
             "random_baseline": random / 3600}
    return hours | {"total": sum(hours.values()), "eval_episode_steps_assumed": eval_episode_steps,
                    "eval_episodes_per_s": episodes / max(evaluation, 1e-9)}


def main(argv: list[str] | None = None) -> None:
    overrides = list(sys.argv[1:] if argv is None else argv)
    if overrides and overrides[0] in ("-h", "--help"):
        from mowbench.config import usage

        print(__doc__)
        print(f"Bench options (bench.<key>=value): {', '.join(f'{k}={v}' for k, v in BENCH_DEFAULTS.items())}")
        print(usage())
        return
    if not any(o.startswith("env=") for o in overrides):
        overrides.append("env=atari100k")  # Pong's 6 actions by default
    bench_overrides = [o for o in overrides if o.startswith("bench.")]
    overrides = [o for o in overrides if not o.startswith("bench.")]
    try:
        cfg = compose_config(overrides)
        cfg["bench"] = OmegaConf.to_container(OmegaConf.from_dotlist(bench_overrides)).get("bench", {})
        unknown = sorted(set(cfg["bench"]) - set(BENCH_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown bench option(s) {unknown}; allowed: {', '.join(BENCH_DEFAULTS)}")
        print(json.dumps(bench(cfg), indent=2))
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
