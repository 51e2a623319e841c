"""ScaleZero-lite's world model (docs/methods/scalezero.md): a ResNet encoder to LayerNorm'ed
latents, a pre-LN causal Transformer over (latent obs, action) tokens whose feed-forward layers are mixtures of
SwiGLU experts with top-1 token routing plus a shared expert, and per-task heads (policy and value on the obs
token, reward and next latent on the action token). No task embedding: task identity enters only through the
heads. Pure modules with explicit sizes; the losses and the search live in baselines/scalezero.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mowbench.models.experts import PairLayout, StackedLinear, StackedNorm
from mowbench.models.packed import Linear
from mowbench.models.transformer import KVCache, attend, layer_mask, position_embedding
from mowbench.models.vae import ConvDecoder

ROUTERS = ("learned", "upstream")
ENCODERS = ("resnet", "lightzero", "vit")
# LightZero's ViT sizes for ScaleZero (UniZeroMTModel: 'base' when a run has more than 8 tasks, else 'small')
VIT_SIZES = {"small": {"dim": 768, "depth": 6, "heads": 6, "mlp": 2048},
             "base": {"dim": 768, "depth": 12, "heads": 12, "mlp": 3072}}


class ResidualBlock(nn.Module):
    """x + Conv3x3(ReLU(Norm(Conv3x3(ReLU(Norm(x)))))): a pre-activation residual block, C channels kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(1, channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.GroupNorm(1, channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def resnet_out(image_size: int, strides: tuple[int, ...]) -> int:
    """Side of the encoder's last feature map; refuses a size the strides cannot halve evenly."""
    size = image_size
    for s in strides:
        if size % s:
            raise ValueError(f"image_size={image_size} with encoder strides {list(strides)}: {size} is not divisible "
                             f"by {s}; allowed: an image side divisible by the product of the strides")
        size //= s
    return size


class ResNetEncoder(nn.Module):
    """obs (B, S, S, 3) uint8 -> z (B, D), LayerNorm'ed (UniZero's latents). Stages of [Conv3x3 at stride s ->
    GroupNorm -> ReLU -> residual block], `blocks` more residual blocks at the last width, flatten, Linear D,
    LayerNorm. GroupNorm(1, C) (LayerNorm over C x H x W) stands for upstream's BatchNorm: no batch statistics,
    so acting and training see the same function. Atari 64x64 (paper preset): strides (2, 2, 2, 2) -> 4x4;
    MinAtar's 10x10 grids rendered at 16x16 (tiny): strides (2, 2) -> 4x4, a small encoder."""

    def __init__(self, image_size: int, channels: tuple[int, ...], strides: tuple[int, ...], blocks: int,
                 latent_dim: int) -> None:
        super().__init__()
        assert len(channels) == len(strides), (channels, strides)
        layers: list[nn.Module] = []
        c_in = 3
        for c, s in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1), nn.GroupNorm(1, c), nn.ReLU(), ResidualBlock(c)]
            c_in = c
        layers += [ResidualBlock(c_in) for _ in range(blocks)]
        self.trunk = nn.Sequential(*layers)
        side = resnet_out(image_size, strides)
        self.project = Linear(c_in * side * side, latent_dim)
        self.norm = nn.LayerNorm(latent_dim, elementwise_affine=False)  # as the predicted latents' (no affine)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2).float() / 255.0 - 0.5  # (B, 3, S, S)
        return self.norm(self.project(self.trunk(x).flatten(1)))  # (B, D)


class LightZeroResBlock(nn.Module):
    """LightZero's (DI-engine's) ResBlock with norm 'LN' (GroupNorm(1, C)), bias-free convs: act(conv-norm-act-conv-
    norm(x) + x); `downsample` halves the side (stride-2 first conv, and a stride-2 conv on the skip path)."""

    def __init__(self, c_in: int, c_out: int, act: nn.Module, downsample: bool = False) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.act = act
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(1, c_out))
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.GroupNorm(1, c_out))
        self.skip = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.conv1(x)))
        return self.act(y + (x if self.skip is None else self.skip(x)))


class LightZeroResNetEncoder(nn.Module):
    """UniZero's ResNet encoder option (LightZero's RepresentationNetworkUniZero with norm_type 'LN'): obs (B, S, S, 3)
    uint8 -> z (B, D). Conv3x3 stride 2 to C/2 -> LayerNorm over (C/2, S/2, S/2) (affine per element) -> act ->
    basic block -> downsampling block to C -> basic block -> AvgPool(3, 2, 1) -> basic block -> `blocks` basic
    blocks -> flatten -> Linear (no bias) -> LayerNorm(D) (affine). act: GELU (tanh), UniZeroMTModel's default.
    Pixels in [0, 1] (LightZero's obs / 255). Side S / 8 (64 -> 8)."""

    def __init__(self, image_size: int, channels: int, blocks: int, latent_dim: int) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size={image_size}; allowed with encoder=lightzero: a multiple of 8")
        act = nn.GELU(approximate="tanh")
        half = channels // 2
        self.act = act
        self.conv1 = nn.Conv2d(3, half, 3, 2, 1, bias=False)
        self.norm1 = nn.LayerNorm([half, image_size // 2, image_size // 2])
        self.stage = nn.Sequential(LightZeroResBlock(half, half, act), LightZeroResBlock(half, channels, act, True),
                                   LightZeroResBlock(channels, channels, act), nn.AvgPool2d(3, 2, 1),
                                   LightZeroResBlock(channels, channels, act),
                                   *(LightZeroResBlock(channels, channels, act) for _ in range(blocks)))
        side = image_size // 8
        self.project = Linear(channels * side * side, latent_dim, bias=False)
        self.norm = nn.LayerNorm(latent_dim)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        x = self.stage(self.act(self.norm1(self.conv1(x))))  # (B, C, S/8, S/8)
        return self.norm(self.project(x.flatten(1)))  # (B, D)


class ViTBlock(nn.Module):
    """One block of LightZero's ViT: x + Attn(x), then x + FF(x). Attn: LayerNorm -> q, k, v from one Linear without
    bias (heads x head_dim each) -> softmax(q k^T / sqrt(head_dim)) (dropout on the weights) -> Linear back to dim
    (dropout). FF: LayerNorm -> Linear(dim, mlp) -> GELU (exact) -> dropout -> Linear(mlp, dim) -> dropout."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = Linear(dim, 3 * heads * head_dim, bias=False)
        self.attn_out = Linear(heads * head_dim, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff_in = Linear(dim, mlp)
        self.ff_out = Linear(mlp, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape  # (B, N, dim)
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = self.dropout(torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1))  # (B, h, N, N)
        x = x + self.dropout(self.attn_out((weights @ v).transpose(1, 2).reshape(b, n, -1)))
        return x + self.dropout(self.ff_out(self.dropout(F.gelu(self.ff_in(self.ff_norm(x))))))


class ViTEncoder(nn.Module):
    """LightZero's ViT encoder option, the one ScaleZero's paper uses (vit-pytorch's ViT with a final LayerNorm):
    obs (B, S, S, 3) uint8 -> z (B, out_dim). Pixels in [0, 1]; p x p patches flattened in (row, column, channel)
    order -> LayerNorm -> Linear(3 p^2, dim) -> LayerNorm; a learned class token prepended and a learned position
    embedding added (both N(0, 1) at init), dropout `emb_dropout`; `depth` ViTBlocks; LayerNorm; the class token ->
    Linear(dim, out_dim) -> LayerNorm(out_dim) (upstream's final_norm_option_in_encoder 'LayerNorm'). Initialised as
    upstream's world model re-initialises it: Linear weights Xavier-uniform, biases 0."""

    def __init__(self, image_size: int, patch: int, dim: int, depth: int, heads: int, head_dim: int, mlp: int,
                 out_dim: int, dropout: float, emb_dropout: float) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size={image_size}; allowed with encoder=vit: a multiple of vit_patch={patch}")
        self.patch = patch
        n, patch_dim = (image_size // patch) ** 2, 3 * patch * patch
        self.patch_norm_in = nn.LayerNorm(patch_dim)
        self.patch_proj = Linear(patch_dim, dim)
        self.patch_norm_out = nn.LayerNorm(dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, n + 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, head_dim, mlp, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.project = Linear(dim, out_dim)
        self.out_norm = nn.LayerNorm(out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, S, S, 3) uint8 -> z (B, out_dim)."""
        return self.head(self.tokens(self.patches(obs.float().div(255.0))))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, S, S, 3) in [0, 1] -> patch embeddings (B, N, dim)."""
        b, s, p = x.shape[0], x.shape[1], self.patch
        x = x.view(b, s // p, p, s // p, p, 3).permute(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, 3)
        return self.patch_norm_out(self.patch_proj(self.patch_norm_in(x.reshape(b, (s // p) ** 2, 3 * p * p))))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, N, dim) -> the transformer's normalised tokens (B, N+1, dim), the class token first."""
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.position
        x = self.emb_dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """The class token (B, N+1, dim)[:, 0] -> z (B, out_dim)."""
        return self.out_norm(self.project(tokens[:, 0]))


class MoEFeedForward(nn.Module):
    """ScaleZero's mixture-of-experts feed-forward layer: `n_experts` SwiGLU experts (W_down(silu(W_gate x) *
    W_up x), no bias), each token sent to its top-1 expert by a router Linear(D, n_experts) on the token alone,
    plus one always-on shared expert Linear -> GELU -> Linear. No balance loss (upstream has none). The router has
    no bias (upstream's gate).

    router='upstream' (default): ScaleZero's code takes the softmax over the single selected logit, a weight of
    exactly 1, so its router never learns (its gradient is 0). router='learned' (ablation `learned_router`): the
    chosen expert's output is weighted by the softmax over all router logits at the chosen one, so the router
    gets a gradient."""

    def __init__(self, width: int, hidden: int, n_experts: int, shared_hidden: int, router: str = "upstream") -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router={router!r}; allowed: {', '.join(ROUTERS)}")
        self.n_experts, self.router_kind = n_experts, router
        self.router = Linear(width, n_experts, bias=False)
        self.gate = StackedLinear(n_experts, width, hidden, bias=False)
        self.up = StackedLinear(n_experts, width, hidden, bias=False)
        self.down = StackedLinear(n_experts, hidden, width, bias=False)
        self.shared = nn.Sequential(Linear(width, shared_hidden), nn.GELU(), Linear(shared_hidden, width))
        self.last_counts: torch.Tensor | None = None  # tokens per expert of the last call (on the device)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> the chosen expert (N,) and its weight (N,)."""
        logits = self.router(x).float()  # (N, E)
        expert = logits.argmax(-1)
        if self.router_kind == "learned":
            weight = torch.softmax(logits, -1).gather(-1, expert[:, None])[:, 0]
        else:  # softmax over the one selected logit: 1 everywhere, no gradient to the router
            weight = torch.softmax(logits.gather(-1, expert[:, None]), -1)[:, 0]
        return expert, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        expert, weight = self.route(flat)
        layout = PairLayout.of(expert, self.n_experts, "auto")
        xs = flat[layout.order][:, None]  # (N, 1, D) in expert order
        h = F.silu(self.gate(xs, layout)) * self.up(xs, layout)  # (N, 1, F)
        y = self.down(h, layout)[:, 0][layout.inverse]  # (N, D), back in token order
        self.last_counts = layout.grouping.counts.detach()
        out = y * weight[:, None].to(y.dtype) + self.shared(flat)
        return out.view(shape)


class DenseFeedForward(nn.Module):
    """The dense feed-forward of UniZero's blocks (ScaleZero's own 'no MoE' ablation): Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(Linear(width, hidden), nn.GELU(), Linear(hidden, width))
        self.last_counts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreLNBlock(nn.Module):
    """x = x + Drop(Attn(LN(x))); x = x + FFN(LN(x)) (UniZero's pre-LN block; FFN dense or MoE). UniZero drops
    only the attention probabilities and the attention output; ffn_dropout (ablation `ffn_dropout`) also drops the
    FFN's output."""

    def __init__(self, width: int, heads: int, ffn: nn.Module, dropout: float, ffn_dropout: bool = False) -> None:
        super().__init__()
        assert width % heads == 0, f"width={width} not divisible by heads={heads}"
        self.heads, self.dropout, self.ffn_dropout = heads, dropout, ffn_dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = Linear(width, 3 * width)
        self.out = Linear(width, width)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attn = attend(q, k, v, cache, layer, mask, self.dropout if self.training else 0.0)  # (B, H, T, d)
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, t, width)))
        y = self.ffn(self.norm2(x))
        return x + (self.drop(y) if self.ffn_dropout else y)


class UniZeroTransformer(nn.Module):
    """Tokens (B, T, D) -> h (B, T, D): learned positions over `max_tokens`, dropout, pre-LN causal blocks, a
    final LayerNorm. With a KVCache (whose row offsets left-pad windows of different lengths) new tokens attend
    to the cached ones. moe=False: dense feed-forward layers of `ffn` hidden units."""

    def __init__(self, width: int, depth: int, heads: int, max_tokens: int, dropout: float, moe: bool,
                 n_experts: int, expert_hidden: int, shared_hidden: int, router: str, ffn: int,
                 ffn_dropout: bool = False) -> None:
        super().__init__()
        self.width, self.depth, self.heads, self.max_tokens = width, depth, heads, max_tokens
        self.position = nn.Embedding(max_tokens, width)
        self.drop = nn.Dropout(dropout)

        def feed_forward() -> nn.Module:
            if moe:
                return MoEFeedForward(width, expert_hidden, n_experts, shared_hidden, router)
            return DenseFeedForward(width, ffn)

        self.blocks = nn.ModuleList(PreLNBlock(width, heads, feed_forward(), dropout, ffn_dropout)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def empty_cache(self, batch: int, device: torch.device, dtype: torch.dtype,
                    offset: torch.Tensor | None = None) -> KVCache:
        return KVCache.empty(self.depth, batch, self.heads, self.max_tokens, self.width // self.heads, device, dtype,
                             offset)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        length = tokens.shape[1]
        mask = layer_mask(cache, None, length, self.max_tokens, tokens.device)
        x = self.drop(tokens + position_embedding(self.position.weight, cache, length))  # layer_mask checked T
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, mask)
        if cache is not None:
            cache.length += length
        return self.norm(x)  # (B, T, D)

    def expert_counts(self) -> list[torch.Tensor]:
        """Tokens per expert in each MoE layer's last call (empty without MoE)."""
        return [b.ffn.last_counts for b in self.blocks if b.ffn.last_counts is not None]


class TaskHeads(nn.Module):
    """K per-task heads LN -> Linear(D, H) -> LN -> GELU (tanh approximation, UniZero's) -> Linear(H, out), weights
    stacked by task: x (B, T, D) and each row's task (B,) -> (B, T, out), every row through its task's head (rows
    grouped by task).

    zero_last: the last Linear starts at zero (LightZero's last_linear_layer_init_zero, on in UniZero): a fresh
    value or reward head then predicts exactly 0 and a fresh policy head the uniform prior. Without it, the random
    heads' values (|v| ~ 5 after the support's inverse transform) steered the first searches and the tiny agent's
    policy collapsed onto one action.

    final_norm: a per-task affine LayerNorm on the output (UniZero's latent head, 'LayerNorm' final norm option)."""

    def __init__(self, n_tasks: int, width: int, hidden: int, out_dim: int, zero_last: bool = False,
                 final_norm: bool = False) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.norm_in = StackedNorm(n_tasks, width)
        self.hidden = StackedLinear(n_tasks, width, hidden)
        self.norm_hidden = StackedNorm(n_tasks, hidden)
        self.out = StackedLinear(n_tasks, hidden, out_dim)
        if zero_last:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.norm_out = StackedNorm(n_tasks, out_dim) if final_norm else None

    def forward(self, x: torch.Tensor, task: torch.Tensor, layout: PairLayout | None = None) -> torch.Tensor:
        layout = layout or PairLayout.of(task, self.n_tasks, "auto")
        h = self.hidden(self.norm_in(x[layout.order], layout), layout)
        y = self.out(F.gelu(self.norm_hidden(h, layout), approximate="tanh"), layout)  # UniZero's GELU (tanh)
        if self.norm_out is not None:
            y = self.norm_out(y, layout)
        return y[layout.inverse]


class UniZeroWorldModel(nn.Module):
    """Encoder, action embedding (the full action set), transformer, per-task heads (and with `decoder` a
    ConvDecoder from latents to frames, the tiny preset's reconstruction loss), with MuZero-named methods:
    encode (representation), tokens, policy/value on obs tokens, reward/next_latent on action tokens.

    latent_head='upstream' (UniZero's): the next-latent head's last Linear starts at zero like the other heads' and
    ends in a per-task affine LayerNorm. 'plain' (ablation `plain_latent_head`): a random last Linear and a
    LayerNorm without affine (the predictions live where a non-affine encoder's latents do).
    encoder: 'resnet' (ours: pre-activation blocks, GroupNorm, non-affine final LayerNorm), 'lightzero' (UniZero's
    ResNet option, LightZeroResNetEncoder; channels[-1] channels) or 'vit' (LightZero's ViT, ViTEncoder; `vit` its
    sizes: dim, depth, heads, mlp, patch, head_dim, dropout; default upstream's 'small')."""

    def __init__(self, image_size: int, n_actions: int, n_tasks: int, latent_dim: int, channels: tuple[int, ...],
                 strides: tuple[int, ...], res_blocks: int, depth: int, heads: int, max_tokens: int, dropout: float,
                 moe: bool, n_experts: int, expert_hidden: int, shared_hidden: int, router: str, ffn: int,
                 head_hidden: int, bins: int, decoder: bool = False, encoder: str = "resnet",
                 ffn_dropout: bool = False, latent_head: str = "upstream", vit: dict | None = None) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder={encoder!r}; allowed: {', '.join(ENCODERS)}")
        if latent_head not in ("upstream", "plain"):
            raise ValueError(f"latent_head={latent_head!r}; allowed: upstream, plain")
        self.n_tasks, self.latent_dim, self.bins = n_tasks, latent_dim, bins
        if encoder == "lightzero":
            self.encoder: nn.Module = LightZeroResNetEncoder(image_size, channels[-1], res_blocks, latent_dim)
        elif encoder == "vit":
            v = vit or {**VIT_SIZES["small"], "patch": 8, "head_dim": 64, "dropout": 0.1}
            self.encoder = ViTEncoder(image_size, v["patch"], v["dim"], v["depth"], v["heads"], v["head_dim"],
                                      v["mlp"], latent_dim, v["dropout"], v["dropout"])
        else:
            self.encoder = ResNetEncoder(image_size, channels, strides, res_blocks, latent_dim)
        # UniZero's optional latent reconstruction (its latent_recon_loss): z -> frame, training only
        self.decoder = ConvDecoder(image_size, channels, latent_dim) if decoder else None
        self.action_embedding = nn.Embedding(n_actions, latent_dim)
        self.transformer = UniZeroTransformer(latent_dim, depth, heads, max_tokens, dropout, moe, n_experts,
                                              expert_hidden, shared_hidden, router, ffn, ffn_dropout)
        self.policy_head = TaskHeads(n_tasks, latent_dim, head_hidden, n_actions, zero_last=True)
        self.value_head = TaskHeads(n_tasks, latent_dim, head_hidden, bins, zero_last=True)
        self.reward_head = TaskHeads(n_tasks, latent_dim, head_hidden, bins, zero_last=True)
        upstream = latent_head == "upstream"
        self.latent_head = TaskHeads(n_tasks, latent_dim, head_hidden, latent_dim, zero_last=upstream,
                                     final_norm=upstream)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (..., S, S, 3) uint8 -> z (..., D)."""
        lead = obs.shape[:-3]
        return self.encoder(obs.reshape(-1, *obs.shape[-3:])).view(*lead, self.latent_dim)

    def interleave(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """z (B, T, D), action (B, T) long -> tokens (B, 2T, D): z_0, a_0, z_1, a_1, ..."""
        return torch.stack([z, self.action_embedding(action).to(z.dtype)], dim=2).flatten(1, 2)

    def obs_heads(self, h: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h at obs tokens (B, T, D) -> policy logits (B, T, A), value logits (B, T, bins)."""
        layout = PairLayout.of(task, self.n_tasks, "auto")
        return self.policy_head(h, task, layout), self.value_head(h, task, layout)

    def action_heads(self, h: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h at action tokens (B, T, D) -> reward logits (B, T, bins), next latent (B, T, D) (LayerNorm'ed)."""
        layout = PairLayout.of(task, self.n_tasks, "auto")
        reward = self.reward_head(h, task, layout)
        z_next = self.latent_head(h, task, layout)
        if self.latent_head.norm_out is None:
            z_next = F.layer_norm(z_next, z_next.shape[-1:])
        return reward, z_next
