"""`python -m mowbench.verify agent=newt`, run as a user runs it: our Newt replays numbers recorded from Newt's
published code (mowbench/data/reference/newt: its state-based multi-task path, two tasks with padded action dims)
within tolerance, and the old behaviours kept as ablations (no_bc, rho_over_h, scale_update_first) fail the rows
they should."""

import re

import pytest

from mowbench.config import compose_config, plan
from tests.test_verify import verdicts, verify

# rows of the table before the updates, of each update ("update 1: ...") and of each planner call
SETUP_ROWS = ["world model parameters (learnt)", "initial encoder Linear weights std",
              "initial dynamics Linear weights std", "initial reward Linear weights std",
              "initial pi Linear weights std", "initial Qs.online Linear weights std",
              "initial Linear biases, largest |b|", "policy log-std minimum", "policy log-std maximum",
              "action masks (task x padded dims)", "discounts (episode lengths 100, 500)",
              "rho, policy loss (H+1 steps)", "rho, model losses (H steps)"]
MODEL_ROWS = ["consistency loss", "reward loss", "value loss", "total loss", "model grad norm before clipping"] + [
    f"{m} grad norm before clipping" for m in ("encoder", "dynamics", "reward", "Qs.online")]
POLICY_ROWS = ["behaviour cloning per step and sample", "policy prior (BC) loss", "policy loss",
               "policy entropy (-log-prob)", "policy scaled entropy", "policy std (mean)", "policy std (max)",
               "scale S used by the policy loss", "scale S after the update", "policy grad norm before clipping"]
MODULES = ("encoder", "dynamics", "reward", "pi", "Qs.online", "Qs.target")
UPDATE_ROWS = MODEL_ROWS + POLICY_ROWS + [f"{m} weights sum of squares" for m in MODULES] + [
    f"{m} change sum of squares" for m in MODULES]
PRETRAIN_ROWS = ["consistency_loss", "reward_loss", "value_loss", "pi_prior_loss", "total_loss", "bc_loss",
                 "pi_entropy", "pi_scaled_entropy", "pi_std", "grad_norm", "lr_enc", "lr", "lr_pi",
                 "behaviour cloning per step and sample"] + [
    f"{m} grad norm before clipping" for m in ("encoder", "dynamics", "reward", "pi", "Qs.online")] + [
    f"{m} change sum of squares" for m in MODULES]
PLAN_ROWS = ["policy trajectories' actions", "initial mean (constrained planning)",
             "initial std (constrained planning)", "final elite weights", "chosen elites", "final mean", "final std",
             "action (exploring)"]


def failed(*args: str) -> set[str]:
    result = verify("agent=newt", *args)
    assert result.returncode != 0
    return {q for q, v in verdicts(result.stdout).items() if v == "FAIL"}


@pytest.mark.slow(seconds=10)
def test_newt_matches_the_published_code():
    ok = verify("agent=newt")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = verdicts(ok.stdout)
    expected = (SETUP_ROWS + [f"update {k}: {q}" for k in (1, 2, 3) for q in UPDATE_ROWS]
                + [f"pretrain {k}: {q}" for k in (1, 2) for q in PRETRAIN_ROWS] + ["pretraining leaves S unchanged"]
                + ["plan: latent z", "plan: action (eval)"]
                + [f"{call}: {q}" for call in ("plan", "plan, next call") for q in PLAN_ROWS])
    assert not [q for q in expected if q not in rows], sorted(rows)
    assert set(rows.values()) == {"ok"}
    assert "nicklashansen/newt @ 75def92f0af818f7c5d5b6aee5d54d807013c88c" in ok.stdout
    assert re.search(rf"\b{len(rows)}/{len(rows)} within tolerance", ok.stdout)


@pytest.mark.slow(seconds=10)
def test_newt_without_behaviour_cloning_fails_the_policy_update():
    # the policy's loss and gradient from update 1, its weights and the planner's policy trajectories; the world
    # model's first update is untouched (the policy is trained after it, on its detached latents)
    rows = failed("ablation=no_bc")
    assert {"update 1: policy loss", "update 1: policy grad norm before clipping",
            "update 1: pi weights sum of squares", "update 3: pi change sum of squares",
            "plan: policy trajectories' actions", "plan: final mean"} <= rows
    assert not [q for q in rows if q.startswith("update 1: ") and q.partition(": ")[2] in MODEL_ROWS]
    assert "update 1: behaviour cloning per step and sample" not in rows  # the same policy: the same term


@pytest.mark.slow(seconds=10)
def test_newt_with_rho_over_h_fails_the_model_losses():
    # weights rho^t normalised over the H model-loss steps: 15/14 of upstream's, in every model loss from update 1;
    # the policy's first update (on the latents before the model's step) is untouched
    rows = failed("ablation=rho_over_h")
    assert "rho, model losses (H steps)" in rows and "rho, policy loss (H+1 steps)" not in rows
    assert {f"update {k}: {q}" for k in (1, 2, 3) for q in MODEL_ROWS} <= rows
    assert not [q for q in rows if q.startswith("update 1: ") and q.partition(": ")[2] in POLICY_ROWS]


@pytest.mark.slow(seconds=10)
def test_newt_updating_the_scale_first_fails_the_scale_used():
    # TD-MPC2's order (S updated before the loss divides by it): the S used in every update; S after an update is
    # the same (it moves with Q at t = 0 either way), and with Q near 0 the loss moves by at most ~1e-5
    rows = failed("ablation=scale_update_first")
    used = {f"update {k}: scale S used by the policy loss" for k in (1, 2, 3)}
    assert used <= rows <= used | {f"update {k}: policy loss" for k in (1, 2, 3)}


def test_state_observations_are_refused_for_every_suite():
    with pytest.raises(ValueError, match="obs=state with env=metaworld: every suite here gives pixels"):
        plan(compose_config(["agent=newt", "env=metaworld", "preset=micro", "agent.obs=state",
                             "agent.state_dim=10"]))


@pytest.mark.slow(seconds=10)
def test_newt_pretraining_departures_fail_its_rows_and_newt_nodemo_replays_the_rest():
    # no behaviour-cloning prior in the pretraining loss: its total, the policy's gradient and every weight change
    rows = failed("agent.prior_coef=0")
    assert {"pretrain 1: total_loss", "pretrain 1: pi grad norm before clipping",
            "pretrain 1: pi change sum of squares", "pretrain 2: encoder change sum of squares"} <= rows
    assert not {q for q in rows if not q.startswith("pretrain")}  # the online updates do not read it
    nodemo = verify("agent=newt-nodemo")
    assert nodemo.returncode == 0, nodemo.stdout + nodemo.stderr
    rows = verdicts(nodemo.stdout)
    assert "update 3: policy loss" in rows and not [q for q in rows if q.startswith("pretrain")]
