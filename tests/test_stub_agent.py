"""The trainer's only contract is `Agent`: a minimal agent with no world model (a bandit learner per task)
trains, checkpoints, resumes exactly and evaluates through the real trainer, runner and results layer."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from mowbench.agents.base import AGENTS, Agent, AgentConfig, register_agent
from mowbench.config import compose_config
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.replay import Batch, Replay, StepField
from mowbench.results import is_done, read_json, run_dir
from mowbench.runner import execute
from mowbench.trainer import CHECKPOINT


@dataclass
class StubConfig(AgentConfig):
    lr: float = 0.2  # step size of each action value towards the sampled rewards


class StubAgent(Agent):
    """One value per (task, action), moved towards the rewards of sampled transitions; acts by softmax."""

    def __init__(self, cfg: StubConfig, tasks: list[TaskInfo], device: torch.device, precision: str) -> None:
        self.cfg, self.tasks = cfg, tasks
        self.q = torch.zeros(len(tasks), tasks[0].action.n)
        self.visits = torch.zeros(len(tasks), tasks[0].action.n)  # transitions learned from
        self.legal = torch.as_tensor(np.stack([t.action.legal_mask() for t in tasks]))

    def new_context(self, task: int, seed: int | None = None) -> dict[str, Any]:
        seed = int(torch.randint(2**62, (1,))) if seed is None else seed
        return {"task": task, "rng": np.random.default_rng(seed)}

    def act(self, context: dict[str, Any], obs: np.ndarray, greedy: bool = False) -> int:
        q = self.q[context["task"]].masked_fill(~self.legal[context["task"]], -1e9)
        probs = torch.softmax(q * 5, -1).double().numpy()
        return int(q.argmax()) if greedy else int(context["rng"].choice(len(probs), p=probs / probs.sum()))

    def update(self, sample: Callable[[int, int], Batch]) -> dict[str, float]:
        batch = sample(4, 2)  # 4 sequences of 2 steps
        for task, actions, rewards in zip(batch.task.tolist(), batch.action.tolist(), batch.reward.tolist(),
                                          strict=True):
            for action, reward in zip(actions, rewards, strict=True):
                self.q[task, action] += self.cfg.lr * (reward - self.q[task, action])
                self.visits[task, action] += 1
        return {"stub/q_mean": float(self.q.mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.clone(), "visits": self.visits.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q, self.visits = state["q"].clone(), state["visits"].clone()

    def parameter_counts(self) -> dict[str, int]:
        return {"values": self.q.numel()}


@pytest.fixture
def stub_registered():
    register_agent("stub", StubConfig)(StubAgent)
    yield
    del AGENTS["stub"]


def stub_cfg(results: Any, *extra: str) -> dict[str, Any]:
    cfg = compose_config(["task=breakout", f"results_dir={results}", "train.warmup=20", "train.steps=80",
                          "train.eval_episodes=3", "train.eval_max_steps=30", "train.replay_capacity=200",
                          "train.checkpoint_every=20", "train.log_every=10", "train.progress=false",
                          "train.tensorboard=false", *extra])
    cfg["agent"] = {"name": "stub", "lr": 0.2}  # the stub's own config, no YAML file
    return cfg


def test_a_stub_agent_trains_resumes_exactly_and_evaluates(stub_registered, tmp_path):
    [(_, whole)] = execute(stub_cfg(tmp_path / "whole"))
    assert execute(stub_cfg(tmp_path / "cut", "train.stop_at=40")) == [("breakout", None)]  # preempted
    folder = run_dir(tmp_path / "cut", "minatar", "stub", "breakout", 0)
    assert (folder / "checkpoint.pt").exists() and not is_done(folder)
    [(_, resumed)] = execute(stub_cfg(tmp_path / "cut"))
    assert is_done(folder)
    assert whole["updates"] == resumed["updates"] == 60 and whole["final_return"] == resumed["final_return"]
    whole_folder = run_dir(tmp_path / "whole", "minatar", "stub", "breakout", 0)
    for name in ("eval.csv", "episodes.csv", "metrics.csv"):  # every row but the wall-clock speed
        rows = [[line for line in (f / name).read_text().splitlines() if ",perf/" not in line]
                for f in (folder, whole_folder)]
        assert rows[0] == rows[1] and len(rows[0]) > 1, name
    model = torch.load(folder / "model.pt", weights_only=True)
    assert model["visits"].sum() == 60 * 4 * 2  # every update learned from its whole batch
    whole_model = torch.load(whole_folder / "model.pt", weights_only=True)
    assert torch.equal(model["q"], whole_model["q"]) and torch.equal(model["visits"], whole_model["visits"])
    meta = read_json(folder / "metadata.json")
    assert meta["agent"] == "stub" and meta["parameters"] == {"values": 6} and meta["per_task_signal"][
        "updates_per_round"] == 1.0
    assert [s["resumed_from_step"] for s in meta["sessions"]] == [None, 40]
    # each session records its process's peak memory (a CPU run: resident memory only), in GiB
    assert all(0.05 < s["peak_memory_gib"]["host_rss"] < 64 and "cuda_allocated" not in s["peak_memory_gib"]
               for s in meta["sessions"])


class FieldsStubAgent(StubAgent):
    """The stub with two optional replay fields: `first` (filled by the trainer) and `chosen_q`, the value of
    the chosen action when it acted (from step_extras). Checks them in every batch it learns from."""

    checked = 0

    def replay_fields(self) -> dict[str, StepField]:
        return {"first": StepField(), "chosen_q": StepField((), torch.float32)}

    def act(self, context: dict[str, int], obs: np.ndarray, greedy: bool = False) -> int:
        action = super().act(context, obs, greedy)
        context["chosen_q"] = float(self.q[context["task"], action]) + 1.0  # +1: told apart from warm-up zeros
        return action

    def step_extras(self, context: dict[str, Any]) -> dict[str, Any]:
        return {"chosen_q": context["chosen_q"]}

    def update(self, sample: Callable[[int, int], Batch]) -> dict[str, float]:
        batch = sample(4, 6)
        first, chosen = batch.extras["first"], batch.extras["chosen_q"]
        assert first.shape == chosen.shape == batch.reward.shape and set(first.unique().tolist()) <= {0.0, 1.0}
        # the step after an episode's end is the next episode's first
        after_end = first[:, 1:][batch.terminal[:, :-1] == 1]
        assert bool((after_end == 1).all())
        FieldsStubAgent.checked += 1
        return super().update(sample)


def test_a_method_declares_optional_replay_fields_without_touching_other_agents(tmp_path):
    register_agent("stub_fields", StubConfig)(FieldsStubAgent)
    try:
        cfg = stub_cfg(tmp_path, "train.steps=300", "train.warmup=100", "train.checkpoint_every=150",
                     "train.keep_checkpoint=true", "train.replay_capacity=400")
        cfg["agent"] = {"name": "stub_fields", "lr": 0.2}
        [(_, summary)] = execute(cfg)
    finally:
        del AGENTS["stub_fields"]
    assert FieldsStubAgent.checked == summary["updates"] == 200
    state = torch.load(run_dir(tmp_path, "minatar", "stub_fields", "breakout", 0) / CHECKPOINT, weights_only=True)
    extras = state["replay"]["buffers"][0]["extras"]
    assert extras["first"][0] == 1.0 and extras["first"].sum() >= 2  # episodes of 300 steps of breakout: several
    assert bool((extras["chosen_q"][:100] == 0).all()) and bool((extras["chosen_q"][100:] >= 1).all())
    replay = Replay(10, [TaskInfo("minatar", "t", 0, 16, ActionSpace(True, 3))], torch.device("cpu"), 0)
    with pytest.raises(ValueError, match=r"replay fields \['root_value'\] were not declared; declared: none"):
        replay.add(0, np.zeros((16, 16, 3), np.uint8), 0, 0.0, False, root_value=1.0)
