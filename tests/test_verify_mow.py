"""`python -m mowbench.verify agent=mow`, run as a user runs it: MoW has no published code, so a MoW of one task,
one VAE cluster and one expert (which reduces to STORM) replays STORM's reference data (mowbench/data/reference/storm)
within tolerance, MoW's own parameters stay neutral, and the MoW settings that depart from STORM fail the rows they
should."""

import re
import subprocess

import pytest

from tests.test_verify import verdicts, verify

# rows of the table (each update / round: "wm update 1: ...", "ac round 1: ..."): STORM's, and MoW's neutral parts
WORLD_MODEL_ROWS = ["posterior samples", "reconstruction loss", "reward loss", "termination loss", "dynamics KL",
                    "representation KL", "total loss", "grad norm before clipping", "weights sum",
                    "weights sum of squares", "weight change sum of squares", "BatchNorm statistics sum of squares",
                    "MoW's own parameters, largest change"]
ACTOR_CRITIC_ROWS = ["context posterior samples", "imagined prior samples", "imagined actions",
                     "imagined terminations", "imagined features [z, h]", "imagined features e_k, largest |e_k|",
                     "imagined rewards", "lambda-returns", "slow-critic lambda-returns", "return 5th percentile",
                     "return 95th percentile", "return scale S (EMA)", "policy loss", "value loss",
                     "slow-critic regularisation", "entropy", "grad norm before clipping",
                     "weight change sum of squares", "actor change sum of squares", "critic change sum of squares",
                     "MoW's own parameters, largest change", "slow critic - critic, sum of squares"]
COUNT = "world model parameters (less MoW's own)"


def failed(result: subprocess.CompletedProcess) -> set[str]:
    return {q for q, v in verdicts(result.stdout).items() if v == "FAIL"}


@pytest.mark.slow(seconds=10)
def test_mow_reduced_to_storm_matches_storms_published_code_and_harmonious_weighting_fails():
    ok = verify("agent=mow")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = verdicts(ok.stdout)
    expected = ([COUNT, "actor-critic parameters (less MoW's own)"]
                + [f"wm update {k}: {q}" for k in (1, 2, 3) for q in WORLD_MODEL_ROWS]
                + [f"wm update 3: {m} change sum of squares" for m in (
                    "encoder", "storm_transformer", "dist_head.post_head", "dist_head.prior_head", "image_decoder",
                    "reward_decoder", "termination_decoder")]
                + [f"ac round {r}: {q}" for r in (1, 2) for q in ACTOR_CRITIC_ROWS])
    assert not [q for q in expected if q not in rows], sorted(rows)
    assert set(rows.values()) == {"ok"}
    title = ok.stdout.splitlines()[0]
    assert title.startswith("mow: ours vs https://github.com/weipu-zhang/STORM @ ")  # STORM's commit, as storm's
    assert title.endswith("(overrides: none, storm's reference data)")
    assert re.search(rf"\b{len(rows)}/{len(rows)} within tolerance", ok.stdout)
    # the rows that follow from h carry the double LayerNorm's reason, MoW's own parts must not move at all
    assert "[fp32-ln]" in ok.stdout and "  [neutral] 0: " in ok.stdout

    # harmonious weighting (L / sigma + ln(1 + sigma), sigma learnt from 1): the total loss from update 1 (+ ln 2), the
    # gradient (1 / sigma) from update 2; Adam's normalised steps barely see the scale, so no weights and no round do
    departed = verify("agent=mow", "agent.harmonious=true")
    assert departed.returncode != 0
    assert failed(departed) == {f"wm update {k}: total loss" for k in (1, 2, 3)} | {
        f"wm update {k}: grad norm before clipping" for k in (2, 3)}
    assert "verify: outside tolerance against upstream: mow" in departed.stderr


@pytest.mark.slow(seconds=15)
def test_mow_task_head_fails_the_count_and_the_reduced_structure_is_forced():
    # the task-ID head: its cross-entropy over one task is exactly 0 with zero gradient, so only its parameters show
    assert failed(verify("agent=mow", "agent.task_loss=true")) == {COUNT}
    # STORM's behaviour through MoW's config: V(s_{t+1}) in the lambda-returns fails the returns, not the world model
    departed = failed(verify("agent=mow", "ablation=textbook_returns"))
    assert {"ac round 1: lambda-returns", "ac round 1: value loss", "ac round 1: policy loss"} <= departed
    assert not [q for q in departed if q.startswith(("wm update", "world model"))]
    # the structure that reduces to STORM is the hook's, whatever the command says (as the reference's sizes are)
    result = verify("agent=mow", "agent.n_experts=3", "agent.top_k=2", "agent.shared_transformer=true")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mow_replays_storms_reference_data():
    from mowbench.verify import agents_with_reference, load_reference, reference_of, reference_path

    assert reference_of("mow") == "storm" and reference_of("storm") == "storm"
    assert reference_path("mow") == reference_path("storm")
    assert {"mow", "storm"} <= set(agents_with_reference())  # so --all verifies mow too
    assert load_reference("mow")["upstream_repository"] == "https://github.com/weipu-zhang/STORM"
