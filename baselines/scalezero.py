"""ScaleZero-lite: ScaleZero ("One Model for All Tasks", opendilab/LightZero; a UniZero world model with
mixture-of-experts feed-forward layers) as a mowbench baseline on Atari 100k and MinAtar. Facts from spec
baselines.md; the world model is mowbench.models.unizero, the planner mowbench.agents.mcts.

One causal transformer over (latent obs, action) tokens, MoE feed-forward layers (top-1 SwiGLU experts plus a
shared expert), per-task policy/value/reward/next-latent heads and no task embedding. Trained on 10-step
replayed sequences (teacher-forced: every obs token is the encoder's latent of the real frame): latent MSE to a
target encoder's next latent (x10), reward CE (x1), policy CE to the stored MCTS visit distribution (x1, entropy
bonus 1e-4), value CE to a 5-step TD target bootstrapped from the EMA target network's value (x0.5); 101-bin
supports after MuZero's scalar transform; AdamW 1e-4, betas (0.9, 0.95), weight decay 1e-4, clip 5; each update
sums equal per-task micro-batches (batch_size rows in all); target = EMA 0.95 of the online weights per update.
Acting: a batched tensor MCTS per env step, 25 simulations while collecting and 50 at evaluation.

Deviations from upstream (each named in the README):
- DPS (dynamic parameter scaling, LoRA stages) is left out: its first stage switch comes after >= 50k updates,
  which a 100k-step-per-game run barely reaches; and it is broken on upstream's current main (spec).
- The encoder is a ResNet (GroupNorm instead of BatchNorm: no batch statistics between acting and training), not
  the paper's ViT, which serves its 400k-step budget.
- router='learned' (default): upstream's router takes the softmax over the single selected logit, a weight of
  1, so it never learns; ours weights the chosen expert by the softmax over all logits. router='upstream' keeps
  upstream's behaviour.
- The search context is recomputed exactly instead of cached: every expansion runs the transformer over the
  node's token window (the last `context_steps` real steps, then the tree path, at most max_tokens - 2 tokens,
  oldest (obs, action) pairs dropped first), at window-relative positions as in training.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mowbench.agents.base import Agent, Metrics, PicklesGenerator, bumps_versions, count_parameters, register_agent
from mowbench.agents.imagination import check_non_negative, check_positive
from mowbench.agents.mcts import SearchResult, search, visit_policy
from mowbench.envs.base import TaskInfo
from mowbench.models.transformer import KVCache
from mowbench.models.unizero import ROUTERS, UniZeroWorldModel, resnet_out
from mowbench.ops import ema_, sample_categorical, support_bins, support_ce, support_value
from mowbench.replay import Batch, StepField


@dataclass
class ScaleZeroConfig:
    """ScaleZero-lite's hyperparameters; defaults are the paper's (spec baselines.md) = the `paper` preset."""

    latent_dim: int = 768  # transformer width D = latent size
    depth: int = 4  # transformer blocks
    heads: int = 24  # attention heads
    max_tokens: int = 20  # learned positions: 10 steps of (obs, action) tokens
    dropout: float = 0.1  # transformer dropout
    moe: bool = True  # MoE feed-forward layers (False: dense, the paper's "no MoE" ablation)
    n_experts: int = 8  # SwiGLU experts per MoE layer (top-1 routing)
    expert_hidden: int = 3072  # SwiGLU hidden size of an expert
    shared_hidden: int = 3072  # hidden size of the always-on shared expert (Linear-GELU-Linear)
    router: str = "learned"  # learned (softmax over all logits) | upstream (softmax over the chosen one: no grad)
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
    # frame reconstruction from the latent (UniZero's optional latent_recon_loss, off upstream on Atari), MSE on
    # [0, 1] pixels through a ConvDecoder mirroring the encoder's stages (stride-2 stages only); 0: no decoder
    recon_coef: float = 0.0
    reward_clip: float = 1.0  # rewards clipped to [-c, c] in training (0: no clipping)
    # MuZero's absorbing states: the steps of a sequence after a terminal are the padding frame (zeros) with value
    # and reward targets 0, so the model learns what follows an episode's end and the search sees it; False: masked
    absorbing: bool = True
    lr: float = 1e-4  # AdamW learning rate
    betas: tuple[float, ...] = (0.9, 0.95)  # AdamW betas
    weight_decay: float = 1e-4  # AdamW weight decay
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
    bench_search_batches: tuple[int, ...] = (1, 26, 256)  # trees per search timed by mowbench.bench

    def check(self) -> None:
        check_positive(self, ("latent_dim", "depth", "heads", "max_tokens", "n_experts", "expert_hidden",
                              "shared_hidden", "ffn", "head_hidden", "bins", "unroll_steps", "td_steps", "lr",
                              "grad_clip", "batch_size", "simulations", "eval_simulations", "c1", "c2",
                              "dirichlet_alpha"))
        check_non_negative(self, ("dropout", "latent_coef", "reward_coef", "policy_coef", "value_coef",
                                  "entropy_coef", "recon_coef", "reward_clip", "weight_decay", "res_blocks",
                                  "context_steps", "temperature", "min_span"))
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r}; allowed: {', '.join(ROUTERS)}")
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


@register_agent("scalezero", ScaleZeroConfig, multi_task=True)
class ScaleZeroAgent(Agent):
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
                                    decoder=cfg.recon_coef > 0).to(device)
        self.target = copy.deepcopy(self.wm).requires_grad_(False).eval()
        self.bins = support_bins(cfg.bins).to(device)
        self.optim = bumps_versions(torch.optim.AdamW(self.wm.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                                      weight_decay=cfg.weight_decay, fused=True))
        self.updates = 0

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

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

        dirichlet = None
        if noise:
            conc = torch.full((b, a), cfg.dirichlet_alpha)
            dirichlet = torch.distributions.Dirichlet(conc).sample().to(self.device) * legal
            dirichlet = dirichlet / dirichlet.sum(-1, keepdim=True)
        ties = torch.stack([torch.rand((n, a), generator=c.rng) if c.rng is not None else torch.rand((n, a))
                            for c in contexts]).to(self.device)  # each stream's own tie-breaking order per node
        return search(logits[:, 0], legal, expand, simulations, cfg.gamma, dirichlet, cfg.noise_weight, cfg.c1, cfg.c2,
                      ties, cfg.min_span)

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
            "reward": self.task_sum(support_ce(reward_logits, reward[:, :t] * in_ep[:, :t], self.bins), live[:, :t],
                                    task),
            "policy": self.task_sum(-(target_pi * log_pi).sum(-1), searched, task),
            "value": self.task_sum(support_ce(value_logits, value_target, self.bins), value_valid, task),
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
        batch = sample(self.batch_rows(), cfg.batch_length)
        terms = self.losses(batch)
        loss = (cfg.latent_coef * terms["latent"] + cfg.reward_coef * terms["reward"] +
                cfg.policy_coef * terms["policy"] + cfg.value_coef * terms["value"] -
                cfg.entropy_coef * terms["entropy"] + cfg.recon_coef * terms.get("recon", 0.0))
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wm.parameters(), cfg.grad_clip)
        self.optim.step()
        ema_(self.target, self.wm, cfg.target_decay)
        self.updates += 1
        metrics: Metrics = {f"wm/{k}": v.detach() for k, v in terms.items()}
        metrics |= {"wm/loss": loss.detach(), "wm/grad_norm": grad_norm}
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
                "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.target.load_state_dict(state["target"])
        self.optim.load_state_dict(state["optim"])
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
