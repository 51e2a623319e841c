"""Speed and size benchmark: `python -m mowbench.bench agent=storm preset=paper [bench.repeats=3]`.

Prints one JSON object: parameter counts, seconds per world-model update, per imagination, per agent
update, a full training step, acting env-steps/s on the real env (Pong by default), and the same
imagination done the way STORM's reference implementation caches (layer inputs, K/V re-projected for
the whole history at every step) so the speed-up is measured on the same machine, and the FLOPs of each
phase with the device's matmul rate: the step time no implementation of the same maths can beat here.

Multi-task agents (`agent=mow`, `agent=monolithic`) are built for the suite's task list (Atari: the 26
games, full action set) and batches are spread over the tasks; the output adds the parameters of one
STORM per task with the same component sizes and the ratio. For MoW the first (untimed) update runs the
warm-up clustering; `agent.cluster_warmup_updates=0 agent.clustering=random` skips its cost without
changing what is timed (the clusters are then as balanced as gradient clustering's 'even' choice).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from einops import rearrange
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from mowbench.agents.base import Batch, get_agent, make_agent
from mowbench.baselines.storm import STORMConfig, STORMWorldModel, sample_z
from mowbench.config import compose_config, plan, resolve_device, resolve_precision
from mowbench.envs import make_envs, resolve_tasks
from mowbench.envs.base import ActionSpace, TaskInfo

# repeats: timed calls (median); task: task(s) (default: Pong, or the suite's list for a multi-task agent);
# reference: also time STORM's reference-style cache; act_steps: env steps timed for acting;
# warm_up: one untimed agent.update() first (MoW: its warm-up clustering; see cluster_warmup_updates);
# flops: count each phase's matmul/conv FLOPs (one untimed pass) and measure the device's dense matmul
# rate in the run's precision, giving a lower bound on the step time (what no implementation of the same
# maths can beat on this device)
# STORM's reference world model (weipu-zhang/STORM, WorldModel with config_files/STORM.yaml), instantiated
# and counted for 4, 6 and 18 actions: 16,503,939 + 512 per action (the token stem's first Linear).
REFERENCE_WM_BASE, REFERENCE_WM_PER_ACTION = 16_503_939, 512

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


def random_batch(agent: Any, n: int, length: int, size: int, device: torch.device) -> Batch:
    """n random sequences spread evenly over the agent's tasks (rows of task k: k, k + N, ...)."""
    a = agent.action_dim
    action = (torch.randint(0, a, (n, length), device=device) if agent.discrete
              else torch.rand(n, length, a, device=device) * 2 - 1)
    task = torch.arange(n, device=device) % len(agent.tasks)
    return Batch(obs=torch.randint(0, 256, (n, length, size, size, 3), dtype=torch.uint8, device=device),
                 action=action, reward=torch.randn(n, length, device=device),
                 terminal=(torch.rand(n, length, device=device) < 0.01).float(), task=task, legal=agent.legal[task])


def separate_storm_parameters(tasks: list[Any], cfg: dict[str, Any]) -> dict[str, int]:
    """Parameters of one STORM per task with the agent's component sizes, each with its task's own
    (minimal) action count: what a multi-task agent's size is compared with (mow.md: about half)."""
    storm_values = {k: v for k, v in cfg["agent"].items() if k in {f.name for f in fields(STORMConfig)}}
    total: dict[str, int] = {}
    for info in tasks:
        legal = int(info.action.legal_mask().sum()) if info.action.discrete else info.action.n
        single = TaskInfo(info.suite, info.name, 0, info.image_size, ActionSpace(info.action.discrete, legal))
        counts = make_agent("storm", storm_values, [single], torch.device("cpu"), "fp32").parameter_counts()
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return total


@torch.no_grad()
def imagine_reference_cache(agent: Any, batch: Batch) -> torch.Tensor:
    """Imagination as STORM's reference does it: the cache keeps each layer's *inputs*, and every step
    re-projects K and V for the whole history (O(T^2) projections). Same outputs as agent.imagine (same
    random draws in the same order), more work. Returns the features (B, H+1, F)."""
    wm, cfg = agent.wm, agent.cfg
    wm.eval()
    tf = wm.transformer

    def step(tokens: torch.Tensor, inputs: list[torch.Tensor], start: int) -> torch.Tensor:
        x = tf.norm(tokens + tf.position(torch.arange(start, start + tokens.shape[1], device=tokens.device)))
        for i, block in enumerate(tf.blocks):
            inputs[i] = x if inputs[i] is None else torch.cat([inputs[i], x], 1)
            _, k, v = rearrange(block.qkv(inputs[i]), "b t (n h d) -> n b h t d", n=3, h=block.heads)
            q = rearrange(block.qkv(x), "b t (n h d) -> n b h t d", n=3, h=block.heads)[0]
            n_new, total = x.shape[1], inputs[i].shape[1]
            mask = torch.ones(n_new, total, dtype=torch.bool, device=x.device).tril(total - n_new)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = block.norm1(x + block.out(rearrange(attn, "b h t d -> b t (h d)")))
            x = block.norm2(x + block.ffn(x))
        return x

    with agent._amp():
        inputs: list = [None] * len(tf.blocks)
        task = batch.task
        z_ctx = sample_z(wm.encode(batch.obs, task))
        a_ctx = agent.action_input(batch.action)
        for t in range(z_ctx.shape[1]):  # the reference feeds the context one step at a time too
            h = step(wm.stem(z_ctx[:, t:t + 1], a_ctx[:, t:t + 1]), inputs, t)
        z = sample_z(wm.prior(h, task))
        feats = []
        for i in range(cfg.imag_horizon):
            feats.append(torch.cat([z, h], -1))
            action = agent.ac.actor(feats[-1], batch.legal[:, None]).sample()
            h = step(wm.stem(z, agent.action_input(action)), inputs, cfg.imag_context + i)
            wm.reward(h, task), wm.termination(h, task)
            z = sample_z(wm.prior(h, task))
        feats.append(torch.cat([z, h], -1))
    return torch.cat(feats, 1).float()


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
    a, size, reps = agent.cfg, env.info.image_size, int(opts["repeats"])
    if opts["warm_up"]:  # one untimed full update first (MoW: runs its warm-up clustering)
        t = time.perf_counter()
        agent.update(lambda n, length: random_batch(agent, n, length, size, device))
        warm_up_s = time.perf_counter() - t
    n = len(agent.tasks)
    wm_batch = random_batch(agent, a.batch_per_task * n, a.batch_length, size, device)
    ctx_batch = random_batch(agent, a.imag_per_task * n, a.imag_context, size, device)
    traj = agent.imagine(ctx_batch)
    out: dict[str, Any] = {
        "agent": cfg["agent"]["name"], "preset": cfg.get("preset_name"), "task": env.info.name,
        "n_tasks": len(envs), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "torch_threads": torch.get_num_threads(),
        "parameters": agent.parameter_counts(),
        "sizes": {"wm_batch": [a.batch_per_task * n, a.batch_length], "imag_starts": a.imag_per_task * n,
                  "per_task": agent.per_task_batch(),
                  "imag_context": a.imag_context, "imag_horizon": a.imag_horizon, "image_size": size,
                  "actions": env.info.action.n},
    }
    if type(agent.wm) is STORMWorldModel and not agent.wm.embed_dim and cfg.get("preset_name") == "paper":
        reference = REFERENCE_WM_BASE + REFERENCE_WM_PER_ACTION * agent.action_dim
        out["reference_world_model_parameters"] = reference
        out["world_model_parameters_match_reference"] = out["parameters"]["world_model"] == reference
    if opts["warm_up"]:
        out["s_first_update_with_warm_up"] = warm_up_s
    if multi_task:
        storm = separate_storm_parameters([e.info for e in envs], cfg)
        out["parameters_separate_storm"] = storm
        mine = out["parameters"]["world_model"] + out["parameters"]["actor_critic"]
        out["parameter_ratio_vs_separate_storm"] = mine / (storm["world_model"] + storm["actor_critic"])
    out["s_per_world_model_update"] = timed(lambda: agent.update_world_model(wm_batch), reps, device)
    out["s_per_imagination"] = timed(lambda: agent.imagine(ctx_batch), reps, device)
    out["s_per_agent_update"] = timed(lambda: agent.learner.update(traj), reps, device)
    out["s_per_train_step"] = out["s_per_world_model_update"] + out["s_per_imagination"] + out["s_per_agent_update"]
    if opts["reference"] and type(agent.wm) is STORMWorldModel and not agent.wm.embed_dim:
        ref_imag = timed(lambda: imagine_reference_cache(agent, ctx_batch), reps, device)
        out["s_per_imagination_reference_cache"] = ref_imag
        ref_step = out["s_per_world_model_update"] + ref_imag + out["s_per_agent_update"]
        out["s_per_train_step_reference_cache"] = ref_step
        out["train_step_speedup_vs_reference_cache"] = ref_step / out["s_per_train_step"]
    if opts["flops"]:
        counts = {"world_model_update": gflop(lambda: agent.update_world_model(wm_batch)),
                  "imagination": gflop(lambda: agent.imagine(ctx_batch)),
                  "agent_update": gflop(lambda: agent.learner.update(traj))}
        out["gflop"] = counts
        rate = out["matmul_gflop_per_s"] = matmul_gflop_per_s(device, precision)
        out["s_per_train_step_at_matmul_rate"] = sum(counts.values()) / rate  # the floor of this device
    context, obs = agent.new_context(0), env.reset()
    for _ in range(agent.cfg.act_context):  # fill the acting window first
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
