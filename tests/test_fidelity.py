"""Fidelity to the code behind the published numbers (docs/methods/storm.md): under the storm
protocol the baselines follow STORM's reference implementation; the textbook choices are ablations."""

import csv
import json

import numpy as np
import pytest
import torch

from mowbench.agents.base import build_config, get_agent
from mowbench.baselines.storm import REFERENCE_WM_BASE, REFERENCE_WM_PER_ACTION
from mowbench.config import compose_config, plan
from mowbench.envs.base import ActionSpace, Step, TaskEnv, TaskInfo
from mowbench.evaluation import evaluate, evaluate_reference
from mowbench.models import CausalTransformer
from mowbench.results import run_dir
from mowbench.runner import execute
from tests.conftest import MICRO

# STORM's reference world model, instantiated and counted (baselines/storm.py): 16,507,011 with Pong's 6 actions
REFERENCE_WM_PARAMETERS_6_ACTIONS = REFERENCE_WM_BASE + 6 * REFERENCE_WM_PER_ACTION
assert REFERENCE_WM_PARAMETERS_6_ACTIONS == 16_507_011


def storm_world_model_parameters(*overrides: str) -> int:
    cfg = compose_config(["agent=storm", "env=atari100k", "preset=paper", "task=Pong", *overrides])
    entry = get_agent("storm")
    agent = entry.cls(build_config(entry, dict(cfg["agent"])), [TaskInfo("atari100k", "Pong", 0, 64,
                                                                          ActionSpace(True, 6))],
                      torch.device("cpu"), "fp32")
    return agent.parameter_counts()["world_model"]


def test_paper_storm_world_model_has_exactly_the_reference_parameter_count():
    assert storm_world_model_parameters() == REFERENCE_WM_PARAMETERS_6_ACTIONS
    # the BatchNorm1d(4096) decoder stem (ablation decoder_bn1d) adds 2 x (4096 - 256) affine parameters
    assert storm_world_model_parameters("ablation=decoder_bn1d") == REFERENCE_WM_PARAMETERS_6_ACTIONS + 7_680


def test_storm_protocol_defaults_are_the_reference_choices():
    cfg = compose_config(["agent=storm", "env=atari100k", "preset=paper", "task=Pong"])
    a = cfg["agent"]
    assert (a["lambda_value"], a["decoder_stem_norm"], a["attn_dropout"], a["block_ln_eps"],
            a["return_percentiles"]) == ("current", "bn2d", 0.1, 1e-6, "kth")
    p = plan(cfg)
    assert p.train.eval_mode == "reference" and p.train.eval_episodes == 20 and p.train.eval_parallel == 5
    assert plan(compose_config(["env=atari100k", "env.protocol=standard", "task=Pong"])).train.eval_mode == "full"
    textbook = compose_config(["agent=storm", "env=atari100k", "ablation=textbook", "task=Pong"])["agent"]
    assert (textbook["lambda_value"], textbook["decoder_stem_norm"], textbook["attn_dropout"],
            textbook["block_ln_eps"], textbook["return_percentiles"]) == ("next", "bn1d", 0.0, 1e-5, "linear")
    for name in ("textbook_returns", "decoder_bn1d", "no_attn_dropout", "interpolated_percentiles"):
        compose_config(["agent=storm", f"ablation={name}"])  # each exists and composes


def test_attention_dropout_acts_in_training_only_and_blocks_use_the_reference_eps():
    model = CausalTransformer(width=16, depth=1, heads=2, ffn=32, dropout=0.0, max_len=8, attn_dropout=0.5,
                              ln_eps=1e-6)
    assert model.blocks[0].norm1.eps == 1e-6 and model.blocks[0].norm2.eps == 1e-6
    x = torch.randn(3, 8, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # deterministic without dropout
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))  # attention probabilities dropped at random
    no_drop = CausalTransformer(width=16, depth=1, heads=2, ffn=32, dropout=0.0, max_len=8).train()
    torch.testing.assert_close(no_drop(x), no_drop(x))


class ScriptedEnv(TaskEnv):
    """Episodes of `length` steps whose rewards are `rewards` (last one at the episode's end)."""

    def __init__(self, rewards: list[float]) -> None:
        self.rewards, self.t = rewards, 0
        self.info = TaskInfo("minatar", "scripted", 0, 4, ActionSpace(True, 2))

    def reset(self) -> np.ndarray:
        self.t = 0
        return np.zeros((4, 4, 3), dtype=np.uint8)

    def step(self, action) -> Step:
        self.t += 1
        done = self.t == len(self.rewards)
        return Step(np.zeros((4, 4, 3), dtype=np.uint8), self.rewards[self.t - 1], done, False)


def test_reference_evaluation_keeps_the_first_episodes_to_finish_without_their_last_reward():
    """Two envs in lockstep (env 0 steps first in each round): env 0's episodes last 3 steps (rewards
    1, 1, 1), env 1's 2 steps (1, 5). Env 1 ends in rounds 2, 4, 6, env 0 in rounds 3 and 6, so the order
    is e1, e0, e1, e0, e1 and the returns without each last reward are 1, 2, 1, 2, 1."""
    scripts = [[1, 1, 1], [1, 5]]  # copy -> its env's episode
    [rows] = evaluate_reference(None, lambda copy, task: ScriptedEnv(scripts[copy]), 1, 5, False, 0, 0, parallel=2)
    assert [r[0] for r in rows] == [1, 2, 1, 2, 1]
    assert [r[1] for r in rows] == [2, 3, 2, 3, 2]
    assert np.mean([r[0] for r in rows]) == pytest.approx(1.4)
    # the full evaluation of the same episodes counts every reward: 3 and 6
    [full] = evaluate(None, lambda episode, task: ScriptedEnv([1, 1, 1]), 1, 2, False, 0, 0)
    assert [r[0] for r in full] == [3, 3]
    [full] = evaluate(None, lambda episode, task: ScriptedEnv([1, 5]), 1, 2, False, 0, 0)
    assert [r[0] for r in full] == [6, 6]
    # tasks evaluated together keep their own scripts: task 1 of a reference evaluation is task 0 above
    both = evaluate_reference(None, lambda copy, task: ScriptedEnv(scripts[copy] if task else [2]), 2, 5, False, 0,
                              0, parallel=2)
    assert [r[0] for r in both[1]] == [1, 2, 1, 2, 1] and [r[0] for r in both[0]] == [0] * 5


def test_random_baseline_plays_random_episodes_and_records_them(tmp_path):
    """train.random_episodes sets the random policy's episodes per task apart from the agent's evaluation
    (None: eval_episodes); 0 is refused before any work."""
    base = ["task=breakout", "train.warmup=20", "train.steps=30", "train.eval_episodes=2", "train.eval_max_steps=30",
            "train.replay_capacity=200", *MICRO]
    returns, meta = {}, {}
    for n in (None, 2, 5):
        out = tmp_path / str(n)
        [(_, summary)] = execute(compose_config([*base, f"results_dir={out}", f"train.random_episodes={n or 'null'}"]))
        returns[n] = summary["random_return"]["breakout"]
        meta[n] = json.loads((run_dir(out, "minatar", "storm", "breakout", 0) / "metadata.json").read_text())
    assert returns[None] == returns[2] and returns[5] != returns[2]  # episodes 3-5 join the first two
    assert [meta[n]["evaluation"]["random_episodes"] for n in (None, 2, 5)] == [2, 2, 5]
    with pytest.raises(ValueError, match=r"train.random_episodes=0; allowed: a positive integer"):
        execute(compose_config([*base, f"results_dir={tmp_path / 'bad'}", "train.random_episodes=0"]))
    assert not (tmp_path / "bad").exists()


def test_evaluation_mode_is_recorded_in_metadata_and_eval_csv(tmp_path):
    cfg = compose_config(["task=breakout", f"results_dir={tmp_path}", "train.warmup=20", "train.steps=30",
                          "train.eval_episodes=3", "train.eval_max_steps=15", "train.eval_mode=reference",
                          "train.eval_parallel=2", "train.replay_capacity=200", *MICRO])
    [(_, summary)] = execute(cfg)
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["evaluation"] == {"mode": "reference", "episodes": 3, "greedy": False, "parallel_envs": 2,
                                  "random_episodes": 3}
    rows = list(csv.DictReader((folder / "eval.csv").open()))
    assert len(rows) == 3 and {r["mode"] for r in rows} == {"reference"}
    assert all(int(r["length"]) <= 15 for r in rows)
    signal = meta["per_task_signal"]
    assert signal["world_model_sequences_per_update"] == 2 and signal["imagination_starts_per_update"] == 4
    assert signal["updates_per_round"] == 1.0 and signal["replayed_steps_per_round"] == 2 * 8
    assert signal["updates_total"] == 10  # (30 - 20) steps x 1 update
