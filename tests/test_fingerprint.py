"""Every registered agent's numbers, recorded: two updates (and a pretraining update where the method has one) and
a few actions on real env frames at the micro preset, seeded. A restructuring (moved models, renamed modules,
shared helpers) must leave them unchanged; tests/data/fingerprints.json holds the values recorded before it.

Regenerate only when a change is meant to change numbers: `.venv/bin/python -m tests.test_fingerprint --record`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mowbench.agents.base import read_metrics, registered_agents
from mowbench.config import compose_config, plan
from mowbench.envs import make_envs
from mowbench.replay import Replay

RECORD = Path(__file__).parent / "data" / "fingerprints.json"
STEPS = 40  # random-policy transitions per task: more than one micro sequence of every agent


def suite_for(agent: str) -> tuple[str, list[str]]:
    from tests.conftest import continuous_only

    if continuous_only(agent):
        return "metaworld", ["reach-v3", "push-v3"]
    tasks = ["breakout", "freeway"]
    return "minatar", tasks if registered_agents()[agent].multi_task else tasks[:1]


def fingerprint(agent_name: str) -> dict[str, Any]:
    """What the agent computes from fixed inputs: metrics of its updates, its greedy and sampled actions, and a
    checksum of every parameter after the updates."""
    suite, tasks = suite_for(agent_name)
    cfg = compose_config([f"agent={agent_name}", f"env={suite}", "preset=micro", f"task=[{','.join(tasks)}]"])
    p = plan(cfg)
    envs = make_envs(suite, p.tasks, dict(p.cfg["env"]), seed=0)
    try:
        torch.manual_seed(0)
        entry = registered_agents()[agent_name]
        agent = entry.cls(p.agent_config, [e.info for e in envs], torch.device("cpu"), "fp32")
        fields = agent.replay_fields()
        replay = Replay(STEPS, [e.info for e in envs], torch.device("cpu"), 0, fields)
        rng = np.random.default_rng(0)
        frames = []
        for k, env in enumerate(envs):
            obs, first = env.reset(), True
            frames.append(obs)
            for _ in range(STEPS):  # the warm-up's random steps: declared fields hold zeros, `first` its flag
                action = env.info.action.sample(rng)
                step = env.step(action)
                extras = {name: np.zeros(f.shape, np.float32) for name, f in fields.items() if name != "first"}
                if "first" in fields:
                    extras["first"] = float(first)
                replay.add(k, obs, action, step.reward, env.train_terminal(step), **extras)
                obs, first = (env.reset(), True) if step.done else (step.obs, False)
        torch.manual_seed(0)
        out: dict[str, Any] = {}
        if (spec := agent.offline_data()) is not None and spec.pretrain_updates:
            out["pretrain"] = read_metrics(agent.pretrain(replay.sample))
        out["updates"] = [read_metrics(agent.update(replay.sample)) for _ in range(2)]
        actions = []
        for greedy in (True, False):
            for k, obs in enumerate(frames):
                context = agent.new_context(k, seed=7)
                agent.episode_start(context)
                actions.append(np.asarray(agent.act(context, obs, greedy=greedy), np.float64).tolist())
        out["actions"] = actions
        state = agent.state_dict()
        out["parameters"] = sum(float(v.detach().double().abs().sum()) for v in tensors(state))
        return out
    finally:
        for env in envs:
            env.close()


def tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() else []
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in tensors(v)]
    return []


def close(a: Any, b: Any, path: str, bad: list[str]) -> None:
    """Numbers within 1e-4 relative (or 1e-6 absolute): the same code gives the same numbers on one CPU, and
    another CPU's vector width moves the last bits only."""
    if isinstance(a, dict) and isinstance(b, dict):
        if sorted(a) != sorted(b):
            bad.append(f"{path}: keys {sorted(a)} != {sorted(b)}")
        for k in set(a) & set(b):
            close(a[k], b[k], f"{path}.{k}", bad)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            bad.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            close(x, y, f"{path}[{i}]", bad)
    elif not math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6) and not (math.isnan(a) and math.isnan(b)):
        bad.append(f"{path}: {a!r} != recorded {b!r}")


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("agent_name", sorted(json.loads(RECORD.read_text()) if RECORD.exists() else {}))
def test_agent_numbers_match_the_recorded_fingerprint(agent_name):
    recorded = json.loads(RECORD.read_text())[agent_name]
    bad: list[str] = []
    close(fingerprint(agent_name), recorded, agent_name, bad)
    assert not bad, "\n".join(bad[:20])


def test_every_registered_agent_has_a_fingerprint():
    assert sorted(json.loads(RECORD.read_text())) == sorted(registered_agents())


if __name__ == "__main__" and "--record" in sys.argv:
    torch.set_num_threads(1)
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or sorted(registered_agents())
    record = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    for name in names:
        record[name] = fingerprint(name)
        print(name, json.dumps(record[name])[:200])
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
