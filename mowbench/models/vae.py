"""Categorical VAE pieces (STORM section 'Observation and latent'): conv encoder, decoder, latent head."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mowbench.models.packed import Conv2d, Linear
from mowbench.ops import unimix_logits


def conv_stages(image_size: int, n_stages: int) -> int:
    """Spatial size after `n_stages` stride-2 convs, or ValueError naming what the encoder can take."""
    factor = 2 ** n_stages
    if image_size < factor or image_size % factor:
        allowed = ", ".join(str(factor * m) for m in (1, 2, 4, 8, 16))
        raise ValueError(f"image_size={image_size} cannot be taken by an encoder with {n_stages} "
                         f"stride-2 stages; allowed: multiples of {factor} (e.g. {allowed})")
    return image_size // factor


def channels_last_weights(module: nn.Module) -> None:
    """Store the module's 4-d weights channels-last, the layout of the images it convolves (frames stay in their
    stored (S, S, 3) layout; the decoder asks for it). With contiguous weights, every convolution first copies
    its weight to the input's layout, a cost that dominates acting's batch-1 convolutions on CPU. The forward values
    are the same bits; gradients are too at STORM's sizes, and differ in the last bits (~1e-8) for some shapes (MoW's
    micro-preset update). Moving the module to a device keeps the layout (`to` preserves strides); optimizer states
    and gradients follow the parameters' layout."""
    module.to(memory_format=torch.channels_last)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that normalises a contiguous copy of its input (B, C, H, W) when training on the CPU. There
    (torch 2.13) the channels-last kernel's batch statistics are ~1000x less accurate than the contiguous one's
    (forward error against fp64 5.6e-4 vs 3.8e-7 at 1024x32x32x32), enough to move STORM's reconstruction loss
    and flip posterior draws relative to the reference, whose activations are contiguous. With running statistics
    (inference) both layouts compute the same, so acting and imagination keep the faster channels-last layout;
    CUDA keeps it too. Same parameters, buffers and state_dict keys as nn.BatchNorm2d (tests/test_storm_fidelity.py
    checks the training-mode encoder and decoder against fp64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu":
            x = x.contiguous()
        return super().forward(x)


class ConvEncoder(nn.Module):
    """Image (B, 3, S, S) in [0, 1] -> flat features (B, C_last * s * s).

    Each stage: Conv2d(k4, s2, p1, no bias) -> BatchNorm2d -> ReLU (STORM: 3->32->64->128->256, 64->4).
    """

    def __init__(self, image_size: int, channels: tuple[int, ...], in_channels: int = 3) -> None:
        super().__init__()
        self.final_size = conv_stages(image_size, len(channels))
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [Conv2d(prev, ch, 4, 2, 1, bias=False), BatchNorm2d(ch), nn.ReLU()]
            prev = ch
        self.net = nn.Sequential(*layers)
        self.out_dim = prev * self.final_size ** 2
        self.image_size = image_size
        channels_last_weights(self)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        assert image.shape[-3:] == (3, self.image_size, self.image_size), image.shape
        return self.net(image).flatten(1)  # (B, out_dim)


class CategoricalHead(nn.Module):
    """Features (..., in_dim [+ cond_dim]) -> unimix logits (..., n_vars, n_classes).

    Used for STORM's posterior (from encoder features) and prior (from h). `cond_dim` > 0 lets MoW
    condition on a task embedding e_k by concatenation.
    """

    def __init__(self, in_dim: int, n_vars: int, n_classes: int, cond_dim: int = 0,
                 unimix: float = 0.01) -> None:
        super().__init__()
        self.n_vars, self.n_classes, self.unimix = n_vars, n_classes, unimix
        self.cond_dim = cond_dim
        self.linear = Linear(in_dim + cond_dim, n_vars * n_classes)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_dim:
            assert cond is not None and cond.shape[-1] == self.cond_dim
            x = torch.cat([x, cond.expand(*x.shape[:-1], self.cond_dim)], dim=-1)
        logits = rearrange(self.linear(x), "... (v c) -> ... v c", v=self.n_vars)
        return unimix_logits(logits, self.unimix)  # (..., V, C)


class ConvDecoder(nn.Module):
    """Flat latent (B, latent_dim [+ cond_dim]) -> image (B, 3, S, S), mirror of ConvEncoder.

    Linear(no bias) -> reshape -> BN -> ReLU -> ConvTranspose2d(k4, s2, p1, no bias)+BN+ReLU blocks -> final
    ConvTranspose2d(-> 3, with bias). No output squashing: STORM regresses [0, 1] pixels with MSE.

    stem_norm: "bn2d" normalises the reshaped (C, s, s) map per channel, as STORM's reference does
    (BatchNorm2d(256) at the paper size, 512 parameters); "bn1d" normalises each of the C*s*s features of
    the flat vector before the reshape (BatchNorm1d(4096): 7,680 parameters more at the paper size).
    """

    def __init__(self, image_size: int, channels: tuple[int, ...], latent_dim: int,
                 cond_dim: int = 0, stem_norm: str = "bn2d") -> None:
        super().__init__()
        if stem_norm not in ("bn2d", "bn1d"):
            raise ValueError(f"decoder stem_norm={stem_norm!r}; allowed: bn2d, bn1d")
        self.start = conv_stages(image_size, len(channels))
        self.channels = tuple(channels)
        self.cond_dim = cond_dim
        top = channels[-1]
        self.linear = Linear(latent_dim + cond_dim, top * self.start ** 2, bias=False)
        self.stem_norm = stem_norm
        self.norm = BatchNorm2d(top) if stem_norm == "bn2d" else nn.BatchNorm1d(top * self.start ** 2)
        layers: list[nn.Module] = []
        rev = list(reversed(channels))
        for c_in, c_out in zip(rev[:-1], rev[1:], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.ConvTranspose2d(rev[-1], 3, 4, 2, 1, bias=True))
        self.net = nn.Sequential(*layers)
        channels_last_weights(self)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.cond_dim:
            assert cond is not None
            z = torch.cat([z, cond.expand(*z.shape[:-1], self.cond_dim)], dim=-1)
        x = self.linear(z)  # (B, C*s*s)
        if self.stem_norm == "bn1d":
            x = self.norm(x)
        x = rearrange(x, "b (c h w) -> b c h w", c=self.channels[-1], h=self.start)
        if self.stem_norm == "bn2d":
            x = self.norm(x)
        x = torch.relu(x)
        # channels-last lets oneDNN run the transposed convolutions (faster forward+backward on CPU than the
        # default path); the values are the same.
        return self.net(x.contiguous(memory_format=torch.channels_last))  # (B, 3, S, S)


def encode_frames(encoder: ConvEncoder, posterior: CategoricalHead, frames: torch.Tensor,
                  cond: torch.Tensor | None = None, chunk: int = 256) -> torch.Tensor:
    """frames (N, S, S, 3) uint8 [, cond (N, E)] -> posterior logits (N, V, C).

    Frames stay in their stored (channels-last) layout, which oneDNN convolves faster; without
    gradients on CPU they are encoded `chunk` at a time (0: all at once) so activations stay in cache:
    encoding imagination's 1024 x 8 context frames takes ~40% less time on CPU, same numbers. A GPU
    encodes them at once: chunks there only multiply the kernel launches (32 chunks: ~640 of the ~3,300
    ops of STORM's eager imagination) and shrink each convolution.
    """
    def run(x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return posterior(encoder(x.permute(0, 3, 1, 2).float().div_(255.0)), c)

    if not chunk or torch.is_grad_enabled() or frames.device.type != "cpu" or len(frames) <= chunk:
        return run(frames, cond)
    conds = cond.split(chunk) if cond is not None else [None] * len(frames.split(chunk))
    return torch.cat([run(f, c) for f, c in zip(frames.split(chunk), conds, strict=True)])
