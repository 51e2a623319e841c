"""STORM (Zhang et al., NeurIPS 2023, arXiv 2310.09615): one categorical-VAE + stochastic-Transformer
world model and one actor-critic per task, trained in imagination. Hyperparameters follow the paper and
its reference implementation (the dataclass defaults are the `paper` preset). The world model and its loss
live here; the update, imagination and acting are the shared ImaginationAgent's."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mowbench.agents.base import Metrics, register_agent
from mowbench.agents.imagination import (
    ImaginationAgent,
    ImaginationConfig,
    check_non_negative,
    check_positive,
    sample_z,
)
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.models import (
    MLP,
    CategoricalHead,
    CausalTransformer,
    ConvDecoder,
    ConvEncoder,
    KVCache,
    TokenStem,
    conv_stages,
    encode_frames,
)
from mowbench.ops import categorical_kl, free_bits, symlog_twohot_ce
from mowbench.replay import Batch

# STORM's reference world model (weipu-zhang/STORM, WorldModel with config_files/STORM.yaml), instantiated
# and counted for 4, 6 and 18 actions: 16,503,939 + 512 per action (the token stem's first Linear). Ours
# matches it at the paper's sizes (PAPER_SIZE_FIELDS at their defaults, 64x64 images).
REFERENCE_WM_BASE, REFERENCE_WM_PER_ACTION = 16_503_939, 512
PAPER_SIZE_FIELDS = ("channels", "n_vars", "n_classes", "width", "depth", "heads", "ffn", "max_len", "head_width",
                     "head_depth", "bins", "decoder_stem_norm")


@dataclass
class STORMConfig(ImaginationConfig):
    """STORM hyperparameters; defaults are the paper's (spec storm.md). Batches, imagination, acting and the
    actor-critic: the parent's fields (mowbench.agents.imagination.ImaginationConfig)."""

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
    free_nats: float = 1.0  # KL free bits, applied to the batch-mean KL
    dyn_scale: float = 0.5  # weight of KL(sg(post) || prior)
    rep_scale: float = 0.1  # weight of KL(post || sg(prior))

    def check(self) -> None:
        super().check()
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels={list(self.channels)}; allowed: a non-empty list of positive integers")
        check_positive(self, ("n_vars", "n_classes", "width", "depth", "heads", "ffn", "max_len", "head_width"))
        check_non_negative(self, ("head_depth", "free_nats", "dyn_scale", "rep_scale"))
        if not 0.0 <= self.unimix < 1.0:
            raise ValueError(f"unimix={self.unimix}; allowed: 0 <= unimix < 1")
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
        if self.act_context > self.max_len:
            raise ValueError(f"act_context={self.act_context}; allowed: 1..max_len={self.max_len}")

    def check_image_size(self, image_size: int) -> None:
        """Refuse, before any env or network is built, an image size the encoder cannot take."""
        conv_stages(image_size, len(self.channels))


class STORMWorldModel(nn.Module):
    """Categorical VAE + stochastic Transformer + reward/termination heads, with paper-named methods
    (encode, decode, sequence, prior, reward, termination). z: (..., V*C) one-hot; h: (..., D).

    Every method takes the rows' task indices (B,): STORM ignores them; with `embed_dim` > 0 (the
    monolithic multi-task baseline) a learnable, L2-normalised task embedding e_k conditions the
    posterior, the decoder and the token stem. MoW's world model offers the same methods."""

    capturable = True  # imagination and acting never wait for the device (fixed shapes, no host reads)

    def __init__(self, cfg: STORMConfig, image_size: int, action_dim: int, n_tasks: int = 1,
                 embed_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.latent_vars, self.latent_dim = cfg.n_vars, cfg.n_vars * cfg.n_classes
        self.embed_dim = embed_dim
        self.feature_dim = self.latent_dim + cfg.width  # [z, h]
        self.n_critics = 1
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

    def host_layout(self, task: torch.Tensor, task_counts: tuple[int, ...] | None = None
                    ) -> contextlib.nullcontext[None]:
        """Nothing of the batch is read on the host (WorldModel.host_layout)."""
        return contextlib.nullcontext()

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

    def empty_cache(self, task: torch.Tensor, dtype: torch.dtype, offset: torch.Tensor | None = None) -> KVCache:
        return self.transformer.empty_cache(task.shape[0], task.device, dtype, offset)

    def sequence(self, z: torch.Tensor, action: torch.Tensor, task: torch.Tensor, cache: Any = None,
                 last: bool = False) -> torch.Tensor:
        """z (B, T, V*C), action (B, T, A) -> h (B, T, D), or (B, 1, D) of the last step with `last`; with a cache,
        appends after cached steps."""
        e = self.embed(task)
        return self.transformer(self.stem(z, action, None if e is None else e[:, None]), cache, last=last)

    def prior(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> logits (B, T, V, C) of the next step's latent."""
        return self.prior_head(h)

    def reward(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> symlog two-hot logits (B, T, bins)."""
        return self.reward_head(h)

    def termination(self, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """h (B, T, D) -> termination logits (B, T)."""
        return self.termination_head(h).squeeze(-1)

    def features(self, z: torch.Tensor, h: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Actor/critic input: [z, h] (B, T, V*C + D)."""
        return torch.cat([z, h], dim=-1)

    def critic_index(self, task: torch.Tensor) -> None:
        """One critic for every row."""
        return None


def storm_terms(wm: STORMWorldModel, batch: Batch, action: torch.Tensor, bins: torch.Tensor,
                autocast: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """STORM's per-sequence loss terms (B,) each: rec (L2 summed over pixels), reward (two-hot CE), termination
    (BCE), kl_dyn = KL(sg(post) || prior), kl_rep = KL(post || sg(prior)), each a mean over time; and the
    forward's z (B, T, V*C) and h (B, T, D). `wm` is any world model with STORM's methods and a decoder
    (MoW's too); `action` (B, T, A) is the world-model input. The forward runs under `autocast` (the agent's),
the losses in fp32."""
    task = batch.task
    with autocast:
        post = wm.encode(batch.obs, task)  # (B, T, V, C)
        z = sample_z(post)  # (B, T, V*C)
        recon = wm.decode(z, task)  # (B, T, 3, S, S)
        h = wm.sequence(z, action, task)  # (B, T, D)
        prior = wm.prior(h, task)
        reward_logits = wm.reward(h, task)
        term_logits = wm.termination(h, task)  # (B, T)
    target = rearrange(batch.obs, "b t h w c -> b t c h w").float() / 255.0
    # prior at t predicts the posterior at t+1
    terms = {
        "rec": (recon.float() - target).pow(2).sum(dim=(2, 3, 4)).mean(1),
        "reward": symlog_twohot_ce(reward_logits, batch.reward, bins).mean(1),
        "termination": F.binary_cross_entropy_with_logits(
            term_logits.float(), batch.terminal.float(), reduction="none").mean(1),
        "kl_dyn": categorical_kl(post[:, 1:].detach(), prior[:, :-1]).mean(1),
        "kl_rep": categorical_kl(post[:, 1:], prior[:, :-1].detach()).mean(1),
    }
    return terms, z, h


def storm_loss(cfg: STORMConfig, rec: torch.Tensor, reward: torch.Tensor, termination: torch.Tensor,
               kl_dyn: torch.Tensor, kl_rep: torch.Tensor) -> torch.Tensor:
    """STORM's loss from mean terms (scalars: batch means; or (N,) per-task means in MoW); free bits clip
    each mean KL (spec storm.md)."""
    return (rec + reward + termination + cfg.dyn_scale * free_bits(kl_dyn, cfg.free_nats)
            + cfg.rep_scale * free_bits(kl_rep, cfg.free_nats))


@register_agent("storm", STORMConfig)
class STORMAgent(ImaginationAgent):
    """STORM: its world model and loss on the shared imagination agent; the reference-cache comparison as its
    bench extra."""

    cfg: STORMConfig
    capturable_updates = True  # one critic, per-task return scales without a host read (tests/test_graphs.py)

    def build_world_model(self, tasks: list[TaskInfo]) -> nn.Module:
        return STORMWorldModel(self.cfg, tasks[0].image_size, self.action_dim)

    def world_model_loss(self, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        terms, _, _ = storm_terms(self.wm, batch, self.action_input(batch.action), self.bins, self.autocast())
        means = {k: v.mean() for k, v in terms.items()}
        loss = storm_loss(self.cfg, **means)
        return loss, {"wm/loss": loss.detach(), **{f"wm/{k}": v.detach() for k, v in means.items()}}

    def bench_extras(self, sample: Callable[[int, int], Batch], time: Callable[[Callable[[], Any]], float],
                     figures: dict[str, Any]) -> dict[str, Any]:
        """Multi-task (the monolithic STORM): its size beside one STORM per task. One task: imagination timed
        the way the reference code caches (imagine_reference_cache) and the training step with it; at the
        paper's sizes, the reference's world-model parameter count."""
        if self.multi_task:
            return super().bench_extras(sample, time, figures) | separate_storm_figures(self, figures)
        cfg, out = self.cfg, super().bench_extras(sample, time, figures)
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


def separate_storm_parameters(tasks: list[TaskInfo], cfg: STORMConfig) -> dict[str, int]:
    """Parameters of one STORM per task with the component sizes of `cfg` (its STORMConfig fields; a MoW or
    monolithic config gives its STORM-sized parts), each with its task's own (minimal) action count."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(STORMConfig)}
    storm: dict[str, int] = {}
    for info in tasks:
        legal = int(info.action.legal_mask().sum()) if info.action.discrete else info.action.n
        single = TaskInfo(info.suite, info.name, 0, info.image_size, ActionSpace(info.action.discrete, legal))
        counts = STORMAgent(STORMConfig(**values), [single], torch.device("cpu"), "fp32").parameter_counts()
        for key, value in counts.items():
            storm[key] = storm.get(key, 0) + value
    return storm


def separate_storm_figures(agent: ImaginationAgent, figures: dict[str, Any]) -> dict[str, Any]:
    """A multi-task agent's size beside one STORM per task (mow.md: MoW is about half)."""
    storm = separate_storm_parameters(agent.tasks, agent.cfg)
    mine = figures["parameters"]["world_model"] + figures["parameters"]["actor_critic"]
    return {"parameters_separate_storm": storm,
            "parameter_ratio_vs_separate_storm": mine / (storm["world_model"] + storm["actor_critic"])}


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
