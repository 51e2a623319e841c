"""Tiny agents learn with fixed seeds: STORM on MinAtar breakout (~5 CPU minutes) beats a uniformly random
policy; one MoW agent on breakout and space_invaders (~10 CPU minutes) trains both games' world models and
beats random on breakout; tdmpc2, newt and pwm, each one multi-task agent for two Meta-World tasks from
pixels, beat a random policy (2-6 CPU minutes a run), each at two seeds (pwm: on the seeds' mean); tiny
ScaleZero-lite (MCTS acting) beats random on breakout at two seeds (~7 CPU minutes a run)."""

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


@pytest.mark.slow(seconds=400)
@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_scalezero_beats_random_on_minatar_breakout(seed, tmp_path):
    """Tiny ScaleZero-lite (lr 1e-3, 8 simulations per step, 16 at evaluation, min_span 0.1), 2000 steps (300 of
    random warm-up, then 1700 updates), evaluation episodes sampled from the visit counts at temperature 0.25 (the
    protocol's). The STORM test's margins.

    Measured on an AVX-512 CPU (threads=1, 20 episodes, two runs at once, ~190 s a run): seed 0 1.05, seed 1 3.05
    vs random 0.35 (seeds 2 and 3, not run here: 2.90 vs 0.55, 1.30 vs 0.50); with AVX2 kernels forced on that CPU
    (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2, which reproduced an AVX2-only
    CPU's 0.85 for the earlier setting's seed 0): 1.75 and 2.30. The earlier setting (min_span 0.01,
    500 warm-up steps) drew seed 0 at 1.90 on one machine, 0.85 on an AVX2-only CPU and 0.45 on this AVX-512 one
    (other float rounding, other runs): its training returns fell to ~0 after warm-up, a search led by near-equal
    values collapsed onto one action (tiny preset's comment), and seed 0 recovered late or not. min_span 0.1 alone:
    seeds 0-3 0.75, 2.15, 1.35, 1.20 (the bar 0.75 met by seed 0 exactly); with 300 warm-up steps learning has 200 more
    updates to climb. 2500 steps instead: 1.90 and 3.10 at +33% time. Cheaper variants failed a seed: 1500 steps 1.65
    and 0.65; 4 collect simulations 0.75 at seed 0; epsilon-greedy collection (1 -> 0.05 over 500 or 1000 updates, at
    min_span 0.01) 0.10 and 0.05 at seed 0."""
    cfg = compose_config(["agent=scalezero-lite", "task=breakout", f"seed={seed}", f"results_dir={tmp_path}",
                          "train.warmup=300", "train.eval_episodes=20", "train.progress=false",
                          "train.tensorboard=false"])
    assert cfg["train"]["steps"] == 2000 and cfg["agent"]["simulations"] == 8 and cfg["agent"]["lr"] == 1e-3
    assert cfg["agent"]["min_span"] == 0.1  # the tiny preset's
    [(_, summary)] = execute(cfg)
    agent, random = summary["final_return"]["breakout"], summary["random_return"]["breakout"]
    print(f"\nscalezero seed {seed}, breakout after 2000 steps: agent {agent:.2f}, random {random:.2f} (20 episodes)")
    assert agent >= 2.0 * random and agent - random >= 0.4, (agent, random)


# The TD-MPC2 family on window-close-v3 and button-press-topdown-v3 from 16x16 pixels (the tiny presets, fast frames
# without anti-aliasing, one thread per xdist worker; every env of a run shares each task's goal variations), all
# three at the default protocol (action repeat 2, 100-step episodes). The statistic is the random-normalised score,
# the mean over the two tasks of the agent's mean return over 5 evaluation episodes divided by a random policy's
# over 20 (train.random_episodes: a random episode costs no agent and no renderer, ~0.3 s, and 5 of them left the
# denominator ~10% off its 20-episode mean), so that neither task's scale decides alone. Both tasks show what
# they ask for in the frames (the window, the button); the pair used before, reach-v3 + button-press, did not:
# reach-v3's goal is invisible, its returns swing 55-1045 under one policy, and an agent that parks the arm far
# from the goals scores below random there -- pwm's seed 1 scored 1.05 on an AVX2-only CPU (reach 0.37x random),
# and its reach ratio at seeds 1-3 was 0.37, 0.94 and 6.05. Measured on an AVX2-only CPU (runs are deterministic
# per seed and CPU; score, then the ratios window / button):
#   tdmpc2, 800 steps per task, with upstream's burst of as many updates as seeding steps when seeding ends
#     (agent.seed_updates=400: 2 tasks x 200 warm-up steps; the tiny preset's 100 is for the quickstart's time),
#     ~3.3 CPU minutes a run; on an AVX-512 AMD EPYC: seed 0 1.71 (1.52 / 1.91), seed 1 3.07 (1.15 / 4.98).
#     Upstream's policy entropy (the Gaussian log-prob before the squash, times the action dims) keeps the policy
#     prior wide while Q's range stays below 1 (S = 1): with the tiny preset's 100 seed updates seed 0 scored 1.00
#     at 800 steps and 0.92 at 1600 (seed 1: 1.04 and 2.79); with 200, 0.89; entropy_coef 1e-5, 1.24; the squashed
#     entropy (ablation squashed_entropy), 1.41.
#   newt (with demonstrations: 10 scripted-expert episodes per task, 40 pretraining updates, half of each batch
#     from them, the policy prior acting until the first update), 1600 steps (~4 CPU minutes), on an AVX-512 AMD
#     EPYC: seed 0 1.89 (1.34 / 2.44), seed 1 2.11 (1.24 / 2.98). At 1200 steps 1.52 and 1.31 (window 0.38 at seed
#     1), at 800 steps seed 0 0.92: the demonstrations' half of each batch slows learning from the agent's own
#     data at this budget, so the budget is 1600.
#   pwm, 800 steps, 5 imagined steps (tiny preset; ~2.3 CPU minutes), at the defaults of PWM's published code
#     (detached actor input, gamma^(H+1) bootstrap, one-step critic targets, per-task statistics and clips, ...),
#     on an AVX-512 AMD EPYC: seed 0 1.58 (1.21 / 1.94), seed 1 1.12 (1.32 / 0.92). PWM's policy learns by
#     gradients through a world model that upstream pretrains offline; online at this budget its score is a lottery
#     (1200 steps: 1.03 and 1.85; a 400-update seeding burst: 0.77 and 2.19; before the alignment 1.34 and 1.50).
#     Its test asserts the two seeds' mean at the family's bar and neither seed below a random policy (an open
#     problem, docs/methods/pwm.md).
# At these budgets (8 to 12 episodes a task) the agents improve on random without solving the tasks (one successful
# evaluation episode in all these runs).
FAMILY_ENV = ["env.fast_render=true", "env.multisample=false", "train.eval_episodes=5", "train.random_episodes=20",
              "train.checkpoint_every=0", "train.progress=false", "train.tensorboard=false"]
FAMILY = {"tdmpc2": (["train.steps=800", "train.warmup=200", "agent.seed_updates=400"], 270),
          "newt": (["train.steps=1600", "train.warmup=200"], 480)}
PWM = ["train.steps=800", "train.warmup=200"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("agent", [pytest.param(a, marks=pytest.mark.slow(seconds=s)) for a, (_, s) in FAMILY.items()])
def test_tdmpc_family_beats_random_on_two_metaworld_tasks_from_pixels(agent, seed, tmp_path):
    """window-close-v3 and button-press-topdown-v3 in one multi-task run: the random-normalised score (mean over the
    tasks of the agent's mean evaluation return over the random policy's) is at least 1.3."""
    score, ratios = family_score(agent, seed, tmp_path, FAMILY[agent][0])
    assert score >= 1.3, (score, ratios)


@pytest.mark.slow(seconds=460)
def test_pwm_beats_random_on_two_metaworld_tasks_from_pixels(tmp_path):
    """The family's run for pwm at seeds 0 and 1: the two seeds' mean score is at least 1.3 and neither seed scores
    below a random policy (PWM's online score at this budget is a lottery: the comment above)."""
    scores = [family_score("pwm-online", seed, tmp_path / f"seed{seed}", PWM)[0] for seed in (0, 1)]
    assert sum(scores) / 2 >= 1.3 and min(scores) >= 1.0, scores


def family_score(agent: str, seed: int, folder, overrides: list[str]) -> tuple[float, dict[str, float]]:
    """One tiny multi-task run on the two tasks: (random-normalised score, per-task ratios)."""
    tasks = ["window-close-v3", "button-press-topdown-v3"]
    cfg = compose_config([f"agent={agent}", "env=metaworld", f"task=[{','.join(tasks)}]", f"seed={seed}",
                          f"results_dir={folder}", *FAMILY_ENV, *overrides])
    assert cfg["env"]["image_size"] == 16 and cfg["agent"]["model_size"] == "custom"  # the tiny preset
    [(_, summary)] = execute(cfg)
    ratios = {t: summary["final_return"][t] / summary["random_return"][t] for t in tasks}
    score = sum(ratios.values()) / len(tasks)
    print(f"\n{agent} seed {seed}: score {score:.2f}, agent {summary['final_return']}, "
          f"random {summary['random_return']}")
    assert all(summary["random_return"][t] > 10 for t in tasks)  # a ratio needs a random return well above 0
    return score, ratios
