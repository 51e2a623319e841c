"""The maths against hand-computed values: symlog/symexp, two-hot, lambda-returns, KL with free bits."""

import math

import pytest
import torch

from mowbench.ops import (
    categorical_kl,
    free_bits,
    group_quantiles,
    lambda_returns,
    sample_categorical,
    symexp,
    symlog,
    twohot_decode,
    twohot_encode,
    uniform_bins,
)


def test_symlog_symexp_values_and_inverse():
    x = torch.tensor([-10.0, -1.0, 0.0, 1.0, math.e - 1])
    assert torch.allclose(symlog(x), torch.tensor([-math.log(11), -math.log(2), 0.0, math.log(2), 1.0]))
    y = torch.linspace(-500, 500, 101)
    assert torch.allclose(symexp(symlog(y)), y, rtol=1e-5, atol=1e-4)


def test_twohot_hand_example():
    bins = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    # 0.25 lies between bins 0 and 1: weights 0.75 and 0.25
    assert torch.allclose(twohot_encode(torch.tensor(0.25), bins), torch.tensor([0.0, 0.75, 0.25, 0.0]))
    # exactly on a bin, and clipped beyond the range
    assert torch.allclose(twohot_encode(torch.tensor(1.0), bins), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert torch.allclose(twohot_encode(torch.tensor(7.0), bins), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert torch.allclose(twohot_encode(torch.tensor(-3.0), bins), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_twohot_round_trip_through_logits():
    bins = uniform_bins(255, -20, 20)
    y = torch.tensor([-1234.5, -3.0, -0.01, 0.0, 0.7, 42.0, 1e5])
    probs = twohot_encode(symlog(y), bins)
    assert torch.allclose(probs.sum(-1), torch.ones(len(y)))
    decoded = twohot_decode(torch.log(probs.clamp_min(1e-30)), bins)
    assert torch.allclose(decoded, y, rtol=1e-4, atol=1e-4)


def test_lambda_returns_hand_computed():
    gamma, lam = 0.5, 0.5
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[10.0, 20.0, 40.0]])  # V(s0), V(s1), V(s2)
    cont = torch.tensor([[1.0, 1.0]])
    # textbook: R1 = 2 + .5*(.5*40 + .5*40) = 22; R0 = 1 + .5*(.5*V(s1)=10 + .5*R1=11) = 11.5
    assert torch.allclose(lambda_returns(rewards, values, cont, gamma, lam, "next"), torch.tensor([[11.5, 22.0]]))
    # STORM reference: (1-lam) term uses V(s_t): R1 = 2 + .5*(.5*20 + .5*40) = 17; R0 = 1 + .5*(5 + 8.5) = 7.75
    assert torch.allclose(lambda_returns(rewards, values, cont, gamma, lam, "current"), torch.tensor([[7.75, 17.0]]))
    # termination after step 0 cuts everything after it
    assert torch.allclose(lambda_returns(rewards, values, torch.tensor([[0.0, 1.0]]), gamma, lam)[:, 0],
                          torch.tensor([1.0]))
    with pytest.raises(ValueError, match="value_index"):
        lambda_returns(rewards, values, cont, gamma, lam, "previous")


def test_free_bits_hand_example():
    # one variable, two classes: p = (0.5, 0.5), q = (0.9, 0.1)
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.9, 0.1]]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108 nats
    assert torch.allclose(categorical_kl(p, q), torch.tensor([expected]), atol=1e-6)
    assert free_bits(categorical_kl(p, q).mean(), free_nats=1.0).item() == pytest.approx(1.0)
    # summed over variables: three identical variables give 1.532 > 1 nat, so no clipping
    p3, q3 = p.expand(1, 3, 2), q.expand(1, 3, 2)
    loss3 = free_bits(categorical_kl(p3, q3).mean(), free_nats=1.0)
    assert loss3.item() == pytest.approx(3 * expected, abs=1e-5)
    # clipping applies to the batch mean (STORM), not per element
    both = free_bits(categorical_kl(torch.cat([p3, p3 * 0]), torch.cat([q3, p3 * 0])).mean(), free_nats=1.0)
    assert both.item() == pytest.approx(1.0)


def test_sample_categorical_frequencies():
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(200_000, 4)
    counts = torch.bincount(sample_categorical(probs), minlength=4).float() / 200_000
    assert counts[1] == 0
    assert torch.allclose(counts, torch.tensor([0.1, 0.0, 0.6, 0.3]), atol=0.01)


def test_group_quantiles_kth_is_storms_percentile():
    """method 'kth' is STORM's reference percentile (weipu-zhang/STORM agents.py:percentile): per group,
    torch.kthvalue(values, int(q * n)), with Python's int(q * n) from float64 q; groups of 20 values put 0.95 * 20 at
    19 exactly, where float32 q would give 18.99..."""
    q_values = (0.05, 0.95)
    q = torch.tensor(q_values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for rows in (15, 16, 31, 64):
        values = torch.randn(rows, 4, generator=gen).round(decimals=1)  # ties too
        label = torch.arange(rows) % 3
        out, present = group_quantiles(values, label, 3, q, method="kth")
        for k in range(3):
            flat = values[label == k].flatten()
            expected = [torch.kthvalue(flat, int(p * flat.numel())).values for p in q_values]
            assert present[k] and torch.equal(out[k], torch.stack(expected)), (rows, k)
    with pytest.raises(ValueError, match="method='nearest'; allowed: linear, kth"):
        group_quantiles(values, label, 3, q, method="nearest")


def test_group_quantiles_by_hand_and_bitwise_equal_to_torch_quantile():
    """Linear interpolation at rank q * (n - 1) of each group's sorted values: group 0 holds 0, 1, 2, 3 (q=0.5:
    rank 1.5 -> 1.5; q=0.9: rank 2.7 -> 2.7), group 1 is absent (zeros, not present), group 2 holds 10, 20 (rank
    0.5 -> 15; 0.9 -> 19). Then random groups, ties included, against torch.quantile bitwise, and a NaN."""
    values = torch.tensor([[3.0, 0.0], [20.0, 10.0], [2.0, 1.0]])
    out, present = group_quantiles(values, torch.tensor([0, 2, 0]), 3, torch.tensor([0.5, 0.9]))
    assert present.tolist() == [True, False, True]
    assert torch.allclose(out, torch.tensor([[1.5, 2.7], [0.0, 0.0], [15.0, 19.0]]))
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.05, 0.95])
    for trial in range(40):
        rows, groups = int(torch.randint(1, 50, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        values = torch.randn(rows, 16, generator=g) * 10
        values = values.round() if trial % 2 else values  # ties
        label = torch.randint(0, groups, (rows,), generator=g)
        out, present = group_quantiles(values, label, groups, q)
        for k in range(groups):
            assert bool(present[k]) == bool((label == k).any())
            if present[k]:
                assert torch.equal(out[k], torch.quantile(values[label == k].flatten(), q)), (trial, k)
    values[0, 0] = float("nan")
    out, _ = group_quantiles(values, label, groups, q)
    assert out[label[0]].isnan().all() and torch.quantile(values[label == label[0]], q).isnan().all()
