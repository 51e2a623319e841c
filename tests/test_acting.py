"""Batched acting and vectorised evaluation: each stream draws from its own generator, so a stream's actions
and an episode's result do not depend on the streams beside it or on how many run at once."""

import copy
import pickle

import numpy as np
import pytest
import torch

from mowbench.agents.base import make_agent
from mowbench.agents.imagination import random_legal
from mowbench.config import compose_config
from mowbench.envs import make_env, make_envs
from mowbench.evaluation import evaluate, evaluate_reference
from mowbench.models.heads import ContinuousActionDist
from mowbench.ops import sample_categorical
from tests.conftest import MICRO


def micro_agent(name, tasks, extra=()):
    cfg = compose_config([f"agent={name}", "env=minatar", f"task=[{','.join(tasks)}]", *MICRO, *extra])
    env_cfg = dict(cfg["env"])
    envs = make_envs("minatar", tasks, env_cfg, seed=0)
    agent = make_agent(name, dict(cfg["agent"]), [e.info for e in envs], torch.device("cpu"), "fp32")
    return agent, envs, env_cfg


def test_sampling_from_given_uniforms_is_the_distribution():
    """Acting samples by inverse CDF from uniforms of each stream's generator: a uniform grid of N points
    gives every outcome N x its probability (hand-computed), so these are exact samplers."""
    grid = (torch.arange(1000, dtype=torch.float32) + 0.5) / 1000
    picks = sample_categorical(torch.tensor([0.1, 0.2, 0.7]).expand(1000, 3), grid[:, None])
    assert torch.bincount(picks, minlength=3).tolist() == [100, 200, 700]
    legal = torch.tensor([True, False, True, True]).expand(999, 4)
    grid3 = (torch.arange(999, dtype=torch.float32) + 0.5) / 999
    assert torch.bincount(random_legal(legal, grid3), minlength=4).tolist() == [333, 0, 333, 333]
    dist = ContinuousActionDist(torch.tensor([[0.3, 0.0]]).expand(1000, 2).contiguous())  # tanh(0.3), std s
    x = dist.sample(grid[:, None].expand(1000, 1))  # (1000, 1): quantiles of N(tanh 0.3, s)
    assert x.mean().item() == pytest.approx(np.tanh(0.3), abs=1e-3)
    assert x.std().item() == pytest.approx(dist.dist.stddev[0, 0].item(), rel=0.01)


@pytest.mark.parametrize("reencode", [True, False])
@pytest.mark.parametrize("name,tasks", [("storm", ["breakout"]), ("mow", ["breakout", "space_invaders", "asterix"])])
def test_batched_acting_equals_acting_one_stream_at_a_time(name, tasks, reencode):
    """Four streams (MoW: over three tasks) join one after another, so their contexts have different lengths
    (one sequence pass per length) and the first action of each is random; acting on all of them at once
    gives the actions and contexts of acting on each alone, re-encoding the windows (the default) or not."""
    torch.manual_seed(0)
    agent, envs, _ = micro_agent(name, tasks, [f"agent.act_reencode={reencode}"])
    size = envs[0].info.image_size
    batched, single, rng, mixed = [], [], np.random.default_rng(0), False
    for step in range(10):
        if step % 2 == 0 and len(batched) < 4:
            task = len(batched) % len(tasks)
            batched.append(agent.new_context(task, seed=len(batched)))
            single.append(agent.new_context(task, seed=len(single)))
        obs = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in batched]
        together = agent.act_batch(batched, obs)
        alone = [agent.act(c, o) for c, o in zip(single, obs, strict=True)]
        assert together == alone, step
        mixed |= len({len(c.history(reencode)) for c in batched}) > 1
    assert mixed  # at some steps the streams had different context lengths
    for a, b in zip(batched, single, strict=True):
        assert (a.z is None) == reencode and (a.obs is None) != reencode  # the context keeps frames or latents
        torch.testing.assert_close(a.history(reencode), b.history(reencode))
        assert torch.equal(a.action, b.action)


@pytest.mark.parametrize("reencode", [True, False])
def test_acting_reencodes_its_window_by_default(reencode):
    """The default (act_reencode, as STORM's reference, which encodes its 16 context frames at every step): an
    act reads its window's frames encoded with the current weights and fresh posterior draws, so from one step to
    the next the frames both windows hold get new draws, and after a weight change even the oldest frame's latent
    follows the new weights. act_reencode=false keeps each frame's latent from when its frame was current."""
    torch.manual_seed(0)
    agent, envs, _ = micro_agent("storm", ["breakout"], [] if reencode else ["agent.act_reencode=false"])
    assert agent.cfg.act_reencode == reencode
    size, rng, w, v = envs[0].info.image_size, np.random.default_rng(0), agent.cfg.act_context, agent.wm.latent_vars

    def frame():
        return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)

    context = agent.new_context(0, seed=0)
    for _ in range(w + 1):
        agent.act(context, frame())
    windows, sequence = [], agent.wm.sequence

    def recorded(z, *args, **kwargs):  # the latents an act reads, (1, W, V*C) -> classes (W, V)
        windows.append(z[0].unflatten(-1, (v, -1)).argmax(-1))
        return sequence(z, *args, **kwargs)

    agent.wm.sequence = recorded
    twin, current = copy.deepcopy(context), frame()  # the same frames, latents and generator state
    agent.act(context, current)
    agent.act(context, frame())
    first, second = windows
    assert first.shape == (w, v)
    assert torch.equal(second[:-1], first[1:]) != reencode  # the same frames: new draws, or the kept latents
    with torch.no_grad():  # an "update" that makes the posterior put all but unimix's 1% on class 0
        agent.wm.posterior_head.linear.weight.zero_()
        bias = torch.zeros(v, agent.cfg.n_classes)  # (V, C)
        bias[:, 0] = 20.0
        agent.wm.posterior_head.linear.bias.copy_(bias.flatten())
    agent.act(twin, current)  # the twin's first act again, with its draws, after the change
    after = windows[2]
    if reencode:
        assert (after == 0).float().mean() > 0.9 and (after[0] == 0).all()  # the oldest frame too
        assert not (first == 0).all()
    else:
        assert torch.equal(after, first)


def test_evaluation_does_not_depend_on_how_many_episodes_run_at_once():
    """Full mode: each episode has its own env and acting seed, so 1 env at a time or all at once give the
    same episodes, for the agent and for the random policy; reference mode evaluates every task's copies in
    one batch and matches evaluating them without batching (max one stream per act_batch call)."""
    torch.manual_seed(0)
    tasks = ["breakout", "space_invaders"]
    agent, envs, env_cfg = micro_agent("mow", tasks)

    def make(copy, task):
        return make_env("minatar", tasks, task, env_cfg, 100 + 7 * copy, evaluation=True)

    for policy in (agent, None):
        one = evaluate(policy, make, 2, 3, False, 25, seed=5, max_envs=1)
        many = evaluate(policy, make, 2, 3, False, 25, seed=5, max_envs=64)
        assert one == many and len(one) == 2 and all(len(rows) == 3 for rows in one)
        assert len({r for rows in one for r in rows}) > 1  # not all alike: the seeds differ per episode

    class OneAtATime:  # the agent acting on each stream alone
        def __getattr__(self, name):
            return getattr(agent, name)

        def act_batch(self, contexts, obs, greedy=False):
            return [agent.act(c, o, greedy) for c, o in zip(contexts, obs, strict=True)]

    batched = evaluate_reference(agent, make, 2, 4, False, 25, seed=5, parallel=3)
    alone = evaluate_reference(OneAtATime(), make, 2, 4, False, 25, seed=5, parallel=3)
    assert batched == alone and all(len(rows) == 4 for rows in batched)


@pytest.mark.parametrize("suite,expected", [("atari100k", 64), ("minatar", 64), ("metaworld", 8)])
def test_evaluation_envs_at_once_default_per_suite(suite, expected):
    """What fits in memory: an Atari env ~3 MiB, a Meta-World env with its renderer ~190 MiB."""
    from mowbench.config import plan

    assert plan(compose_config([f"env={suite}"])).train.eval_envs == expected
    assert plan(compose_config([f"env={suite}", "train.eval_envs=3"])).train.eval_envs == 3


@pytest.mark.parametrize("name,tasks,extra", [("storm", ["breakout"], []),
                                              ("mow", ["breakout", "space_invaders", "asterix"], []),
                                              ("mow", ["breakout", "space_invaders"], ["agent.routing=token"])])
def test_cached_acting_is_exact_over_its_window(name, tasks, extra):
    """act_refresh=R > 1: every step's h is the exact pass over the stream's last L steps (positions from 0),
    with min(len, W-R+1) <= L <= min(len, W) for W = act_context; streams joining later make rows of
    different lengths in one cache (left padding). The first W steps of a batch that does not change are the
    exact path's, action for action. R = 1 is the exact path itself. With kept latents (act_reencode=false), so
    that the cached steps' latents are the context's."""
    w, r = 4, 2
    torch.manual_seed(0)
    cfg = compose_config([f"agent={name}", "env=minatar", f"task=[{','.join(tasks)}]", *MICRO, *extra,
                          f"agent.act_context={w}", f"agent.act_refresh={r}", "agent.act_reencode=false"])
    envs = make_envs("minatar", tasks, dict(cfg["env"]), seed=0)
    agent = make_agent(name, dict(cfg["agent"]), [e.info for e in envs], torch.device("cpu"), "fp32")
    size = envs[0].info.image_size
    seen, original = [], agent.cached_h

    def checked(contexts, lengths, task, u):
        h = original(contexts, lengths, task, u)  # (n, 1, D)
        session = contexts[0].session
        for i, c in enumerate(contexts):
            if not lengths[i]:
                continue
            window = session.slots - session.pad[i]
            assert min(lengths[i], w - r + 1) <= window <= min(lengths[i], w)
            exact = agent.wm.sequence(c.z[None, -window:], agent.action_input(c.action[None, -window:]),
                                      task[i:i + 1])[:, -1]  # (1, D)
            torch.testing.assert_close(h[i], exact, atol=1e-4, rtol=1e-4)
            seen.append(window)
        return h

    agent.cached_h = checked
    contexts, rng = [], np.random.default_rng(0)
    for step in range(14):
        if step in (0, 3, 7):  # streams join: a new session each time, rows of different lengths
            contexts.append(agent.new_context(len(contexts) % len(tasks), seed=len(contexts)))
        agent.act_batch(contexts, [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in contexts])
    assert set(seen) == {1, 2, 3, 4}  # every window length occurred, refreshes (3) and full windows (4)

    exact_cfg = dict(cfg["agent"]) | {"act_refresh": 1}
    torch.manual_seed(0)
    exact = make_agent(name, exact_cfg, [e.info for e in envs], torch.device("cpu"), "fp32")
    exact.load_state_dict(agent.state_dict())
    a = [agent.new_context(i % len(tasks), seed=i) for i in range(3)]
    b = [exact.new_context(i % len(tasks), seed=i) for i in range(3)]
    for _ in range(w + 1):  # steps 1..W: the cache grows from one pass, exactly the exact path's windows
        obs = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in a]
        assert agent.act_batch(a, obs) == exact.act_batch(b, obs)


@pytest.mark.parametrize("reencode", [True, False])
def test_cached_acting_resumes_exactly_from_pickled_contexts(reencode):
    """The session lives in the streams' contexts, which a checkpoint pickles together: acting on the unpickled
    contexts continues with the same cache and gives the actions of the uninterrupted run (re-encoding the
    frames each call passes, or with kept latents)."""
    torch.manual_seed(0)
    cfg = compose_config(["agent=mow", "env=minatar", "task=[breakout,asterix]", *MICRO, "agent.act_refresh=3",
                          f"agent.act_reencode={reencode}"])
    envs = make_envs("minatar", ["breakout", "asterix"], dict(cfg["env"]), seed=0)
    agent = make_agent("mow", dict(cfg["agent"]), [e.info for e in envs], torch.device("cpu"), "fp32")
    size, rng = envs[0].info.image_size, np.random.default_rng(0)
    frames = [[rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(2)] for _ in range(12)]
    contexts = [agent.new_context(i, seed=i) for i in range(2)]
    for obs in frames[:5]:
        agent.act_batch(contexts, obs)
    restored = pickle.loads(pickle.dumps(contexts))
    assert restored[0].session is restored[1].session and restored[0].session.serves(restored)
    straight = [agent.act_batch(contexts, obs) for obs in frames[5:]]
    assert [agent.act_batch(restored, obs) for obs in frames[5:]] == straight
