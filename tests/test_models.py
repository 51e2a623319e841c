"""Component shapes, sizes errors, and KV-cache equivalence with the full-sequence forward."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mowbench.agents.base import build_config, get_agent, read_metrics
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.models import CausalTransformer, ConvDecoder, ConvEncoder, TokenStem
from mowbench.models.packed import ONEDNN, PACK_MIN_ELEMENTS, Conv2d, Linear


def test_encoder_decoder_shapes_storm_sizes():
    enc = ConvEncoder(64, (32, 64, 128, 256))
    x = torch.rand(2, 3, 64, 64)
    assert enc(x).shape == (2, 4096) and enc.final_size == 4
    dec = ConvDecoder(64, (32, 64, 128, 256), 1024)
    assert dec(torch.rand(2, 1024)).shape == (2, 3, 64, 64)
    # STORM encoder: convs 3*32*16 + 32*64*16 + 64*128*16 + 128*256*16, BN 2*(32+64+128+256)
    assert sum(p.numel() for p in enc.parameters()) == 16 * (96 + 2048 + 8192 + 32768) + 2 * 480


def test_frames_are_encoded_in_chunks_on_cpu_only_with_the_same_numbers():
    """Without gradients a CPU encodes `chunk` frames at a time (activations stay in cache) and gives the numbers
    of one pass; any other device (here `meta`, standing for a GPU, where chunks only multiply kernel launches)
    encodes them in one pass, as does any pass with gradients."""
    from mowbench.models import encode_frames
    from mowbench.models.vae import CategoricalHead

    torch.manual_seed(0)
    encoder, head = ConvEncoder(16, (8, 16)).eval(), CategoricalHead(16 * 4 * 4, 4, 4).eval()
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    frames = torch.randint(0, 256, (10, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        chunked = encode_frames(encoder, head, frames, chunk=4)
        assert calls == [4, 4, 2]
        assert torch.allclose(chunked, encode_frames(encoder, head, frames, chunk=0), atol=1e-6)
        calls.clear()
        encode_frames(copy.deepcopy(encoder).to("meta"), copy.deepcopy(head).to("meta"), frames.to("meta"), chunk=4)
        assert calls == [10]
    calls.clear()
    encode_frames(encoder, head, frames, chunk=4)
    assert calls == [10]


def test_conv_weights_are_channels_last_and_give_the_contiguous_weights_numbers():
    """The encoder's and decoder's 4-d weights are stored channels-last, the layout of the frames they convolve
    (oneDNN otherwise reorders each weight at every call), through a move to a device and an optimizer step. With
    running statistics (acting, imagination) the outputs at these sizes are bitwise those of contiguous weights; in
    training on the CPU the BatchNorms normalise contiguous copies (their channels-last batch statistics are far
    less accurate), so the layouts meet there up to fp32 rounding."""
    torch.manual_seed(0)
    for module, x in ((ConvEncoder(64, (32, 64, 128, 256)), torch.rand(4, 64, 64, 3).permute(0, 3, 1, 2)),
                      (ConvDecoder(64, (32, 64, 128, 256), 1024), torch.rand(4, 1024))):
        plain = copy.deepcopy(module)
        for m in plain.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.data = m.weight.data.contiguous()
        module.to(torch.device("cpu"))
        module.eval(), plain.eval()
        with torch.no_grad():
            assert torch.equal(module(x), plain(x))
        module.train(), plain.train()
        out, ref = module(x), plain(x)
        # fp32 rounding of another summation order, relative to the largest value
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        out.square().mean().backward()
        ref.square().mean().backward()
        for a, b in zip(module.parameters(), plain.parameters(), strict=True):
            assert (a.grad - b.grad).abs().max() <= 1e-4 * b.grad.abs().max()
        torch.optim.Adam(module.parameters(), fused=True).step()
        weights = [p for p in module.parameters() if p.dim() == 4]
        assert len(weights) == 4 and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)


def test_linear_packs_its_weight_for_inference_and_repacks_it_after_every_change():
    """Without gradients on CPU, a Linear of PACK_MIN_ELEMENTS weights or more uses a oneDNN-packed weight:
    F.linear's values up to rounding, the same bits on every call, rows() equal to forward's columns. After each
    in-place change (fused Adam through agents.base.adam, an EMA's lerp_, load_state_dict) it equals a Linear built
    from the new weight, bitwise: no stale packed copy. Training passes and smaller weights are F.linear's exactly;
    copies start without packed weights."""
    from mowbench.agents.base import adam
    from mowbench.ops import ema_

    assert ONEDNN, "torch's CPU build has oneDNN; without it Linear is F.linear everywhere"
    assert 512 * 512 >= PACK_MIN_ELEMENTS > 8 * 512
    torch.manual_seed(0)
    lin = Linear(512, 640)
    x = torch.randn(5, 3, 512)

    def fresh(module):  # a Linear with the module's current parameters, packed now
        new = Linear(512, 640)
        new.load_state_dict(module.state_dict())
        return new(x)

    with torch.no_grad():
        out = lin(x)
        assert out.shape == (5, 3, 640) and set(lin.packed) == {(0, 640)}
        torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
        assert torch.equal(lin(x), out)
        torch.testing.assert_close(lin.rows(x, 128, 640), out[..., 128:], rtol=1e-5, atol=1e-6)
        assert torch.equal(lin(x[0, 0]), lin(x[:1, :1])[0, 0])  # a vector as one row
        small = Linear(512, 8)
        assert torch.equal(small(x), F.linear(x, small.weight, small.bias)) and small.packed == {}
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # with gradients: F.linear
    optimizer = adam(lin.parameters(), lr=0.1)
    lin(x).square().sum().backward()
    optimizer.step()
    target = copy.deepcopy(lin)
    assert target.packed == {}
    with torch.no_grad():
        assert not torch.equal(lin(x), out) and torch.equal(lin(x), fresh(lin))
        before = target(x)
        ema_(target, Linear(512, 640), 0.5)
        assert not torch.equal(target(x), before) and torch.equal(target(x), fresh(target))
        lin.load_state_dict(target.state_dict())
        assert torch.equal(lin(x), fresh(target))


def test_packed_conv_gives_nn_conv2ds_bits_and_repacks_after_a_change():
    """Conv2d without gradients on CPU convolves with a weight reordered once for oneDNN: bitwise the output of an
    nn.Conv2d with the same (channels-last) weight, for channels-last and contiguous inputs and any batch size,
    and after an optimizer step the new weight's."""
    from mowbench.agents.base import adam

    torch.manual_seed(0)
    conv = Conv2d(32, 64, 4, 2, 1, bias=False).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(32, 64, 4, 2, 1, bias=False).to(memory_format=torch.channels_last)
    plain.load_state_dict(conv.state_dict())
    frames = torch.rand(5, 16, 16, 32).permute(0, 3, 1, 2)  # (B, C, S, S) channels-last, as encode_frames gives
    with torch.no_grad():
        for x in (frames, frames[:1], frames.contiguous()):
            assert torch.equal(conv(x), plain(x))
        assert set(conv.packed) == {"weight"}
    optimizer = adam(conv.parameters(), lr=0.1)
    conv(frames).square().sum().backward()
    optimizer.step()
    plain.load_state_dict(conv.state_dict())
    with torch.no_grad():
        assert torch.equal(conv(frames), plain(frames))


def test_encoder_rejects_bad_image_size():
    with pytest.raises(ValueError, match="image_size=60.*allowed: multiples of 16"):
        ConvEncoder(60, (32, 64, 128, 256))


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 3, 2], [12]])
def test_kv_cache_matches_full_forward(chunks):
    torch.manual_seed(0)
    model = CausalTransformer(width=64, depth=2, heads=4, ffn=128, dropout=0.1, max_len=16).eval()
    tokens = torch.randn(3, 12, 64)
    full = model(tokens)
    cache = model.empty_cache(3, torch.device("cpu"))
    parts, start = [], 0
    for n in chunks:
        parts.append(model(tokens[:, start:start + n], cache))
        start += n
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_last_token_pass_equals_the_full_passs_last_row(depth):
    """`last` computes only the last token's output in the final block: the full pass's last row, without a
    cache (its one query attends to every key, not causally to the first), appending to a cache (the cache then
    holds the keys and values of every token, so later steps equal the full pass's), and with left-padded rows
    (batched acting's offsets)."""
    torch.manual_seed(0)
    model = CausalTransformer(width=64, depth=depth, heads=4, ffn=128, dropout=0.1, max_len=16).eval()
    tokens = torch.randn(3, 12, 64)
    with torch.no_grad():
        full = model(tokens)  # (3, 12, 64)
        last = model(tokens[:, :9], last=True)
        assert last.shape == (3, 1, 64)
        torch.testing.assert_close(last, model(tokens[:, :9])[:, -1:], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(last, full[:, :1], atol=1e-3)  # not the first row (is_causal with one query)
        cache = model.empty_cache(3, torch.device("cpu"))
        torch.testing.assert_close(model(tokens[:, :5], cache, last=True), full[:, 4:5], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(tokens[:, 5:8], cache, last=True), full[:, 7:8], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(tokens[:, 8:], cache), full[:, 8:], atol=1e-5, rtol=1e-5)
        # rows of 6, 4 and 2 real tokens, left-padded with garbage that no query may see
        padded = torch.randn(3, 6, 64)
        for i, n in enumerate((6, 4, 2)):
            padded[i, 6 - n:] = tokens[i, :n]
        cache = model.empty_cache(3, torch.device("cpu"), offset=torch.tensor([0, 2, 4]))
        h = model(padded, cache, last=True)  # (3, 1, 64)
        for i, n in enumerate((6, 4, 2)):
            torch.testing.assert_close(h[i], full[i, n - 1:n], atol=1e-5, rtol=1e-5)


def test_transformer_is_causal():
    model = CausalTransformer(width=32, depth=2, heads=4, ffn=64, dropout=0.0, max_len=8).eval()
    x = torch.randn(1, 8, 32)
    y = x.clone()
    y[:, 5:] += 1.0
    torch.testing.assert_close(model(x)[:, :5], model(y)[:, :5])


def test_storm_world_model_shapes_and_paper_counts():
    entry = get_agent("storm")
    cfg = build_config(entry, {})
    info = TaskInfo("atari100k", "Pong", 0, 64, ActionSpace(True, 6))
    agent = entry.cls(cfg, [info], torch.device("cpu"), "fp32")
    counts = agent.parameter_counts()
    # token stem for Pong: (1024 + 6) * 512 + 512*512 weights, two LayerNorms
    stem = sum(p.numel() for p in agent.wm.stem.parameters())
    assert stem == (1024 + 6) * 512 + 512 * 512 + 4 * 512
    assert counts["slow_critic"] == sum(p.numel() for p in agent.ac.critics.parameters())
    obs = torch.randint(0, 255, (2, 5, 64, 64, 3), dtype=torch.uint8)
    task = torch.zeros(2, dtype=torch.long)
    post = agent.wm.encode(obs, task)
    assert post.shape == (2, 5, 32, 32)
    assert torch.allclose(post.exp().sum(-1), torch.ones(2, 5, 32))
    assert post.exp().min() >= 0.01 / 32 - 1e-6  # unimix floor
    h = agent.wm.sequence(torch.zeros(2, 5, 1024), torch.zeros(2, 5, 6), task)
    assert h.shape == (2, 5, 512)
    assert agent.wm.decode(torch.zeros(2, 5, 1024), task).shape == (2, 5, 3, 64, 64)


def test_token_stem_shape():
    stem = TokenStem(latent_dim=20, action_dim=3, width=16, cond_dim=4)
    out = stem(torch.zeros(2, 7, 20), torch.zeros(2, 7, 3), torch.zeros(1, 1, 4))
    assert out.shape == (2, 7, 16)


def test_unknown_agent_option_is_refused():
    with pytest.raises(ValueError, match=r"unknown storm option\(s\) \['widht'\]; allowed:"):
        build_config(get_agent("storm"), {"widht": 3})
    with pytest.raises(ValueError, match="unknown agent 'dreamer'; allowed: .*storm"):
        get_agent("dreamer")


def test_bf16_autocast_path_runs():
    """The CUDA precision path (bf16 autocast, bf16 KV cache) exercised with CPU autocast: no dtype errors,
    finite losses, float32 outputs where the trainer expects them."""
    from mowbench.agents.base import Batch

    entry = get_agent("storm")
    cfg = build_config(entry, {"channels": (8, 16), "n_vars": 4, "n_classes": 4, "width": 16, "heads": 2,
                               "ffn": 32, "head_width": 16, "ac_width": 16, "imag_per_task": 4, "imag_context": 2,
                               "imag_horizon": 3, "act_context": 3, "batch_length": 6, "batch_per_task": 2})
    info = TaskInfo("minatar", "breakout", 0, 16, ActionSpace(True, 6, (True, True, False, True, False, False)))
    agent = entry.cls(cfg, [info], torch.device("cpu"), "bf16")

    def sample(n, t):
        return Batch(torch.randint(0, 255, (n, t, 16, 16, 3), dtype=torch.uint8), torch.randint(0, 6, (n, t)),
                     torch.randn(n, t), torch.zeros(n, t), torch.zeros(n, dtype=torch.long), agent.legal[[0] * n])

    metrics = read_metrics(agent.update(sample))
    assert all(math.isfinite(v) for v in metrics.values())
    traj = agent.imagine(sample(4, 2))
    assert traj.feat.dtype == torch.float32 and traj.reward.dtype == torch.float32
    ctx = agent.new_context(0)
    actions = [agent.act(ctx, torch.randint(0, 255, (16, 16, 3), dtype=torch.uint8).numpy()) for _ in range(5)]
    assert all(a in (0, 1, 3) for a in actions)  # legal actions only


def test_bench_reference_cache_imagination_equals_ours():
    """The benchmark's emulation of STORM's reference cache does the same computation as our KV cache."""
    from mowbench.bench_extras import imagine_reference_cache
    from mowbench.replay import random_batch

    entry = get_agent("storm")
    cfg = build_config(entry, {"channels": (8, 16), "n_vars": 4, "n_classes": 4, "width": 16, "heads": 2,
                               "ffn": 32, "head_width": 16, "ac_width": 16, "imag_per_task": 6, "imag_context": 3,
                               "imag_horizon": 5})
    agent = entry.cls(cfg, [TaskInfo("atari100k", "Pong", 0, 16, ActionSpace(True, 6))], torch.device("cpu"), "fp32")
    batch = random_batch(agent.tasks, 6, 3, torch.device("cpu"))
    torch.manual_seed(1)
    ours = agent.imagine(batch).feat
    torch.manual_seed(1)
    reference = imagine_reference_cache(agent, batch)
    assert reference.shape == ours.shape == (6, 6, 16 + 16)
    torch.testing.assert_close(reference, ours, atol=1e-5, rtol=1e-5)


def test_position_embedding_slices_the_table_as_a_lookup_would():
    """Rows that all start at one position take a slice of the table (no gather kernel, no index scatter in the
    backward): the values and the table's gradient are those of the lookup, bitwise; rows with offsets gather."""
    from mowbench.models.transformer import KVCache, position_embedding

    table = torch.randn(32, 8, requires_grad=True)
    cache = KVCache.empty(1, 3, 2, 32, 4, torch.device("cpu"), torch.float32)
    cache.length = 5
    upstream = torch.randn(3, 6, 8)
    for c, start in ((None, 0), (cache, 5)):
        sliced = position_embedding(table, c, 6)
        assert sliced.shape == (6, 8) and sliced.data_ptr() == table[start].data_ptr()  # a view
        looked_up = F.embedding(torch.arange(start, start + 6), table)
        assert torch.equal(sliced, looked_up)
        grads = [torch.autograd.grad((upstream * pos).sum(), table)[0] for pos in (sliced, looked_up)]
        assert torch.equal(*grads) and grads[0][start:start + 6].abs().sum() > 0
    cache.offset = torch.tensor([0, 2, 4])  # left padding: row i's tokens start at slot offset[i]
    rows = position_embedding(table, cache, 2)  # slots 5, 6 -> positions 5 - offset, 6 - offset
    assert torch.equal(rows, table[torch.tensor([[5, 6], [3, 4], [1, 2]])])
