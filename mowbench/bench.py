"""Speed and size benchmark of any registered agent: `python -m mowbench.bench agent=storm preset=paper
[bench.repeats=3]`.

Prints one JSON object: parameter counts, seconds per phase of a training step as the agent names them
(`Agent.bench_phases`; STORM-style agents: world-model update, imagination, agent update) and their sum,
acting env-steps/s on the real env (Pong by default), the FLOPs of each phase with the device's matmul
rate (the step time no implementation of the same maths can beat here), and whatever the agent adds
(`Agent.bench_extras`; STORM: the same imagination done the way its reference implementation caches, so
the speed-up is measured on the same machine, and the reference's parameter count). It knows no baseline.

Multi-task agents (`agent=mow`, `agent=monolithic`) are built for the suite's task list (Atari: the 26
games, full action set) and batches are spread over the tasks; their extras add the parameters of one
STORM per task with the same component sizes and the ratio. For MoW the first (untimed) update runs the
warm-up clustering; `agent.cluster_warmup_updates=0 agent.clustering=random` skips its cost without
changing what is timed (the clusters are then as balanced as gradient clustering's 'even' choice).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from mowbench.agents.base import get_agent, make_agent
from mowbench.config import compose_config, plan, resolve_device, resolve_precision
from mowbench.envs import make_envs, resolve_tasks
from mowbench.replay import random_batch

# repeats: timed calls (median); task: task(s) (default: Pong, or the suite's list for a multi-task agent);
# reference: also the agent's own extras (STORM: its reference-style cache); act_steps: env steps timed for
# acting; warm_up: one untimed agent.update() first (MoW: its warm-up clustering; see cluster_warmup_updates);
# flops: count each phase's matmul/conv FLOPs (one untimed pass) and measure the device's dense matmul
# rate in the run's precision, giving a lower bound on the step time (what no implementation of the same
# maths can beat on this device)
BENCH_DEFAULTS = {"repeats": 3, "task": None, "reference": True, "act_steps": 200, "warm_up": True,
                  "flops": True}


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


def gflop(fn: Callable[[], Any]) -> float:
    """GFLOP of the matmuls, convolutions and attention `fn` runs (forward and backward; elementwise ops
    are not counted), from torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


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
    env_cfg = dict(p.cfg["env"])
    envs = make_envs(suite, p.tasks, env_cfg, seed=0)
    env = envs[0]
    agent = make_agent(cfg["agent"]["name"], dict(cfg["agent"]), [e.info for e in envs], device, precision)
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
        counts = {name: gflop(fn) for name, fn in phases.items()}
        out["gflop"] = counts
        rate = out["matmul_gflop_per_s"] = matmul_gflop_per_s(device, precision)
        out["s_per_train_step_at_matmul_rate"] = sum(counts.values()) / rate  # the floor of this device
    context, obs = agent.new_context(0), env.reset()
    for _ in range(16):  # fill an acting window first (e.g. STORM's 16-frame context)
        obs = env.step(agent.act(context, obs)).obs
    steps = int(opts["act_steps"])
    t = time.perf_counter()
    for _ in range(steps):
        step = env.step(agent.act(context, obs))
        obs = env.reset() if step.done else step.obs
    out["acting_env_steps_per_s"] = steps / (time.perf_counter() - t)
    for e in envs:
        e.close()
    return out


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
