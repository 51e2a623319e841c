"""STORM (Zhang et al., NeurIPS 2023, arXiv 2310.09615): one categorical-VAE + stochastic-Transformer
world model and one actor-critic per task, trained in imagination. Hyperparameters follow the paper and
its reference implementation (the dataclass defaults are the `paper` preset)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mowbench.agents.actor_critic import ActorCritic, ActorCriticLearner, Imagined
from mowbench.agents.base import Agent, Batch, adam, register_agent
from mowbench.envs.base import TaskInfo
from mowbench.models import (
    MLP,
    CategoricalHead,
    CausalTransformer,
    ConvDecoder,
    ConvEncoder,
    KVCache,
    TokenStem,
    conv_stages,
)
from mowbench.ops import categorical_kl, free_bits, sample_onehot_st, symlog_twohot_ce, twohot_decode, uniform_bins

# STORM's reference world model (weipu-zhang/STORM, WorldModel with config_files/STORM.yaml), instantiated
# and counted for 4, 6 and 18 actions: 16,503,939 + 512 per action (the token stem's first Linear). Ours
# matches it at the paper's sizes (PAPER_SIZE_FIELDS at their defaults, 64x64 images).
REFERENCE_WM_BASE, REFERENCE_WM_PER_ACTION = 16_503_939, 512
PAPER_SIZE_FIELDS = ("channels", "n_vars", "n_classes", "width", "depth", "heads", "ffn", "max_len", "head_width",
                     "head_depth", "bins", "decoder_stem_norm")


@dataclass
class STORMConfig:
    """STORM hyperparameters; defaults are the paper's (spec storm.md)."""

    channels: tuple[int, ...] = (32, 64, 128, 256)  # encoder conv channels; 64x64 -> 4x4
    n_vars: int = 32  # categorical variables in z
    n_classes: int = 32  # classes per variable
    unimix: float = 0.01  # uniform mix in posterior/prior probabilities
    width: int = 512  # Transformer width D (token stem, h)
    depth: int = 2  # Transformer blocks
    heads: int = 8  # attention heads
    ffn: int = 1024  # FFN hidden size
    dropout: float = 0.1  # Transformer dropout (residual branches)
    attn_dropout: float = 0.1  # dropout on attention probabilities in training (reference: 0.1; textbook: 0)
    block_ln_eps: float = 1e-6  # LayerNorm eps inside the Transformer blocks (reference: 1e-6; torch default 1e-5)
    decoder_stem_norm: str = "bn2d"  # bn2d: BatchNorm2d(256) after the reshape (reference) | bn1d: over 4096 features
    max_len: int = 64  # learned positional embedding length
    head_width: int = 512  # reward/termination MLP width
    head_depth: int = 2  # reward/termination MLP hidden layers
    bins: int = 255  # symlog two-hot bins in [-20, 20] for reward and value
    wm_lr: float = 1e-4  # world-model Adam learning rate
    wm_grad_clip: float = 1000.0  # world-model global grad-norm clip
    free_nats: float = 1.0  # KL free bits, applied to the batch-mean KL
    dyn_scale: float = 0.5  # weight of KL(sg(post) || prior)
    rep_scale: float = 0.1  # weight of KL(post || sg(prior))
    # Per-task sizes: every task of a multi-task agent is in every batch (stratified sampling), so a batch
    # holds batch_per_task x N sequences and imag_per_task x N start states. STORM (one task): 16 and 1024.
    batch_per_task: int = 16  # world-model batch: sequences of each task per update
    batch_length: int = 64  # world-model batch: steps per sequence
    imag_per_task: int = 1024  # imagination start states of each task per update
    imag_context: int = 8  # real steps fed before imagining
    imag_horizon: int = 16  # imagined steps
    act_context: int = 16  # frames/actions the Transformer sees when acting
    reset_context_on_episode: bool = False  # STORM keeps the acting context across episodes
    ac_width: int = 512  # actor/critic MLP width
    ac_depth: int = 2  # actor/critic hidden layers
    gamma: float = 0.985  # discount
    lam: float = 0.95  # lambda of lambda-returns
    lambda_value: str = "current"  # 'current' = STORM reference's V(s_t) (published numbers) | 'next' = V(s_{t+1})
    slow_decay: float = 0.98  # slow critic EMA decay
    norm_decay: float = 0.99  # EMA decay of the return scale S
    # multi-task only (one task: all the same): one S per task | per critic (MoW: cluster) | one for all.
    # The papers are silent; per task keeps a game with large returns from shrinking the others' advantages
    return_norm: str = "task"
    entropy_coef: float = 3e-4  # entropy bonus
    ac_lr: float = 3e-5  # actor-critic Adam learning rate
    ac_eps: float = 1e-5  # actor-critic Adam epsilon
    ac_grad_clip: float = 100.0  # actor-critic grad-norm clip

    def check(self) -> None:
        if self.lambda_value not in ("next", "current"):
            raise ValueError(f"lambda_value={self.lambda_value!r}; allowed: next, current")
        if self.return_norm not in ("task", "critic", "global"):
            raise ValueError(f"return_norm={self.return_norm!r}; allowed: task, critic, global")
        if self.decoder_stem_norm not in ("bn2d", "bn1d"):
            raise ValueError(f"decoder_stem_norm={self.decoder_stem_norm!r}; allowed: bn2d, bn1d")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: 0 <= {name} < 1")
        if self.block_ln_eps <= 0:
            raise ValueError(f"block_ln_eps={self.block_ln_eps}; allowed: > 0")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be divisible by heads={self.heads}")
        if self.batch_length > self.max_len or self.imag_context + self.imag_horizon > self.max_len:
            raise ValueError(f"batch_length={self.batch_length} and imag_context+imag_horizon="
                             f"{self.imag_context + self.imag_horizon} must be <= max_len={self.max_len}")
        if self.act_context > self.max_len or self.act_context < 1:
            raise ValueError(f"act_context={self.act_context}; allowed: 1..max_len={self.max_len}")
        for name in ("batch_per_task", "batch_length", "imag_per_task", "imag_context", "imag_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; allowed: a positive integer")

    def check_image_size(self, image_size: int) -> None:
        """Refuse, before any env or network is built, an image size the encoder cannot take."""
        conv_stages(image_size, len(self.channels))


def encode_frames(encoder: ConvEncoder, posterior: CategoricalHead, frames: torch.Tensor,
                  cond: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """frames (N, S, S, 3) uint8 [, cond (N, E)] -> posterior logits (N, V, C).

    Frames stay in their stored (channels-last) layout, which oneDNN convolves faster; without
    gradients they are encoded `chunk` at a time (0: all at once) so activations stay in cache:
    encoding imagination's 1024 x 8 context frames takes ~40% less time on CPU, same numbers.
    """
    def run(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return posterior(encoder(x.permute(0, 3, 1, 2).float().div_(255.0)), c)

    if not chunk or torch.is_grad_enabled() or len(frames) <= chunk:
        return run(frames, cond)
    conds = cond.split(chunk) if cond is not None else [None] * len(frames.split(chunk))
    return torch.cat([run(f, c) for f, c in zip(frames.split(chunk), conds, strict=True)])


class STORMWorldModel(nn.Module):
    """Categorical VAE + stochastic Transformer + reward/termination heads, with paper-named methods
    (encode, decode, sequence, prior, reward, termination). z: (..., V*C) one-hot; h: (..., D).

    Every method takes the rows' task indices (B,): STORM ignores them; with `embed_dim` > 0 (the
    monolithic multi-task baseline) a learnable, L2-normalised task embedding e_k conditions the
    posterior, the decoder and the token stem. MoW's world model offers the same methods."""

    def __init__(self, cfg: STORMConfig, image_size: int, action_dim: int, n_tasks: int = 1,
                 embed_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_dim = cfg.n_vars * cfg.n_classes
        self.embed_dim = embed_dim
        self.task_embedding = nn.Embedding(n_tasks, embed_dim) if embed_dim else None
        self.encoder = ConvEncoder(image_size, cfg.channels)
        self.posterior_head = CategoricalHead(self.encoder.out_dim, cfg.n_vars, cfg.n_classes, embed_dim, cfg.unimix)
        self.decoder = ConvDecoder(image_size, cfg.channels, self.latent_dim, embed_dim, cfg.decoder_stem_norm)
        self.stem = TokenStem(self.latent_dim, action_dim, cfg.width, embed_dim)
        self.transformer = CausalTransformer(cfg.width, cfg.depth, cfg.heads, cfg.ffn, cfg.dropout, cfg.max_len,
                                             cfg.attn_dropout, cfg.block_ln_eps)
        self.prior_head = CategoricalHead(cfg.width, cfg.n_vars, cfg.n_classes, unimix=cfg.unimix)
        self.reward_head = MLP(cfg.width, cfg.head_width, cfg.head_depth, cfg.bins)
        self.termination_head = MLP(cfg.width, cfg.head_width, cfg.head_depth, 1)

    def embed(self, task: torch.Tensor) -> torch.Tensor | None:
        """task (B,) -> e_k (B, E) with ||e_k|| = 1, or None without task conditioning."""
        if self.task_embedding is None:
            return None
        return F.normalize(self.task_embedding(task), dim=-1)

    def encode(self, obs: torch.Tensor, task: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """obs (B, T, S, S, 3) uint8 -> posterior logits (B, T, V, C)."""
        b, t = obs.shape[:2]
        e = self.embed(task)
        cond = None if e is None else e[:, None].expand(b, t, -1).flatten(0, 1)  # (B*T, E)
        return rearrange(encode_frames(self.encoder, self.posterior_head, obs.flatten(0, 1), cond, chunk),
                         "(b t) v c -> b t v c", b=b)

    def decode(self, z: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """z (B, T, V*C) -> image (B, T, 3, S, S) in ~[0, 1]."""
        b, t = z.shape[:2]
        e = self.embed(task)
        cond = None if e is None else e[:, None].expand(b, t, -1).flatten(0, 1)
        return rearrange(self.decoder(z.flatten(0, 1), cond), "(b t) c h w -> b t c h w", b=b)

    def empty_cache(self, task: torch.Tensor, dtype: torch.dtype) -> KVCache:
        return self.transformer.empty_cache(task.shape[0], task.device, dtype)

    def sequence(self, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor, cache: Any = None) -> torch.Tensor:
        """z (B, T, V*C), action (B, T, A) -> h (B, T, D); with a cache, appends after cached steps."""
        e = self.embed(task)
        return self.transformer(self.stem(z, action, None if e is None else e[:, None]), cache)

    def prior(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> logits (B, T, V, C) of the next step's latent."""
        return self.prior_head(h)

    def reward(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> symlog two-hot logits (B, T, bins)."""
        return self.reward_head(h)

    def termination(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> termination logits (B, T)."""
        return self.termination_head(h).squeeze(-1)


def sample_z(logits: torch.Tensor) -> torch.Tensor:
    """Posterior/prior logits (..., V, C) -> straight-through one-hot sample flattened to (..., V*C)."""
    return sample_onehot_st(logits).flatten(-2)


@dataclass
class ActingContext:
    """The last `act_context` (z, a) pairs of one env stream; z (T, V*C), action (T, A)."""

    task: int
    z: torch.Tensor | None = None
    action: torch.Tensor | None = None


@register_agent("storm", STORMConfig)
class STORMAgent(Agent):
    """STORM's agent: world-model loss and optimizer, imagination with a KV cache, actor-critic in
    imagination, acting from the Transformer context. Multi-task subclasses (monolithic, MoW) reuse it
    through the world model's task-taking methods and the hooks `features` and `critic_index`."""

    def __init__(self, cfg: STORMConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        if len(tasks) != 1 and not self.multi_task:
            raise ValueError(f"storm is single-task; got {len(tasks)} tasks (the runner makes one run per task)")
        spaces = {(t.action.discrete, t.action.n) for t in tasks}
        if len(spaces) != 1:
            raise ValueError(f"tasks have different action spaces {sorted(spaces)}; a shared agent needs one "
                             "action set (Atari: env.action_set=full)")
        self.cfg, self.tasks, self.device = cfg, tasks, device
        self.autocast = precision == "bf16"
        space = tasks[0].action
        self.discrete, self.action_dim = space.discrete, space.n
        self.legal = torch.as_tensor(np.stack([t.action.legal_mask() for t in tasks]), device=device)  # (N, A)
        self.wm = self.build_world_model(tasks).to(device)
        self.ac = ActorCritic(self.feature_dim(), self.action_dim, self.discrete, cfg.ac_width, cfg.ac_depth,
                              cfg.bins, n_critics=self.n_critics()).to(device)
        self.wm_opt = adam(self.wm.parameters(), lr=cfg.wm_lr)
        self.learner = ActorCriticLearner(
            self.ac, device, cfg.ac_lr, cfg.ac_eps, cfg.ac_grad_clip, cfg.gamma, cfg.lam, cfg.lambda_value,
            cfg.slow_decay, cfg.norm_decay, entropy_coef=cfg.entropy_coef, bins=cfg.bins, autocast=self.autocast,
            norm_groups={"task": len(tasks), "critic": self.n_critics(), "global": 1}[cfg.return_norm])
        self.bins = uniform_bins(cfg.bins).to(device)

    # ---- hooks for multi-task subclasses ----
    def build_world_model(self, tasks: list[TaskInfo]) -> nn.Module:
        return STORMWorldModel(self.cfg, tasks[0].image_size, self.action_dim)

    def feature_dim(self) -> int:
        return self.wm.latent_dim + self.cfg.width

    def features(self, z: torch.Tensor, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Actor/critic input: [z, h] (B, T, V*C + D)."""
        return torch.cat([z, h], dim=-1)

    def n_critics(self) -> int:
        return 1

    def critic_index(self, task: torch.Tensor) -> torch.Tensor | None:
        """Which critic judges rows of these tasks (None: the only one)."""
        return None

    def norm_index(self, task: torch.Tensor) -> torch.Tensor | None:
        """Which return scale S normalises rows of these tasks (config return_norm; None: one S)."""
        if self.cfg.return_norm == "global":
            return None
        return task if self.cfg.return_norm == "task" else self.critic_index(task)

    # ---- helpers ----
    def _amp(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def action_input(self, action: torch.Tensor) -> torch.Tensor:
        """Env actions (B, T) long or (B, T, A) float -> Transformer input (B, T, A) float."""
        return F.one_hot(action.long(), self.action_dim).float() if self.discrete else action.float()

    # ---- world model ----
    def world_model_terms(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-sequence loss terms (B,) each: rec (L2 summed over pixels), reward (two-hot CE), termination
        (BCE), kl_dyn = KL(sg(post) || prior), kl_rep = KL(post || sg(prior)), each a mean over time;
        plus the forward's z (B, T, V*C) and h (B, T, D) for subclasses' extra heads."""
        task = batch.task
        with self._amp():
            post = self.wm.encode(batch.obs, task)  # (B, T, V, C)
            z = sample_z(post)  # (B, T, V*C)
            recon = self.wm.decode(z, task)  # (B, T, 3, S, S)
            h = self.wm.sequence(z, self.action_input(batch.action), task)  # (B, T, D)
            prior = self.wm.prior(h, task)
            reward_logits = self.wm.reward(h, task)
            term_logits = self.wm.termination(h, task)  # (B, T)
        target = rearrange(batch.obs, "b t h w c -> b t c h w").float() / 255.0
        # prior at t predicts the posterior at t+1
        terms = {
            "rec": (recon.float() - target).pow(2).sum(dim=(2, 3, 4)).mean(1),
            "reward": symlog_twohot_ce(reward_logits, batch.reward, self.bins).mean(1),
            "termination": F.binary_cross_entropy_with_logits(
                term_logits.float(), batch.terminal.float(), reduction="none").mean(1),
            "kl_dyn": categorical_kl(post[:, 1:].detach(), prior[:, :-1]).mean(1),
            "kl_rep": categorical_kl(post[:, 1:], prior[:, :-1].detach()).mean(1),
        }
        return terms, {"z": z, "h": h}

    def combine_terms(self, rec: torch.Tensor, reward: torch.Tensor, termination: torch.Tensor,
                      kl_dyn: torch.Tensor, kl_rep: torch.Tensor) -> torch.Tensor:
        """STORM's loss from mean terms (scalars: batch means; or (N,) per-task means in MoW); free bits
        clip each mean KL (spec storm.md)."""
        cfg = self.cfg
        return (rec + reward + termination + cfg.dyn_scale * free_bits(kl_dyn, cfg.free_nats)
                + cfg.rep_scale * free_bits(kl_rep, cfg.free_nats))

    def world_model_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        terms, _ = self.world_model_terms(batch)
        means = {k: v.mean() for k, v in terms.items()}
        loss = self.combine_terms(**means)
        return loss, {"wm/loss": loss.item(), **{f"wm/{k}": v.item() for k, v in means.items()}}

    def update_world_model(self, batch: Batch) -> dict[str, float]:
        self.wm.train()
        loss, metrics = self.world_model_loss(batch)
        self.wm_opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics["wm/grad_norm"] = nn.utils.clip_grad_norm_(self.wm.parameters(), self.cfg.wm_grad_clip).item()
        self.wm_opt.step()
        return metrics

    # ---- imagination ----
    @torch.no_grad()
    def imagine(self, batch: Batch) -> Imagined:
        """Encode `imag_context` real steps into a KV cache, then roll out `imag_horizon` steps."""
        cfg, wm, task = self.cfg, self.wm, batch.task
        wm.eval()
        legal = batch.legal  # (B, A)
        cache = wm.empty_cache(task, torch.bfloat16 if self.autocast else torch.float32)
        feats, actions, hs = [], [], []
        with self._amp():
            z_ctx = sample_z(wm.encode(batch.obs, task))  # (B, C, V*C)
            h = wm.sequence(z_ctx, self.action_input(batch.action), task, cache)[:, -1:]  # (B, 1, D)
            z = sample_z(wm.prior(h, task))  # (B, 1, V*C): prediction of the next latent
            for _ in range(cfg.imag_horizon):
                feat = self.features(z, h, task)  # (B, 1, F)
                action = self.ac.actor(feat, legal[:, None]).sample()  # (B, 1) or (B, 1, A)
                h = wm.sequence(z, self.action_input(action), task, cache)
                feats.append(feat)
                actions.append(action)
                hs.append(h)
                z = sample_z(wm.prior(h, task))
            feats.append(self.features(z, h, task))
            # reward and termination depend on h only and feed nothing back into the rollout: one pass over
            # the whole horizon instead of one per step (fewer, larger matmuls; the same values)
            h_all = torch.cat(hs, 1)  # (B, H, D)
            rewards = twohot_decode(wm.reward(h_all, task), self.bins)  # (B, H)
            conts = (wm.termination(h_all, task) <= 0).float()  # (B, H): 1 - predicted termination
        return Imagined(torch.cat(feats, 1).float(), torch.cat(actions, 1), rewards.float(), conts, legal,
                        self.critic_index(task), self.norm_index(task))

    # ---- Agent interface ----
    def per_task_batch(self) -> dict[str, int]:
        """What each task contributes to one update: world-model sequences (of batch_length steps) and
        imagination start states. The replay's stratified sampling gives every task exactly these."""
        return {"world_model_sequences": self.cfg.batch_per_task, "sequence_length": self.cfg.batch_length,
                "imagination_starts": self.cfg.imag_per_task}

    def update(self, sample: Callable[[int, int], Batch]) -> dict[str, float]:
        cfg, n = self.cfg, len(self.tasks)
        metrics = self.update_world_model(sample(cfg.batch_per_task * n, cfg.batch_length))
        traj = self.imagine(sample(cfg.imag_per_task * n, cfg.imag_context))
        self.ac.train()
        metrics |= self.learner.update(traj)
        return metrics

    def new_context(self, task: int) -> ActingContext:
        return ActingContext(task)

    def episode_start(self, context: ActingContext) -> None:
        if self.cfg.reset_context_on_episode:
            context.z = context.action = None

    @torch.no_grad()
    def act(self, context: ActingContext, obs: np.ndarray, greedy: bool = False) -> np.ndarray | int:
        """STORM acts from [prior sample of z_t, h_{t-1}] computed over the previous frames/actions;
        the current frame is appended to the context after the action is chosen. The window slides, so
        learned absolute positions change every step and one full pass over <= act_context tokens is
        used (the KV cache serves imagination, where positions only grow)."""
        self.wm.eval()
        self.ac.eval()
        legal = self.legal[context.task][None, None]  # (1, 1, A)
        task = torch.full((1,), context.task, dtype=torch.long, device=self.device)
        with self._amp():
            if context.z is None:  # nothing seen yet: a uniformly random legal action, as STORM does
                if self.discrete:
                    choices = torch.nonzero(self.legal[context.task]).flatten()
                    action = choices[torch.randint(len(choices), (1,), device=self.device)].view(1, 1)
                else:
                    action = torch.rand(1, 1, self.action_dim, device=self.device) * 2 - 1
            else:
                h = self.wm.sequence(context.z[None], self.action_input(context.action[None]), task)[:, -1:]
                z = sample_z(self.wm.prior(h, task))
                dist = self.ac.actor(self.features(z, h, task), legal)
                action = dist.mode() if greedy else dist.sample()  # (1, 1) or (1, 1, A)
            obs_t = torch.as_tensor(obs, device=self.device)[None, None]
            z_obs = sample_z(self.wm.encode(obs_t, task))[0]  # (1, V*C)
        action_row = action[0]
        if context.z is None:
            context.z, context.action = z_obs.float(), action_row
        else:
            keep = self.cfg.act_context - 1
            context.z = torch.cat([context.z[-keep:] if keep else context.z[:0], z_obs.float()])
            context.action = torch.cat([context.action[-keep:] if keep else context.action[:0], action_row])
        out = action_row[0].cpu().numpy()
        return int(out) if self.discrete else out.astype(np.float32)

    # ---- benchmark hooks (mowbench.bench) ----
    def bench_phases(self, sample: Callable[[int, int], Batch]) -> dict[str, Callable[[], Any]]:
        cfg, n = self.cfg, len(self.tasks)
        wm_batch = sample(cfg.batch_per_task * n, cfg.batch_length)
        context = sample(cfg.imag_per_task * n, cfg.imag_context)
        traj = self.imagine(context)
        return {"world_model_update": lambda: self.update_world_model(wm_batch),
                "imagination": lambda: self.imagine(context),
                "agent_update": lambda: self.learner.update(traj)}

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """Plain STORM only: imagination timed the way the reference code caches (imagine_reference_cache)
        and the training step with it; at the paper's sizes, the reference's world-model parameter count."""
        if type(self.wm) is not STORMWorldModel or self.wm.embed_dim:
            return {}
        cfg, out = self.cfg, {}
        context = sample(cfg.imag_per_task * len(self.tasks), cfg.imag_context)
        out["s_per_imagination_reference_cache"] = time(lambda: imagine_reference_cache(self, context))
        ref_step = figures["s_per_train_step"] - figures["s_per_imagination"] + out["s_per_imagination_reference_cache"]
        out["s_per_train_step_reference_cache"] = ref_step
        out["train_step_speedup_vs_reference_cache"] = ref_step / figures["s_per_train_step"]
        paper = STORMConfig()
        if self.tasks[0].image_size == 64 and all(getattr(cfg, f) == getattr(paper, f) for f in PAPER_SIZE_FIELDS):
            reference = REFERENCE_WM_BASE + REFERENCE_WM_PER_ACTION * self.action_dim
            out["reference_world_model_parameters"] = reference
            out["world_model_parameters_match_reference"] = figures["parameters"]["world_model"] == reference
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"wm": self.wm.state_dict(), "ac": self.ac.state_dict(), "wm_opt": self.wm_opt.state_dict(),
                "learner": self.learner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.wm.load_state_dict(state["wm"])
        self.ac.load_state_dict(state["ac"])
        self.wm_opt.load_state_dict(state["wm_opt"])
        self.learner.load_state_dict(state["learner"])

    def parameter_counts(self) -> dict[str, int]:
        return {"world_model": count_parameters(self.wm.parameters()),
                "actor_critic": count_parameters(self.ac.actor.parameters()) + count_parameters(
                    self.ac.critics.parameters()),
                "slow_critic": count_parameters(self.ac.slow_critics.parameters())}


def count_parameters(params: Any) -> int:
    return sum(p.numel() for p in params)


@torch.no_grad()
def imagine_reference_cache(agent: STORMAgent, batch: Batch) -> torch.Tensor:
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
