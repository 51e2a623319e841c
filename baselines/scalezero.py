"""ScaleZero-lite: ScaleZero ("One Model for All Tasks", opendilab/LightZero; a UniZero world model with
mixture-of-experts feed-forward layers) as a mowbench baseline on Atari 100k and MinAtar. Facts in
docs/methods/scalezero.md; the world model is mowbench.models.unizero, the planner mowbench.agents.mcts.

One causal transformer over (latent obs, action) tokens, MoE feed-forward layers (top-1 SwiGLU experts plus a
shared expert), per-task policy/value/reward/next-latent heads and no task embedding. Trained on 10-step
replayed sequences (teacher-forced: every obs token is the encoder's latent of the real frame): latent MSE to a
target encoder's next latent (x10), reward CE (x1), policy CE to the stored MCTS visit distribution (x1, entropy
bonus 1e-4), value CE to a 5-step TD target bootstrapped from the EMA target network's value (x0.5); 101-bin
supports after MuZero's scalar transform, value and reward targets label-smoothed (0.1); upstream's multi-task
default adds a second total of the same terms with a learned entropy weight (adaptive_entropy); AdamW 1e-4,
betas (0.9, 0.95), weight decay 1e-4 on matrices, convolutions and embeddings, clip 5; each update
sums equal per-task micro-batches (batch_size rows in all); target = EMA 0.95 of the online weights per update.
Acting: a batched tensor MCTS per env step, 25 simulations while collecting and 50 at evaluation.

Deviations from upstream (each named in the README):
- DPS (dynamic parameter scaling, LoRA stages) as upstream's code runs it: its optimizer holds only the stage-0
  trainable parameters, so at its first stage switch the LoRA adapters it switches on get gradients but never
  change (they add exactly zero: lora_B starts at 0), and the transformer's frozen weights stop learning. The first
  switch comes at 50k updates (min_stage0_iters; max_stage_iters 20k has passed by then), so
  `transformer_freeze_after` 50000 at the paper preset is that; the adapters themselves, which the paper describes
  as learning, are not built (the name stays scalezero-lite).
- The encoder is LightZero's ViT at the paper preset (encoder='vit': 'base' for more than 8 tasks, else 'small', as
  upstream picks; verified against upstream's with its weights, dropout included); encoder='resnet' (ours:
  pre-activation blocks, GroupNorm instead of BatchNorm, non-affine final LayerNorm; the tiny and micro presets) or
  encoder='lightzero' (UniZero's ResNet option, verified).
- The router, the transformer, the heads and the losses follow upstream (mowbench.verify); each earlier choice of
  ours is an ablation (ablations/README.md): learned_router, ffn_dropout, plain_latent_head, no_label_smoothing,
  fixed_entropy_weight, decay_all_params.
- Our stacked experts share one Adam state per projection: an expert without tokens in an update still takes a
  step (moment decay, weight decay); upstream's separate experts skip it.
- The search follows LightZero's C++ tree (mowbench.agents.mcts; one collect search per task replayed by
  mowbench.verify: root visits, root value, the sampled action); our earlier conventions are ablations:
  self_visit_puct, edge_only_min_max, visit_weighted_root_value. Below the root every action of a node is legal
  upstream (its children get no mask); ours masks every node with the task's legal actions.
- The search context is recomputed exactly instead of cached: every expansion runs the transformer over the
  node's token window (the last `context_steps` real steps, then the tree path, at most max_tokens - 2 tokens,
  oldest (obs, action) pairs dropped first), at window-relative positions as in training. Upstream caches keys and
  values and, once a cache reaches context_length - 1 tokens, drops its oldest (obs, action) pair and moves the
  rest back two positions by adding key/value projections of position-embedding differences computed at
  construction (exact at no layer); the verify expands with upstream's context (upstream_context_expand) to compare
  the trees.
- Budget: the paper trains 400k agent steps per game (4x Atari 100k). Our Atari 100k runs (train.steps=100000)
  are not its numbers; train.steps=400000 runs its budget.
- Update ratio: upstream collects 8 segments x 20 steps per task, then makes 80 updates (0.5 per step per task);
  train.updates_per_step is shared by every agent of a grid, so set train.updates_per_step=0.5 to match.
- Sequences that cross an episode end: after a terminal, the steps are MuZero's absorbing states (the padding
  frame, value and reward 0; `absorbing`); after a truncation they are masked, and value targets whose t+5
  bootstrap falls past a truncation are left out.
- Evaluation streams (seeded contexts) search without root noise with eval_simulations; `greedy` takes the most
  visited action (UniZero's evaluation), else an action is sampled from the visits at `temperature`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mowbench.agents.base import (
    Agent,
    AgentConfig,
    Autocast,
    Metrics,
    PicklesGenerator,
    bumps_versions,
    count_parameters,
    register_agent,
)
from mowbench.agents.mcts import SearchResult, draws_needed, search, visit_policy
from mowbench.envs.base import TaskInfo
from mowbench.models.experts import StackedLinear, StackedNorm
from mowbench.models.transformer import KVCache
from mowbench.models.unizero import ENCODERS, ROUTERS, VIT_SIZES, UniZeroWorldModel, resnet_out
from mowbench.ops import ema_, sample_categorical, support_bins, support_ce, support_value
from mowbench.replay import Batch, StepField

# known departures from the paper and the published code (one line each; docs/methods/scalezero.md has them
# as a table): recorded in every run's metadata.json and printed in the analysis's notes
DEPARTURES = (
    "DPS as upstream's code runs it: the transformer frozen at its first stage switch (50k updates); the LoRA "
    "adapters, which upstream's optimizer never steps, are not built",
    "the search context recomputed exactly (upstream: a one-token cached context)",
    "legal-action masks at every node (upstream: below the root every action is legal)",
    "stacked experts share one Adam state (an expert without tokens still steps)",
    "budget 100k agent steps per game (the paper: 400k)",
)


@dataclass
class ScaleZeroConfig(AgentConfig):
    """ScaleZero-lite's hyperparameters; defaults are the paper's (docs/methods/scalezero.md) = the `paper` preset."""

    latent_dim: int = 768  # transformer width D = latent size
    depth: int = 4  # transformer blocks
    heads: int = 24  # attention heads
    max_tokens: int = 20  # learned positions: 10 steps of (obs, action) tokens
    dropout: float = 0.1  # transformer dropout
    moe: bool = True  # MoE feed-forward layers (False: dense, the paper's "no MoE" ablation)
    n_experts: int = 8  # SwiGLU experts per MoE layer (top-1 routing)
    expert_hidden: int = 3072  # SwiGLU hidden size of an expert
    shared_hidden: int = 3072  # hidden size of the always-on shared expert (Linear-GELU-Linear)
    router: str = "upstream"  # upstream (softmax over the chosen logit: weight 1, no grad) | learned (over all)
    ffn_dropout: bool = False  # also drop the FFN's output (upstream drops only attention probabilities and output)
    latent_head: str = "upstream"  # upstream (zero-init last layer, affine LayerNorm) | plain (random, no affine)
    # vit: LightZero's ViT, the paper's and upstream's multi-task Atari setting | resnet (ours: pre-activation blocks,
    # GroupNorm) | lightzero (UniZero's ResNet option)
    encoder: str = "vit"
    vit_size: str = "auto"  # small (768 wide, 6 blocks) | base (768, 12) | auto: base for more than 8 tasks (upstream)
    vit_patch: int = 8  # patch side (64x64 -> 64 patches)
    vit_head_dim: int = 64  # per attention head (vit-pytorch's default, upstream keeps it)
    vit_dropout: float = 0.1  # attention, feed-forward and embedding dropout (upstream: 0.1 each)
    ffn: int = 3072  # dense feed-forward hidden size (moe=false)
    head_hidden: int = 768  # hidden size of the per-task heads
    channels: tuple[int, ...] = (32, 64, 128, 128)  # ResNet stage widths (64x64 -> 4x4 at strides 2, 2, 2, 2)
    strides: tuple[int, ...] = (2, 2, 2, 2)  # ResNet stage strides
    res_blocks: int = 1  # extra residual blocks after the last stage
    bins: int = 101  # categorical support of value and reward (-50..50 after MuZero's transform)
    unroll_steps: int = 10  # replayed steps per training sequence
    td_steps: int = 5  # n of the n-step value target (bootstrap at t + 5)
    gamma: float = 0.997  # discount
    latent_coef: float = 10.0  # latent MSE weight
    reward_coef: float = 1.0  # reward CE weight
    policy_coef: float = 1.0  # policy CE weight
    value_coef: float = 0.5  # value CE weight
    entropy_coef: float = 1e-4  # policy entropy bonus
    # upstream's multi-task default (use_adaptive_entropy_weight): a second total of the same terms is added, with
    # the entropy weighted by alpha = exp(log_alpha) (1 at the start, learned by Adam toward a target entropy of
    # ratio x log(A), the ratio annealed linearly from start to end over decay_steps updates)
    adaptive_entropy: bool = True
    alpha_lr: float = 1e-3
    target_entropy_start: float = 0.98
    target_entropy_end: float = 0.1
    target_entropy_decay_steps: int = 150000
    label_smoothing: float = 0.1  # value/reward targets: (1 - eps) two-hot + eps / bins (upstream's phi_transform)
    # frame reconstruction from the latent (UniZero's optional latent_recon_loss, off upstream on Atari), MSE on
    # [0, 1] pixels through a ConvDecoder mirroring the encoder's stages (stride-2 stages only); 0: no decoder
    recon_coef: float = 0.0
    reward_clip: float = 1.0  # rewards clipped to [-c, c] in training (0: no clipping)
    # MuZero's absorbing states: the steps of a sequence after a terminal are the padding frame (zeros) with value
    # and reward targets 0, so the model learns what follows an episode's end and the search sees it; False: masked
    absorbing: bool = True
    lr: float = 1e-4  # AdamW learning rate
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 1e-4  # AdamW weight decay (upstream's nanoGPT groups: matrices, convs, embeddings only)
    decay_all: bool = False  # weight decay on every parameter (biases and norms too)
    # freeze the transformer after this many updates (0: never). Upstream's DPS at its first stage switch (50k
    # updates: min_stage0_iters, with max_stage_iters 20k passed) freezes the transformer's non-LoRA weights; its
    # optimizer holds only stage-0 parameters, so the LoRA adapters it switches on get gradients but never change:
    # the transformer just stops learning
    transformer_freeze_after: int = 50_000
    grad_clip: float = 5.0  # grad-norm clip
    target_decay: float = 0.95  # EMA of the target network per update: target = 0.95 target + 0.05 online
    batch_size: int = 512  # sequences per update, equal micro-batches per task (at least one each)
    context_steps: int = 4  # real (obs, action) steps before the root in the search's context
    simulations: int = 25  # MCTS simulations while collecting
    eval_simulations: int = 50  # MCTS simulations at evaluation
    c1: float = 1.25  # pUCT c1
    c2: float = 19652.0  # pUCT c2
    dirichlet_alpha: float = 0.3  # root noise concentration
    noise_weight: float = 0.25  # root noise mix
    temperature: float = 0.25  # visit-count temperature of sampled actions
    # the smallest span of a tree's Q values that min-max normalisation divides by (LightZero's value_delta_max)
    min_span: float = 0.01
    # the search's old conventions, each an ablation (mowbench.agents.mcts; upstream: LightZero's C++ tree)
    self_visit: bool = False  # pUCT's parent count 1 + sum N (mctx's; upstream: sum N)
    root_in_min_max: bool = True  # the root's gamma V in the min-max statistics (False: edge Qs only)
    visit_weighted_value: bool = False  # root value sum N Q / sum N (upstream: returns / (simulations + 1))
    bench_search_batches: tuple[int, ...] = (1, 26, 256)  # trees per search timed by mowbench.bench

    def check(self) -> None:
        self.check_positive(("latent_dim", "depth", "heads", "max_tokens", "n_experts", "expert_hidden",
                              "shared_hidden", "ffn", "head_hidden", "bins", "unroll_steps", "td_steps", "lr",
                              "grad_clip", "batch_size", "simulations", "eval_simulations", "c1", "c2",
                              "dirichlet_alpha"))
        self.check_non_negative(("alpha_lr", "target_entropy_decay_steps", "label_smoothing",
                                  "transformer_freeze_after", "dropout", "latent_coef", "reward_coef", "policy_coef",
                                  "value_coef",
                                  "entropy_coef", "recon_coef", "reward_clip", "weight_decay", "res_blocks",
                                  "context_steps", "temperature", "min_span"))
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r}; allowed: {', '.join(ROUTERS)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r}; allowed: {', '.join(ENCODERS)}")
        if self.vit_size not in ("auto", *VIT_SIZES):
            raise ValueError(f"vit_size={self.vit_size!r}; allowed: auto, {', '.join(VIT_SIZES)}")
        self.check_positive(("vit_patch", "vit_head_dim"))
        if not 0.0 <= self.vit_dropout < 1.0:
            raise ValueError(f"vit_dropout={self.vit_dropout}; allowed: 0 <= vit_dropout < 1")
        if self.latent_head not in ("upstream", "plain"):
            raise ValueError(f"latent_head={self.latent_head!r}; allowed: upstream, plain")
        if self.latent_dim % self.heads:
            raise ValueError(f"latent_dim={self.latent_dim}; allowed: a multiple of heads={self.heads}")
        if not self.channels or len(self.channels) != len(self.strides):
            raise ValueError(f"channels={list(self.channels)} and strides={list(self.strides)}; allowed: two "
                             "non-empty lists of one length")
        if self.recon_coef > 0 and any(s != 2 for s in self.strides):
            raise ValueError(f"recon_coef={self.recon_coef} with strides={list(self.strides)}; allowed: recon_coef=0 "
                             "or stride-2 stages only (the decoder mirrors them)")
        if self.bins % 2 == 0:
            raise ValueError(f"bins={self.bins}; allowed: an odd number (a support symmetric about 0)")
        if 2 * self.unroll_steps > self.max_tokens:
            raise ValueError(f"unroll_steps={self.unroll_steps} needs {2 * self.unroll_steps} tokens; allowed: "
                             f"2 x unroll_steps <= max_tokens={self.max_tokens}")
        if 2 * self.context_steps + 1 > self.max_tokens - 2:
            raise ValueError(f"context_steps={self.context_steps}; allowed: 2 x context_steps + 3 <= "
                             f"max_tokens={self.max_tokens} (the root window and one expansion)")
        for name in ("gamma", "target_decay", "noise_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 0 <= {name} <= 1")
        if len(self.betas) != 2:
            raise ValueError(f"betas={list(self.betas)}; allowed: two numbers")

    def check_image_size(self, image_size: int) -> None:
        if self.encoder == "vit":
            if image_size % self.vit_patch:
                raise ValueError(f"image_size={image_size}; allowed with encoder=vit: a multiple of vit_patch="
                                 f"{self.vit_patch}")
            return
        if self.encoder == "lightzero":
            if image_size % 8:
                raise ValueError(f"image_size={image_size}; allowed with encoder=lightzero: a multiple of 8")
            return
        resnet_out(image_size, tuple(self.strides))

    def check_suite(self, suite: str, discrete: bool) -> None:
        """Discrete actions only: refused before any env or network is built."""
        if not discrete:
            raise ValueError(f"env={suite} has continuous actions; scalezero searches over discrete actions; "
                             "allowed: env=atari100k, env=minatar")

    @property
    def batch_length(self) -> int:
        """Steps of a replayed sequence: the unroll and the n steps to its last bootstrap (the run's plan checks
        that warm-up and replay hold one)."""
        return self.unroll_steps + self.td_steps

    @property
    def window(self) -> int:
        """Token slots of a search node's window: the largest odd number <= max_tokens - 2 (a window ends with an
        obs token; an expansion appends an action token and the predicted latent)."""
        w = self.max_tokens - 2
        return w if w % 2 else w - 1


@dataclass
class ZeroContext(PicklesGenerator):
    """One env stream's acting state: task, the episode's last `context_steps` observations and actions before
    the current one, its noise generator (evaluation streams; None: torch's global one) and the last search's
    statistics (what step_extras stores)."""

    task: int
    obs: list[np.ndarray] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    rng: torch.Generator | None = None
    visits: np.ndarray | None = None
    root_value: float = 0.0


def n_step_targets(reward: torch.Tensor, terminal: torch.Tensor, in_episode: torch.Tensor, boot: torch.Tensor,
                   n: int, gamma: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n-step value targets of the first `steps` steps of replayed sequences and where they are defined.

    reward, terminal (B, L) with L >= steps + n; in_episode (B, L) 1.0 while a step is in the episode of step 0;
    boot (B, steps) the bootstrap values V(o_{t+n}). target_t = sum_{i<n} gamma^i r_{t+i} (steps in the episode)
    + gamma^n boot_t if o_{t+n} is in it. Defined where step t is in the episode and the window either reaches
    t + n in it or ends at a terminal; a truncation (episode end without a terminal) before t + n has no value
    to bootstrap from. Returns (B, steps) targets and (B, steps) 1.0/0.0 validity."""
    r = reward * in_episode
    disc = gamma ** torch.arange(n, dtype=reward.dtype, device=reward.device)  # (n,)
    windows = r.unfold(1, n, 1)[:, :steps]  # (B, steps, n): r_{t..t+n-1}
    ret = (windows * disc).sum(-1)
    alive_n = in_episode[:, n:n + steps]  # o_{t+n} in the episode
    ended = (terminal * in_episode).unfold(1, n, 1)[:, :steps].amax(-1)  # a terminal in t..t+n-1
    target = ret + (gamma ** n) * boot * alive_n
    valid = in_episode[:, :steps] * ((alive_n + ended) > 0).float()
    return target, valid


def absorbing_steps(terminal: torch.Tensor, in_episode: torch.Tensor) -> torch.Tensor:
    """1.0 at the steps after a terminal of step 0's episode (MuZero's absorbing states), else 0.0: terminal,
    in_episode (B, L) -> (B, L). A truncation (an episode end without a terminal) starts none."""
    term = terminal * in_episode
    return (torch.cumsum(term, 1) - term).clamp(max=1.0)


def decay_groups(model: torch.nn.Module, decay_all: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(decayed, not decayed) parameters as upstream's nanoGPT groups: weight decay on parameters of >= 2 dims
    (matrices, convs, embeddings, the encoder's LayerNorm over C x H x W), none on biases and LayerNorm vectors.
    Stacked modules (per-task heads, experts) carry a leading stack dimension that upstream's separate modules
    do not have: it is not counted."""
    stacked = {id(p) for m in model.modules() if isinstance(m, (StackedLinear, StackedNorm))
               for p in m.parameters(recurse=False)}
    decay, keep = [], []
    for p in model.parameters():
        dims = p.dim() - (id(p) in stacked)
        (decay if decay_all or dims >= 2 else keep).append(p)
    return decay, keep


def smoothed_support_ce(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor, eps: float) -> torch.Tensor:
    """support_ce against (1 - eps) two-hot(h(target)) + eps / bins (upstream's label smoothing): logits (..., n),
    target (...,) -> (...,). The uniform part adds eps x the mean negative log-probability over the bins."""
    log_p = F.log_softmax(logits.float(), -1)
    return (1.0 - eps) * support_ce(logits, target, bins) - eps * log_p.mean(-1)


@register_agent("scalezero-lite", ScaleZeroConfig, multi_task=True)
class ScaleZeroAgent(Autocast, Agent):
    """ScaleZero-lite (see the module docstring)."""

    def __init__(self, cfg: ScaleZeroConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        for t in tasks:  # the plan refuses them first; an agent built directly refuses them too
            cfg.check_suite(t.suite, t.action.discrete)
        self.cfg, self.tasks, self.device = cfg, tasks, device
        self.autocast_bf16 = precision == "bf16"
        self.n_actions = max(t.action.n for t in tasks)
        legal = np.zeros((len(tasks), self.n_actions), dtype=bool)
        for k, t in enumerate(tasks):
            legal[k, :t.action.n] = t.action.legal_mask()
        self.legal = torch.as_tensor(legal, device=device)  # (K, A)
        self.wm = UniZeroWorldModel(tasks[0].image_size, self.n_actions, len(tasks), cfg.latent_dim,
                                    tuple(cfg.channels), tuple(cfg.strides), cfg.res_blocks, cfg.depth, cfg.heads,
                                    cfg.max_tokens, cfg.dropout, cfg.moe, cfg.n_experts, cfg.expert_hidden,
                                    cfg.shared_hidden, cfg.router, cfg.ffn, cfg.head_hidden, cfg.bins,
                                    decoder=cfg.recon_coef > 0, encoder=cfg.encoder, ffn_dropout=cfg.ffn_dropout,
                                    latent_head=cfg.latent_head, vit=self.vit_sizes(len(tasks))).to(device)
        self.target = copy.deepcopy(self.wm).requires_grad_(False).eval()
        self.bins = support_bins(cfg.bins).to(device)
        decay, keep = decay_groups(self.wm, cfg.decay_all)
        self.optim = bumps_versions(torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=cfg.lr, betas=tuple(cfg.betas), fused=True))
        self.log_alpha = torch.zeros(1, device=device, requires_grad=True)  # adaptive entropy weight, log
        self.alpha_optim = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self.updates = 0

    def vit_sizes(self, n_tasks: int) -> dict[str, Any]:
        """The ViT encoder's sizes: upstream's 'base' for more than 8 tasks, else 'small' (vit_size=auto)."""
        cfg = self.cfg
        size = cfg.vit_size if cfg.vit_size != "auto" else ("base" if n_tasks > 8 else "small")
        return {**VIT_SIZES[size], "patch": cfg.vit_patch, "head_dim": cfg.vit_head_dim, "dropout": cfg.vit_dropout}

    # ---- acting ----
    def new_context(self, task: int, seed: int | None = None) -> ZeroContext:
        rng = None
        if seed is not None:
            rng = torch.Generator()
            rng.manual_seed(seed)
        return ZeroContext(task, rng=rng)

    def episode_start(self, context: ZeroContext) -> None:
        context.obs, context.actions = [], []

    def replay_fields(self) -> dict[str, StepField]:
        return {"first": StepField(), "visits": StepField((self.n_actions,)), "root_value": StepField()}

    def step_extras(self, context: ZeroContext) -> dict[str, Any]:
        return {"visits": context.visits, "root_value": context.root_value}

    def root_windows(self, contexts: list[ZeroContext], obs: list[np.ndarray]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stream's root window: its last context_steps (obs, action) steps of the episode and the current
        obs, encoded in one pass. Returns tokens (B, R, D) right-aligned (R = 2 context_steps + 1, left slots of
        short histories zero), the number of padded slots (B,) and the current latents (B, D)."""
        c, wm = self.cfg.context_steps, self.wm
        frames, counts = [], []
        for ctx, o in zip(contexts, obs, strict=True):
            past = ctx.obs[-c:] if c else []
            frames += [*past, o]
            counts.append(len(past))
        with self.autocast():
            z = wm.encode(torch.as_tensor(np.stack(frames), device=self.device)).float()  # (sum, D)
        b, r = len(contexts), 2 * c + 1
        tokens = torch.zeros(b, r, self.cfg.latent_dim, device=self.device)
        latents, start = [], 0
        for i, (ctx, n) in enumerate(zip(contexts, counts, strict=True)):
            zi = z[start:start + n + 1]  # (n + 1, D)
            start += n + 1
            if n:
                acts = torch.as_tensor(ctx.actions[-n:], device=self.device)
                tokens[i, r - 2 * n - 1:r - 1] = wm.interleave(zi[None, :n], acts[None])[0].float()
            tokens[i, -1] = zi[-1]
            latents.append(zi[-1])
        pads = torch.as_tensor([r - 2 * n - 1 for n in counts], device=self.device)
        return tokens, pads, torch.stack(latents)

    def run_window(self, tokens: torch.Tensor, pads: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """The transformer over right-aligned windows (B, W, D) with `pads` (B,) left slots of padding (positions
        start at each row's first real token, which nothing before it can see) -> h of the last token (B, D) and
        the cache, to which one more token can be appended."""
        cache = self.wm.transformer.empty_cache(tokens.shape[0], self.device, tokens.dtype, offset=pads)
        h = self.wm.transformer(tokens, cache)
        return h[:, -1], cache

    @torch.no_grad()
    def plan(self, contexts: list[ZeroContext], obs: list[np.ndarray], simulations: int, noise: bool
             ) -> SearchResult:
        """MCTS for every stream at once. Each tree's node table: node latents (B, N, D) and token windows (B, N, W)
        of ids into [root tokens | node latents | action embeddings] (-1: padding)."""
        cfg, wm = self.cfg, self.wm
        wm.eval()
        task = torch.as_tensor([c.task for c in contexts], device=self.device)
        legal = self.legal[task]  # (B, A)
        root_tokens, pads, z0 = self.root_windows(contexts, obs)
        b, r, d = root_tokens.shape
        n, a, w = simulations + 1, self.n_actions, cfg.window
        rows = torch.arange(b, device=self.device)
        with self.autocast():
            h, _ = self.run_window(root_tokens, pads)
            logits = wm.obs_heads(h[:, None], task)[0]  # (B, 1, A); the root's value enters no statistic
        actions = wm.action_embedding.weight.float()  # (A, D)
        table = torch.cat([root_tokens, torch.zeros(b, n, d, device=self.device), actions.expand(b, a, d)], 1)
        table[:, r] = z0
        ids = torch.arange(r, device=self.device).expand(b, r)
        ids = torch.where(ids >= pads[:, None], ids, -1)  # (B, R)
        root_win = F.pad(ids, (max(w - r, 0), 0), value=-1)[:, -w:]  # (B, W)
        windows = torch.full((b, n, w), -1, dtype=torch.long, device=self.device)
        windows[:, 0] = root_win

        def expand(parent: torch.Tensor, action: torch.Tensor, node: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            win = windows[rows, parent]  # (B, W)
            seq = torch.cat([win, (r + n + action)[:, None]], 1)  # (B, W + 1)
            tokens = table.gather(1, seq.clamp(min=0)[..., None].expand(b, w + 1, d))
            with self.autocast():
                h, cache = self.run_window(tokens, (seq < 0).sum(1))
                reward_logits, z_next = wm.action_heads(h[:, None], task)
                h2 = wm.transformer(z_next.to(tokens.dtype), cache)
                pol, val = wm.obs_heads(h2, task)
            table[:, r + node] = z_next[:, 0].float()
            windows[:, node] = torch.cat([win, (r + n + action)[:, None], torch.full_like(action, r + node)[:, None]],
                                         1)[:, 2:]
            return support_value(reward_logits[:, 0], self.bins), support_value(val[:, 0], self.bins), pol[:, 0]

        dirichlet = self.root_noise(legal) if noise else None
        ties = self.tie_draws(contexts, draws_needed(simulations)).to(self.device)
        return search(logits[:, 0], legal, expand, simulations, cfg.gamma, dirichlet, cfg.noise_weight, cfg.c1, cfg.c2,
                      ties, cfg.min_span, cfg.self_visit, cfg.root_in_min_max, cfg.visit_weighted_value)

    def root_noise(self, legal: torch.Tensor) -> torch.Tensor:
        """Dirichlet(alpha) root noise over each tree's legal actions (B, A) bool -> (B, A), 0 where illegal
        (upstream draws one over the legal actions). Its own method so that the verify replays upstream's draws."""
        conc = torch.full(legal.shape, self.cfg.dirichlet_alpha)
        dirichlet = torch.distributions.Dirichlet(conc).sample().to(legal.device) * legal
        return dirichlet / dirichlet.sum(-1, keepdim=True)

    def tie_draws(self, contexts: list[ZeroContext], k: int) -> torch.Tensor:
        """k tie draws per stream (B, k) int64 in [0, 2^31 - 1) (LightZero's rand() range), from each stream's own
        generator (evaluation) or torch's. Its own method so that the verify replays upstream's rand() outputs."""
        return torch.stack([torch.randint(0, 2**31 - 1, (k,), generator=c.rng) if c.rng is not None
                            else torch.randint(0, 2**31 - 1, (k,)) for c in contexts])

    @torch.inference_mode()  # acting: no autograd bookkeeping (see ImaginationAgent.act_batch)
    def act_batch(self, contexts: list[ZeroContext], obs: list[np.ndarray], greedy: bool = False) -> list[int]:
        evaluation = all(c.rng is not None for c in contexts)
        sims = self.cfg.eval_simulations if evaluation else self.cfg.simulations
        result = self.plan(contexts, obs, sims, noise=not evaluation)
        visits = result.visits.cpu()
        if greedy:
            chosen = visits.argmax(-1)
        else:
            u = torch.stack([torch.rand((), generator=c.rng) if c.rng is not None else torch.rand(())
                             for c in contexts])[:, None]  # (B, 1)
            chosen = sample_categorical(visit_policy(visits, self.cfg.temperature), u)
        policy = (visits / visits.sum(-1, keepdim=True)).numpy()
        values = result.value.cpu().tolist()
        out = chosen.tolist()
        for i, (ctx, o) in enumerate(zip(contexts, obs, strict=True)):
            ctx.visits, ctx.root_value = policy[i], values[i]
            ctx.obs = [*ctx.obs, o][-self.cfg.context_steps:] if self.cfg.context_steps else []
            ctx.actions = [*ctx.actions, out[i]][-self.cfg.context_steps:] if self.cfg.context_steps else []
        return out

    def act(self, context: ZeroContext, obs: np.ndarray, greedy: bool = False) -> int:
        return self.act_batch([context], [obs], greedy)[0]

    # ---- learning ----
    def batch_rows(self) -> int:
        """Sequences per update: batch_size rounded down to a multiple of the task count, at least one per task."""
        k = len(self.tasks)
        return max(k, self.cfg.batch_size // k * k)

    def per_task_batch(self) -> dict[str, int]:
        return {"sequences": self.batch_rows() // len(self.tasks),
                "sequence_length": self.cfg.batch_length}

    def task_sum(self, loss: torch.Tensor, mask: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Sum over tasks of each task's masked mean of loss (B, T): upstream sums the per-task micro-batch losses."""
        k = len(self.tasks)
        num = torch.zeros(k, device=loss.device).index_add_(0, task, (loss.float() * mask).sum(1))
        den = torch.zeros(k, device=loss.device).index_add_(0, task, mask.sum(1))
        return (num / den.clamp(min=1.0)).sum()

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, wm = self.cfg, self.wm
        t, n = cfg.unroll_steps, cfg.td_steps
        task = batch.task
        first = batch.extras["first"]  # (B, L)
        in_ep = torch.cat([torch.ones_like(first[:, :1]), torch.cumprod(1.0 - first[:, 1:], 1)], 1)  # (B, L)
        reward = batch.reward.float()
        if cfg.reward_clip:
            reward = reward.clamp(-cfg.reward_clip, cfg.reward_clip)
        action = batch.action.long()
        obs, absorbing = batch.obs, torch.zeros_like(in_ep)
        if cfg.absorbing:  # steps after a terminal of step 0's episode: the padding frame, value and reward 0
            absorbing = absorbing_steps(batch.terminal.float(), in_ep)  # (B, L)
            obs = torch.where(absorbing[..., None, None, None] > 0, torch.zeros_like(obs), obs)
        live = in_ep + absorbing  # (B, L): steps the model is trained on
        with torch.no_grad(), self.autocast():
            target_z = self.target.encode(obs[:, 1:t + 1]).float()  # (B, T, D)
            h_boot = self.target.transformer(self.target.interleave(self.target.encode(obs[:, n:n + t]),
                                                                    action[:, n:n + t]))
            boot = support_value(self.target.obs_heads(h_boot[:, 0::2], task)[1], self.bins)  # (B, T)
        value_target, value_valid = n_step_targets(reward, batch.terminal.float(), in_ep, boot, n, cfg.gamma, t)
        value_target = value_target * (1.0 - absorbing[:, :t])
        value_valid = torch.maximum(value_valid, absorbing[:, :t])
        with self.autocast():
            z = wm.encode(obs[:, :t])  # (B, T, D)
            h = wm.transformer(wm.interleave(z, action[:, :t]))  # (B, 2T, D)
            policy_logits, value_logits = wm.obs_heads(h[:, 0::2], task)
            reward_logits, z_pred = wm.action_heads(h[:, 1::2], task)
        step_valid = in_ep[:, :t]
        next_valid = live[:, 1:t + 1]  # o_{t+1} in the episode (or absorbing): the latent target exists
        visits = batch.extras["visits"][:, :t].float()  # (B, T, A)
        searched = step_valid * (visits.sum(-1) > 0).float()  # warm-up (random) steps have no search
        legal = batch.legal[:, None]  # (B, 1, A)
        log_pi = F.log_softmax(policy_logits.float().masked_fill(~legal, -1e9), -1)
        target_pi = visits / visits.sum(-1, keepdim=True).clamp(min=1e-8)
        entropy = -(log_pi.exp() * log_pi).sum(-1)  # (B, T)
        terms = {
            "latent": self.task_sum((z_pred.float() - target_z).pow(2).mean(-1), next_valid, task),
            "reward": self.task_sum(smoothed_support_ce(reward_logits, reward[:, :t] * in_ep[:, :t], self.bins,
                                                        cfg.label_smoothing), live[:, :t], task),
            "policy": self.task_sum(-(target_pi * log_pi).sum(-1), searched, task),
            "value": self.task_sum(smoothed_support_ce(value_logits, value_target, self.bins, cfg.label_smoothing),
                                   value_valid, task),
            "entropy": self.task_sum(entropy, searched, task),
        }
        if wm.decoder is not None:
            frames = wm.decoder(z.flatten(0, 1).float())  # (B*T, 3, S, S)
            target = obs[:, :t].flatten(0, 1).permute(0, 3, 1, 2).float() / 255.0
            recon = (frames.float() - target).pow(2).mean((1, 2, 3)).view(z.shape[:2])  # (B, T)
            terms["recon"] = self.task_sum(recon, torch.ones_like(recon), task)
        return terms

    def update(self, sample: Callable[[int, int], Batch]) -> Metrics:
        cfg = self.cfg
        self.wm.train()
        if cfg.transformer_freeze_after and self.updates >= cfg.transformer_freeze_after:
            # upstream's DPS stage switch (see the config): its transformer's blocks and final norm; the learned
            # positions are a module of their own upstream and go on learning
            self.wm.transformer.blocks.requires_grad_(False)
            self.wm.transformer.norm.requires_grad_(False)
        batch = sample(self.batch_rows(), cfg.batch_length)
        terms = self.losses(batch)

        def total(entropy_weight: float | torch.Tensor) -> torch.Tensor:
            return (cfg.latent_coef * terms["latent"] + cfg.reward_coef * terms["reward"] +
                    cfg.policy_coef * (terms["policy"] - entropy_weight * terms["entropy"]) +
                    cfg.value_coef * terms["value"] + cfg.recon_coef * terms.get("recon", 0.0))

        loss = total(cfg.entropy_coef)
        alpha_loss = None
        if cfg.adaptive_entropy:
            # upstream's default multi-task path: the fixed-weight total plus the same terms again with the
            # entropy weighted by alpha; every term counts twice (upstream's behaviour, kept as such)
            with torch.no_grad():
                self.log_alpha.clamp_(math.log(5e-3), math.log(10.0))
            alpha = self.log_alpha.exp().detach()
            progress = min(1.0, self.updates / max(cfg.target_entropy_decay_steps, 1))
            ratio = cfg.target_entropy_start * (1.0 - progress) + cfg.target_entropy_end * progress
            target_entropy = math.log(self.n_actions) * ratio
            mean_entropy = terms["entropy"].detach() / len(self.tasks)  # the per-task entropies' mean
            alpha_loss = (self.log_alpha * (mean_entropy - target_entropy)).sum()
            loss = loss + total(alpha[0])
            self.alpha_optim.zero_grad(set_to_none=True)
        self.optim.zero_grad(set_to_none=True)
        (loss if alpha_loss is None else loss + alpha_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm.parameters(), cfg.grad_clip)
        self.optim.step()
        if alpha_loss is not None:
            self.alpha_optim.step()
        ema_(self.target, self.wm, cfg.target_decay)
        self.updates += 1
        metrics: Metrics = {f"wm/{k}": v.detach() for k, v in terms.items()}
        metrics |= {"wm/loss": loss.detach(), "wm/grad_norm": grad_norm}
        if alpha_loss is not None:
            metrics |= {"wm/alpha": self.log_alpha.detach().exp()[0], "wm/alpha_loss": alpha_loss.detach()}
        counts = self.wm.transformer.expert_counts()
        if counts:  # the busiest expert's share of tokens, mean over layers (1 / n_experts: balanced; 1: collapsed)
            shares = torch.stack([c.float() / c.sum().clamp(min=1) for c in counts])
            metrics["moe/max_expert_share"] = shares.amax(-1).mean()
        return metrics

    # ---- bench ----
    def bench_phases(self, sample: Callable[[int, int], Batch]) -> dict[str, Callable[[], Any]]:
        return {"update": lambda: self.update(sample)}

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """Seconds per batched search and simulations per second at each of bench_search_batches trees (collect
        simulations, root noise on), and the active parameters per token."""
        out: dict[str, Any] = {"parameters_active_per_token": self.active_parameters()}
        size = self.tasks[0].image_size
        for trees in self.cfg.bench_search_batches:
            contexts = [self.new_context(i % len(self.tasks)) for i in range(trees)]
            rng = np.random.default_rng(0)
            obs = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(trees)]
            seconds = time(lambda c=contexts, o=obs: self.plan(c, o, self.cfg.simulations, noise=True))
            out[f"s_per_search_batch_{trees}"] = seconds
            out[f"search_sims_per_s_batch_{trees}"] = trees * self.cfg.simulations / seconds
        return out

    # ---- state ----
    def state_dict(self) -> dict[str, Any]:
        return {"wm": self.wm.state_dict(), "target": self.target.state_dict(), "optim": self.optim.state_dict(),
                "log_alpha": self.log_alpha.detach().clone(), "alpha_optim": self.alpha_optim.state_dict(),
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.target.load_state_dict(state["target"])
        self.optim.load_state_dict(state["optim"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.alpha_optim.load_state_dict(state["alpha_optim"])
        self.updates = int(state["updates"])

    def active_parameters(self) -> int:
        """Parameters one token passes through: all but the unchosen experts (n_experts - 1 per MoE layer),
        one task's heads (of K) and the action embedding's other rows; the decoder (training only) is not counted."""
        wm, cfg = self.wm, self.cfg
        decoder = count_parameters(wm.decoder.parameters()) if wm.decoder is not None else 0
        total = count_parameters(wm.parameters()) - decoder
        if cfg.moe:
            per_expert = 3 * cfg.latent_dim * cfg.expert_hidden
            total -= cfg.depth * (cfg.n_experts - 1) * per_expert
        heads = sum(count_parameters(h.parameters()) for h in (wm.policy_head, wm.value_head, wm.reward_head,
                                                                 wm.latent_head))
        total -= heads * (len(self.tasks) - 1) // len(self.tasks)
        return total - (self.n_actions - 1) * cfg.latent_dim

    def parameter_counts(self) -> dict[str, int]:
        wm = self.wm
        blocks = wm.transformer.blocks
        experts = sum(count_parameters([b.ffn.gate.weight, b.ffn.up.weight, b.ffn.down.weight]) for b in blocks
                      if self.cfg.moe)
        transformer = count_parameters(wm.transformer.parameters())
        counts = {"encoder": count_parameters(wm.encoder.parameters()),
                  "decoder": count_parameters(wm.decoder.parameters()) if wm.decoder is not None else 0,
                  "action_embedding": count_parameters(wm.action_embedding.parameters()),
                  "transformer_experts": experts, "transformer_other": transformer - experts,
                  "heads": sum(count_parameters(h.parameters()) for h in (wm.policy_head, wm.value_head,
                                                                          wm.reward_head, wm.latent_head))}
        return counts | {"total": sum(counts.values())}


# ---- mowbench.verify: replaying ScaleZero's upstream numbers (LightZero; mowbench/data/reference/scalezero) ----
VERIFY_REFERENCE = "scalezero"  # mowbench/data/reference/scalezero: recorded from LightZero's ScaleZero

# the reference's sizes as our config (SOURCES.md, "Sizes"): UniZero's ResNet option (the recorder's encoder),
# 2 tasks x 2 sequences, 4 unroll steps; td_steps 1 makes a replayed sequence the recorded 5 frames (upstream's
# value targets come from its buffer and are replayed, so the n of ours does not enter); reward_clip 0: upstream
# clips rewards in its Atari wrapper, not in the learner; the DPS stage switch before the third update
VERIFY_SIZES: dict[str, Any] = {
    "encoder": "lightzero", "channels": [4], "strides": [8], "res_blocks": 1, "latent_dim": 16, "depth": 2,
    "heads": 2, "max_tokens": 8, "n_experts": 8, "expert_hidden": 64, "shared_hidden": 64, "head_hidden": 16,
    "bins": 101, "unroll_steps": 4, "td_steps": 1, "context_steps": 2, "batch_size": 4, "reward_clip": 0.0,
    "recon_coef": 0.0, "dropout": 0.1, "transformer_freeze_after": 2, "simulations": 16,
}

TOLERANCES = {
    "fp32": "rtol 1e-5: fp32 rounding where our kernels add in another order (the fused qkv projection, stacked "
            "per-task heads and experts as grouped matmuls, scaled_dot_product_attention, the smoothed cross-entropy "
            "as (1 - eps) CE + eps mean(-log p), fused AdamW); measured over 3 updates: losses <= 1.1e-6, "
            "weights' sums of squares <= 1.4e-6, gradient norms <= 9.2e-6 (the head gradients pass through the "
            "latent head's LayerNorm of a near-zero input, which scales them by up to 1 / sqrt(1e-5)); the searches: "
            "predicted value 0, policy logits <= 2.4e-7, root value <= 2.9e-6 of the largest root edge value (a mean "
            "of returns of both signs)",
    "target": "rtol 1e-3: the target network's change is 0.05 of the online change (Adam steps of ~1e-4) held in "
              "weights ~1e4 times larger, so fp32 rounding of the weights (ulp ~6e-8 relative, both sides round the "
              "momentum update differently: upstream (1 - m) t + m s, ours lerp) is ~6e-3 of an element's change; "
              "over a module measured <= 3.9e-4",
    "exact": "equal or not: parameter counts, the dropout masks applied, root visit counts, the rand() draws a "
             "search consumes, the sampled action, the Dirichlet noise re-drawn from numpy's generator",
}
# rows not compared, and why (docs): each stands for a part of upstream that ours does not build
LEFT_OUT = {
    "transformer change sum of squares": "our experts are stacked in one tensor per projection and share one Adam "
    "state: an expert that gets no token in an update still takes an Adam step (its moments decay, weight decay "
    "applies); upstream's experts are separate parameters and skip the step (no gradient). Measured: 16% of the "
    "transformer's change after update 2. Its weights' sum of squares is compared",
    "update 3: transformer grad norm": "upstream's includes its LoRA adapters' gradients (DPS, not built; 0.05 "
    "against a total of 6.5e3, which is compared)",
    "target change where the online change is 0": "upstream's momentum update moves an unchanged module's target "
    "by fp32 rounding only (<= 1e-12)",
}
RTOL = 1e-5

# our parameter -> (how, upstream names): 'same' one tensor; 'cat' fused along dim 0 (q, k, v); 'stack' per-task
# or per-expert tensors stacked on a new dim 0; 'stackT' Linear weights (out, in) stacked as ours (n, in, out)
_ENC = "tokenizer.encoder.0."
_DS = _ENC + "downsample_net."


def _resblock(ours: str, up: str, skip: bool = False) -> dict[str, tuple[str, list[str]]]:
    names = {f"{ours}.conv{i}.{j}.{w}": ("same", [f"{up}.conv{i}.{j}.{w}"])
             for i in (1, 2) for j, ws in ((0, ("weight",)), (1, ("weight", "bias"))) for w in ws}
    if skip:
        names[f"{ours}.skip.weight"] = ("same", [f"{up}.conv3.0.weight"])
    return names


def upstream_names(depth: int, n_experts: int, n_tasks: int, res_blocks: int) -> dict[str, tuple[str, list[str]]]:
    """The explicit name map of the reference's sizes (UPSTREAM_NAMES is the one of the recorded model)."""
    m: dict[str, tuple[str, list[str]]] = {
        "encoder.conv1.weight": ("same", [_DS + "conv1.weight"]),
        "encoder.norm1.weight": ("same", [_DS + "norm1.weight"]), "encoder.norm1.bias": ("same", [_DS + "norm1.bias"]),
        **_resblock("encoder.stage.0", _DS + "resblocks1.0"),
        **_resblock("encoder.stage.1", _DS + "downsample_block", skip=True),
        **_resblock("encoder.stage.2", _DS + "resblocks2.0"),
        **_resblock("encoder.stage.4", _DS + "resblocks3.0"),
        "encoder.project.weight": ("same", [_ENC + "last_linear.weight"]),
        "encoder.norm.weight": ("same", [_ENC + "final_norm.weight"]),
        "encoder.norm.bias": ("same", [_ENC + "final_norm.bias"]),
        "action_embedding.weight": ("same", ["act_embedding_table.weight"]),
        "transformer.position.weight": ("same", ["pos_emb.weight"]),
        "transformer.norm.weight": ("same", ["transformer.ln_f.weight"]),
        "transformer.norm.bias": ("same", ["transformer.ln_f.bias"]),
    }
    for r in range(res_blocks):
        m |= _resblock(f"encoder.stage.{5 + r}", _ENC + f"resblocks.{r}")
    for i in range(depth):
        ours, up = f"transformer.blocks.{i}.", f"transformer.blocks.{i}."
        for w in ("weight", "bias"):
            m[ours + f"norm1.{w}"] = ("same", [up + f"ln1.{w}"])
            m[ours + f"norm2.{w}"] = ("same", [up + f"ln2.{w}"])
            m[ours + f"qkv.{w}"] = ("cat", [up + f"attn.{n}.{w}" for n in ("query", "key", "value")])
            m[ours + f"out.{w}"] = ("same", [up + f"attn.proj.{w}"])
            m[ours + f"ffn.shared.0.{w}"] = ("same", [up + f"feed_forward.shared_expert.0.{w}"])
            m[ours + f"ffn.shared.2.{w}"] = ("same", [up + f"feed_forward.shared_expert.2.{w}"])
        m[ours + "ffn.router.weight"] = ("same", [up + "feed_forward.gate.weight"])
        for ours_w, up_w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            m[ours + f"ffn.{ours_w}.weight"] = ("stackT", [up + f"feed_forward.experts.{j}.{up_w}.weight"
                                                          for j in range(n_experts)])
    for ours, up in (("policy_head", "head_policy"), ("value_head", "head_value"), ("reward_head", "head_rewards"),
                     ("latent_head", "head_observations")):
        layers = [("norm_in", 0, "stack", ("weight", "bias")), ("hidden", 1, "stackT", ("weight",)),
                  ("hidden", 1, "stack", ("bias",)), ("norm_hidden", 2, "stack", ("weight", "bias")),
                  ("out", 4, "stackT", ("weight",)), ("out", 4, "stack", ("bias",))]
        if ours == "latent_head":
            layers.append(("norm_out", 5, "stack", ("weight", "bias")))
        for layer, idx, how, ws in layers:
            for w in ws:
                m[f"{ours}.{layer}.{w}"] = (how, [f"{up}_multi_task.{k}.head_module.{idx}.{w}" for k in range(n_tasks)])
    return m


UPSTREAM_NAMES = upstream_names(2, 8, 2, 1)
# upstream's checksum groups (its WorldModelMT's top-level modules) -> the prefixes of our parameters in them
OUR_GROUPS = {"tokenizer": ("encoder.",), "pos_emb": ("transformer.position.",),
              "act_embedding_table": ("action_embedding.",),
              "transformer": tuple(f"transformer.{n}" for n in ("blocks.", "norm.")),
              "head_dict": ("policy_head.", "value_head.", "reward_head.", "latent_head.")}


def from_upstream(init: dict[str, torch.Tensor], names: dict[str, tuple[str, list[str]]]) -> dict[str, torch.Tensor]:
    """Upstream's state (its names) -> our parameters (our names) through the name map."""
    out = {}
    for ours, (how, ups) in names.items():
        ts = [init[u].float() for u in ups]
        if how == "same":
            out[ours] = ts[0]
        elif how == "cat":
            out[ours] = torch.cat(ts)
        else:
            out[ours] = torch.stack([t.T for t in ts] if how == "stackT" else ts)
    return out


def to_upstream(ours: dict[str, torch.Tensor], init: dict[str, torch.Tensor],
                names: dict[str, tuple[str, list[str]]]) -> dict[str, torch.Tensor]:
    """Our parameters as upstream's state: every key of upstream's `init`, ours where mapped, else init's (buffers
    such as the attention masks, and what upstream never trains: the LoRA adapters and scales, the single-task
    heads). Upstream's aliases (head_dict.*, blocks.i.experts.j, the same modules under a second name) included."""
    state = dict(init)
    for name, (how, ups) in names.items():
        t = ours[name].detach()
        if how == "same":
            parts = [t]
        elif how == "cat":
            parts = list(t.chunk(len(ups)))
        else:
            parts = [x.T for x in t.unbind(0)] if how == "stackT" else list(t.unbind(0))
        for u, p in zip(ups, parts, strict=True):
            state[u] = p
    for key in init:
        if key.startswith("head_dict."):  # head_dict.X is X
            state[key] = state[key[len("head_dict."):]]
        if ".experts." in key and ".feed_forward." not in key:  # blocks.i.experts.j = blocks.i.feed_forward.experts.j
            state[key] = state[key.replace(".experts.", ".feed_forward.experts.", 1)]
    return state


def upstream_checksums(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """As the recorder: per top-level module, float64 sum and sum of squares of the weights and of their change."""
    out = {}
    for group in sorted({k.split(".")[0] for k in state}):
        keys = [k for k in state if k.split(".")[0] == group and state[k].is_floating_point()]
        flat = torch.cat([state[k].double().flatten() for k in keys])
        change = torch.cat([(state[k].double() - init[k].double()).flatten() for k in keys])
        out[group] = torch.stack([flat.sum(), flat.pow(2).sum()])
        out[group + "/change"] = torch.stack([change.sum(), change.pow(2).sum()])
    return out


class ReplayedDropout(torch.nn.Module):
    """Dropout with recorded keep masks in call order (shared by every site of a model): x * keep / (1 - p)."""

    def __init__(self, p: float, masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.p, self.masks = p, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = self.masks.pop(0)
        return x * keep.to(x.dtype) / (1.0 - self.p)


def verify_reference(reference: dict[str, Any], agent_values: dict[str, Any]) -> tuple[list[Any], dict[str, str]]:
    """mowbench.verify's hook: upstream's initial weights, three updates (fixed 2-task batches, upstream's dropout
    masks and value targets; the third after the DPS stage switch), then one collect search per task (search_rows)
    replayed through ours -> (rows, reasons)."""
    import sys

    from mowbench.agents.base import build_config, get_agent
    from mowbench.envs.base import ActionSpace
    from mowbench.models import unizero
    from mowbench.models.transformer import attend as sdpa_attend
    from mowbench.verify import Row, scalar_row

    module = sys.modules[__name__]
    s = reference["sizes"]
    cfg = build_config(get_agent("scalezero-lite"), {**agent_values, **VERIFY_SIZES})
    k_tasks, a = s["tasks"], s["actions"]
    infos = [TaskInfo("atari100k", f"upstream{k}", k, s["image_size"], ActionSpace(True, a)) for k in range(k_tasks)]
    torch.manual_seed(0)
    agent = ScaleZeroAgent(cfg, infos, torch.device("cpu"), "fp32")
    wm, init = agent.wm, reference["init"]
    ours_params = dict(wm.named_parameters())
    # the map of the reference's sizes, less what an ablation's model lacks (the plain latent head's affine norm)
    names = {k: v for k, v in upstream_names(cfg.depth, cfg.n_experts, k_tasks, cfg.res_blocks).items()
             if k in ours_params}
    rows: list[Row] = []
    mapped = sum(init[u].numel() for _, ups in names.values() for u in ups)
    rows.append(scalar_row("world model parameters (mapped)", mapped, count_parameters(wm.parameters()), 0.0,
                           "exact"))
    try:
        loaded = from_upstream(init, names)
        missing = sorted(set(ours_params) - set(loaded))
        if missing:
            raise KeyError(f"ours without upstream: {', '.join(missing[:3])}")
        with torch.no_grad():
            for n, p in ours_params.items():
                p.copy_(loaded[n])
            agent.target.load_state_dict(wm.state_dict())
    except (RuntimeError, KeyError) as err:
        rows.append(Row(f"upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                        float("nan"), float("inf"), 0.0, "exact"))
        return rows, TOLERANCES
    p_drop = cfg.dropout
    queue: list[torch.Tensor] = []

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any, layer: int, mask: Any,
               dropout: float = 0.0) -> torch.Tensor:
        """Causal attention with upstream's recorded keep masks on the probabilities (training passes only)."""
        if dropout == 0.0 or cache is not None:
            return sdpa_attend(q, k, v, cache, layer, mask, dropout)
        t = q.shape[2]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        att = att * queue.pop(0).to(att.dtype) / (1.0 - dropout)
        return att @ v

    per_task: list[torch.Tensor] = []

    def task_sum(loss: torch.Tensor, mask: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """ScaleZeroAgent.task_sum, keeping each task's masked mean."""
        num = torch.zeros(k_tasks).index_add_(0, task, (loss.float() * mask).sum(1))
        den = torch.zeros(k_tasks).index_add_(0, task, mask.sum(1))
        per_task.append((num / den.clamp(min=1.0)).detach())
        return (num / den.clamp(min=1.0)).sum()

    grads: dict[str, torch.Tensor] = {}
    clip = torch.nn.utils.clip_grad_norm_

    def clip_recorded(params: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Per upstream module: the grad norm before clipping (as the recorder's wrapper)."""
        grads.clear()
        for group, prefixes in OUR_GROUPS.items():
            sq = [p.grad.double().pow(2).sum() for n, p in wm.named_parameters()
                  if p.grad is not None and n.startswith(prefixes)]
            grads[group] = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), dtype=torch.float64)
        return clip(params, max_norm, *args, **kwargs)

    value_targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    agent.task_sum = task_sum  # type: ignore[method-assign]
    drops = [wm.transformer.drop, *(b.drop for b in wm.transformer.blocks)]
    replayed = ReplayedDropout(p_drop, queue)
    module_n_step, unizero_attend = module.n_step_targets, unizero.attend
    module.n_step_targets = lambda *args, **kwargs: value_targets.pop(0)
    unizero.attend = attend
    torch.nn.utils.clip_grad_norm_ = clip_recorded
    wm.transformer.drop = replayed
    for b in wm.transformer.blocks:
        b.drop = replayed
    t = s["unroll_steps"]
    try:
        for u, upd in enumerate(reference["updates"]):
            tag = f"update {u + 1}"
            tasks = upd["tasks"]
            frames = torch.cat([x["frames"] for x in tasks])  # (B, T+1, 3, 8, 8)
            f = s["image_size"] // s["obs_base"]
            obs = frames.repeat_interleave(f, 3).repeat_interleave(f, 4).permute(0, 1, 3, 4, 2).contiguous()
            mask = torch.cat([x["mask"] for x in tasks])  # (B, T+1)
            b = mask.shape[0]
            # upstream's padding mask as episode starts: step t+1 (past the unroll) and the first padded step
            first = torch.zeros(b, t + 1)
            first[:, t] = 1.0
            first = torch.maximum(first, (mask == 0).float() * (torch.cumsum((mask == 0).float(), 1) == 1).float())
            action = torch.zeros(b, t + 1, dtype=torch.long)
            action[:, :t] = torch.cat([x["action"] for x in tasks])
            batch = Batch(obs, action, torch.cat([x["target_reward"] for x in tasks]), torch.zeros(b, t + 1),
                          torch.arange(k_tasks).repeat_interleave(b // k_tasks), torch.ones(b, a, dtype=torch.bool),
                          extras={"first": first, "visits": torch.cat([x["target_policy"] for x in tasks])},
                          task_counts=(b // k_tasks,) * k_tasks)
            value_targets.append((torch.cat([x["target_value"] for x in tasks])[:, :t], mask[:, :t]))
            # upstream's masks per task in call order (LoRA dropouts: the adapters, not built, add 0 at stage 1)
            sites = [(n, m) for n, m in zip(upd["dropout_sites"], upd["dropout_keep"], strict=True)
                     if "lora_dropout" not in n]
            per = len(sites) // k_tasks
            queue[:] = [torch.cat([sites[j * per + i][1] for j in range(k_tasks)]) for i in range(per)]
            n_masks = len(queue)
            per_task.clear()
            metrics = agent.update(lambda n, length, batch=batch: batch)
            log = upd["log"]
            rows.append(scalar_row(f"{tag}: dropout masks applied", n_masks, n_masks - len(queue), 0.0, "exact"))
            latent, reward, policy, value, entropy = per_task
            for k in range(k_tasks):
                for what, ours_v in (("obs", latent), ("reward", reward), ("value", value),
                                     ("orig_policy", policy), ("policy_entropy", entropy)):
                    rows.append(scalar_row(f"{tag}: task {k} {what} loss".replace("entropy loss", "entropy"),
                                           log[f"noreduce_{what}_loss_task{k}".replace("entropy_loss", "entropy")],
                                           ours_v[k], RTOL, "fp32"))
                rows.append(scalar_row(f"{tag}: task {k} policy loss (with entropy bonus)",
                                       log[f"noreduce_policy_loss_task{k}"],
                                       policy[k] - cfg.entropy_coef * entropy[k], RTOL, "fp32"))
            rows += [scalar_row(f"{tag}: total loss", log["weighted_total_loss"], metrics["wm/loss"], RTOL, "fp32"),
                     scalar_row(f"{tag}: grad norm before clipping", log["total_grad_norm_before_clip_wm"],
                                metrics["wm/grad_norm"], RTOL, "fp32")]
            for group in OUR_GROUPS:
                if group == "transformer" and upd["stage"] > 0:
                    continue  # upstream's includes its LoRA adapters' gradients (not built)
                rows.append(scalar_row(f"{tag}: {group} grad norm before clipping", upd["grad_norm"][group],
                                       grads[group], RTOL, "fp32", floor=1e-3))
            rows.append(scalar_row(f"{tag}: entropy log-alpha", upd["log_alpha"], agent.log_alpha.detach(), RTOL,
                                   "fp32"))
            for which, model, up_sums in (("", wm, upd["checksums"]), ("target ", agent.target,
                                                                         upd["target_checksums"])):
                ours_sums = upstream_checksums(to_upstream(dict(model.named_parameters()), init, names), init)
                for group in OUR_GROUPS:
                    rows.append(scalar_row(f"{tag}: {which}{group} weights sum of squares", up_sums[group][1],
                                           ours_sums[group][1], RTOL, "fp32"))
                    if group == "transformer" or not float(upd["checksums"][group + "/change"][1]):
                        continue  # LEFT_OUT
                    rows.append(scalar_row(f"{tag}: {which}{group} change sum of squares",
                                           up_sums[group + "/change"][1], ours_sums[group + "/change"][1],
                                           1e-3 if which else RTOL, "target" if which else "fp32"))
    except (RuntimeError, IndexError, ValueError) as err:
        rows.append(Row(f"updates replayed ({str(err).splitlines()[0][:80]})", float("nan"), float("nan"),
                        float("inf"), 0.0, "exact"))
    finally:
        module.n_step_targets, unizero.attend = module_n_step, unizero_attend
        torch.nn.utils.clip_grad_norm_ = clip
        del agent.task_sum
        wm.transformer.drop = drops[0]
        for blk, d in zip(wm.transformer.blocks, drops[1:], strict=True):
            blk.drop = d
    rows += search_rows(agent, reference, names)
    rows += vit_rows()
    return rows, TOLERANCES


# upstream's ViT (lzero/model/vit.py) parameter names -> ours (mowbench.models.unizero.ViTEncoder)
VIT_NAMES = (
    (r"pos_embedding", "position"), (r"cls_token", "cls"),
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_norm_out.\1"),
    (r"transformer\.norm\.(weight|bias)", r"norm.\1"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.attn_norm.\2"),
    (r"transformer\.layers\.(\d+)\.0\.to_qkv\.weight", r"blocks.\1.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_out\.0\.(weight|bias)", r"blocks.\1.attn_out.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.0\.(weight|bias)", r"blocks.\1.ff_norm.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.1\.(weight|bias)", r"blocks.\1.ff_in.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.4\.(weight|bias)", r"blocks.\1.ff_out.\2"),
    (r"last_linear\.(weight|bias)", r"project.\1"), (r"final_norm\.(weight|bias)", r"out_norm.\1"),
)


def vit_rows() -> list[Any]:
    """Upstream's ViT encoder (mowbench/data/reference/scalezero/vit.pt: LightZero's ViT at small sizes, LoRA off as
    the Atari multi-task config leaves it) through ours with its weights: the patch embeddings, the transformer's
    tokens, the head before and after its LayerNorm (eval mode), the output with dropout active from upstream's
    seed (train mode: the same draws in the same order), and the parameter counts of upstream's two sizes at 768
    outputs."""
    import re

    from mowbench.models.unizero import VIT_SIZES, ViTEncoder
    from mowbench.verify import REFERENCE_DIR, Row, scalar_row, tensor_row

    ref = torch.load(REFERENCE_DIR / "scalezero" / "vit.pt", map_location="cpu", weights_only=True)
    c = ref["config"]
    rows: list[Row] = []
    for size in ("small", "base"):
        v = VIT_SIZES[size]
        with torch.device("meta"):  # counted, never computed: no memory for their 26.8M and 85.8M weights
            ours = ViTEncoder(64, 8, v["dim"], v["depth"], v["heads"], 64, v["mlp"], 768, 0.1, 0.1)
        rows.append(scalar_row(f"vit {size} parameters (768 out)", ref[f"param_count_{size}_768"],
                               count_parameters(ours.parameters()), 0.0, "exact"))
    torch.manual_seed(0)
    vit = ViTEncoder(c["image_size"], c["patch_size"], c["dim"], c["depth"], c["heads"], c["dim_head"], c["mlp_dim"],
                     c["num_classes"], c["dropout"], c["emb_dropout"])
    state = {}
    for name, value in ref["state_dict"].items():
        ours_name = next((re.sub(p, t, name) for p, t in VIT_NAMES if re.fullmatch(p, name)), name)
        state[ours_name] = value
    try:
        vit.load_state_dict(state)
    except RuntimeError as err:
        return rows + [Row(f"vit: upstream weights load into ours ({str(err).splitlines()[0][:80]})", float("nan"),
                           float("nan"), float("inf"), 0.0, "exact")]
    x = ref["input"].permute(0, 2, 3, 1).contiguous()  # upstream's (B, 3, S, S) in [0, 1] -> ours (B, S, S, 3)
    vit.eval()
    with torch.no_grad():
        patches = vit.patches(x)
        tokens = vit.tokens(patches)
        pre_norm = vit.project(tokens[:, 0])
        out = vit.out_norm(pre_norm)
        vit.train()
        torch.manual_seed(c["train_forward_seed"])
        train_out = vit.head(vit.tokens(vit.patches(x)))
    rows += [tensor_row("vit: patch embeddings", ref["patch_embeddings"], patches, RTOL, "fp32"),
             tensor_row("vit: transformer tokens (normalised)", ref["transformer_tokens"], tokens, RTOL, "fp32"),
             tensor_row("vit: head before its LayerNorm", ref["head_pre_norm"], pre_norm, RTOL, "fp32"),
             tensor_row("vit: output (eval)", ref["output_eval"], out, RTOL, "fp32"),
             tensor_row("vit: output (train, dropout from upstream's seed)", ref["output_train_seed2"], train_out,
                        RTOL, "fp32")]
    return rows


def upstream_context_expand(agent: ScaleZeroAgent, init: dict[str, torch.Tensor], task: torch.Tensor,
                            z0: torch.Tensor, nodes: int) -> tuple[Any, torch.Tensor]:
    """The model side of upstream's search at the reference's sizes (our model's weights, upstream's context):
    with context_length 4 every expansion sees one cached token, its parent's latent, then the action (position 1)
    and the new latent (position 2); the new node's cache keeps only that latent, its keys and values moved from
    position 2 to 0 by adding key/value projections of pos_emb[0] - pos_emb[2] from the construction weights
    (UniZero's update_cache_context and precompute_pos_emb_diff_kv: exact at no layer, and stale after training).
    Ours recomputes every node's window exactly (plan); to compare the trees, the verify expands as upstream does.
    z0 (B, D) root latents -> (expand for mowbench.agents.mcts.search, root policy logits (B, A))."""
    cfg, wm = agent.cfg, agent.wm
    heads, width = cfg.heads, cfg.latent_dim
    pos = init["pos_emb.weight"].float()
    shift = {w: torch.stack([((pos[0] - pos[2]) @ init[f"transformer.blocks.{i}.attn.{w}.weight"].float().T)
                             .view(heads, width // heads) for i in range(cfg.depth)]) for w in ("key", "value")}
    b = z0.shape[0]
    node_k = torch.zeros(nodes, cfg.depth, b, heads, width // heads)  # each node's one cached token per layer
    node_v = torch.zeros_like(node_k)
    rows = torch.arange(b)
    cache = wm.transformer.empty_cache(b, z0.device, torch.float32)
    logits, _ = wm.obs_heads(wm.transformer(z0[:, None], cache), task)  # (B, 1, A)
    node_k[0], node_v[0] = cache.k[:, :, :, 0], cache.v[:, :, :, 0]  # the root's z0 at position 0, exact

    def expand(parent: torch.Tensor, action: torch.Tensor, node: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
        cache = wm.transformer.empty_cache(b, z0.device, torch.float32)
        cache.k[:, :, :, 0] = node_k[parent, :, rows].transpose(0, 1)  # (L, B, H, d)
        cache.v[:, :, :, 0] = node_v[parent, :, rows].transpose(0, 1)
        cache.length = 1
        h = wm.transformer(wm.action_embedding(action)[:, None], cache)  # (B, 1, D) at position 1
        reward_logits, z_next = wm.action_heads(h, task)
        pol, val = wm.obs_heads(wm.transformer(z_next, cache), task)  # the new latent at position 2
        node_k[node] = cache.k[:, :, :, 2] + shift["key"][:, None]
        node_v[node] = cache.v[:, :, :, 2] + shift["value"][:, None]
        return support_value(reward_logits[:, 0], agent.bins), support_value(val[:, 0], agent.bins), pol[:, 0]

    return expand, logits[:, 0]


def search_rows(agent: ScaleZeroAgent, reference: dict[str, Any], names: dict[str, tuple[str, list[str]]]
                ) -> list[Any]:
    """Upstream's collect search per task replayed through our tree (mowbench.agents.mcts.search at the agent's
    settings): the updated model with the recorded last layers of the policy, value and reward heads
    (`search_weights`), the task's frame, the recorded Dirichlet noise, upstream's rand() outputs as the tie draws,
    expansions with upstream's one-token context (upstream_context_expand), and act_batch's sampling with upstream's
    uniform (not recorded: re-drawn from numpy's generator as the recorder seeded it, 300 + task, after the
    Dirichlet draw, which the noise row checks) -> rows."""
    from mowbench.verify import Row, exact_row, scalar_row, tensor_row

    s, wm = reference["sizes"], agent.wm
    if s["context_length"] != 4:  # upstream_context_expand builds the one-token context of context_length 4
        return [Row(f"searches replayed (context_length {s['context_length']}, not 4)", float("nan"), float("nan"),
                    float("inf"), 0.0, "exact")]
    wm.eval()  # as upstream's collect (the updates left it in training mode: dropout)
    up = to_upstream(dict(wm.named_parameters()), reference["init"], names)
    up |= {k: v.float() for k, v in reference["search_weights"].items()}
    loaded = from_upstream(up, names)
    with torch.no_grad():
        for n, p in wm.named_parameters():
            if n.endswith((".out.weight", ".out.bias")) and n.split(".")[0] != "latent_head":
                p.copy_(loaded[n])
    f = s["image_size"] // s["obs_base"]
    k_draws = draws_needed(agent.cfg.simulations)
    rows = []
    for k, rec in enumerate(reference["searches"]):
        tag = f"search task {k}"
        # (3, 8, 8) uint8 -> the (64, 64, 3) frame our agent acts on (upstream: the same frame / 255)
        obs = reference["search_frames"][k].repeat_interleave(f, 1).repeat_interleave(f, 2).permute(1, 2, 0).numpy()
        ctx = agent.new_context(k)
        with torch.no_grad():
            tokens, pads, _ = agent.root_windows([ctx], [obs])
            h, _ = agent.run_window(tokens, pads)
            logits, value = wm.obs_heads(h[:, None], torch.tensor([k]))  # (1, 1, A), (1, 1, bins)
        rows += [scalar_row(f"{tag}: predicted value", rec["predicted_value"], support_value(value[0], agent.bins),
                            RTOL, "fp32"),
                 tensor_row(f"{tag}: predicted policy logits", rec["predicted_policy_logits"], logits[0, 0], RTOL,
                            "fp32")]
        gen = np.random.RandomState(300 + k)
        redrawn = torch.as_tensor(gen.dirichlet([agent.cfg.dirichlet_alpha] * s["actions"]), dtype=torch.float32)
        u = torch.tensor(gen.random_sample(), dtype=torch.float32)  # np.random.choice's one uniform
        rows.append(tensor_row(f"{tag}: root noise re-drawn from numpy (the action draw follows it)", rec["noise"],
                               redrawn, 0.0, "exact"))
        ties = torch.zeros(1, k_draws, dtype=torch.long)
        ties[0, :len(rec["tie_rand"])] = rec["tie_rand"]
        cfg = agent.cfg
        with torch.no_grad():
            z0 = wm.encode(torch.as_tensor(obs[None])).float()  # (1, D)
            expand, root_logits = upstream_context_expand(agent, reference["init"], torch.tensor([k]), z0,
                                                          cfg.simulations + 1)
        result = search(root_logits, agent.legal[[k]], expand, cfg.simulations, cfg.gamma, rec["noise"][None],
                        cfg.noise_weight, cfg.c1, cfg.c2, ties, cfg.min_span, cfg.self_visit, cfg.root_in_min_max,
                        cfg.visit_weighted_value)
        # act_batch's sampling (visit_policy at the temperature, inverse CDF) with upstream's uniform
        action = int(sample_categorical(visit_policy(result.visits, cfg.temperature), u[None, None])[0])
        rows += [exact_row(f"{tag}: root visit counts", rec["visits"], result.visits[0], "exact"),
                 exact_row(f"{tag}: rand() draws consumed", torch.tensor(len(rec["tie_rand"])),
                           result.draws_used[0], "exact"),
                 # the mean of returns of both signs (task 1: 0.25 from edge values up to ~10 in size): relative
                 # to the largest root edge value, the scale its fp32 rounding has
                 scalar_row(f"{tag}: root value", rec["root_value"], result.value[0], RTOL, "fp32",
                            floor=float(result.q.abs().max())),
                 exact_row(f"{tag}: sampled action (temperature {agent.cfg.temperature})", torch.tensor(rec["action"]),
                           torch.tensor(action), "exact")]
    return rows
