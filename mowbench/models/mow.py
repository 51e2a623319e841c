"""MoW's world model (arXiv 2602.01270; docs/methods/mow.md): per-cluster VAEs and heads conditioned on the task
embedding e_k, a router choosing TopK of N_e experts (each a token mixer and a small causal Transformer, stacked:
ExpertBank), a mix layer and a shared Transformer. Pure modules with explicit sizes (MoWSizes); the losses, the
clustering and the schedules are the agent's (baselines/mow.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mowbench.models.experts import KERNELS, PairLayout, StackedBlock, StackedLinear, StackedNorm, resolve_kernel
from mowbench.models.heads import MLP
from mowbench.models.packed import Linear
from mowbench.models.storm import STORMSizes
from mowbench.models.transformer import CausalTransformer, KVCache, layer_mask, positions
from mowbench.models.vae import CategoricalHead, ConvDecoder, ConvEncoder, encode_frames
from mowbench.ops import Grouping, Routing, counts_of, topk_route


@dataclass(frozen=True)
class MoWSizes(STORMSizes):
    """STORM's sizes (each cluster's VAE and heads, the experts' and shared Transformers') and MoW's own."""

    embed_dim: int  # task embedding e_k
    n_clusters: int  # VAE clusters (each with its heads)
    routing: str  # task | token (ROUTINGS)
    router_width: int  # router MLP hidden width
    n_experts: int  # N_e
    top_k: int  # experts per task (task routing) or token
    expert_depth: int  # blocks per expert Transformer
    expert_transformers: bool  # False: token mixers only
    expert_kernel: str  # auto | grouped | loop (models/experts.py)
    shared_transformer: bool  # the shared Transformer after the mix layer
    task_loss: bool  # the task-ID head
    task_head_input: str  # h | z
    tau_start: float  # the router temperature's start


@dataclass
class ExpertCache:
    """Inference state of an ExpertBank over a fixed set of pairs (a rollout: task-level routing does not
    change within it; token-level routing runs every pair): the pair layout and one KV cache over the pairs
    in slot order, created on the first call. offset (B,): per-sequence left padding (see KVCache)."""

    dtype: torch.dtype
    layout: PairLayout | None = None
    kv: KVCache | None = None
    offset: torch.Tensor | None = None


class ExpertBank(nn.Module):
    """N_e experts j = token mixer m_j(z_t, a_t, e_k) (STORM's stem: Linear -> LN -> ReLU -> Linear -> LN)
    followed by a causal Transformer f_j (learned positions, LN, post-LN blocks; absent when
    `transformer` is False: the 'no expert Transformers' ablation), all with stacked weights. `kernel`:
    one of KERNELS (module docstring)."""

    def __init__(self, n_experts: int, latent_dim: int, action_dim: int, embed_dim: int, width: int, depth: int,
                 heads: int, ffn: int, dropout: float, max_len: int, transformer: bool = True,
                 attn_dropout: float = 0.0, ln_eps: float = 1e-5, kernel: str = "auto") -> None:
        super().__init__()
        assert kernel in KERNELS, f"kernel={kernel!r}; allowed: {', '.join(KERNELS)}"
        n = self.n_experts = n_experts
        self.depth, self.heads, self.width, self.max_len, self.kernel = depth, heads, width, max_len, kernel
        self.pad_inputs: bool | None = None  # PairLayout.pad_inputs (None: on CUDA)
        self.mix_in = StackedLinear(n, latent_dim + action_dim + embed_dim, width, bias=False)
        self.mix_norm1 = StackedNorm(n, width)
        self.mix_out = StackedLinear(n, width, width, bias=False)
        self.mix_norm2 = StackedNorm(n, width)
        self.transformer = transformer
        if transformer:
            self.position = nn.Parameter(torch.randn(n, max_len, width))  # as nn.Embedding's N(0, 1)
            self.norm = StackedNorm(n, width, eps=1e-6)
            self.blocks = nn.ModuleList(StackedBlock(n, width, heads, ffn, dropout, attn_dropout, ln_eps)
                                        for _ in range(depth))

    def expert_parameters(self, j: int) -> list[torch.Tensor]:
        """Views of expert j's parameters (for inspection and tests)."""
        return [p[j] for p in self.parameters()]

    def forward(self, z: torch.Tensor, action: torch.Tensor, e: torch.Tensor, pair_row: torch.Tensor,
                pair_expert: torch.Tensor, key_mask: torch.Tensor | None = None,
                cache: ExpertCache | None = None) -> torch.Tensor:
        """z (B, T, L), action (B, T, A), e (B, E); pair_row, pair_expert (P,); key_mask (P, T) or None
        -> outputs (P, T, D) in pair order."""
        if cache is not None and cache.layout is not None:
            layout = cache.layout
        else:
            layout = PairLayout.of(pair_expert, self.n_experts, self.kernel, self.pad_inputs)
            if cache is not None:
                cache.layout = layout
        rows = pair_row[layout.order]  # (P,) the sequence of each slot
        t = z.shape[1]
        inputs = torch.cat([z[rows], action[rows], e[rows][:, None].expand(-1, t, -1)], -1)  # (P, T, in)
        x = self.mix_norm2(self.mix_out(F.relu(self.mix_norm1(self.mix_in(inputs, layout), layout)), layout),
                           layout)  # (P, T, D)
        if self.transformer:
            kv = None
            if cache is not None:
                if cache.kv is None:
                    offset = None if cache.offset is None else cache.offset[rows]  # (P,) in slot order
                    cache.kv = KVCache.empty(self.depth, len(rows), self.heads, self.max_len, self.width // self.heads,
                                             z.device, cache.dtype, offset)
                kv = cache.kv
            mask = layer_mask(kv, None if key_mask is None else key_mask[layout.order], t, self.max_len, z.device)
            if kv is None or kv.offset is None:
                start = 0 if kv is None else kv.length
                pos = self.position[:, start:start + t][layout.expert]  # (P, T, D)
            else:  # per-sequence offsets (batched acting)
                pos = self.position[layout.expert[:, None], positions(kv, t, z.device)]  # (P, T, D)
            x = self.norm(x + pos, layout)
            for i, block in enumerate(self.blocks):
                x = block(x, layout, kv, i, mask)
            if kv is not None:
                kv.length += t
        return x[layout.inverse]  # (P, T, D) in pair order


class ClusterModule(nn.Module):
    """One VAE cluster: STORM's encoder/decoder with the posterior and decoder conditioned on e_k, and the
    cluster's next-latent (prior), reward and termination heads on (h, e_k)."""

    def __init__(self, cfg: MoWSizes, image_size: int) -> None:
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
    """MoW's routing (docs/methods/mow.md): S_k = softmax(MLP(e_k) / tau) from the task embedding alone, so every token
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


    def __init__(self, sizes: MoWSizes, n_tasks: int, image_size: int, action_dim: int) -> None:
        super().__init__()
        self.sizes, self.n_tasks = sizes, n_tasks
        cfg = sizes
        self.latent_vars, self.latent_dim = cfg.n_vars, cfg.n_vars * cfg.n_classes
        e = cfg.embed_dim
        self.feature_dim = self.latent_dim + cfg.width + e  # [z, h, sg(e_k)]
        self.n_critics = cfg.n_clusters  # one critic per VAE cluster
        self.max_len = cfg.max_len
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
        head_in = cfg.width if cfg.task_head_input == "h" else self.latent_dim
        self.task_head = MLP(head_in, cfg.head_width, 1, n_tasks) if cfg.task_loss else None
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
        return self.sizes.routing == "task" and resolve_kernel(self.experts.kernel, self.assignment.device) == "grouped"

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
        return topk_route(logits, self.tau, self.sizes.top_k)

    def route_tasks(self) -> Routing:
        """Task-level routing of every task (N, N_e) (independent of the batch)."""
        task = torch.arange(self.n_tasks, device=self.assignment.device)
        return topk_route(self.router(self.embed(task)), self.tau, self.sizes.top_k)

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

    def task_logits(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The task-ID head's logits (B, T, N) from h (B, T, D) or z (B, T, V*C) (`task_head_input`).

        h by default, the faithful reading: the task-ID loss is one of the world model's losses on its temporal
        module, whose output h the next-latent, reward and termination heads read too, and what it asks is that
        h itself carry the task (so the shared Transformer's state separates the tasks the experts mix). h follows
        the mix layer, which reads e_k directly, so the head can read the task off e_k's trace in h and its loss
        may be nearly free; but the paper conditions the experts on e_k too (m_j(z, a, e_k)), so that path is the
        paper's own, and h stays the default. z (the posterior latent of the task's cluster VAE, whose
        posterior head also reads e_k, through a categorical bottleneck) is the other reading, kept as an
        option and the ablation task_head_on_z."""
        return self.task_head(h if self.sizes.task_head_input == "h" else z)

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
