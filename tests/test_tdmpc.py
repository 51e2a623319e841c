"""The TD-MPC2 family (tdmpc2, newt, pwm): the maths against hand-computed values (SimNorm, discounts, rho
weights, two-hot over 101 bins, squashed Gaussians, MPPI), parameter counts of the presets against hand counts,
Newt's language vectors, the refusals of discrete suites, and exact resume of each agent's state."""

import math
import pickle

import numpy as np
import pytest
import torch

from mowbench.agents.base import make_agent
from mowbench.config import compose_config, plan
from mowbench.envs import make_envs
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.envs.metaworld import MT50
from mowbench.ops import (
    mppi_elites,
    mppi_moments,
    random_shift,
    rho_weights,
    simnorm,
    squashed_gaussian,
    stack_frames,
    tdmpc_discount,
    twohot_encode,
)
from mowbench.replay import Replay

CPU = torch.device("cpu")


def mw_tasks(names, size=64, episode_length=100):
    return [TaskInfo("metaworld", n, k, size, ActionSpace(False, 4), protocol={"episode_length": episode_length})
            for k, n in enumerate(names)]


# ---- the maths ----

def test_simnorm_is_a_softmax_within_each_group():
    x = torch.tensor([0.0, math.log(3.0), 5.0, 5.0])
    assert torch.allclose(simnorm(x, group=2), torch.tensor([0.25, 0.75, 0.5, 0.5]))
    y = simnorm(torch.randn(3, 16), group=8)
    assert torch.allclose(y.view(3, 2, 8).sum(-1), torch.ones(3, 2))
    # written out (no row-wise softmax kernel), its values and gradient are torch.softmax's, also at large inputs
    torch.manual_seed(0)
    x = (torch.randn(4, 5, 16, dtype=torch.float64) * 30).requires_grad_()
    w = torch.randn(4, 5, 16, dtype=torch.float64)
    ref = torch.softmax(x.view(4, 5, 2, 8), -1).view(4, 5, 16)
    (grad,) = torch.autograd.grad((simnorm(x) * w).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(simnorm(x), ref)
    torch.testing.assert_close(grad, ref_grad)
    # bf16 latents (autocast) come out in fp32, as torch.softmax's under autocast: the softmax of the rounded
    # inputs at fp32 precision (compared with the unrounded inputs' softmax, rounding by 0.5 at |x| ~ 100 differs)
    rounded = x.detach().float().bfloat16()
    half = simnorm(rounded)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.softmax(rounded.float().view(4, 5, 2, 8), -1).view(4, 5, 16))


def test_discount_from_episode_length():
    assert tdmpc_discount(100) == pytest.approx(0.95)  # Meta-World at action repeat 2: frac 20 -> 0.95
    assert tdmpc_discount(500) == pytest.approx(0.99)  # frac 100 -> 99/100
    assert tdmpc_discount(10) == pytest.approx(0.95)  # frac 2 -> 0.5, clipped up
    assert tdmpc_discount(10_000) == pytest.approx(0.995)  # clipped down


def test_rho_weights_tdmpc2_and_newt():
    assert torch.allclose(rho_weights(3, 0.5, False), torch.tensor([1.0, 0.5, 0.25]) / 3)
    assert torch.allclose(rho_weights(3, 0.5, True), torch.tensor([4.0, 2.0, 1.0]) / 7)


def test_twohot_over_tdmpc2s_101_bins():
    bins = torch.linspace(-10, 10, 101)  # spacing 0.2
    on_bin = twohot_encode(torch.tensor(1.0), bins)  # symlog(e - 1) = 1.0 is bin 55
    assert on_bin[55] == pytest.approx(1.0) and on_bin.sum() == pytest.approx(1.0)
    between = twohot_encode(torch.tensor(0.5), bins)  # halfway between bins 52 (0.4) and 53 (0.6)
    assert between[52] == pytest.approx(0.5, abs=1e-5) and between[53] == pytest.approx(0.5, abs=1e-5)
    assert twohot_encode(torch.tensor(30.0), bins)[100] == pytest.approx(1.0)  # beyond the range: the end bin


def test_squashed_gaussian_masks_padded_dims():
    mean, log_std, eps = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    action, log_prob = squashed_gaussian(mean, log_std, eps, torch.tensor([True, True, False]))
    assert torch.equal(action, torch.zeros(3))
    # two valid dims of a standard normal at 0: 2 * -0.5 ln(2 pi), tanh's Jacobian 1 (minus its 1e-6 guard)
    assert log_prob.item() == pytest.approx(-math.log(2 * math.pi) - 2 * math.log(1 + 1e-6), abs=1e-6)
    action, _ = squashed_gaussian(torch.tensor([0.5, 0.5]), torch.zeros(2), torch.ones(2), torch.tensor([True, False]))
    assert action[0].item() == pytest.approx(math.tanh(1.5)) and action[1].item() == 0.0


def test_mppi_elites_and_moments_by_hand():
    index, score = mppi_elites(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2, temperature=0.5)
    assert index.tolist() == [[1, 2]]
    w = math.exp(-0.5)  # exp(0.5 * (2 - 3))
    assert score[0].tolist() == pytest.approx([1 / (1 + w), w / (1 + w)])
    elites = torch.tensor([[1.0], [-1.0]]).view(1, 2, 1, 1)  # (B, E, H, A)
    mean, std = mppi_moments(elites, torch.tensor([[0.75, 0.25]]), 0.05, 2.0)
    assert mean.item() == pytest.approx(0.5)  # 0.75 - 0.25
    assert std.item() == pytest.approx(math.sqrt(0.75 * 0.25 + 0.25 * 2.25))  # 0.866
    assert mppi_moments(elites, torch.tensor([[0.75, 0.25]]), 0.05, 0.5)[1].item() == pytest.approx(0.5)


def test_mppi_finds_the_best_first_action_of_a_known_value():
    """The planning loop around the real agent, with the value of a sequence replaced by a known one (-(a_0 -
    0.3)^2 in the first dim): MPPI's mean moves from 0 to 0.3 and its std shrinks."""
    cfg = compose_config(["agent=tdmpc2", "env=metaworld", "preset=micro", "agent.num_samples=256",
                          "agent.num_elites=32", "agent.iterations=6", "agent.num_pi_trajs=0"])
    agent = make_agent("tdmpc2", dict(cfg["agent"]), mw_tasks(["reach-v3"], 16), CPU, "fp32")
    agent.estimate_value = lambda z, actions, task, eps, pair: -(actions[:, :, 0, 0] - 0.3) ** 2
    context = agent.new_context(0, seed=3)
    z = torch.zeros(1, 16)
    action = agent.plan(z, torch.tensor([0]), [context], greedy=True)
    assert action[0, 0].item() == pytest.approx(0.3, abs=0.05)
    assert context.carry[0, 0] == pytest.approx(0.3, abs=0.05)


def test_q_dropout_acts_inside_updates_only_as_upstream():
    """Upstream TD-MPC2 keeps its model in eval mode except inside `_update`, and its target Qs always in eval mode:
    Q dropout acts on the predicted Qs and the policy's Q, never while planning or in TD targets. With a large
    dropout, planning twice from the same stream seeds gives the same action, the global RNG untouched."""
    cfg = compose_config(["agent=tdmpc2", "env=metaworld", "preset=micro", "agent.q_dropout=0.5"])
    agent = make_agent("tdmpc2", dict(cfg["agent"]), mw_tasks(["reach-v3"], 16), CPU, "fp32")
    wm = agent.wm
    seen = {"qs": [], "target_qs": []}
    wm.qs.register_forward_hook(lambda m, i, o: seen["qs"].append(m.training))
    wm.target_qs.register_forward_hook(lambda m, i, o: seen["target_qs"].append(m.training))
    assert not wm.training
    obs = [np.full((16, 16, 3), 100, np.uint8)]
    rng = torch.get_rng_state()
    first = agent.act_batch([agent.new_context(0, seed=5)], obs, greedy=True)
    again = agent.act_batch([agent.new_context(0, seed=5)], obs, greedy=True)
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask was drawn while planning
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert seen["qs"] and not any(seen["qs"])
    seen["qs"].clear()
    infos = mw_tasks(["reach-v3"], 16)
    replay = Replay(64, infos, CPU, seed=0, fields=agent.replay_fields())
    for t in range(20):
        replay.add(0, obs[0], np.zeros(infos[0].action.n, np.float32), 0.5, False, first=float(t == 0))
    agent.update(replay.sample)
    assert seen["qs"] and all(seen["qs"])  # the predicted Qs and the policy's Q: dropout on
    assert seen["target_qs"] and not any(seen["target_qs"])  # TD targets: off
    assert not wm.training and not wm.target_qs.training  # back to eval mode for planning
    wm.train()
    assert not wm.target_qs.training


def test_frame_stacks_repeat_an_episodes_first_frame():
    obs = torch.arange(6).view(1, 6, 1, 1, 1).expand(1, 6, 1, 1, 3).to(torch.uint8)  # frame t is filled with t
    first = torch.tensor([[0.0, 0, 1, 0, 0, 0]])  # an episode starts at step 2
    stacks = stack_frames(obs, first, 3)  # (1, 4, 9, 1, 1): stacks ending at steps 2..5
    frames = stacks[0, :, ::3, 0, 0].tolist()  # one channel per frame, oldest first
    assert frames == [[2, 2, 2], [2, 2, 3], [2, 3, 4], [3, 4, 5]]


def test_random_shift_by_hand():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert torch.equal(random_shift(x, 1, torch.tensor([[1, 1]])), x)  # the centre window
    shifted = random_shift(x, 1, torch.tensor([[0, 2]]))  # one row up, one column right; edges replicated
    assert shifted[0, 0].tolist() == [[1, 2, 2], [1, 2, 2], [4, 5, 5]]


def test_stacked_q_heads_equal_separate_mlps_by_hand():
    """The Q ensemble in one stacked module: head k of the batched pass equals head k's MLP written out by hand
    (Linear, LayerNorm, Mish, Linear); the last layer starts at zero; dropout acts in training only."""
    from mowbench.models.tdmpc import TaskMLP

    torch.manual_seed(0)
    heads = TaskMLP(3, 6, (5, 4), 2, dropout=0.5, zero_last=True)
    assert torch.equal(heads.weights[-1], torch.zeros(3, 4, 2)) and torch.equal(heads.biases[-1], torch.zeros(3, 1, 2))
    with torch.no_grad():
        heads.weights[-1].normal_()
    heads.eval()  # no dropout
    x = torch.randn(7, 6)
    out = heads(x.expand(3, 7, 6))  # (3, 7, 2)

    def by_hand(k):
        h = x
        for i in range(2):
            h = h @ heads.weights[i][k] + heads.biases[i][k]
            h = torch.nn.functional.layer_norm(h, (h.shape[-1],)) * heads.norms_w[i][k] + heads.norms_b[i][k]
            h = h * torch.tanh(torch.nn.functional.softplus(h))  # Mish
        return h @ heads.weights[2][k] + heads.biases[2][k]

    for k in range(3):
        torch.testing.assert_close(out[k], by_hand(k))
    heads.train()
    assert not torch.equal(heads(x.expand(3, 7, 6)), out)  # dropout on in training


def test_planning_pays_for_the_two_q_heads_it_averages():
    """Q(..., heads=(B, 2)) gives each row's two heads of the full ensemble's output (the planner's value, at 2/5
    of the ensemble's cost), for rows of both tasks, in the (k, B, ...) layout of the full call."""
    from mowbench.models.tdmpc import TDMPCWorldModel

    torch.manual_seed(0)
    wm = TDMPCWorldModel(16, 3, 4, 2, latent_dim=16, mlp_dim=32, task_dim=8, channels=8, kernels=(3, 3),
                         strides=(2, 1)).eval()
    with torch.no_grad():
        for p in wm.qs.parameters():
            p.normal_(0, 0.3)  # the last layer starts at zero: give every head its own output
    b, n = 3, 8
    z, a, task = torch.randn(b, n, 16), torch.rand(b, n, 4) * 2 - 1, torch.tensor([0, 1, 1])
    heads = torch.tensor([[4, 0], [1, 2], [3, 1]])
    with torch.no_grad():
        full = wm.Q(z, a, task)  # (5, B, N, bins)
        two = wm.Q(z, a, task, heads=heads)  # (2, B, N, bins)
    assert two.shape == (2, b, n, 101)
    for i in range(b):
        for j in range(2):
            torch.testing.assert_close(two[j, i], full[heads[i, j], i])  # bitwise on our CPUs from 4 samples a row
    assert not torch.allclose(two[0, 0], two[1, 0])  # the heads differ, so a wrong index would show


# ---- sizes ----

def mlp(in_dim, hidden, out_dim):
    """A NormedMLP's parameters counted by hand: weight + bias + LayerNorm (2 x width) per hidden layer."""
    total, prev = 0, in_dim
    for width in hidden:
        total, prev = total + prev * width + width + 2 * width, width
    return total + prev * out_dim + out_dim


def dynamics(in_dim, hidden, latent):
    """The dynamics: an MLP whose output has a LayerNorm (2 x latent) before SimNorm, as upstream's NormedLinear."""
    return mlp(in_dim, hidden, latent) + 2 * latent


TRUNK_64 = (9 * 32 * 49 + 32) + (32 * 32 * 25 + 32) + 2 * (32 * 32 * 9 + 32)  # 3 frames x RGB in, 7/5/3/3 convs


@pytest.mark.parametrize("agent,tasks,expected", [
    # single task at 64x64: no embedding, no projection (the trunk's 512 is the latent), as upstream
    ("tdmpc2", ["reach-v3"], {"encoder": TRUNK_64, "dynamics": dynamics(516, (512, 512), 512),
                              "reward": mlp(516, (512, 512), 101), "policy": mlp(512, (512, 512), 8),
                              "q_ensemble": 5 * mlp(516, (512, 512), 101), "task_embedding": 0}),
    # MT50: a learned 64-d e_k after the trunk (projection 512 + 64 -> 512) and into every head
    ("tdmpc2", MT50, {"encoder": TRUNK_64 + 576 * 512 + 512, "dynamics": dynamics(580, (512, 512), 512),
                      "reward": mlp(580, (512, 512), 101), "policy": mlp(576, (512, 512), 8),
                      "q_ensemble": 5 * mlp(580, (512, 512), 101), "task_embedding": 50 * 64}),
    # Newt L (mlp 1024, latent 512) with frozen 512-d language vectors (a buffer: no parameters)
    ("newt", MT50, {"encoder": TRUNK_64 + 1024 * 512 + 512, "dynamics": dynamics(1028, (1024, 1024), 512),
                    "reward": mlp(1028, (1024, 1024), 101), "policy": mlp(1024, (1024, 1024), 8),
                    "q_ensemble": 5 * mlp(1028, (1024, 1024), 101), "task_embedding": 0}),
    # PWM on MT10: TD-MPC2's 5M world model without Q and policy, per task an actor (+ log-std) and 3 critics
    ("pwm-online", MT50[:10], {"encoder": TRUNK_64 + 576 * 512 + 512, "dynamics": dynamics(580, (512, 512), 512),
                        "reward": mlp(580, (512, 512), 101), "task_embedding": 10 * 64,
                        "actors": 10 * (mlp(512, (400, 200, 100), 4) + 4),
                        "critics": 10 * 3 * mlp(512, (400, 200), 1)}),
])
def test_paper_preset_parameter_counts(agent, tasks, expected):
    cfg = compose_config([f"agent={agent}", "env=metaworld", "preset=paper"])
    counts = make_agent(agent, dict(cfg["agent"]), mw_tasks(tasks), CPU, "fp32").parameter_counts()
    assert {k: counts[k] for k in expected} == expected
    assert counts["total"] == sum(expected.values())
    if agent == "tdmpc2" and len(tasks) == 1:
        assert counts["total"] == 4_870_150  # TD-MPC2's "5M": upstream's WorldModel at these sizes, counted
        assert counts["target_q"] == counts["q_ensemble"]


def test_model_sizes_follow_tdmpc2s_table():
    for size, (mlp_dim, latent) in {"1M": (384, 128), "5M": (512, 512), "19M": (1024, 768)}.items():
        cfg = compose_config(["agent=tdmpc2", "env=metaworld", "preset=paper", f"agent.model_size={size}"])
        counts = make_agent("tdmpc2", dict(cfg["agent"]), mw_tasks(["reach-v3"]), CPU, "fp32").parameter_counts()
        assert counts["dynamics"] == dynamics(latent + 4, (mlp_dim, mlp_dim), latent), size


# ---- Newt's language ----

def test_newt_uses_the_shipped_language_vectors_and_fills_shelf_place():
    import json

    from mowbench.baselines.newt import data_file, language_vectors

    table = json.loads(data_file().read_text())
    assert "nicklashansen/newt" in table["source"] and len(table["tasks"]) == 49
    vectors = language_vectors(MT50)
    assert vectors.shape == (50, 512)
    assert torch.equal(vectors[MT50.index("shelf-place-v3")], vectors[MT50.index("pick-place-v3")])
    assert vectors[0].tolist() == pytest.approx(table["tasks"]["reach-v3"]["text_embedding"])
    cfg = compose_config(["agent=newt", "env=metaworld", "preset=micro"])
    agent = make_agent("newt", dict(cfg["agent"]), mw_tasks(MT50[:3], 16), CPU, "fp32")
    assert not agent.wm.task_embedding.learned and torch.equal(agent.wm.task_embedding.vectors, vectors[:3])
    onehot = compose_config(["agent=newt", "env=metaworld", "preset=micro", "ablation=newt_onehot"])
    agent = make_agent("newt", dict(onehot["agent"]), mw_tasks(MT50[:3], 16), CPU, "fp32")
    assert agent.wm.task_embedding.learned


def test_newt_constrained_planning_schedule():
    from mowbench.baselines.newt import constraint_weight

    assert [constraint_weight(u, 3000, 18000) for u in (0, 3000, 10500, 18000, 20000)] == [1.0, 1.0, 0.5, 0.0, 0.0]


# ---- refusals ----

@pytest.mark.parametrize("agent", ["tdmpc2", "newt", "pwm-online"])
@pytest.mark.parametrize("env", ["atari100k", "minatar"])
def test_discrete_suites_are_refused_in_one_line_before_any_work(agent, env):
    with pytest.raises(ValueError, match=f"env={env} has discrete actions; the TD-MPC2 family"):
        plan(compose_config([f"agent={agent}", f"env={env}", "preset=micro"]))
    discrete = [TaskInfo(env, "breakout", 0, 16, ActionSpace(True, 6))]
    with pytest.raises(ValueError, match="needs continuous actions"):
        make_agent(agent, dict(compose_config([f"agent={agent}", "env=metaworld", "preset=micro"])["agent"]),
                   discrete, CPU, "fp32")


def test_bad_family_values_are_refused():
    for override, message in [("agent.model_size=2M", "model_size='2M'; allowed: 1M, 5M, 19M, L, custom"),
                              ("agent.num_elites=999", "num_elites=999, num_pi_trajs=2; allowed: at most"),
                              ("agent.latent_dim=20", "latent_dim=20; allowed: a multiple of simnorm_group=8")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            plan(compose_config(["agent=tdmpc2", "env=metaworld", "preset=micro", override]))


# ---- exact resume of the agents' state ----

@pytest.mark.parametrize("agent_name", ["tdmpc2", "newt", "pwm-online"])
def test_agent_state_and_contexts_resume_exactly(agent_name, tmp_path):
    """Updates and actions after a save/load (state_dict through torch.save, contexts through pickle, the RNG
    restored) equal those of the agent that never stopped, on a replay of real Meta-World pixels."""
    tasks = ["reach-v3", "button-press-topdown-v3"]
    cfg = compose_config([f"agent={agent_name}", "env=metaworld", "preset=micro", f"task=[{','.join(tasks)}]"])
    envs = make_envs("metaworld", tasks, dict(cfg["env"]), seed=0)
    infos = [e.info for e in envs]
    torch.manual_seed(0)
    agent = make_agent(agent_name, dict(cfg["agent"]), infos, CPU, "fp32")
    replay = Replay(200, infos, CPU, seed=0, fields=agent.replay_fields())
    contexts = [agent.new_context(k) for k in range(2)]
    obs = [e.reset() for e in envs]
    for t in range(24):
        actions = agent.act_batch(contexts, obs)
        for k, (e, a) in enumerate(zip(envs, actions, strict=True)):
            step = e.step(a)
            replay.add(k, obs[k], a, step.reward, False, first=float(t == 0))
            obs[k] = step.obs
    for _ in range(3):
        agent.update(replay.sample)
    torch.save(agent.state_dict(), tmp_path / "agent.pt")
    saved = (pickle.dumps(contexts), replay.state_dict(), torch.get_rng_state())

    def go_on(a, ctx):
        metrics = [{k: float(v) for k, v in a.update(replay.sample).items()} for _ in range(2)]
        return metrics, [np.asarray(x) for x in a.act_batch(ctx, obs)]

    expected = go_on(agent, contexts)
    torch.manual_seed(123)  # a fresh process: other weights until the load
    resumed = make_agent(agent_name, dict(cfg["agent"]), infos, CPU, "fp32")
    resumed.load_state_dict(torch.load(tmp_path / "agent.pt", weights_only=True))
    ctx = pickle.loads(saved[0])
    replay.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    got = go_on(resumed, ctx)
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1], strict=True):
        np.testing.assert_array_equal(a, b)
    for e in envs:
        e.close()


@pytest.mark.parametrize("agent_name", ["tdmpc2", "newt", "pwm-online", "pwm"])
def test_fifty_tasks_every_task_in_every_batch_and_one_acting_pass(agent_name):
    """MT50 scale at micro sizes (more tasks than the preset's batch of 8 rows): every batch holds every task,
    every learned task vector gets a gradient, PWM's start states hold starts_per_task rows of each task and its
    return statistics move per task, Newt's and PWM's pretraining updates run on all 50 (Newt's behaviour cloning
    non-zero), and the 50 streams act in one batch."""
    infos = mw_tasks(MT50, 16)
    torch.manual_seed(0)
    cfg = compose_config([f"agent={agent_name}", "env=metaworld", "preset=micro"])
    agent = make_agent(agent_name, dict(cfg["agent"]), infos, CPU, "fp32")
    replay = Replay(50, infos, CPU, 0, agent.replay_fields())
    rng = np.random.default_rng(0)
    for t in range(12):
        for k in range(50):
            replay.add(k, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.uniform(-1, 1, 4).astype(np.float32),
                       float(k), False, first=float(t == 0))
    counts = []

    def sample(n, length):
        batch = replay.sample(n, length)
        counts.append(torch.bincount(batch.task, minlength=50))
        return batch

    if agent_name in ("newt", "pwm"):  # their pretraining update on offline data, at MT50 scale too
        pre = agent.pretrain(sample)
        assert all(math.isfinite(float(v)) for v in pre.values())
        if agent_name == "newt":  # the behaviour-cloning prior reaches the policy from every task's rows
            assert float(pre["wm/prior"]) != 0 and float(pre["pi/bc"]) > 0
    metrics = agent.update(sample)
    assert all(math.isfinite(float(v)) for v in metrics.values())
    assert all(int(c.min()) >= 1 and int(c.min()) == int(c.max()) for c in counts)  # every task, evenly
    if agent_name.startswith("pwm"):
        assert int(counts[-1][0]) == cfg["agent"]["starts_per_task"]
        # per-task return statistics: every task's own count and variance moved by its own rows
        assert bool((agent.ret_count > 1).all()) and len(set(agent.ret_var.tolist())) == 50
    embedding = agent.wm.task_embedding
    if embedding.learned:
        assert int((embedding.table.weight.grad.abs().sum(1) > 0).sum()) == 50
    actions = agent.act_batch([agent.new_context(k) for k in range(50)], [np.zeros((16, 16, 3), np.uint8)] * 50)
    assert len(actions) == 50 and all(a.shape == (4,) and np.all(np.abs(a) <= 1) for a in actions)

