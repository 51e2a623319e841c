"""Offline data (mowbench.offline) on real Meta-World: the scripted experts succeed on every MT50 task under our
protocol (action repeat 2, 100 agent steps), the stored pixels are the frames our env renders for the stored actions,
the cache is read instead of playing again, the mixed batches take their share from it; Newt pretrains on it inside
a real run, records it, and resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mowbench.config import compose_config
from mowbench.envs import make_env
from mowbench.envs.metaworld import MT50
from mowbench.offline import OfflineSpec, collect, mixed_sampler, task_episodes
from mowbench.replay import Replay, StepField

CPU = torch.device("cpu")
FIRST = {"first": StepField()}


# Fast frames (no shadows, reflections or anti-aliasing: ~5x cheaper under osmesa): these tests are about the data's
# path, which is the same at any render quality; the full-quality frames are tested in tests/test_envs.py.
FAST = ["env.fast_render=true", "env.multisample=false"]


def env_cfg(**extra):
    return {**dict(compose_config(["env=metaworld", "preset=micro", *FAST])["env"]), "run_seed": 0, **extra}


def test_every_mt50_scripted_expert_succeeds_under_our_protocol():
    """Paper scale: one successful demonstration of each of the 50 tasks within the attempt limit, without pixels
    (a blank frame per step: the actions and successes do not depend on rendering)."""
    cfg = env_cfg()

    def blind(task, seed):
        env = make_env("metaworld", MT50, MT50.index(task), cfg, seed)
        env.observe = False
        return env

    tries = {}
    for task in MT50:
        episodes, stats = task_episodes(OfflineSpec(demos=1), lambda copy, task=task: blind(task, copy), seed=0)
        assert len(episodes) == 1 and episodes[0].success and len(episodes[0].reward) == 100
        assert stats["demos"]["success_rate"] == 1.0 and episodes[0].action.shape == (100, 4)
        assert np.abs(episodes[0].action).max() <= 1.0
        tries[task] = stats["demos"]["tries"]
    # measured at this seed: 58 tries for 50 successes (pick-out-of-hole-v3 6, peg-insert-side-v3 3)
    assert sum(tries.values()) <= 75, tries


def test_demonstration_pixels_are_our_envs_frames_and_the_cache_is_reused(tmp_path):
    """The stored frames equal those a fresh env of the same seed renders while replaying the stored actions; a
    second collect reads the cache (no env is made); other episode settings are another dataset."""
    tasks = ["reach-v3", "drawer-close-v3"]
    cfg = env_cfg()
    made = []

    def make(copy, k):
        made.append((copy, k))
        return make_env("metaworld", tasks, k, cfg, 500 + copy)

    infos = [make_env("metaworld", tasks, k, cfg, 0).info for k in range(2)]
    spec = OfflineSpec(demos=2, random=1)
    replay, stats = collect(spec, infos, make, 7, FIRST, CPU, CPU, tmp_path)
    assert made == [(0, 0), (2, 0), (0, 1), (2, 1)]  # one env per kind and task
    for k, task in enumerate(tasks):
        buf = replay.buffers[k]
        assert buf.size == 300 and stats[task]["demos"]["episodes"] == 2 and stats[task]["random"]["episodes"] == 1
        assert buf.extras["first"][:300].nonzero().flatten().tolist() == [0, 100, 200]
        env = make_env("metaworld", tasks, k, cfg, 500)  # the demonstrations' env, played again
        frames, rewards = [env.reset()], []
        for i in range(100):
            step = env.step(buf.action[i].numpy())
            frames.append(step.obs)
            rewards.append(step.reward)
        env.close()
        np.testing.assert_array_equal(buf.obs[:100].numpy(), np.stack(frames[:100]))
        np.testing.assert_allclose(buf.reward[:100].numpy(), rewards, rtol=1e-6)
        assert frames[0].std() > 10  # a real frame, not a blank one
    assert stats["drawer-close-v3"]["demos"]["mean_return"] > 10 * stats["drawer-close-v3"]["random"]["mean_return"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("metaworld-") for f in files)

    made.clear()
    again, _ = collect(spec, infos, make, 7, FIRST, CPU, CPU, tmp_path)
    assert made == []
    assert torch.equal(again.buffers[1].obs[:300], replay.buffers[1].obs[:300])
    assert torch.equal(again.buffers[1].action[:300], replay.buffers[1].action[:300])
    collect(OfflineSpec(demos=2, random=2), infos[:1], make, 7, FIRST, CPU, CPU, tmp_path)
    assert made == [(0, 0), (2, 0)] and len(list(tmp_path.iterdir())) == 3


def test_mixed_batches_take_their_share_from_the_offline_data():
    info = make_env("metaworld", ["reach-v3"], 0, env_cfg(), 0).info
    online, offline = Replay(50, [info], CPU, 0, FIRST), Replay(50, [info], CPU, 1, FIRST)
    for _ in range(50):
        online.add(0, np.zeros((16, 16, 3), np.uint8), np.zeros(4, np.float32), 1.0, False, first=0.0)
        offline.add(0, np.zeros((16, 16, 3), np.uint8), np.zeros(4, np.float32), 2.0, False, first=0.0)
    batch = mixed_sampler(online.sample, offline.sample, 0.5)(10, 4)
    assert batch.reward[:5].eq(2.0).all() and batch.reward[5:].eq(1.0).all() and batch.task_counts == (10,)
    assert mixed_sampler(online.sample, offline.sample, 0.0)(10, 4).reward.eq(1.0).all()


@pytest.mark.parametrize("values, message", [
    ({"demos": 0}, "demos=0; allowed: >= 1 for agent=newt"),
    ({"demo_share": 1.0}, "demo_share=1.0; allowed: 0 <= demo_share < 1"),
])
def test_newt_without_demonstrations_is_another_name(values, message):
    from mowbench.agents.base import build_config, get_agent

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_config(get_agent("newt"), values)
    with pytest.raises(ValueError, match="allowed: 0 for agent=newt-nodemo"):
        build_config(get_agent("newt-nodemo"), {"demos": 10})
    assert build_config(get_agent("newt-nodemo"), {}).demos == 0
    assert build_config(get_agent("newt"), {}).demos == 10


def test_newt_pretrains_on_demonstrations_in_a_run_and_resumes_exactly(tmp_path, monkeypatch):
    """A real micro run: the demonstrations are collected, pretrained on (pretrain/ metrics at step 0), put in the
    online replay, recorded in metadata; a run preempted (SIGUSR2) during its pretraining and resumed ends with the
    same weights as one that never stopped (the offline sampler's generator included). Meta-World restarts an
    episode cut by a preemption, so a preemption during pretraining, before any env step, is the one that can
    resume exactly."""
    import os
    import signal

    from mowbench.baselines.newt import NewtAgent
    from mowbench.runner import execute

    def run(folder):
        cfg = compose_config(["agent=newt", "env=metaworld", "preset=micro", "task=[reach-v3,drawer-close-v3]", *FAST,
                              "train.steps=40", "train.warmup=20", "train.eval_episodes=1",
                              "train.random_baseline=false",
                              "train.keep_checkpoint=true", f"results_dir={folder}"])
        return execute(cfg)

    run(tmp_path / "a")
    pretrain = NewtAgent.pretrain

    def preempted_at_two(self, sample):
        metrics = pretrain(self, sample)
        if self.pretrained == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # the trainer checkpoints after this update and leaves
        return metrics

    monkeypatch.setattr(NewtAgent, "pretrain", preempted_at_two)
    run(tmp_path / "b")
    folder = tmp_path / "b" / "metaworld" / "newt" / "all2" / "seed_0"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["counters"]["pretrain_updates"] == 2
    assert not (folder / "DONE.json").exists()
    monkeypatch.setattr(NewtAgent, "pretrain", pretrain)
    run(tmp_path / "b")
    runs = [tmp_path / x / "metaworld" / "newt" / "all2" / "seed_0" for x in "ab"]
    meta = json.loads((runs[0] / "metadata.json").read_text())
    data = meta["offline_data"]
    assert data["spec"]["demos"] == 2 and data["spec"]["pretrain_updates"] == 4 and data["spec"]["share"] == 0.5
    assert {t: data["tasks"][t]["demos"]["success_rate"] for t in data["tasks"]} == {"reach-v3": 1.0,
                                                                                      "drawer-close-v3": 1.0}
    metrics = (runs[0] / "metrics.csv").read_text()
    assert "0,pretrain/wm/prior," in metrics and "0,pretrain/lr/model," in metrics
    states = [torch.load(r / "checkpoint.pt", weights_only=True) for r in runs]
    assert states[0]["counters"]["pretrain_updates"] == 4 and states[0]["agent"]["pretrained"] == 4
    assert states[0]["replay"]["buffers"][0]["size"] == 200 + 40  # the demonstrations, then the run's own steps
    for name, value in states[0]["agent"]["wm"].items():
        assert torch.equal(value, states[1]["agent"]["wm"][name]), name
    assert len(list((tmp_path / "a" / "offline_data").iterdir())) == 2


def test_pwm_pretrains_its_world_model_offline_then_extracts_policies_with_it_frozen(tmp_path, monkeypatch):
    """`pwm`, PWM's published recipe, in a real micro run: the offline dataset of each task holds one scripted-expert,
    one noisy-expert and one random episode; 4 world-model updates on it, then 6 policy updates that leave the world
    model exactly as pretrained and move the actors; no env step (no training episode); recorded in metadata."""
    from mowbench.baselines.pwm import PWMOfflineAgent
    from mowbench.runner import execute

    seen = []
    train_step = PWMOfflineAgent.train_step

    def recording(self, sample):
        seen.append(({k: v.clone() for k, v in self.wm.state_dict().items()},
                     {k: v.clone() for k, v in self.actor.state_dict().items()}))
        return train_step(self, sample)

    monkeypatch.setattr(PWMOfflineAgent, "train_step", recording)
    cfg = compose_config(["agent=pwm", "env=metaworld", "preset=micro", "task=[reach-v3,drawer-close-v3]", *FAST,
                          "train.eval_episodes=1", "train.random_baseline=false", "train.keep_checkpoint=true",
                          f"results_dir={tmp_path}"])
    execute(cfg)
    folder = tmp_path / "metaworld" / "pwm" / "all2" / "seed_0"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["step_budget"]["agent_steps_per_task"] == 0 and meta["step_budget"]["offline_updates"] == 6
    assert meta["offline_data"]["spec"]["online"] is False
    for stats in meta["offline_data"]["tasks"].values():
        assert {k: stats[k]["episodes"] for k in ("demos", "noisy", "random")} == {"demos": 1, "noisy": 1,
                                                                                    "random": 1}
    assert (folder / "episodes.csv").read_text().count("\n") == 1  # the header: no training episode
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert state["agent"]["pretrained"] == 4 and state["agent"]["updates"] == 6 and len(seen) == 6
    pretrained_wm, first_actor = seen[0]
    for name, value in state["agent"]["wm"].items():
        assert torch.equal(value, pretrained_wm[name]), name  # frozen after pretraining
    assert any(not torch.equal(state["agent"]["actor"][k], v) for k, v in first_actor.items())
    assert any("pretrain/wm/loss" in line for line in (folder / "metrics.csv").read_text().splitlines())
