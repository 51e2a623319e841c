"""`python -m mowbench.verify agent=pwm`, run as a user runs it: our PWM replays numbers recorded from PWM's
published code (mowbench/data/reference/pwm: its multi-task flow, one task's actor and critics trained on a frozen
world model shared by three tasks, padded observation and action dims) within tolerance, and the old behaviours kept as
ablations fail the rows they should."""

import re

import pytest
import torch

from mowbench.baselines.pwm import PWMAgent, reference_config
from mowbench.config import compose_config
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.replay import Batch
from mowbench.verify import draws_from, load_reference
from tests.test_verify import verdicts, verify

SETUP_ROWS = ["world model parameters", "actor parameters (one task)", "critic parameters (one task)",
              "initial actor Linear weights std", "initial critic Linear weights std",
              "initial critic biases, largest |b|"]
ROLLOUT_ROWS = ["imagined latents z_0..z_H", "imagined actions", "imagined rewards (symlog)"]
RETURN_ROWS = ["actor loss per sample", "return mean after", "return variance after"]
ACTOR_ROWS = ["actor loss", "actor grad norm before clipping", "actor grad norm per parameter",
              "actor gradients before clipping"]
CRITIC_ROWS = ["critic losses per minibatch step", "critic grad norms before clipping",
               "critic grad norms per critic", "value loss"]
MODULES = ("actor.mu_net", "actor.logstd", "critic", "wm._task_emb", "wm._encoder", "wm._dynamics", "wm._reward")
UPDATE_ROWS = (["actor learning rate", "critic learning rate", "log-std before the update", *ROLLOUT_ROWS,
                "critic targets", *RETURN_ROWS, "return mean before", "return variance before",
                "return count before", "return count after", *ACTOR_ROWS, *CRITIC_ROWS,
                "task vector after (max_norm renorm)"] + [f"{m} weights sum of squares" for m in MODULES])
FINAL_ROWS = ([f"update 3: {m} change sum of squares" for m in ("actor.mu_net", "actor.logstd", "critic",
                                                                 "wm._task_emb")]
              + ["return variance after the updates", "return count after the updates",
                 "act: mean action (all padded dims)"]
              + [f"wm._{m} unchanged (frozen)" for m in ("encoder", "dynamics", "reward")])


def failed(*args: str) -> set[str]:
    result = verify("agent=pwm", *args)
    assert result.returncode != 0
    return {q for q, v in verdicts(result.stdout).items() if v == "FAIL"}


def rows_of(update: int, names: list[str]) -> set[str]:
    return {f"update {update}: {q}" for q in names}


@pytest.mark.slow(seconds=5)
def test_pwm_matches_the_published_code():
    ok = verify("agent=pwm")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = verdicts(ok.stdout)
    expected = SETUP_ROWS + [f"update {k}: {q}" for k in (1, 2, 3) for q in UPDATE_ROWS] + FINAL_ROWS
    assert not [q for q in expected if q not in rows], sorted(rows)
    assert set(rows.values()) == {"ok"}
    assert "imgeorgiev/PWM @ aa5a1d8bc0736459531a20ef328cbdb7540489b0" in ok.stdout
    assert re.search(rf"\b{len(rows)}/{len(rows)} within tolerance", ok.stdout)


@pytest.mark.slow(seconds=5)
def test_an_attached_actor_input_fails_the_actor_gradient():
    # the rollout is the same (the forward pass does not change), the actor's gradient is not
    rows = failed("ablation=attached_actor_input")
    assert rows_of(1, ACTOR_ROWS[1:]) <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + RETURN_ROWS + CRITIC_ROWS + ["actor loss"])


@pytest.mark.slow(seconds=5)
def test_a_gamma_h_bootstrap_fails_the_actor_loss_not_the_critics():
    rows = failed("ablation=bootstrap_gamma_h")
    assert rows_of(1, RETURN_ROWS + ACTOR_ROWS) <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + ["critic targets"] + CRITIC_ROWS)


@pytest.mark.slow(seconds=5)
def test_lambda_critic_targets_fail_the_critics_not_the_first_actor_update():
    rows = failed("ablation=lambda_critic_targets")
    assert rows_of(1, ["critic targets"] + CRITIC_ROWS) <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + RETURN_ROWS + ACTOR_ROWS)


@pytest.mark.slow(seconds=5)
def test_an_ema_return_scale_fails_the_return_statistics_and_the_actor():
    rows = failed("ablation=ema_return_norm")
    assert rows_of(1, ["return mean after", "return variance after", "return count after"] + ACTOR_ROWS) <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + ["actor loss per sample"] + CRITIC_ROWS)


@pytest.mark.slow(seconds=5)
def test_a_summed_critic_loss_fails_the_critic_losses_not_the_actor():
    rows = failed("ablation=summed_critic_loss")
    assert rows_of(1, CRITIC_ROWS) <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + RETURN_ROWS + ACTOR_ROWS + ["critic targets"])


@pytest.mark.slow(seconds=5)
def test_shuffled_critic_minibatches_fail_the_critic_steps():
    rows = failed("ablation=shuffled_critic_minibatches")
    assert rows_of(1, CRITIC_ROWS) <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + RETURN_ROWS + ACTOR_ROWS + ["critic targets"])


@pytest.mark.slow(seconds=5)
def test_layernorm_before_mish_fails_the_first_rollout():
    rows = failed("ablation=norm_before_mish")
    assert rows_of(1, ROLLOUT_ROWS + ["critic targets"] + RETURN_ROWS + ACTOR_ROWS + CRITIC_ROWS) <= rows


@pytest.mark.slow(seconds=5)
def test_a_uniform_critic_init_fails_the_initialisation_rows_only():
    # the replay loads upstream's critic weights: only our fresh initialisation's distribution differs
    assert failed("ablation=uniform_critic_init") == {"initial critic Linear weights std",
                                                     "initial critic biases, largest |b|"}


@pytest.mark.slow(seconds=5)
def test_a_log_std_clamp_in_the_graph_fails_the_log_std_gradient():
    # the reference's log-std starts below the floor in dim 0: a clamp in the graph gives it no gradient
    rows = failed("ablation=graph_log_std_clamp")
    assert {"update 1: actor gradients before clipping", "update 1: actor.logstd weights sum of squares",
            "update 2: log-std before the update", "update 3: actor.logstd change sum of squares"} <= rows
    assert not rows & rows_of(1, ROLLOUT_ROWS + RETURN_ROWS + CRITIC_ROWS + ["actor loss"])


@pytest.mark.slow(seconds=5)
def test_masked_padded_actions_fail_the_first_rollout():
    rows = failed("ablation=masked_padded_actions")
    assert rows_of(1, ROLLOUT_ROWS + ["critic targets"] + RETURN_ROWS + ACTOR_ROWS) <= rows
    assert "act: mean action (all padded dims)" in rows


def policy_step_of_task_zero(per_task: bool, both: bool) -> list[torch.Tensor]:
    """Task 0's actor and critic slices after one policy step of the reference-sized agent, from a batch of task 0's
    rows only or of task 0's and task 2's (whose returns are on another scale)."""
    reference = load_reference("pwm")
    s = reference["sizes"]
    values = dict(compose_config(["agent=pwm-online", "env=metaworld", "preset=paper"])["agent"])
    cfg = reference_config(reference, {**values, "per_task_statistics": per_task})
    tasks = [TaskInfo("metaworld", n, k, 64, ActionSpace(False, a))
             for k, (n, a) in enumerate(zip(s["tasks"], s["action_dims"], strict=True))]
    torch.manual_seed(0)
    agent = PWMAgent(cfg, tasks, torch.device("cpu"), "fp32")
    b, d, a = s["batch"], s["obs_dim"], s["action_dim"]
    gen = torch.Generator().manual_seed(3)
    obs = torch.randn(2 * b, 1, d, generator=gen)
    obs[b:] *= 4.0
    eps = [torch.randn(2, b, a, generator=gen) for _ in range(s["horizon"])]
    rows = 2 * b if both else b
    task = torch.tensor([0] * b + [2] * b)[:rows]
    batch = Batch(obs[:rows], torch.zeros(rows, 1, a), torch.zeros(rows, 1), torch.zeros(rows, 1), task,
                  torch.ones(rows, a, dtype=torch.bool), extras={"first": torch.zeros(rows, 1)},
                  task_counts=(b, 0, b) if both else (b, 0, 0))
    with draws_from(torch, {"randn": [e if both else e[:1] for e in eps]}):
        agent.policy_step(lambda n, length: batch)
    return [p.detach()[0].clone() for p in [*agent.actor.parameters(), agent.log_std, *agent.critics.parameters()]]


@pytest.mark.slow(seconds=5)
def test_each_task_trains_as_if_alone_unless_statistics_are_shared():
    # upstream trains one task per run: with per-task return statistics, losses and clips, another task's rows in
    # the batch leave a task's update as it is alone (measured 1.2e-7, fp32 rounding); shared_task_statistics does
    # not (2.1e-5 after Adam's first step, whose size hardly depends on the gradient's scale)
    for per_task in (True, False):
        alone, together = policy_step_of_task_zero(per_task, False), policy_step_of_task_zero(per_task, True)
        worst = max(float((x - y).abs().max()) for x, y in zip(alone, together, strict=True))
        assert (worst < 1e-6) if per_task else (worst > 1e-5), (per_task, worst)
