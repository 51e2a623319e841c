"""STORM's world model (arXiv 2310.09615): a categorical VAE, a stochastic Transformer over (z_t, a_t) tokens and
reward / termination heads. Pure modules with explicit sizes (STORMSizes); the losses are the agent's
(baselines/storm.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mowbench.models.heads import MLP
from mowbench.models.transformer import CausalTransformer, KVCache, TokenStem
from mowbench.models.vae import CategoricalHead, ConvDecoder, ConvEncoder, encode_frames


@dataclass(frozen=True)
class STORMSizes:
    """What STORM's world model is built from; `of(cfg)` takes them from any config that has these fields (the
    STORM family's agent configs)."""

    channels: tuple[int, ...]  # encoder conv channels (decoder mirrored)
    n_vars: int  # categorical variables in z
    n_classes: int  # classes per variable
    unimix: float  # uniform mix in posterior / prior probabilities
    width: int  # Transformer width D
    depth: int  # Transformer blocks
    heads: int  # attention heads
    ffn: int  # FFN hidden size
    dropout: float  # residual-branch dropout
    attn_dropout: float  # attention-probability dropout
    block_ln_eps: float  # LayerNorm eps inside the blocks
    decoder_stem_norm: str  # bn2d | bn1d
    max_len: int  # learned positional embedding length
    head_width: int  # reward / termination MLP width
    head_depth: int  # reward / termination MLP hidden layers
    bins: int  # reward two-hot bins

    @classmethod
    def of(cls, cfg: Any) -> Any:
        """The sizes among `cfg`'s fields (a subclass's fields too, e.g. MoWSizes)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


class STORMWorldModel(nn.Module):
    """Categorical VAE + stochastic Transformer + reward/termination heads, with paper-named methods
    (encode, decode, sequence, prior, reward, termination). z: (..., V*C) one-hot; h: (..., D).

    Every method takes the rows' task indices (B,): STORM ignores them; with `embed_dim` > 0 (the
    monolithic multi-task baseline) a learnable, L2-normalised task embedding e_k conditions the
    posterior, the decoder and the token stem. MoW's world model offers the same methods."""

    capturable = True  # imagination and acting never wait for the device (fixed shapes, no host reads)

    def __init__(self, sizes: STORMSizes, image_size: int, action_dim: int, n_tasks: int = 1,
                 embed_dim: int = 0) -> None:
        super().__init__()
        self.sizes = cfg = sizes
        self.latent_vars, self.latent_dim = cfg.n_vars, cfg.n_vars * cfg.n_classes
        self.embed_dim = embed_dim
        self.feature_dim = self.latent_dim + cfg.width  # [z, h]
        self.n_critics = 1
        self.max_len = cfg.max_len
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
