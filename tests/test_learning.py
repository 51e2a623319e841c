"""Tiny agents learn on MinAtar with a fixed seed: STORM on breakout (~5 CPU minutes) beats a uniformly random
policy; one MoW agent on breakout and space_invaders (~10 CPU minutes) trains both games' world models and
beats random on breakout."""

import pytest

from mowbench.config import compose_config
from mowbench.runner import execute


@pytest.mark.slow(seconds=270)
def test_tiny_storm_beats_random_on_minatar_breakout(tmp_path):
    cfg = compose_config(["task=breakout", "seed=0", f"results_dir={tmp_path}", "train.eval_every=1000",
                          "train.eval_episodes=30", "train.progress=false"])
    assert cfg["train"]["steps"] == 2000 and cfg["agent"]["imag_per_task"] == 128  # the tiny preset
    [(_, summary)] = execute(cfg)
    agent, random = summary["final_return"]["breakout"], summary["random_return"]["breakout"]
    print(f"\nbreakout after 2000 steps: agent {agent:.2f}, random {random:.2f} (30 episodes each)")
    # measured on the development machine: agent 1.93, random 0.30 (threads=1, 12 minutes beside other runs; reference
    # defaults since issue 11); before them 1.33 (2 threads) and 2.57 (threads=1)
    assert agent >= 2.0 * random and agent - random >= 0.4, (agent, random)


@pytest.mark.slow(seconds=620)
def test_tiny_mow_trains_both_minatar_games_and_beats_random_on_breakout(tmp_path):
    """Tiny MoW, one agent for MinAtar breakout and space_invaders (a cluster each), 2000 steps per game, every
    game in every batch. Asserted: each game's world-model loss L_k falls to under 0.6 of its first logged
    value, and breakout's return beats a random policy's by the STORM test's margins.

    Measured with the reference defaults (threads=1; 20 episodes): seed 0 breakout 2.60 vs random 0.35,
    space_invaders 3.00 vs 4.65; seed 1 breakout 1.05 vs 0.20, space_invaders 4.65 vs 3.20; mean L_k
    12.2 -> 4.6 and 12.4 -> 4.9. The same seed 0 with every textbook choice (ablation=textbook): breakout 1.10,
    space_invaders 1.30. space_invaders' return is not asserted: no variant beats random reliably at this
    budget (a random policy's mean is 3.85 over 500 episodes, and a 20-episode mean of it ranges 2.35-5.25);
    the earlier assertion passed at seed 0 (6.00) by the luck of one random stream, which the changed
    sampling and warm-up redrew."""
    import csv

    cfg = compose_config(["agent=mow", "task=[breakout,space_invaders]", "agent.n_clusters=2", "seed=0",
                          f"results_dir={tmp_path}", "train.eval_episodes=20", "train.progress=false",
                          "train.tensorboard=false"])
    assert cfg["train"]["steps"] == 2000 and cfg["agent"]["imag_per_task"] == 64  # the tiny preset (x 2 games)
    assert cfg["agent"]["return_norm"] == "task"
    [(_, summary)] = execute(cfg)
    agent, random = summary["final_return"], summary["random_return"]
    print(f"\nMoW after 2000 steps per game: agent {agent}, random {random} (20 episodes each)")
    rows = list(csv.DictReader((tmp_path / "minatar" / "mow" / "all2" / "seed_0" / "metrics.csv").open()))
    for game in ("breakout", "space_invaders"):
        losses = [float(r["value"]) for r in rows if r["name"] == f"wm/task_loss/{game}"]
        print(f"{game}: L_k {losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} logs")
        assert len(losses) >= 10 and losses[-1] < 0.6 * losses[0], (game, losses[0], losses[-1])
    assert agent["breakout"] >= 2.0 * random["breakout"] and agent["breakout"] - random["breakout"] >= 0.4


# The TD-MPC2 family on two Meta-World tasks from 16x16 pixels (the tiny presets, fast rendering, one thread per
# xdist worker). Measured sums of the two tasks' mean returns over 5 evaluation episodes, agent / random policy:
#   newt, 1200 steps per task (tiny MPPI): seed 0 585.3 / 305.9 (1.91x), seed 1 587.4 / 395.5 (1.49x)
#   pwm, 600 steps: seed 0 813.3 / 305.9 (2.66x), seed 1 279.1 / 395.5 (0.71x: reach-v3 not learned)
#   tdmpc2, 1000 steps, MPPI 2 iterations x 64 samples: seed 0 312.3 / 305.9 (1.02x); before the stacked Q
#   ensemble (other dropout draws) 458 / 305.9 (1.50x) and seed 1 782 / 395.5 (1.98x)
#   tdmpc2, 1200 steps (tiny MPPI): seed 0 601.4 / 305.9 (1.97x), seed 1 529.9 / 395.5 (1.34x), 353 s each
# Only newt clears the margin at both seeds within CI's time (each run 6-7 minutes on one core; the suite is at
# 27 of its ~30 minutes); tdmpc2 and pwm are not asserted yet (issue 16). Runs are deterministic per seed: newt
# seed 1 gave 587.4 again in a later session.
FAMILY = {"newt": ["train.steps=1200"]}


@pytest.mark.slow(seconds=380)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agent", sorted(FAMILY))
def test_tdmpc_family_beats_random_on_two_metaworld_tasks_from_pixels(agent, seed, tmp_path):
    """reach-v3 and button-press-topdown-v3 in one multi-task run: the sum of the two tasks' mean evaluation
    returns beats a random policy's by 30%."""
    tasks = ["reach-v3", "button-press-topdown-v3"]
    cfg = compose_config([f"agent={agent}", "env=metaworld", f"task=[{','.join(tasks)}]", f"seed={seed}",
                          f"results_dir={tmp_path}", "env.fast_render=true", "train.warmup=200",
                          "train.eval_episodes=5", "train.checkpoint_every=0", "train.progress=false",
                          "train.tensorboard=false", *FAMILY[agent]])
    assert cfg["env"]["image_size"] == 16 and cfg["agent"]["model_size"] == "custom"  # the tiny preset
    [(_, summary)] = execute(cfg)
    agent_sum, random_sum = (sum(summary[key][t] for t in tasks) for key in ("final_return", "random_return"))
    print(f"\n{agent} seed {seed}: agent {summary['final_return']}, random {summary['random_return']}")
    assert agent_sum >= 1.3 * random_sum, (agent_sum, random_sum)
