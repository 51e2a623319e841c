"""STORM's networks compute in training what the reference's (weipu-zhang/STORM) compute, to fp32 rounding, on the
CPU: layouts chosen for speed must not change the numbers."""

import copy
import time

import torch

from mowbench.models.vae import ConvDecoder, ConvEncoder


def test_training_mode_encoder_and_decoder_match_fp64_on_cpu():
    """Training-mode (batch statistics) forward of the paper-size encoder (64x64 frames, 32..256 channels) and
    decoder against the same modules in fp64: within fp32 rounding (the errors are ~1e-5 at |y| ~ 5, over four
    convolutions whose sums and batch statistics round: 8e-6 and 2e-6 here). Channels-last BatchNorm2d in training
    on the CPU (torch 2.13) put the encoder 1.3e-4 off, its batch statistics' rounding; the reference's
    activations are contiguous."""
    torch.manual_seed(0)
    size, channels, n = 64, (32, 64, 128, 256), 512
    encoder = ConvEncoder(size, channels).train()
    frames = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8)
    x = frames.permute(0, 3, 1, 2).float() / 255  # (N, 3, S, S), channels-last strides as encode_frames makes
    t = time.perf_counter()
    y = encoder(x)  # (N, 4096)
    exact = copy.deepcopy(encoder).double()(x.double())
    err = (y.double() - exact).abs().max().item()
    print(f"encoder: max |fp32 - fp64| {err:.2e} (|y| <= {exact.abs().max().item():.1f})")
    assert err < 3e-5

    decoder = ConvDecoder(size, channels, 32 * 32).train()
    z = torch.randn(n // 4, 32 * 32)  # (B, V*C)
    image = decoder(z)  # (B, 3, S, S)
    exact = copy.deepcopy(decoder).double()(z.double())
    err = (image.double() - exact).abs().max().item()
    print(f"decoder: max |fp32 - fp64| {err:.2e} (|x| <= {exact.abs().max().item():.1f}); "
          f"{time.perf_counter() - t:.1f} s")
    assert err < 3e-5
