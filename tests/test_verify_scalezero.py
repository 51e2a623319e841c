"""`python -m mowbench.verify agent=scalezero-lite`, run as a user runs it: our ScaleZero replays the numbers recorded
from LightZero's ScaleZero (mowbench/data/reference/scalezero: three multi-task updates, the third after a DPS stage
switch, then one collect search per task) within tolerance at its defaults, and each documented departure (an
ablation) fails the rows it should."""

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_verify import verdicts


def verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mowbench.verify", "agent=scalezero-lite", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def failed(result: subprocess.CompletedProcess) -> set[str]:
    return {q for q, v in verdicts(result.stdout).items() if v == "FAIL"}


@pytest.mark.slow(seconds=15)
def test_scalezero_matches_lightzero_at_its_defaults():
    result = verify()
    assert result.returncode == 0, result.stdout + result.stderr
    table = verdicts(result.stdout)
    assert len(table) >= 100 and set(table.values()) == {"ok"}
    for update in (1, 2, 3):  # every loss term of both tasks, the total and the grad norm, per update
        for k in (0, 1):
            for term in ("obs loss", "reward loss", "value loss", "orig_policy loss", "policy_entropy"):
                assert f"update {update}: task {k} {term}" in table
        assert f"update {update}: total loss" in table
        assert f"update {update}: grad norm before clipping" in table
        assert f"update {update}: entropy log-alpha" in table
    for k in (0, 1):  # upstream's collect search per task: LightZero's C++ tree replayed through ours
        for what in ("predicted value", "predicted policy logits", "root visit counts", "rand() draws consumed",
                     "root value", "sampled action (temperature 0.25)"):
            assert f"search task {k}: {what}" in table
    # LightZero's ViT encoder (the paper preset's) with upstream's weights, and its two real sizes
    for what in ("patch embeddings", "transformer tokens (normalised)", "head before its LayerNorm", "output (eval)",
                 "output (train, dropout from upstream's seed)"):
        assert f"vit: {what}" in table
    assert "vit small parameters (768 out)" in table and "vit base parameters (768 out)" in table


@pytest.mark.slow(seconds=15)
def test_learned_router_fails_the_gradients():
    # the router's weight enters the experts' output: every head's gradient moves at the first update
    assert {"update 1: grad norm before clipping", "update 1: head_dict grad norm before clipping"} <= failed(
        verify("ablation=learned_router"))


@pytest.mark.slow(seconds=15)
def test_fixed_entropy_weight_fails_the_total_and_alpha():
    departed = failed(verify("ablation=fixed_entropy_weight"))
    assert {"update 1: total loss", "update 1: grad norm before clipping", "update 1: entropy log-alpha"} <= departed
    assert "update 1: task 0 obs loss" not in departed  # the terms themselves are upstream's


@pytest.mark.slow(seconds=15)
def test_no_label_smoothing_fails_reward_and_value():
    departed = failed(verify("ablation=no_label_smoothing"))
    assert {"update 2: task 0 reward loss", "update 2: task 0 value loss"} <= departed
    assert "update 1: task 0 reward loss" not in departed  # zero heads: log(101) whatever the target


@pytest.mark.slow(seconds=15)
def test_plain_latent_head_fails_the_obs_loss():
    departed = failed(verify("ablation=plain_latent_head"))
    assert {"update 2: task 0 obs loss", "update 2: task 1 obs loss"} <= departed
    assert "update 1: task 0 obs loss" not in departed


@pytest.mark.slow(seconds=15)
def test_ffn_dropout_draws_masks_upstream_does_not():
    result = verify("ablation=ffn_dropout")
    assert result.returncode != 0
    assert any(q.startswith("updates replayed") for q in failed(result))


SEARCH = ("root visit counts", "rand() draws consumed", "root value", "sampled action (temperature 0.25)")


@pytest.mark.slow(seconds=15)
def test_self_visit_puct_fails_both_searches():
    # a fresh node's first choice follows the prior instead of a tie: every search takes other paths
    departed = failed(verify("ablation=self_visit_puct"))
    assert {f"search task {k}: {what}" for k in (0, 1) for what in SEARCH} <= departed
    assert not any(q.startswith("update") for q in departed)


@pytest.mark.slow(seconds=15)
def test_edge_only_min_max_fails_the_first_search():
    # the root's gamma V sets task 0's min-max range (not task 1's): task 0's search takes other paths
    departed = failed(verify("ablation=edge_only_min_max"))
    assert {"search task 0: root visit counts", "search task 0: root value"} <= departed


@pytest.mark.slow(seconds=15)
def test_visit_weighted_root_value_fails_only_the_root_values():
    departed = failed(verify("ablation=visit_weighted_root_value"))
    assert departed == {"search task 0: root value", "search task 1: root value"}
