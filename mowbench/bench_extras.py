"""Figures particular methods add to the bench (their agents' `bench_extras` call these; mowbench.bench itself knows
no method): STORM's imagination done the way its reference implementation caches, a multi-task agent's size beside
one STORM per task, and MoW's experts timed under each kernel. Bench-only code, kept out of the baselines' files;
it imports no baseline (STORM comes from the registry)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from einops import rearrange

from mowbench.agents.base import get_agent
from mowbench.agents.imagination import ImaginationAgent, sample_z
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.models.experts import padding_ratio
from mowbench.replay import Batch


def separate_storm_parameters(tasks: list[TaskInfo], cfg: Any) -> dict[str, int]:
    """Parameters of one STORM per task with the component sizes of `cfg` (its STORMConfig fields; a MoW or
    monolithic config gives its STORM-sized parts), each with its task's own (minimal) action count. STORM is
    taken from the registry, so that this module imports no baseline."""
    entry = get_agent("storm")
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(entry.config)}
    storm: dict[str, int] = {}
    for info in tasks:
        legal = int(info.action.legal_mask().sum()) if info.action.discrete else info.action.n
        single = TaskInfo(info.suite, info.name, 0, info.image_size, ActionSpace(info.action.discrete, legal))
        counts = entry.cls(entry.config(**values), [single], torch.device("cpu"), "fp32").parameter_counts()
        for key, value in counts.items():
            storm[key] = storm.get(key, 0) + value
    return storm


def separate_storm_figures(agent: ImaginationAgent, figures: dict[str, Any]) -> dict[str, Any]:
    """A multi-task agent's size beside one STORM per task (the paper: MoW is about half)."""
    storm = separate_storm_parameters(agent.tasks, agent.cfg)
    mine = figures["parameters"]["world_model"] + figures["parameters"]["actor_critic"]
    return {"parameters_separate_storm": storm,
            "parameter_ratio_vs_separate_storm": mine / (storm["world_model"] + storm["actor_critic"])}


@torch.no_grad()
def imagine_reference_cache(agent: ImaginationAgent, batch: Batch) -> torch.Tensor:
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

    with agent.autocast():
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


def expert_figures(agent: Any, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float]
                   ) -> dict[str, Any]:
    """MoW's experts (`agent`: a MoWAgent), on one world-model batch at the current routing (in the bench: the
    initial one): the padding that running the experts on groups padded to the largest would cost, and the experts'
    forward + backward seconds with each kernel."""
    wm, cfg = agent.wm, agent.cfg
    batch = sample(cfg.batch_per_task * agent.n_tasks, cfg.batch_length)
    b, t = batch.action.shape[:2]
    z = torch.randn(b, t, wm.latent_dim, device=agent.device)  # timing only needs the shapes
    action = agent.action_input(batch.action)
    with torch.no_grad():
        e, routing = wm.embed(batch.task), wm.route(z, action, batch.task)
    pair_expert = (routing.index.flatten() if cfg.routing == "task"
                   else torch.arange(cfg.n_experts, device=agent.device).repeat(b))  # token: every pair

    def forward_backward() -> None:
        wm.experts.zero_grad(set_to_none=True)
        with agent.autocast():
            out = wm.routing.chosen(wm.experts, z, action, e, routing, None)
        out.float().square().mean().backward()

    seconds = {}
    for kernel in ("grouped", "loop"):
        wm.experts.kernel = kernel
        seconds[kernel] = time(forward_backward)
    wm.experts.kernel = cfg.expert_kernel
    wm.experts.zero_grad(set_to_none=True)
    return {"expert_pairs": len(pair_expert), "expert_padding_ratio_avoided": padding_ratio(pair_expert,
                                                                                           cfg.n_experts),
            "s_experts_fwd_bwd": seconds}
