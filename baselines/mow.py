"""Mixture-of-World Models (MoW, arXiv 2602.01270; docs/methods/mow.md): N_m modular categorical VAEs assigned
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
task_gradient_vectors and clustering.gradient_vector); of the k-means restarts the most similar grouping is
kept (lowest inertia, `cluster_select`), with its silhouette and within-cluster similarities recorded. Per
update each task gets `batch_per_task` sequences and `imag_per_task` imagination starts (paper preset: 1 and
40; the paper states neither). The task-ID head reads h (`task_head_input`; MoWWorldModel.task_logits)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mowbench import results
from mowbench.agents.base import Metrics, adam, build_config, count_parameters, get_agent, register_agent
from mowbench.agents.imagination import ImaginationAgent
from mowbench.analysis.figures import heatmap_png
from mowbench.baselines import storm
from mowbench.baselines.storm import (
    STORMConfig,
    replay_actor_critic_round,
    storm_loss,
    storm_terms,
)
from mowbench.clustering import (
    cluster_quality,
    cosine_similarity_matrix,
    gradient_vector,
    kmeans_cosine,
    random_assignment,
)
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.logger import Ticker
from mowbench.models.experts import KERNELS
from mowbench.models.mow import MoWSizes, MoWWorldModel
from mowbench.ops import balance_loss, group_mean, harmonious_loss
from mowbench.replay import Batch

# known departures from the paper and the published code (one line each; docs/methods/mow.md has them
# as a table): recorded in every run's metadata.json and printed in the analysis's notes
DEPARTURES = (
    "not stated in the paper, chosen here: embed_dim 64, top_k 2, router MLP width 256, temperature 2 -> 1 over 10k "
    "updates, experts of depth 1, the shared Transformer STORM's depth, actor and critics on [z, h, sg(e_k)]",
    "clustering gradients kept per layer as sketches (the paper: averaged per layer)",
    "per update each task's batch_per_task sequences and imag_per_task starts (the paper states neither); one "
    "return scale S per task",
    "size 817 MiB at the paper preset for 26 games against the paper's 972.5 MB (unreconciled)",
    "Meta-World's 300k steps read as simulator steps (env.paper_steps=agent: agent steps)",
)


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
    expert_kernel: str = "auto"  # how each expert runs on its pairs: auto | grouped | loop (models/experts.py)
    shared_transformer: bool = True  # False: no shared Transformer F after the experts (ablation)
    task_loss: bool = True  # task-ID head and its cross-entropy (ablation: False)
    task_loss_scale: float = 1.0  # weight of the task-ID cross-entropy inside each task's loss
    # what the task-ID head reads: h (the shared Transformer's output, the paper's reading) | z (the posterior
    # latent, whose encoder also reads e_k; ablation task_head_on_z). See MoWWorldModel.task_logits.
    task_head_input: str = "h"
    balance_loss: bool = True  # expert-balance loss (ablation: False)
    balance_scale: float = 0.1  # its coefficient (the paper: 0.1)
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
    # k-means restart kept: inertia = the most similar grouping (lowest cosine k-means objective; ties: the more
    # even sizes) | even = the most even group sizes (ties: lowest inertia; ablation even_clusters)
    cluster_select: str = "inertia"
    cluster_n_init: int = 100  # k-means restarts

    def check(self) -> None:
        super().check()
        choices = {"routing": ("task", "token"), "expert_kernel": KERNELS, "clustering": ("gradient", "random", "none"),
                   "cluster_grad_reduce": ("sketch", "flat", "layer_mean"),
                   "cluster_grad_params": ("cluster", "shared"), "cluster_select": ("inertia", "even"),
                   "task_head_input": ("h", "z")}
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
        return MoWWorldModel(MoWSizes.of(self.cfg), len(tasks), tasks[0].image_size, self.action_dim)

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
            logits = self.wm.task_logits(z, h).float()  # (B, T, N)
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

    # ---- warm-up clustering (docs/methods/mow.md) ----
    def task_gradient_vectors(self, sample: Callable[[int, int], Batch], done: Callable[[], None] = lambda: None
                              ) -> torch.Tensor:
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
            done()  # progress: one task's gradient
        return torch.stack(vectors)

    def warm_up(self, sample: Callable[[int, int], Batch]) -> Metrics:
        """Train the shared model (cluster 0 for every task) on the random warm-up data, cluster the tasks,
        start every cluster's VAE, heads and critic from the warm-up weights."""
        cfg, start = self.cfg, time.time()
        metrics: Metrics = {}
        gradients = self.n_tasks if cfg.clustering == "gradient" else 0
        ticker = Ticker(f"MoW clustering warm-up ({cfg.cluster_warmup_updates} shared updates, then {gradients} task "
                        "gradients)", cfg.cluster_warmup_updates + gradients)
        for _ in range(cfg.cluster_warmup_updates):
            metrics = self.update_world_model(sample(cfg.batch_per_task * self.n_tasks, cfg.batch_length))
            ticker.tick()
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the run's seeded torch RNG
        similarity, quality = None, {"silhouette_cosine": None, "within_cluster_cosine": None}
        if cfg.clustering == "gradient":
            vectors = self.task_gradient_vectors(sample, ticker.tick)
            labels = kmeans_cosine(vectors, cfg.n_clusters, cfg.cluster_n_init, seed, cfg.cluster_select)
            similarity = cosine_similarity_matrix(vectors).tolist()
            quality = cluster_quality(np.asarray(similarity), labels)  # how similar the kept grouping is
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
            "clustering": cfg.clustering, "n_clusters": cfg.n_clusters, "cluster_select": cfg.cluster_select,
            "assignment": labels.tolist(), **quality, "gradient_similarity": similarity,
            "warmup_updates": cfg.cluster_warmup_updates, "warmup_seconds": time.time() - start,
            "routing_warmup": self.routing_matrix().tolist()}
        return {f"warmup/{k.split('/')[-1]}": v for k, v in metrics.items()}

    def update(self, sample: Callable[[int, int], Batch]) -> Metrics:
        warm = self.warm_up(sample) if self.cluster_report is None else {}
        return super().update(sample) | warm

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """MoW's size beside one STORM per task (the paper: about half) and beside the paper's 972.5 MB, and its experts
        at the current routing."""
        from mowbench.bench_extras import expert_figures, separate_storm_figures

        return (super().bench_extras(sample, time, figures) | separate_storm_figures(self, figures)
                | self.size_figures() | expert_figures(self, sample, time))

    def size_figures(self) -> dict[str, Any]:
        """The checkpoint's size as the paper counts it (every state_dict tensor, slow critics and buffers included,
        fp32: 26 STORMs come to the paper's 1977.5 MB this way, so its MB are MiB), in MiB beside the paper's figure
        for MoW on the 26 Atari games (972.5 MB; that configuration is not published: docs/methods/mow.md)."""
        tensors = [*self.wm.state_dict().values(), *self.ac.state_dict().values()]
        tensors += [self.log_sigma] if self.log_sigma is not None else []
        return {"state_dict_mib": sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20,
                "state_dict_elements": sum(t.numel() for t in tensors), "paper_state_dict_mb": PAPER_STATE_DICT_MB}

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
            summary = {k: v for k, v in rep.items() if k != "routing_warmup"}
            results.atomic_write_json(folder / "clusters.json", {**summary, "tasks": names, "assignment": assignment})
            results.atomic_write_text(folder / "clusters.csv", "task,cluster\n" + "".join(
                f"{n},{c}\n" for n, c in assignment.items()))
            results.atomic_write_bytes(folder / "clusters.png", cluster_png(rep, names, self.cfg.n_clusters))
            if rep["gradient_similarity"] is not None:
                sim = np.asarray(rep["gradient_similarity"])
                results.atomic_write_text(folder / "gradient_similarity.csv", matrix_csv(sim, labelled, labelled))
                results.atomic_write_bytes(folder / "gradient_similarity.png", heatmap_png(
                    sim, labelled, labelled, "warm-up task-gradient cosine similarity", "cosine", -1, 1, "RdBu_r"))
            self._write_routing(folder, "warmup", np.asarray(rep["routing_warmup"]), labelled, experts)
        if final:
            self._write_routing(folder, "final", self.routing_matrix(), labelled, experts)

    def _write_routing(self, folder: Path, tag: str, matrix: np.ndarray, rows: list[str], cols: list[str]) -> None:
        results.atomic_write_bytes(folder / f"routing_{tag}.png", heatmap_png(
            matrix, rows, cols, f"expert routing weights ({tag}, {self.cfg.routing}-level, top_k={self.cfg.top_k})",
            "routing weight", 0, None))
        results.atomic_write_text(folder / f"routing_{tag}.csv", matrix_csv(matrix, rows, cols))  # last: marks done

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


# the paper's size of MoW for the 26 Atari games (MB, which are MiB of fp32 state_dicts: size_figures)
PAPER_STATE_DICT_MB = 972.5


def cluster_png(rep: dict[str, Any], names: list[str], n_clusters: int) -> bytes:
    """The tasks x clusters membership heatmap, titled with how the restart was kept and how similar the grouping
    is (silhouette, cosine), each cluster's column labelled with its mean within-cluster cosine similarity."""
    within = rep.get("within_cluster_cosine") or [None] * n_clusters
    cols = [f"c{c}" + ("" if w is None else f" ({w:.2f})") for c, w in enumerate(within)]
    title = f"VAE cluster assignment ({rep['clustering']})"
    if rep["clustering"] == "gradient":  # on lines of their own: one line is cut off at a few tasks' width
        sil = rep.get("silhouette_cosine")
        title += (f"\nkept by {rep.get('cluster_select', 'even')}, silhouette (cosine) "
                  f"{'n/a' if sil is None else f'{sil:.3f}'}\n(c): mean within-cluster cosine")
    return heatmap_png(np.eye(n_clusters)[rep["assignment"]], names, cols, title, "member", 0, 1, "Greys")


def matrix_csv(matrix: np.ndarray, rows: list[str], cols: list[str]) -> str:
    lines = ["," + ",".join(cols)] + [f"{r}," + ",".join(f"{v:.6g}" for v in row)
                                      for r, row in zip(rows, matrix, strict=True)]
    return "\n".join(lines) + "\n"


# ---- STORM's published numbers through a MoW that reduces to STORM (python -m mowbench.verify agent=mow) ----

# MoW has no published code. Its parts that are STORM's (the VAE, the heads, the expert's token stem and Transformer,
# the actor-critic, the losses and updates) are checked against STORM's reference data: mowbench.verify loads the
# data of the method named here, which a MoW of one task, one cluster and one expert replays as STORM does.
VERIFY_REFERENCE = "storm"
# STORM's upstream protocol, and off the two MoW settings that depart from STORM even for one task. They are
# behaviour, so a command may set them back, and the check then fails: harmonious weighting (L / sigma + ln(1 + sigma)
# with a learnt sigma instead of STORM's L) and the task-ID head (its cross-entropy over one task is exactly 0, with
# zero gradient, but its parameters are none of STORM's: the parameter count fails)
VERIFY_DEFAULTS = ("env=atari100k", "preset=paper", "agent.harmonious=false", "agent.task_loss=false")
# The structure that reduces to STORM, forced whatever the command says: one VAE cluster; one expert, which task-level
# routing gives the one task with weight 1 (a softmax over one expert: any logit, any temperature); no shared
# Transformer after it and its own Transformer as deep as STORM's (reference_config), so the expert is STORM's token
# stem and Transformer; no clustering and no warm-up pre-training (the reference has neither). Everything else comes
# from the command's configuration, as for STORM: the balance loss is on (the load of one expert is always even, so
# the loss is exactly 0), and embed_dim, router_width, the temperature and the expert kernel are the command's.
REDUCTION = {"n_clusters": 1, "n_experts": 1, "top_k": 1, "routing": "task", "expert_transformers": True,
             "shared_transformer": False, "clustering": "none", "cluster_warmup_updates": 0}

# Our STORM's parameter and buffer names (storm.from_upstream's output) -> MoW's, the first matching rule applies;
# the last block's norm2 goes to the mix LayerNorm instead (mow_name, MIX_SCALE).
STORM_NAMES: tuple[tuple[str, str], ...] = (
    (r"(encoder|posterior_head|decoder|prior_head|reward_head|termination_head)\.(.+)", r"clusters.0.\1.\2"),
    (r"stem\.net\.0\.(.+)", r"experts.mix_in.\1"),
    (r"stem\.net\.1\.(.+)", r"experts.mix_norm1.\1"),
    (r"stem\.net\.3\.(.+)", r"experts.mix_out.\1"),
    (r"stem\.net\.4\.(.+)", r"experts.mix_norm2.\1"),
    (r"transformer\.position\.weight", r"experts.position"),
    (r"transformer\.norm\.(.+)", r"experts.norm.\1"),
    (r"transformer\.blocks\.(\d+)\.ffn\.0\.(.+)", r"experts.blocks.\1.ffn_in.\2"),
    (r"transformer\.blocks\.(\d+)\.ffn\.2\.(.+)", r"experts.blocks.\1.ffn_out.\2"),
    (r"transformer\.blocks\.(\d+)\.(qkv|out|norm1|norm2)\.(.+)", r"experts.blocks.\1.\2.\3"),
    (r"(actor|critics|slow_critics)\.(.+)", r"\1.\2"),
)
# MoW's `mix` (Linear W over [the expert's output, e_k], then LayerNorm) has no counterpart in STORM. STORM's h is its
# last block's LN(x) * g + b (eps 1e-6); MoW's is mixLN(W [LN(x) * g' + b', e_k]) * g'' + b'' (eps 1e-5). With
# W = [MIX_SCALE * I, 0], the expert's last (g', b') = (1, 0) and STORM's (g, b) as the mix LayerNorm's (g'', b''),
# MoW normalises x twice: (x - mean) / sqrt(var + 1e-5 (var + 1e-6) / MIX_SCALE^2) instead of sqrt(var + 1e-6), h
# relative ~1e-6 / (2 var) (4.8e-7 of max |h| at the reference's sizes, in float64: MOW_TOLERANCES["fp32-ln"]). The
# scale, a power of two (exact in fp32), keeps the mix LayerNorm's own eps out: with W = [I, 0] it shrinks h by
# ~5e-6 (update 1's KL 5.3e-6 off). The affine moves behind the mix LayerNorm, which would normalise (g', b') away
# once they are trained (left in the expert, with the mix LayerNorm's held at (1, 0): the KL 1.3e-4 off at update 2).
# W, g' and b' get gradients STORM has no place for (W's off-diagonal, g' and b' under the mix LayerNorm): trained,
# they take the model away from STORM from update 2 (the KL 5.8e-5 off at update 2, 1.3e-4 at update 3, the imagined
# features 3.9e-4, at rtol 1e-5), so they are frozen (neutralise).
MIX_SCALE = 2.0 ** 10


def reference_config(reference: dict[str, Any], agent_values: dict[str, Any]) -> MoWConfig:
    """Our config for the reference run: STORM's fields as storm.reference_config makes them (the command's
    behaviour, the reference's sizes, no CUDA graphs or compilation), MoW's own from the command, and REDUCTION with
    expert_depth = STORM's depth on top."""
    fields = {f.name for f in dataclasses.fields(STORMConfig)}
    storm_cfg = storm.reference_config(reference, {k: v for k, v in agent_values.items() if k in fields})
    values = {**agent_values, **{f: getattr(storm_cfg, f) for f in fields}, **REDUCTION,
              "expert_depth": storm_cfg.depth}
    return build_config(get_agent("mow"), values)


def mow_name(name: str, depth: int) -> str:
    """MoW's name (STORM_NAMES) of our STORM's parameter or buffer `name`; KeyError for one no rule maps."""
    last = f"experts.blocks.{depth - 1}.norm2."
    for pattern, template in STORM_NAMES:
        match = re.fullmatch(pattern, name)
        if match:
            out = match.expand(template)
            return "mix.1." + out.removeprefix(last) if out.startswith(last) else out
    raise KeyError(f"no rule of STORM_NAMES maps our STORM's {name!r}")


def to_mow(state: dict[str, torch.Tensor], module: nn.Module, depth: int, embed_dim: int
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our STORM's state (storm.from_upstream) placed in `module`'s (MoW's world model or actor-critic) state_dict
    -> (the whole state, what STORM lacks left as it is; per weight of MoW that also reads e_k, a mask of its shape,
    True on the e_k columns, set to 0). An expert's tensor gets the leading expert dimension (1) and its Linear
    weights are transposed (ExpertBank's (n, in, out)). e_k is concatenated after STORM's inputs everywhere, so a
    weight reading it has `embed_dim` more inputs, after STORM's; any other difference of shape does not fit
    (RuntimeError)."""
    out, e_columns = module.state_dict(), {}
    for name, value in state.items():
        ours = mow_name(name, depth)
        if ours not in out:
            raise KeyError(f"MoW has no {ours!r} (for our STORM's {name!r})")
        stacked = ours.startswith("experts.")
        if stacked:
            value = (value.T if value.dim() == 2 and ours != "experts.position" else value)[None]
        like = out[ours]
        inputs = 1 if stacked else -1  # the input dimension of a Linear weight: (n, in, out) or (out, in)
        fits = value.shape == like.shape or (
            value.dim() == like.dim() and like.dim() >= 2 and ours.endswith(".weight")
            and like.shape[inputs] == value.shape[inputs] + embed_dim
            and [n for i, n in enumerate(like.shape) if i != inputs % like.dim()]
            == [n for i, n in enumerate(value.shape) if i != inputs % value.dim()])
        if not fits:
            raise RuntimeError(f"our STORM's {name} {tuple(value.shape)} does not fit MoW's {ours} "
                               f"{tuple(like.shape)}")
        block = tuple(slice(0, n) for n in value.shape)  # STORM's inputs, then e_k's
        out[ours] = like.new_zeros(like.shape)
        out[ours][block] = value
        if value.shape != like.shape:
            mask = torch.ones(like.shape, dtype=torch.bool)
            mask[block] = False
            e_columns[ours] = mask
    return out, e_columns


def neutralise(wm: MoWWorldModel, state: dict[str, torch.Tensor]) -> list[str]:
    """MoW's own world-model parameters set in `state` to the values that reduce it to STORM (and the ones with
    gradients STORM has no place for frozen) -> their names. e_k = 0: the embedding is 0 and F.normalize(0) = 0; one
    task has nothing to tell apart, and an e_k of 0 gives the e_k columns of every layer (zeroed by to_mow) exactly
    zero gradient, so they stay 0. e_k's own gradient is exactly 0 then, though normalize's Jacobian at 0 is
    I / 1e-12: what reaches it is exactly 0 (zero e_k columns; the router passes back exactly 0, a softmax over one
    expert), and the verify checks it is not moved. The router keeps its initial weights (any weights give the one
    expert weight 1). `mix` is the scaled identity on the expert's output with STORM's last LayerNorm affine after
    it, the expert's last affine the identity, these two frozen (MIX_SCALE)."""
    d, e = wm.sizes.width, wm.sizes.embed_dim
    last = f"experts.blocks.{len(wm.experts.blocks) - 1}.norm2"
    state["task_embedding.weight"] = torch.zeros_like(state["task_embedding.weight"])
    state["mix.0.weight"] = torch.cat([MIX_SCALE * torch.eye(d), torch.zeros(d, e)], 1)  # (D, D + E)
    state[f"{last}.weight"], state[f"{last}.bias"] = torch.ones(1, d), torch.zeros(1, d)  # (1, D) each
    frozen = [wm.mix[0].weight, wm.experts.blocks[-1].norm2.weight, wm.experts.blocks[-1].norm2.bias]
    for p in frozen:
        p.requires_grad_(False)  # no gradient: clip_grad_norm_ and Adam skip them
    return ["task_embedding.weight", "mix.0.weight", f"{last}.weight", f"{last}.bias",
            *(n for n, _ in wm.router.named_parameters(prefix="router"))]


# why each tolerance (mowbench.verify prints those a table uses); STORM's, and MoW's own
MOW_TOLERANCES = {
    "fp32-ln": "rtol 1e-5 (as fp32), for what follows from h: besides the rounding, MoW's h is normalised twice (the "
               "expert's last LayerNorm, then the mix LayerNorm: MIX_SCALE in baselines/mow.py), which moves it by "
               "~1e-6 / (2 var) relative (4.8e-7 of max |h| in float64, at these sizes and the initial weights); "
               "measured <= 1.9e-6 (the actor's change in round 1; the imagined features 1.5e-6, 1.1e-6 in STORM's "
               "own check); the world model's rows do not drift (<= 6.2e-7 at update 1, 1.1e-6 at update 2: the grad "
               "norm, as in STORM's check, 8.0e-7 at update 3)",
    "neutral": "0: MoW's own parameters (the task embedding, held at e_k = 0; the router; the e_k columns of every "
               "layer that reads e_k; the frozen mix Linear and last expert LayerNorm affine) and the e_k features "
               "stay exactly where they were: e_k = 0 gives its columns exactly zero gradient, a softmax over one "
               "expert passes the router exactly 0, and Adam (no weight decay) does not move a parameter whose "
               "gradients were all 0",
}
MOW_KEYS = {"fp32": "fp32-ln"}  # storm.checksum_rows' key -> ours, for rows that follow from h


def verify_reference(reference: dict[str, Any], agent_values: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """mowbench.verify's hook: STORM's reference replayed through a MoW that reduces to STORM (REDUCTION; MoW's own
    parts neutral: to_mow, neutralise) -> (rows, tolerance reasons). What is compared is STORM's check (storm.py's
    verify_reference), with each quantity on MoW's modules, and MoW's own parameters checked to stay neutral."""
    from mowbench.ops import uniforms_from
    from mowbench.verify import Row, exact_row, scalar_row, tensor_row

    s = reference["sizes"]
    cfg = reference_config(reference, agent_values)
    info = TaskInfo("reference", "upstream", 0, s["image_size"], ActionSpace(True, s["n_actions"]))
    agent = MoWAgent(cfg, [info], torch.device("cpu"), "fp32")
    wm, ac = agent.wm, agent.ac
    init_wm, init_ac = reference["init"]["world_model"], reference["init"]["agent"]
    tolerances = storm.TOLERANCES | MOW_TOLERANCES
    rows: list[Row] = []
    try:
        wm_state, wm_e = to_mow(storm.from_upstream(init_wm), wm, cfg.depth, cfg.embed_dim)
        ac_state, ac_e = to_mow(storm.from_upstream(init_ac), ac, cfg.depth, cfg.embed_dim)
        own = neutralise(wm, wm_state)
        wm.load_state_dict(wm_state)
        ac.load_state_dict(ac_state)
    except (RuntimeError, KeyError) as err:
        rows.append(Row(f"upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                        float("nan"), float("inf"), 0.0, "exact"))
        return rows, tolerances
    buffer = re.compile(r".*\.(running_mean|running_var|num_batches_tracked)$")
    named_wm = dict(wm.named_parameters())
    own_count = sum(named_wm[n].numel() for n in own)
    for what, init, module, e_columns, less in (
            ("world model", init_wm, wm, wm_e, own_count), ("actor-critic", init_ac, ac, ac_e, 0)):
        count = sum(v.numel() for k, v in init.items() if not buffer.match(k))
        ours = count_parameters(module.parameters()) - less - sum(int(m.sum()) for m in e_columns.values())
        rows.append(scalar_row(f"{what} parameters (less MoW's own)", count, ours, 0.0, "exact"))
    # our name -> upstream module, for the checksums: only STORM's parameters (MoW's own are checked to stay put)
    group_of = {mow_name(storm.upstream_name(k), cfg.depth): storm.upstream_group(k) for k in [*init_wm, *init_ac]}
    init_state = {"wm": {k: v.clone() for k, v in wm.state_dict().items()},
                  "ac": {k: v.clone() for k, v in ac.state_dict().items()}}

    def checksums(tree: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """storm.py's checksums over the parameters with an upstream counterpart (with their zero e_k columns)."""
        named = {n: p for n, p in module.named_parameters() if n in group_of}
        out = {}
        for group in sorted({group_of[n] for n in named}) + [""]:
            names = [n for n in named if group_of[n] == group or not group]
            key = group or "all_parameters"
            flat = torch.cat([named[n].detach().double().flatten() for n in names])
            change = torch.cat([(named[n].detach().double() - init_state[tree][n].double()).flatten() for n in names])
            out[key] = torch.stack([flat.sum(), flat.pow(2).sum()])
            out[key + "/change"] = torch.stack([change.sum(), change.pow(2).sum()])
        buffers = [b.detach().double().flatten() for n, b in module.named_buffers()
                   if n in group_of and b.is_floating_point()]  # not MoW's `tau`
        if buffers:
            flat = torch.cat(buffers)
            out["all_float_buffers"] = torch.stack([flat.sum(), flat.pow(2).sum()])
        return out

    def own_change(tree: str, module: nn.Module, names: list[str], e_columns: dict[str, torch.Tensor]) -> float:
        """The largest change of MoW's own parameters: `names`, and the e_k columns of STORM's."""
        state = module.state_dict()
        change = [(state[n] - init_state[tree][n]).abs().max() for n in names]
        change += [(state[n] - init_state[tree][n])[mask].abs().max() for n, mask in e_columns.items()]
        return float(torch.stack(change).max())

    def rekeyed(rows: list[Row], keep: tuple[str, ...] = ()) -> list[Row]:
        """Rows of storm.checksum_rows under our keys (MOW_KEYS), but those naming one of `keep`."""
        return [r if any(k in r.quantity for k in keep) else dataclasses.replace(r, why=MOW_KEYS.get(r.why, r.why))
                for r in rows]

    def upsample(obs: torch.Tensor) -> torch.Tensor:
        k = s["image_size"] // s["obs_base"]
        return obs.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)

    legal = torch.ones(1, s["n_actions"], dtype=torch.bool)

    def batch(obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor | None = None,
              terminal: torch.Tensor | None = None) -> Batch:
        b = obs.shape[0]
        zeros = torch.zeros(action.shape)
        return Batch(upsample(obs), action.long(), zeros if reward is None else reward.float(),
                     zeros if terminal is None else terminal.float(), torch.zeros(b, dtype=torch.long),
                     legal.expand(b, -1), task_counts=(b,))

    rtol, h_key = storm.RTOL, MOW_KEYS["fp32"]
    for k, upd in enumerate(reference["world_model_updates"]):
        tag = f"wm update {k + 1}"
        # before update 1's step the reconstruction and the BatchNorm statistics do not depend on h
        first = "fp32" if k == 0 else h_key
        torch.set_rng_state(upd["rng_state_before_transformer"])  # dropout masks: upstream's (the only draws left)
        with uniforms_from([upd["posterior_u"]]) as draws:
            metrics = agent.update_world_model(batch(upd["obs"], upd["action"], upd["reward"], upd["termination"]))
        up = upd["losses"]
        rows += [
            exact_row(f"{tag}: posterior samples", upd["posterior_index"], draws.drawn[0], "exact"),
            scalar_row(f"{tag}: reconstruction loss", up["WorldModel/reconstruction_loss"], metrics["wm/rec"],
                       rtol, first),
            scalar_row(f"{tag}: reward loss", up["WorldModel/reward_loss"], metrics["wm/reward"], rtol, h_key),
            scalar_row(f"{tag}: termination loss", up["WorldModel/termination_loss"], metrics["wm/termination"],
                       rtol, h_key),
            scalar_row(f"{tag}: dynamics KL", up["WorldModel/dynamics_real_kl_div"], metrics["wm/kl_dyn"],
                       rtol, h_key),
            scalar_row(f"{tag}: representation KL", up["WorldModel/representation_real_kl_div"],
                       metrics["wm/kl_rep"], rtol, h_key),
            scalar_row(f"{tag}: total loss", up["WorldModel/total_loss"], metrics["wm/loss"], rtol, h_key),
            scalar_row(f"{tag}: grad norm before clipping", upd["grad_norm"], metrics["wm/grad_norm"], rtol,
                       h_key),
        ]
        last = k == len(reference["world_model_updates"]) - 1
        rows += rekeyed(storm.checksum_rows(tag, upd["checksums"], checksums("wm", wm), groups=last),
                        keep=("BatchNorm",) if k == 0 else ())
        rows.append(scalar_row(f"{tag}: MoW's own parameters, largest change", 0.0, own_change("wm", wm, own, wm_e),
                               0.0, "neutral", floor=1.0))

    n_storm = reference["actor_critic_rounds"][0]["features"].shape[-1]  # [z, h]: V*C + D; ours then has e_k
    for r, rnd in enumerate(reference["actor_critic_rounds"]):
        tag = f"ac round {r + 1}"
        traj, context, priors, metrics, (ret, slow_ret, q) = replay_actor_critic_round(agent, rnd, batch)
        up = rnd["losses"]
        scale = rnd["lambda_return"].abs().max().item()  # percentiles: relative to the largest |return|
        rows += [
            exact_row(f"{tag}: context posterior samples", rnd["context_index"], context, "exact"),
            exact_row(f"{tag}: imagined prior samples", rnd["prior_index"], priors, "exact"),
            exact_row(f"{tag}: imagined actions", rnd["action_index"], traj.action, "exact"),
            exact_row(f"{tag}: imagined terminations", rnd["termination"], 1 - traj.cont, "exact"),
            tensor_row(f"{tag}: imagined features [z, h]", rnd["features"], traj.feat[..., :n_storm], rtol, h_key),
            scalar_row(f"{tag}: imagined features e_k, largest |e_k|", 0.0, traj.feat[..., n_storm:].abs().max(),
                       0.0, "neutral", floor=1.0),
            tensor_row(f"{tag}: imagined rewards", rnd["reward"], traj.reward, rtol, h_key),
            tensor_row(f"{tag}: lambda-returns", rnd["lambda_return"], ret, rtol, h_key),
            tensor_row(f"{tag}: slow-critic lambda-returns", rnd["slow_lambda_return"], slow_ret, rtol, h_key),
            scalar_row(f"{tag}: return 5th percentile", rnd["percentile_05"], q[0, 0], rtol, "decoded", scale),
            scalar_row(f"{tag}: return 95th percentile", rnd["percentile_95"], q[0, 1], rtol, "decoded", scale),
            scalar_row(f"{tag}: return scale S (EMA)", rnd["return_scale"], metrics["ac/return_scale"], rtol,
                       h_key),
            scalar_row(f"{tag}: policy loss", up["ActorCritic/policy_loss"], metrics["ac/policy_loss"], rtol,
                       h_key),
            scalar_row(f"{tag}: value loss", up["ActorCritic/value_loss"], metrics["ac/value_loss"], rtol, h_key),
            scalar_row(f"{tag}: slow-critic regularisation", up["slow_value_regularization_loss"],
                       metrics["ac/slow_reg"], rtol, h_key),
            scalar_row(f"{tag}: entropy", up["ActorCritic/entropy_loss"], metrics["ac/entropy"], rtol, h_key),
            scalar_row(f"{tag}: grad norm before clipping", rnd["grad_norm"], metrics["ac/grad_norm"], rtol, h_key),
        ]
        gap = torch.cat([(slow - critic).detach().double().flatten() for slow, critic in zip(
            ac.slow_critics.parameters(), ac.critics.parameters(), strict=True)])
        rows += rekeyed(storm.checksum_rows(tag, rnd["checksums"], checksums("ac", ac), groups=True))
        rows.append(scalar_row(f"{tag}: MoW's own parameters, largest change", 0.0, own_change("ac", ac, [], ac_e),
                               0.0, "neutral", floor=1.0))
        # the slow critic's distance from the critic (storm.TOLERANCES["ema"]): the bound 12 x 2^-24 x |critic| / |gap|
        bound = 12 * 2.0 ** -24 * math.sqrt(rnd["checksums"]["critic"][1] / rnd["slow_critic_gap"][1])
        rows.append(scalar_row(f"{tag}: slow critic - critic, sum of squares", rnd["slow_critic_gap"][1],
                               gap.pow(2).sum(), max(rtol, bound), "ema"))
    return rows, tolerances
