"""Mixture-of-World Models (MoW, arXiv 2602.01270; spec mow.md): N_m modular categorical VAEs assigned
to task clusters found by gradient similarity, a task-level router sending each task to its TopK expert
Transformers before a shared Transformer, per-cluster heads and critics, one shared actor.

Every ablation switch is a MoWConfig field, gated in exactly one place (search for `cfg.<name>`; task- vs
token-level routing is a strategy object, TaskLevelRouting or TokenLevelRouting, chosen once):
n_experts, n_clusters, top_k, routing (task|token), task_loss, balance_loss, harmonious,
clustering (gradient|random|none), expert_transformers, shared_transformer.

Choices where the paper is silent (documented in the README too, all config fields): embed_dim 64,
top_k 2, router = one-hidden-layer MLP, temperature annealed linearly from tau_start=2 to 1 over
tau_anneal_updates, TopK weights are the softmax probabilities (not renormalised), expert width = D
with `expert_depth` 1 block, the shared Transformer has STORM's depth, the concatenated expert outputs
and e_k are projected to D (Linear + LayerNorm) before it, the actor and critics read [z, h, sg(e_k)],
without harmonious weighting the task losses are averaged, the world-model optimizer restarts after the
warm-up clustering, and the warm-up pre-training (cluster_warmup_updates) runs for every `clustering`.
Each task's clustering gradient is taken w.r.t. the warm-up VAE and heads (the module the clustering
splits) from the task's own rows, averaged over several batches, and kept per layer as a fixed random
projection (count sketch) scaled to unit length (the paper: "averaged per layer"; see
task_gradient_vectors and clustering.gradient_vector). Per update each task gets `batch_per_task`
sequences and `imag_per_task` imagination starts (paper preset: 1 and 40; the paper states neither).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mowbench import results as R
from mowbench.agents.base import Metrics, adam, count_parameters, register_agent
from mowbench.agents.imagination import ImaginationAgent
from mowbench.baselines.storm import STORMConfig, separate_storm_figures, storm_loss, storm_terms
from mowbench.clustering import cosine_similarity_matrix, gradient_vector, kmeans_cosine, random_assignment
from mowbench.envs.base import TaskInfo
from mowbench.figures import heatmap_png
from mowbench.models import MLP, CategoricalHead, CausalTransformer, ConvDecoder, ConvEncoder, KVCache, encode_frames
from mowbench.models.moe import KERNELS, ExpertBank, ExpertCache, padding_ratio, resolve_kernel
from mowbench.models.packed import Linear
from mowbench.ops import Grouping, Routing, balance_loss, counts_of, group_mean, harmonious_loss, topk_route
from mowbench.replay import Batch


@dataclass
class MoWConfig(STORMConfig):
    """STORM's component sizes and optimisation (the parent's fields) plus MoW's. Defaults: `paper`."""

    embed_dim: int = 64  # size of the task embedding e_k (not published)
    n_clusters: int = 12  # N_m VAE clusters (paper: 12 for 26 Atari games)
    n_experts: int = 12  # N_e expert Transformers (paper: 12)
    top_k: int = 2  # experts per task (TopK; not published, ablate_topk sweeps 1, 2, 4)
    routing: str = "task"  # task: one expert set per task (MoW) | token: each token routed by its features
    router_width: int = 256  # hidden width of the router MLP
    tau_start: float = 2.0  # router softmax temperature at the start, annealed linearly to 1
    tau_anneal_updates: int = 10_000  # world-model updates over which tau reaches 1
    expert_depth: int = 1  # blocks of each expert's small causal Transformer (width D, STORM's heads/FFN)
    expert_transformers: bool = True  # False: experts are token mixers only (ablation)
    expert_kernel: str = "auto"  # how each expert runs on its pairs: auto | grouped | loop (models/moe.py)
    shared_transformer: bool = True  # False: no shared Transformer F after the experts (ablation)
    task_loss: bool = True  # task-ID head and its cross-entropy (ablation: False)
    task_loss_scale: float = 1.0  # weight of the task-ID cross-entropy inside each task's loss
    balance_loss: bool = True  # expert-balance loss (ablation: False)
    balance_scale: float = 0.1  # its coefficient (mow.md: 0.1)
    harmonious: bool = True  # HarmonyDream weighting with one learnable s_k per task (ablation: False)
    clustering: str = "gradient"  # gradient (warm-up gradients, k-means) | random | none (one shared VAE)
    cluster_warmup_updates: int = 5000  # offline updates of the shared model on random data before clustering
    cluster_grad_batches: int = 4  # batches averaged for each task's gradient
    cluster_grad_seqs: int = 4  # sequences of the task in each of those batches
    cluster_grad_reduce: str = "sketch"  # per layer: sketch (random projection) | flat | layer_mean (old reading)
    cluster_grad_dim: int = 256  # sketch: numbers kept per layer
    # whose gradient: cluster = the warm-up VAE and heads (what the clustering splits into N_m copies) |
    # shared = every shared parameter, experts, router and task-ID head included (task-specific by design)
    cluster_grad_params: str = "cluster"
    cluster_select: str = "even"  # k-means restart kept: most even group sizes | lowest inertia
    cluster_n_init: int = 100  # k-means restarts

    def check(self) -> None:
        super().check()
        choices = {"routing": ("task", "token"), "expert_kernel": KERNELS, "clustering": ("gradient", "random", "none"),
                   "cluster_grad_reduce": ("sketch", "flat", "layer_mean"),
                   "cluster_grad_params": ("cluster", "shared"), "cluster_select": ("even", "inertia")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("embed_dim", "n_clusters", "n_experts", "top_k", "router_width", "expert_depth",
                     "cluster_grad_batches", "cluster_grad_seqs", "cluster_grad_dim", "cluster_n_init"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: a positive integer")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} > n_experts={self.n_experts}; allowed: top_k in 1..n_experts")
        if self.clustering == "none" and self.n_clusters != 1:
            raise ValueError(f"clustering=none means one shared VAE, but n_clusters={self.n_clusters}; "
                             "allowed: n_clusters=1 with clustering=none")
        if self.tau_start < 1.0 or self.tau_anneal_updates < 0 or self.cluster_warmup_updates < 0:
            raise ValueError(f"tau_start={self.tau_start} (allowed >= 1), tau_anneal_updates="
                             f"{self.tau_anneal_updates}, cluster_warmup_updates={self.cluster_warmup_updates} "
                             "(allowed >= 0)")

    def check_tasks(self, n_tasks: int) -> None:
        """Refuse, before any env or network is built, more clusters than tasks."""
        if self.n_clusters > n_tasks:
            raise ValueError(f"n_clusters={self.n_clusters} > {n_tasks} tasks; allowed: n_clusters in 1..{n_tasks}")


def tau_schedule(updates: int, tau_start: float, anneal: int) -> float:
    """Router temperature: linear from tau_start to 1 over `anneal` updates, then 1."""
    if anneal <= 0:
        return 1.0
    return 1.0 + (tau_start - 1.0) * max(0.0, 1.0 - updates / anneal)


class ClusterModule(nn.Module):
    """One VAE cluster: STORM's encoder/decoder with the posterior and decoder conditioned on e_k, and the
    cluster's next-latent (prior), reward and termination heads on (h, e_k)."""

    def __init__(self, cfg: MoWConfig, image_size: int) -> None:
        super().__init__()
        latent, e = cfg.n_vars * cfg.n_classes, cfg.embed_dim
        self.encoder = ConvEncoder(image_size, cfg.channels)
        self.posterior_head = CategoricalHead(self.encoder.out_dim, cfg.n_vars, cfg.n_classes, e, cfg.unimix)
        self.decoder = ConvDecoder(image_size, cfg.channels, latent, e, cfg.decoder_stem_norm)
        self.prior_head = CategoricalHead(cfg.width, cfg.n_vars, cfg.n_classes, e, cfg.unimix)
        self.reward_head = MLP(cfg.width + e, cfg.head_width, cfg.head_depth, cfg.bins)
        self.termination_head = MLP(cfg.width + e, cfg.head_width, cfg.head_depth, 1)


@dataclass
class MoWCache:
    """Inference state for imagination: the experts' caches and the shared Transformer's."""

    experts: ExpertCache
    shared: KVCache | None


class TaskLevelRouting:
    """MoW's routing (mow.md 2): S_k = softmax(MLP(e_k) / tau) from the task embedding alone, so every token
    of task k goes to the same TopK experts J_k and each expert sees whole, coherent sequences."""

    def router_inputs(self, latent_dim: int, action_dim: int, embed_dim: int) -> int:
        return embed_dim

    def logits(self, router: nn.Module, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return router(e)  # (B, N_e)

    def chosen(self, experts: ExpertBank, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor,
               routing: Routing, cache: ExpertCache | None) -> torch.Tensor:
        """The K chosen experts' outputs weighted by W_k -> (B, T, K, D): B*K (sequence, expert) pairs."""
        b, k = routing.index.shape
        rows = torch.arange(b, device=z.device).repeat_interleave(k)
        out = experts(z, action, e, rows, routing.index.flatten(), cache=cache)  # (B*K, T, D)
        chosen = out.unflatten(0, (b, k)) * routing.weight[:, :, None, None].to(out.dtype)  # (B, K, T, D)
        return chosen.transpose(1, 2)

    def balance_weights(self, wm: MoWWorldModel, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor
                        ) -> tuple[torch.Tensor, float | None, torch.Tensor | None]:
        """Routing weights for the balance loss: one row per task (N, N_e), whatever the batch holds."""
        return wm.route_tasks().dense, None, None

    def matrix(self, wm: MoWWorldModel, token_means: torch.Tensor) -> torch.Tensor:
        """Tasks x experts routing weights for the heatmaps: the router's W_k."""
        return wm.route_tasks().dense


class TokenLevelRouting:
    """The `routing=token` ablation: each token routed by its own (z_t, a_t, e_k), as in token-level MoE; expert
    j attends only to the tokens routed to it, so sequences are fragmented (what the paper argues against)."""

    def router_inputs(self, latent_dim: int, action_dim: int, embed_dim: int) -> int:
        return latent_dim + action_dim + embed_dim

    def logits(self, router: nn.Module, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return router(torch.cat([z, action, e[:, None].expand(*z.shape[:2], -1)], dim=-1))  # (B, T, N_e)

    def chosen(self, experts: ExpertBank, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor,
               routing: Routing, cache: ExpertCache | None) -> torch.Tensor:
        """Every (sequence, expert) pair, each expert seeing only its tokens; then each token's K chosen
        outputs weighted by W -> (B, T, K, D)."""
        b, n_e = z.shape[0], routing.dense.shape[-1]
        member = (routing.dense > 0).transpose(1, 2).flatten(0, 1)  # (B*N_e, T)
        rows, expert = torch.arange(b, device=z.device).repeat_interleave(n_e), torch.arange(n_e, device=z.device)
        out = experts(z, action, e, rows, expert.repeat(b), member, cache)  # (B*N_e, T, D)
        dense = out.unflatten(0, (b, n_e)).transpose(1, 2)  # (B, T, N_e, D)
        index = routing.index[..., None].expand(-1, -1, -1, dense.shape[-1])  # (B, T, K, D)
        return dense.gather(2, index) * routing.weight[..., None].to(out.dtype)

    def balance_weights(self, wm: MoWWorldModel, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor
                        ) -> tuple[torch.Tensor, float | None, torch.Tensor | None]:
        """Every token's weights (B*T, N_e) counted as N task rows, and each row's mean weights (B, N_e)."""
        dense = wm.route(z, action, task).dense  # (B, T, N_e)
        return dense.flatten(0, 1), float(wm.n_tasks), dense.detach().mean(1)

    def matrix(self, wm: MoWWorldModel, token_means: torch.Tensor) -> torch.Tensor:
        """Tasks x experts: the mean weights of each task's tokens in the latest batch holding it."""
        return token_means


ROUTINGS = {"task": TaskLevelRouting, "token": TokenLevelRouting}


class MoWWorldModel(nn.Module):
    """MoW's world model with the same paper-named methods as STORMWorldModel (each takes the rows'
    task indices (B,)). e_k: L2-normalised task embedding; `assignment` (N,): task -> VAE cluster (all 0
    until the warm-up clustering); `tau`: the router temperature."""


    def __init__(self, cfg: MoWConfig, n_tasks: int, image_size: int, action_dim: int) -> None:
        super().__init__()
        self.cfg, self.n_tasks = cfg, n_tasks
        self.latent_vars, self.latent_dim = cfg.n_vars, cfg.n_vars * cfg.n_classes
        e = cfg.embed_dim
        self.feature_dim = self.latent_dim + cfg.width + e  # [z, h, sg(e_k)]
        self.n_critics = cfg.n_clusters  # one critic per VAE cluster
        self.task_embedding = nn.Embedding(n_tasks, e)
        self.clusters = nn.ModuleList(ClusterModule(cfg, image_size) for _ in range(cfg.n_clusters))
        self.routing = ROUTINGS[cfg.routing]()  # the one place task- vs token-level routing is chosen
        self.router = MLP(self.routing.router_inputs(self.latent_dim, action_dim, e), cfg.router_width, 1,
                          cfg.n_experts)
        self.experts = ExpertBank(
            cfg.n_experts, latent_dim=self.latent_dim, action_dim=action_dim, embed_dim=e, width=cfg.width,
            depth=cfg.expert_depth, heads=cfg.heads, ffn=cfg.ffn, dropout=cfg.dropout, max_len=cfg.max_len,
            transformer=cfg.expert_transformers, attn_dropout=cfg.attn_dropout, ln_eps=cfg.block_ln_eps,
            kernel=cfg.expert_kernel)
        self.mix = nn.Sequential(Linear(cfg.top_k * cfg.width + e, cfg.width, bias=False), nn.LayerNorm(cfg.width))
        self.shared = (CausalTransformer(cfg.width, cfg.depth, cfg.heads, cfg.ffn, cfg.dropout, cfg.max_len,
                                         cfg.attn_dropout, cfg.block_ln_eps) if cfg.shared_transformer else None)
        self.task_head = MLP(cfg.width, cfg.head_width, 1, n_tasks) if cfg.task_loss else None
        self.register_buffer("assignment", torch.zeros(n_tasks, dtype=torch.long))
        self.register_buffer("tau", torch.tensor(float(cfg.tau_start)))
        self._memo: tuple[torch.Tensor, Grouping] | None = None
        self._sizes: tuple[int, ...] | None = None  # rows per cluster inside host_layout
        self._host_assignment: tuple[torch.Tensor, int, tuple[int, ...]] | None = None  # host_assignment's memo
        self._embed_memo: tuple[torch.Tensor, int, torch.Tensor] | None = None

    # ---- task embedding, clusters ----
    def embed(self, task: torch.Tensor) -> torch.Tensor:
        """task (B,) -> e_k (B, E), ||e_k|| = 1. Without autograd (imagination, acting) it is reused while
        the same `task` tensor comes back and the embedding is unchanged: a rollout asks for it ~5 times a step
        (a CUDA graph's capture gets a `task` of its own: agents/graphs.py)."""
        if torch.is_grad_enabled():
            return F.normalize(self.task_embedding(task), dim=-1)
        version = self.task_embedding.weight._version
        if self._embed_memo is None or self._embed_memo[0] is not task or self._embed_memo[1] != version:
            self._embed_memo = (task, version, F.normalize(self.task_embedding(task), dim=-1))
        return self._embed_memo[2]

    @property
    def capturable(self) -> bool:
        """Whether a rollout or an act inside host_layout waits for nothing (WorldModel.capturable): with task routing
        and the grouped expert kernel, whose group offsets stay on the device. The loop kernel reads each
        layout's group sizes; token-level routing builds key masks with host-made indices."""
        return self.cfg.routing == "task" and resolve_kernel(self.experts.kernel, self.assignment.device) == "grouped"

    @contextlib.contextmanager
    def host_layout(self, task: torch.Tensor, task_counts: tuple[int, ...] | None = None
                    ) -> Iterator[tuple[int, ...]]:
        """Rows of these tasks per VAE cluster, which the groupings made inside (by cluster: the VAEs and heads)
        take instead of reading their own (WorldModel.host_layout): from the rows per task where the host knows
        them (a replay batch, acting streams), else read from the device once."""
        if task_counts is None:
            sizes = tuple(counts_of(self.assignment[task], len(self.clusters)).tolist())
        else:
            assert len(task_counts) == self.n_tasks and sum(task_counts) == len(task), (task_counts, len(task))
            cluster, per = self.host_assignment(), [0] * len(self.clusters)
            for k, rows in enumerate(task_counts):
                per[cluster[k]] += rows
            sizes = tuple(per)
        self._sizes = sizes
        try:
            yield sizes
        finally:
            self._sizes = None

    def host_assignment(self) -> tuple[int, ...]:
        """`assignment` on the host, read from the device once each time it changes (the clustering, a load)."""
        memo = self._host_assignment
        if memo is None or memo[0] is not self.assignment or memo[1] != self.assignment._version:
            memo = self._host_assignment = (self.assignment, self.assignment._version, tuple(self.assignment.tolist()))
        return memo[2]

    def by_cluster(self, task: torch.Tensor) -> Grouping:
        """Rows grouped by their task's VAE cluster; reused while the same `task` tensor is passed (one
        imagination rollout; a CUDA graph's capture gets a `task` of its own: agents/graphs.py), so the grouping's
        device sync happens once per rollout, or never inside host_layout."""
        if self._memo is None or self._memo[0] is not task:
            self._memo = (task, Grouping(self.assignment[task], len(self.clusters), self._sizes))
        return self._memo[1]

    def start_clusters(self, assignment: torch.Tensor) -> None:
        """After the warm-up: every cluster starts from the shared (cluster 0) weights; tasks are assigned."""
        state = self.clusters[0].state_dict()
        for cluster in self.clusters[1:]:
            cluster.load_state_dict(state)
        self.assignment.copy_(assignment)
        self._memo = None

    # ---- perception ----
    def encode(self, obs: torch.Tensor, task: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """obs (B, T, S, S, 3) uint8 -> posterior logits (B, T, V, C), each row by its cluster's VAE."""
        t = obs.shape[1]

        def run(g: int, parts: list[torch.Tensor]) -> torch.Tensor:
            obs_g, e_g = parts
            cond = e_g[:, None].expand(-1, t, -1).flatten(0, 1)  # (b*T, E)
            c = self.clusters[g]
            return encode_frames(c.encoder, c.posterior_head, obs_g.flatten(0, 1), cond, chunk).unflatten(0, (-1, t))

        return self.by_cluster(task).apply(run, obs, self.embed(task))

    def decode(self, z: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """z (B, T, V*C) -> image (B, T, 3, S, S)."""
        t = z.shape[1]

        def run(g: int, parts: list[torch.Tensor]) -> torch.Tensor:
            z_g, e_g = parts
            cond = e_g[:, None].expand(-1, t, -1).flatten(0, 1)
            return self.clusters[g].decoder(z_g.flatten(0, 1), cond).unflatten(0, (-1, t))

        return self.by_cluster(task).apply(run, z, self.embed(task))

    # ---- temporal module ----
    def route(self, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor) -> Routing:
        """Task-level: S_k = softmax(MLP(e_k) / tau) -> (B, N_e); token-level: from each token's
        (z_t, a_t, e_k) -> (B, T, N_e). Then TopK."""
        logits = self.routing.logits(self.router, z, action, self.embed(task))
        return topk_route(logits, self.tau, self.cfg.top_k)

    def route_tasks(self) -> Routing:
        """Task-level routing of every task (N, N_e) (independent of the batch)."""
        task = torch.arange(self.n_tasks, device=self.assignment.device)
        return topk_route(self.router(self.embed(task)), self.tau, self.cfg.top_k)

    def empty_cache(self, task: torch.Tensor, dtype: torch.dtype, offset: torch.Tensor | None = None) -> MoWCache:
        shared = None if self.shared is None else self.shared.empty_cache(task.shape[0], task.device, dtype, offset)
        return MoWCache(ExpertCache(dtype, offset=offset), shared)

    def sequence(self, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor,
                 cache: MoWCache | None = None, last: bool = False) -> torch.Tensor:
        """z (B, T, V*C), action (B, T, A) -> h (B, T, D), or (B, 1, D) of the last step with `last`; with a cache,
        appends after cached steps. The experts run on every step either way (the shared Transformer attends to
        all of their outputs); `last` saves the shared Transformer's final block all but the last step's query.

        The chosen experts' outputs, weighted by their routing weights (so the router gets gradient),
        are concatenated in rank order with e_k, projected to D and fed to the shared Transformer."""
        b, t = z.shape[:2]
        e = self.embed(task)  # (B, E)
        chosen = self.routing.chosen(self.experts, z, action, e, self.route(z, action, task),
                                     None if cache is None else cache.experts)  # (B, T, K, D)
        if last and self.shared is None:  # nothing attends to the earlier steps: mix the last one only
            chosen, t = chosen[:, -1:], 1
        x = self.mix(torch.cat([chosen.flatten(2), e[:, None].expand(b, t, -1).to(chosen.dtype)], dim=-1))
        if self.shared is None:
            return x  # (B, 1 or T, D)
        return self.shared(x, None if cache is None else cache.shared, last=last)  # (B, 1 or T, D)

    # ---- what the actor-critic sees ----
    def features(self, z: torch.Tensor, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """[z, h, sg(e_k)] (B, T, V*C + D + E): the shared actor knows the task through e_k."""
        e = self.embed(task).detach()[:, None].expand(*h.shape[:2], -1).to(h.dtype)
        return torch.cat([z, h, e], dim=-1)

    def critic_index(self, task: torch.Tensor) -> torch.Tensor:
        """Rows are judged by their task's cluster critic (B,)."""
        return self.assignment[task]

    # ---- per-cluster heads on (h, e_k) ----
    def _heads(self, h: torch.Tensor, task: torch.Tensor, head: str) -> torch.Tensor:
        def run(g: int, parts: list[torch.Tensor]) -> torch.Tensor:
            h_g, e_g = parts
            module = getattr(self.clusters[g], head)
            if head == "prior_head":
                return module(h_g, e_g[:, None])
            return module(torch.cat([h_g, e_g[:, None].expand(-1, h_g.shape[1], -1).to(h_g.dtype)], dim=-1))

        return self.by_cluster(task).apply(run, h, self.embed(task))

    def prior(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> next-latent logits (B, T, V, C) from the task's cluster head."""
        return self._heads(h, task, "prior_head")

    def reward(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> symlog two-hot logits (B, T, bins)."""
        return self._heads(h, task, "reward_head")

    def termination(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> termination logits (B, T)."""
        return self._heads(h, task, "termination_head").squeeze(-1)


@register_agent("mow", MoWConfig, multi_task=True)
class MoWAgent(ImaginationAgent):
    """The shared imagination agent (world-model update, imagination, actor-critic, acting) around MoW's
    world model, with MoW's losses, one critic per VAE cluster (the world model's critic_index), and the
    warm-up clustering run at the first update (the replay then holds only the trainer's random warm-up
    data for every task)."""

    cfg: MoWConfig

    def __init__(self, cfg: MoWConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        cfg.check_tasks(len(tasks))
        self.n_tasks = len(tasks)
        # s_k of the harmonious weighting: loss parameters, so they live here (optimised with the world model)
        self.log_sigma = torch.zeros(self.n_tasks, device=device, requires_grad=True) if cfg.harmonious else None
        super().__init__(cfg, tasks, device, precision)
        self.wm_updates = 0
        self.token_routing = torch.zeros(self.n_tasks, cfg.n_experts, device=device)  # token routing: per task
        self.cluster_report: dict[str, Any] | None = None  # set by the warm-up

    @property
    def capturable_updates(self) -> bool:
        """The updates wait for nothing inside the world model's host_layout (its groupings by cluster and the
        per-cluster critics take the layout's sizes) wherever imagination does: task routing, grouped kernel."""
        return self.wm.capturable

    def build_world_model(self, tasks: list[TaskInfo]) -> nn.Module:
        return MoWWorldModel(self.cfg, len(tasks), tasks[0].image_size, self.action_dim)

    def world_model_parameters(self) -> list[torch.Tensor]:
        return list(self.wm.parameters()) + ([self.log_sigma] if self.log_sigma is not None else [])

    # ---- losses ----
    def task_losses(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor],
                                                    dict[str, torch.Tensor]]:
        """Per-task world-model losses L_k (N,) (STORM's terms + task-ID CE, free bits per task), which
        tasks are present (N,), the per-task term means, and the forward's z/h."""
        terms, z, h = storm_terms(self.wm, batch, self.action_input(batch.action), self.bins, self.autocast())
        b, t = batch.obs.shape[:2]
        if self.wm.task_head is not None:
            logits = self.wm.task_head(h).float()  # (B, T, N)
            terms["task_id"] = F.cross_entropy(logits.flatten(0, 1), batch.task.repeat_interleave(t),
                                               reduction="none").view(b, t).mean(1)
        per, present = {}, None
        for name, value in terms.items():
            per[name], present = group_mean(value, batch.task, self.n_tasks)
        loss = storm_loss(self.cfg, per["rec"], per["reward"], per["termination"], per["kl_dyn"], per["kl_rep"])
        if "task_id" in per:
            loss = loss + self.cfg.task_loss_scale * per["task_id"]
        return loss, present, per, {"z": z, "h": h}

    def world_model_loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """Over the tasks present (a replay batch holds every task), with masks rather than indexing by
        `present` so that nothing waits for the device; a task absent from the batch logs NaN."""
        cfg = self.cfg
        task_loss, present, per, aux = self.task_losses(batch)
        weight = present.float() / present.sum()  # (N,): the mean over the tasks present
        if self.log_sigma is not None:
            loss = harmonious_loss(task_loss, self.log_sigma, present)
        else:
            loss = (task_loss * weight).sum()
        metrics: Metrics = {f"wm/{k}": (v.detach() * weight).sum() for k, v in per.items()}
        per_task = torch.where(present, task_loss.detach(), torch.nan)
        metrics |= {f"wm/task_loss/{info.name}": per_task[k] for k, info in enumerate(self.tasks)}
        weights, rows, row_means = self.wm.routing.balance_weights(self.wm, aux["z"], self.action_input(batch.action),
                                                                   batch.task)
        if row_means is not None:  # token routing: the latest batch's routing per task, for the heatmaps
            means, seen = group_mean(row_means, batch.task, self.n_tasks)
            self.token_routing[seen] = means[seen]
        balance = balance_loss(weights, rows)
        if cfg.balance_loss:
            loss = loss + cfg.balance_scale * balance
        metrics.update({"wm/loss": loss.detach(), "wm/balance": balance.detach(), "wm/tau": self.wm.tau.clone(),
                        "wm/task_loss_mean": (task_loss.detach() * weight).sum()})
        if self.log_sigma is not None:
            metrics["wm/sigma_mean"] = self.log_sigma.detach().exp().mean()
        return loss, metrics

    def update_world_model(self, batch: Batch) -> Metrics:
        metrics = super().update_world_model(batch)
        self.wm_updates += 1
        self.wm.tau.fill_(tau_schedule(self.wm_updates, self.cfg.tau_start, self.cfg.tau_anneal_updates))
        return metrics

    # ---- warm-up clustering (mow.md section 5) ----
    def task_gradient_vectors(self, sample: Callable[[int, int], Batch]) -> torch.Tensor:
        """Per task k, the gradient of L_k w.r.t. the shared parameters (everything but the task embeddings
        and the not-yet-used clusters 1..N_m-1), averaged over `cluster_grad_batches` batches of k's own
        rows only (`cluster_grad_seqs` sequences each) and reduced per layer to one vector
        (`cluster_grad_reduce`, clustering.gradient_vector) -> (N, D). Tasks are done one at a time, so
        memory holds one gradient, not N."""
        cfg = self.cfg
        if cfg.cluster_grad_params == "cluster":
            params = list(self.wm.clusters[0].parameters())
        else:
            params = [p for name, p in self.wm.named_parameters()
                      if not name.startswith("task_embedding") and not (name.startswith("clusters.")
                                                                       and not name.startswith("clusters.0."))]
        # stratified batches: every task has exactly cluster_grad_seqs rows in each
        batches = [sample(cfg.cluster_grad_seqs * self.n_tasks, cfg.batch_length)
                   for _ in range(cfg.cluster_grad_batches)]
        self.wm.train()
        vectors = []
        for k in range(self.n_tasks):  # once, at the warm-up: not on the training hot path
            sums = [torch.zeros_like(p) for p in params]
            for batch in batches:
                own = batch.rows(torch.nonzero(batch.task == k).flatten())  # task k's rows only (BN stats too)
                task_loss, _, _, _ = self.task_losses(own)
                grads = torch.autograd.grad(task_loss[k], params, allow_unused=True)
                for acc, g in zip(sums, grads, strict=True):
                    if g is not None:
                        acc += g
            vectors.append(gradient_vector([s / len(batches) for s in sums], cfg.cluster_grad_reduce,
                                           cfg.cluster_grad_dim).cpu())
        return torch.stack(vectors)

    def warm_up(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """Train the shared model (cluster 0 for every task) on the random warm-up data, cluster the tasks,
        start every cluster's VAE, heads and critic from the warm-up weights."""
        cfg, start = self.cfg, time.time()
        metrics: Metrics = {}
        for _ in range(cfg.cluster_warmup_updates):
            metrics = self.update_world_model(sample(cfg.batch_per_task * self.n_tasks, cfg.batch_length))
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the run's seeded torch RNG
        similarity = None
        if cfg.clustering == "gradient":
            vectors = self.task_gradient_vectors(sample)
            labels = kmeans_cosine(vectors, cfg.n_clusters, cfg.cluster_n_init, seed, cfg.cluster_select)
            similarity = cosine_similarity_matrix(vectors).tolist()
        elif cfg.clustering == "random":
            labels = random_assignment(self.n_tasks, cfg.n_clusters, seed)
        else:
            labels = np.zeros(self.n_tasks, dtype=np.int64)
        self.wm.start_clusters(torch.as_tensor(labels, device=self.device))
        for critics in (self.ac.critics, self.ac.slow_critics):
            for critic in critics[1:]:
                critic.load_state_dict(critics[0].state_dict())
        # fresh moments for the separate clusters (a graph of the update would hold the old optimizer's)
        self.wm_opt = adam(self.world_model_parameters(), lr=cfg.wm_lr, capturable=self.capturable_optimizers)
        self.forget_graphs()
        self.cluster_report = {
            "clustering": cfg.clustering, "n_clusters": cfg.n_clusters, "assignment": labels.tolist(),
            "gradient_similarity": similarity, "warmup_updates": cfg.cluster_warmup_updates,
            "warmup_seconds": time.time() - start, "routing_warmup": self.routing_matrix().tolist()}
        return {f"warmup/{k.split('/')[-1]}": v for k, v in metrics.items()}

    def update(self, sample: Callable[[int, int], Batch]) -> Metrics:
        warm = self.warm_up(sample) if self.cluster_report is None else {}
        return super().update(sample) | warm

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """MoW's size beside one STORM per task (mow.md: about half), and its experts at the current routing."""
        return (super().bench_extras(sample, time, figures) | separate_storm_figures(self, figures)
                | self.expert_figures(sample, time))

    def expert_figures(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float]
                       ) -> dict[str, Any]:
        """On one world-model batch at the current routing (in the bench: the initial one): the padding that
        running the experts on groups padded to the largest would cost, and the experts' forward + backward
        seconds with each kernel."""
        wm, cfg = self.wm, self.cfg
        batch = sample(cfg.batch_per_task * self.n_tasks, cfg.batch_length)
        b, t = batch.action.shape[:2]
        z = torch.randn(b, t, wm.latent_dim, device=self.device)  # timing only needs the shapes
        action = self.action_input(batch.action)
        with torch.no_grad():
            e, routing = wm.embed(batch.task), wm.route(z, action, batch.task)
        pair_expert = (routing.index.flatten() if cfg.routing == "task"
                       else torch.arange(cfg.n_experts, device=self.device).repeat(b))  # token: every pair

        def forward_backward() -> None:
            wm.experts.zero_grad(set_to_none=True)
            with self.autocast():
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

    # ---- seeing inside ----
    @torch.no_grad()
    def routing_matrix(self) -> np.ndarray:
        """Routing weights tasks x experts (N, N_e): the router's W_k, or for token routing the mean
        weights of each task's tokens in the latest batch holding it."""
        return self.wm.routing.matrix(self.wm, self.token_routing).cpu().numpy()

    def write_artifacts(self, folder: Path, final: bool) -> None:
        """clusters.{json,csv,png}, gradient_similarity.{csv,png} (gradient clustering) and
        routing_warmup.{csv,png} once the warm-up is done; routing_final.{csv,png} at the end."""
        if self.cluster_report is None:
            return
        rep, names = self.cluster_report, [t.name for t in self.tasks]
        labelled = [f"{n} [c{c}]" for n, c in zip(names, rep["assignment"], strict=True)]
        experts = [f"e{j}" for j in range(self.cfg.n_experts)]
        if not (folder / "routing_warmup.csv").exists():
            assignment = dict(zip(names, rep["assignment"], strict=True))
            R.atomic_write_json(folder / "clusters.json", {**{k: v for k, v in rep.items() if k != "routing_warmup"},
                                                            "tasks": names, "assignment": assignment})
            R.atomic_write_text(folder / "clusters.csv", "task,cluster\n" + "".join(
                f"{n},{c}\n" for n, c in assignment.items()))
            onehot = np.eye(self.cfg.n_clusters)[rep["assignment"]]
            R.atomic_write_bytes(folder / "clusters.png", heatmap_png(
                onehot, names, [f"c{c}" for c in range(self.cfg.n_clusters)],
                f"VAE cluster assignment ({rep['clustering']})", "member", 0, 1, "Greys"))
            if rep["gradient_similarity"] is not None:
                sim = np.asarray(rep["gradient_similarity"])
                R.atomic_write_text(folder / "gradient_similarity.csv", matrix_csv(sim, labelled, labelled))
                R.atomic_write_bytes(folder / "gradient_similarity.png", heatmap_png(
                    sim, labelled, labelled, "warm-up task-gradient cosine similarity", "cosine", -1, 1, "RdBu_r"))
            self._write_routing(folder, "warmup", np.asarray(rep["routing_warmup"]), labelled, experts)
        if final:
            self._write_routing(folder, "final", self.routing_matrix(), labelled, experts)

    def _write_routing(self, folder: Path, tag: str, matrix: np.ndarray, rows: list[str], cols: list[str]) -> None:
        R.atomic_write_bytes(folder / f"routing_{tag}.png", heatmap_png(
            matrix, rows, cols, f"expert routing weights ({tag}, {self.cfg.routing}-level, top_k={self.cfg.top_k})",
            "routing weight", 0, None))
        R.atomic_write_text(folder / f"routing_{tag}.csv", matrix_csv(matrix, rows, cols))  # last: marks done

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "log_sigma": self.log_sigma, "wm_updates": self.wm_updates, "token_routing": self.token_routing,
            "cluster_report": None if self.cluster_report is None else json.loads(json.dumps(self.cluster_report))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.log_sigma is not None:
            with torch.no_grad():
                self.log_sigma.copy_(state["log_sigma"])
        self.wm_updates, self.cluster_report = state["wm_updates"], state["cluster_report"]
        self.token_routing.copy_(state["token_routing"])

    def parameter_counts(self) -> dict[str, int]:
        wm = self.wm
        vae = sum(count_parameters(m.parameters()) for c in wm.clusters
                  for m in (c.encoder, c.posterior_head, c.decoder))
        heads = sum(count_parameters(m.parameters()) for c in wm.clusters
                    for m in (c.prior_head, c.reward_head, c.termination_head))
        return super().parameter_counts() | {
            "wm/vaes": vae, "wm/cluster_heads": heads, "wm/experts": count_parameters(wm.experts.parameters()),
            "wm/router": count_parameters(wm.router.parameters()), "wm/mix": count_parameters(wm.mix.parameters()),
            "wm/shared_transformer": 0 if wm.shared is None else count_parameters(wm.shared.parameters()),
            "wm/task_head": 0 if wm.task_head is None else count_parameters(wm.task_head.parameters()),
            "wm/task_embedding": count_parameters(wm.task_embedding.parameters()),
            "harmonious_s": 0 if self.log_sigma is None else self.log_sigma.numel()}


def matrix_csv(matrix: np.ndarray, rows: list[str], cols: list[str]) -> str:
    lines = ["," + ",".join(cols)] + [f"{r}," + ",".join(f"{v:.6g}" for v in row)
                                      for r, row in zip(rows, matrix, strict=True)]
    return "\n".join(lines) + "\n"
