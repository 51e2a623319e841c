"""MoW's expert bank: every (sequence, expert) pair gets exactly what expert j alone would compute (checked
against STORM's own stem and Transformer loaded with expert j's weights), with either kernel, uneven and empty
expert groups included; both kernels give equal gradients; the cached pass equals the full one."""

import pytest
import torch

from mowbench.models.experts import PairLayout, expert_matmul, padding_ratio
from mowbench.models.mow import ExpertBank, ExpertCache
from mowbench.models.transformer import CausalTransformer, TokenStem

LATENT, ACTION, EMBED, WIDTH, HEADS, FFN, DEPTH, MAX_LEN, N_E = 24, 5, 3, 32, 4, 48, 2, 8, 6
# six experts; expert 4 gets no pair, expert 1 gets four (the untrained router's unevenness, in small)
PAIR_ROW = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
PAIR_EXPERT = torch.tensor([1, 3, 1, 0, 5, 1, 2, 1])


def bank(kernel: str) -> ExpertBank:
    torch.manual_seed(0)
    return ExpertBank(N_E, LATENT, ACTION, EMBED, WIDTH, DEPTH, HEADS, FFN, dropout=0.0, max_len=MAX_LEN,
                      ln_eps=1e-6, kernel=kernel).eval()


def inputs(t: int = 6):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, t, LATENT, generator=g)
    action = torch.nn.functional.one_hot(torch.randint(0, ACTION, (4, t), generator=g), ACTION).float()
    return z, action, torch.randn(4, EMBED, generator=g)


def storm_expert(experts: ExpertBank, j: int) -> tuple[TokenStem, CausalTransformer]:
    """STORM's TokenStem and CausalTransformer holding expert j's weights (nn.Linear stores W transposed)."""
    stem = TokenStem(LATENT, ACTION, WIDTH, EMBED)
    ct = CausalTransformer(WIDTH, DEPTH, HEADS, FFN, 0.0, MAX_LEN, ln_eps=1e-6).eval()
    pairs = [(stem.net[0], experts.mix_in), (stem.net[1], experts.mix_norm1), (stem.net[3], experts.mix_out),
             (stem.net[4], experts.mix_norm2), (ct.norm, experts.norm)]
    for block, stacked in zip(ct.blocks, experts.blocks, strict=True):
        pairs += [(block.qkv, stacked.qkv), (block.out, stacked.out), (block.norm1, stacked.norm1),
                  (block.ffn[0], stacked.ffn_in), (block.ffn[2], stacked.ffn_out), (block.norm2, stacked.norm2)]
    with torch.no_grad():
        for plain, stacked in pairs:
            weight = stacked.weight[j]
            plain.weight.copy_(weight.T if weight.dim() == 2 else weight)
            if plain.bias is not None:
                plain.bias.copy_(stacked.bias[j])
        ct.position.weight.copy_(experts.position[j])
    return stem, ct


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_every_pair_gets_what_its_expert_alone_computes(kernel):
    experts = bank(kernel)
    z, action, e = inputs()
    with torch.no_grad():
        out = experts(z, action, e, PAIR_ROW, PAIR_EXPERT)  # (P, T, D) in pair order
        for p, (row, j) in enumerate(zip(PAIR_ROW.tolist(), PAIR_EXPERT.tolist(), strict=True)):
            stem, ct = storm_expert(experts, j)
            alone = ct(stem(z[row:row + 1], action[row:row + 1], e[row:row + 1, None]))[0]
            torch.testing.assert_close(out[p], alone, atol=1e-5, rtol=1e-5)


def test_the_two_kernels_give_equal_outputs_and_gradients():
    z, action, e = inputs()
    results = []
    for kernel in ("grouped", "loop"):
        experts = bank(kernel)
        out = experts(z, action, e, PAIR_ROW, PAIR_EXPERT)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in experts.parameters()]))
    (out_g, grads_g), (out_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_g, grads_l, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert grads_g[0][4].abs().sum() == 0 and grads_g[0][1].abs().sum() > 0  # the unused expert gets nothing


def test_grouped_kernel_pads_a_misfit_input_width_and_equals_the_loop_without_reading_sizes():
    """An input width of 33 floats (132 bytes) does not fit F.grouped_mm's 16-byte rows: the loop handles it on CPU;
    with pad_inputs (CUDA's default) the grouped kernel takes it padded with zero columns, and outputs and gradients
    equal the loop's, the layout's group sizes never read on the host."""
    from tests.test_graphs import host_syncs

    g = torch.Generator().manual_seed(1)
    z, action, e = torch.randn(4, 5, LATENT, generator=g), torch.randn(4, 5, ACTION + 1, generator=g), torch.randn(
        4, EMBED, generator=g)
    results = []
    for kernel, pad in (("grouped", True), ("loop", False)):
        torch.manual_seed(0)
        experts = ExpertBank(N_E, LATENT, ACTION + 1, EMBED, WIDTH, DEPTH, HEADS, FFN, dropout=0.0, max_len=MAX_LEN,
                             kernel=kernel).eval()
        experts.pad_inputs = pad
        with host_syncs() as found:
            out = experts(z, action, e, PAIR_ROW, PAIR_EXPERT)
        assert (found == []) == pad, found
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in experts.parameters()]))
    (out_g, grads_g), (out_l, grads_l) = results
    torch.testing.assert_close(out_g, out_l, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_g, grads_l, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_token_by_token_with_the_cache_equals_the_full_pass(kernel):
    experts = bank(kernel)
    z, action, e = inputs()
    with torch.no_grad():
        full = experts(z, action, e, PAIR_ROW, PAIR_EXPERT)
        cache = ExpertCache(torch.float32)
        steps = [experts(z[:, t:t + 1], action[:, t:t + 1], e, PAIR_ROW, PAIR_EXPERT, cache=cache)
                 for t in range(z.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_layout_sorts_pairs_by_expert_without_padding():
    layout = PairLayout.of(PAIR_EXPERT, N_E, "grouped")
    assert layout.expert.tolist() == [0, 1, 1, 1, 1, 2, 3, 5]
    assert layout.ends.tolist() == [1, 5, 6, 7, 7, 8]  # expert 4 is empty
    assert torch.equal(PAIR_EXPERT[layout.order], layout.expert)
    assert torch.equal(layout.order[layout.inverse], torch.arange(len(PAIR_EXPERT)))
    assert layout.slot_counts() == [1, 4, 1, 1, 0, 1]
    # padded to the largest group (4) over the 5 experts present: 20 slots for 8 pairs
    assert padding_ratio(PAIR_EXPERT, N_E) == 2.5
    assert PairLayout.of(PAIR_EXPERT, N_E, "auto").kernel == "grouped"  # on CPU


def test_grouped_matmul_takes_a_broadcast_gradient():
    """A sum's (stride-0) gradient straight into F.grouped_mm's backward, which refuses it unless made contiguous."""
    x, w = torch.randn(8, 3, 16, requires_grad=True), torch.randn(N_E, 16, 8, requires_grad=True)
    grads = []
    for kernel in ("grouped", "loop"):
        x.grad = w.grad = None
        expert_matmul(x, w, PairLayout.of(PAIR_EXPERT, N_E, kernel)).sum().backward()
        grads.append((x.grad, w.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("capability", "kernel"), [((8, 0), "loop"), ((9, 0), "grouped"), ((10, 0), "grouped")])
def test_auto_kernel_on_cuda_is_grouped_from_hopper_on(monkeypatch, capability, kernel):
    from mowbench.models.experts import auto_kernel

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert auto_kernel(torch.device("cuda")) == kernel
    assert auto_kernel(torch.device("cpu")) == "grouped"
