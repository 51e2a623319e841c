"""Paper-scale invariants on CPU, a few steps only: every task is in every batch of the multi-task agents
and every task's embedding and harmonious weight learn from each world-model update (26 Atari games on the
real ALE at the paper preset; Meta-World's 50 tasks with the continuous-action agent at tiny sizes)."""

import numpy as np
import pytest
import torch

from mowbench.agents.base import Batch, make_agent
from mowbench.config import compose_config, plan
from mowbench.envs import make_envs
from mowbench.envs.atari import TASKS as ATARI26
from mowbench.envs.base import ActionSpace, Step, TaskEnv, TaskInfo
from mowbench.envs.metaworld import MT50
from mowbench.evaluation import evaluate
from mowbench.replay import Replay, stratified_counts
from tests.test_mow import fill_replay


# ---- stratified sampling ----
@pytest.mark.parametrize("n_tasks", [26, 50])
def test_batches_smaller_than_the_task_count_give_every_task_its_fair_share(n_tasks):
    """400 batches of 16: a fixed remainder gave the first 16 tasks one row each time and the others none."""
    rng = np.random.default_rng(0)
    totals = sum(stratified_counts(16, n_tasks, rng) for _ in range(400))
    fair = 400 * 16 / n_tasks
    assert totals.sum() == 400 * 16
    assert totals.min() >= 0.5 * fair and totals.max() <= 1.5 * fair, (totals.min(), totals.max(), fair)


def test_stratified_counts_hand_values():
    rng = np.random.default_rng(0)
    assert stratified_counts(52, 26, rng).tolist() == [2] * 26  # a multiple: exact, no random draw
    state = rng.bit_generator.state
    stratified_counts(26, 26, rng)
    assert rng.bit_generator.state == state
    counts = stratified_counts(30, 26, rng)  # 1 each and 4 extra rows to 4 distinct tasks
    assert counts.sum() == 30 and counts.min() == 1 and (counts == 2).sum() == 4


def test_replay_batch_of_16_over_26_tasks_rotates_the_remainder():
    infos = [TaskInfo("atari100k", f"g{k}", k, 4, ActionSpace(True, 18)) for k in range(26)]
    replay = Replay(10, infos, torch.device("cpu"), seed=0)
    for k in range(26):
        for _ in range(10):
            replay.add(k, np.zeros((4, 4, 3), np.uint8), 0, 0.0, False)
    seen = torch.zeros(26)
    for _ in range(400):
        seen += torch.bincount(replay.sample(16, 4).task, minlength=26)
    fair = 400 * 16 / 26
    assert seen.min() >= 0.5 * fair and seen.max() <= 1.5 * fair


# ---- one update at the paper preset, 26 games on the real ALE ----
@pytest.fixture(scope="module")
def atari26_replay():
    cfg = compose_config(["agent=mow", "env=atari100k", "preset=paper"])
    env_cfg = dict(plan(cfg).cfg["env"])  # the shared 18-action set with per-game legal masks
    envs = make_envs("atari100k", ATARI26, env_cfg, seed=0)
    replay = fill_replay(envs, 70, seed=0)  # >= one sequence of 64 steps per game
    for env in envs:
        env.close()
    return replay


class Recorder:
    """replay.sample, recording each batch's size and rows per task."""

    def __init__(self, replay: Replay) -> None:
        self.replay, self.calls = replay, []

    def __call__(self, n: int, length: int) -> Batch:
        batch = self.replay.sample(n, length)
        self.calls.append((n, length, torch.bincount(batch.task, minlength=len(self.replay.buffers)).tolist()))
        return batch


@pytest.mark.slow(seconds=45)
@pytest.mark.parametrize("agent_name", ["mow", "monolithic"])
def test_one_paper_preset_update_touches_every_atari_game(agent_name, atari26_replay):
    """One full update (MoW: with its warm-up gradient clustering, no pre-training updates to save CI time)
    of the paper preset over the 26 games: each game has 1 sequence of 64 steps in every world-model batch
    and 40 imagination starts, every task embedding (and MoW's every harmonious s_k) gets a non-zero
    gradient, and the warm-up's task gradients each see one task's rows only."""
    cfg = compose_config([f"agent={agent_name}", "env=atari100k", "preset=paper", "agent.cluster_warmup_updates=0",
                          "agent.cluster_grad_batches=1", "agent.cluster_grad_seqs=1", "agent.cluster_n_init=5"]
                         if agent_name == "mow" else [f"agent={agent_name}", "env=atari100k", "preset=paper"])
    assert (cfg["agent"]["batch_per_task"], cfg["agent"]["imag_per_task"]) == (1, 40)
    torch.manual_seed(0)
    infos = atari26_replay.tasks
    agent = make_agent(agent_name, dict(cfg["agent"]), infos, torch.device("cpu"), "fp32")
    loss_rows = []
    if agent_name == "mow":
        task_losses = agent.task_losses
        agent.task_losses = lambda batch: (loss_rows.append(torch.bincount(batch.task, minlength=26).tolist()),
                                           task_losses(batch))[1]
    sample = Recorder(atari26_replay)
    agent.update(sample)

    for n, length, counts in sample.calls:
        assert min(counts) >= 1, (n, length, counts)  # every game in every batch
    wm_batches = [c for n, length, c in sample.calls if length == 64]
    imag_batches = [c for n, length, c in sample.calls if length == 8]
    assert wm_batches[-1] == [1] * 26 and imag_batches == [[40] * 26]
    grad = agent.wm.task_embedding.weight.grad  # (26, E), from the last world-model update
    assert (grad.norm(dim=1) > 0).all(), grad.norm(dim=1)
    if agent_name == "mow":
        assert (agent.log_sigma.grad.abs() > 0).all(), agent.log_sigma.grad
        single = [rows for rows in loss_rows if sum(r > 0 for r in rows) == 1]  # the warm-up's task gradients
        assert [rows.index(1) for rows in single] == list(range(26)) and all(sum(r) == 1 for r in single)
        assert len(wm_batches) == 2 and wm_batches[0] == [1] * 26  # the clustering's gradient batch, the update
        assert len(agent.cluster_report["assignment"]) == 26 and len(set(agent.cluster_report["assignment"])) == 12


class StillEnv(TaskEnv):
    """A task's evaluation env without a simulator: constant frames, episodes of `length` steps."""

    def __init__(self, info: TaskInfo, length: int = 3) -> None:
        self.info, self.length, self.t = info, length, 0

    def frame(self) -> np.ndarray:
        return np.full((self.info.image_size,) * 2 + (3,), 7 * self.info.index, dtype=np.uint8)

    def reset(self) -> np.ndarray:
        self.t = 0
        return self.frame()

    def step(self, action) -> Step:
        assert self.info.action.legal_mask()[action], (self.info.name, action)
        self.t += 1
        return Step(self.frame(), 1.0, self.t == self.length, False)


@pytest.mark.slow(seconds=45)
def test_paper_preset_mow_acts_on_26_games_in_one_batch_and_evaluates_every_episode(atari26_replay):
    """The paper-preset MoW after one update: 26 streams (one per game, joining at different steps) acting in
    one batch give the actions of each acting alone, all legal for their game; an evaluation of 26 games x 2
    episodes with 16 envs at once (fewer than the episodes) plays every episode of every game."""
    cfg = compose_config(["agent=mow", "env=atari100k", "preset=paper", "agent.cluster_warmup_updates=0",
                          "agent.cluster_grad_batches=1", "agent.cluster_grad_seqs=1", "agent.cluster_n_init=5"])
    torch.manual_seed(0)
    infos = atari26_replay.tasks
    agent = make_agent("mow", dict(cfg["agent"]), infos, torch.device("cpu"), "fp32")
    agent.update(atari26_replay.sample)
    together = [agent.new_context(k, seed=k) for k in range(26)]
    alone = [agent.new_context(k, seed=k) for k in range(26)]
    rng = np.random.default_rng(0)
    for step in range(3):
        live = range(0, 26, 2) if step == 0 else range(26)  # odd games join a step later: two context lengths
        obs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in live]
        batched = agent.act_batch([together[k] for k in live], obs)
        assert batched == [agent.act(alone[k], o) for k, o in zip(live, obs, strict=True)], step
        assert all(infos[k].action.legal_mask()[a] for k, a in zip(live, batched, strict=True))
    rows = evaluate(agent, lambda episode, task: StillEnv(infos[task]), 26, 2, False, 0, seed=0, max_envs=16)
    assert [[length for _, length, _ in per_task] for per_task in rows] == [[3, 3]] * 26


# ---- Meta-World MT50 with the continuous-action agent ----
def mt50_replay(length: int) -> Replay:
    """The 50 MT50 tasks with Meta-World's 4-d continuous actions, `length + 1` steps of random pixels and
    actions each. (Building the 50 real MT1 benchmarks takes minutes here, mostly goal sampling inside
    metaworld; the invariants below concern the agent and the replay, and test_envs renders the real ones.)"""
    infos = [TaskInfo("metaworld", name, k, 16, ActionSpace(False, 4)) for k, name in enumerate(MT50)]
    replay = Replay(length + 1, infos, torch.device("cpu"), seed=0)
    rng = np.random.default_rng(0)
    for k in range(len(infos)):
        for _ in range(length + 1):
            replay.add(k, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.uniform(-1, 1, 4).astype(np.float32),
                    float(rng.normal()), False)
    return replay


@pytest.mark.parametrize("agent_name", ["mow", "monolithic"])
def test_one_update_over_mt50_touches_every_task(agent_name):
    assert len(MT50) == 50
    cfg = compose_config([f"agent={agent_name}", "env=metaworld", "task=MT50", "preset=tiny", "agent.batch_per_task=1",
                          "agent.imag_per_task=2"] +
                         (["agent.n_clusters=12", "agent.n_experts=12", "agent.cluster_warmup_updates=1",
                           "agent.cluster_grad_batches=1", "agent.cluster_grad_seqs=1", "agent.cluster_n_init=5"]
                          if agent_name == "mow" else []))
    replay = mt50_replay(cfg["agent"]["batch_length"])
    torch.manual_seed(0)
    agent = make_agent(agent_name, dict(cfg["agent"]), replay.tasks, torch.device("cpu"), "fp32")
    assert not agent.discrete and agent.action_dim == 4
    sample = Recorder(replay)
    agent.update(sample)
    for n, length, counts in sample.calls:
        assert min(counts) >= 1, (n, length, counts)  # every task in every batch
    assert sample.calls[-1][2] == [2] * 50  # imagination starts
    assert (agent.wm.task_embedding.weight.grad.norm(dim=1) > 0).all()
    if agent_name == "mow":
        assert (agent.log_sigma.grad.abs() > 0).all()
        assert len(set(agent.cluster_report["assignment"])) == 12
