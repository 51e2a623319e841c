"""Every registered agent runs end to end on every suite (micro sizes): discrete Atari, continuous
Meta-World; and the benchmark prints its JSON."""

import json
import subprocess
import sys

import pytest
import torch

from mowbench.agents.base import AGENTS, get_agent
from mowbench.agents.imagination import ImaginationAgent
from mowbench.config import compose_config
from mowbench.results import run_dir
from mowbench.runner import execute
from tests.conftest import MICRO, REPO, refuses_suite

get_agent("storm")  # import the baselines so AGENTS is filled for parametrisation

# the one-line refusal of a suite an agent cannot act in: continuous-only agents (the TD-MPC2 family) refuse Atari,
# discrete-only ones (scalezero, searching over discrete actions) Meta-World
REFUSALS = {"atari100k": r"^env=atari100k has discrete actions.*allowed: env=metaworld$",
            "metaworld": r"^env=metaworld has continuous actions.*allowed: env=atari100k, env=minatar$"}


@pytest.mark.parametrize("agent", sorted(AGENTS))
@pytest.mark.parametrize("env,tasks", [("atari100k", ["Pong", "Breakout"]), ("metaworld", ["reach-v3", "push-v3"])])
def test_agent_runs_on_suite(agent, env, tasks, tmp_path):
    """Single-task agents run one task; multi-task agents run two (Atari: shared 18-action set with
    per-game masks; Meta-World: continuous 4-d actions). A continuous-only agent (the TD-MPC2 family) is refused
    Atari, a discrete-only one (scalezero) Meta-World, with a one-line error before any env is built."""
    multi = get_agent(agent).multi_task
    tasks = tasks if multi else tasks[:1]
    if refuses_suite(agent, env, discrete=env == "atari100k"):
        cfg = compose_config([f"agent={agent}", f"env={env}", f"task=[{','.join(tasks)}]", f"results_dir={tmp_path}"])
        with pytest.raises(ValueError, match=REFUSALS[env]):
            execute(cfg)
        assert not any(tmp_path.iterdir())  # nothing written
        return
    cfg = compose_config([f"agent={agent}", f"env={env}", f"task=[{','.join(tasks)}]", f"results_dir={tmp_path}",
                          "train.warmup=12", "train.steps=20", "train.updates_per_step=1", "train.eval_episodes=1",
                          "train.eval_max_steps=10", "train.replay_capacity=100", "env.image_size=16",
                          *MICRO,
                          *(["env.fast_render=true"] if env == "metaworld" else [])])
    [(_, summary)] = execute(cfg)
    if "policy_updates" in cfg["agent"]:  # an offline method (pwm): its loop counts updates, no env step
        assert summary["step"] == summary["updates"] == cfg["agent"]["policy_updates"]
    else:
        assert summary["step"] == 20 and summary["updates"] == 8
    assert set(summary["final_return"]) == set(tasks)
    folder = run_dir(tmp_path, env, agent, f"all{len(tasks)}" if multi else tasks[0], 0)
    assert (folder / "DONE.json").exists()
    state = torch.load(folder / "model.pt", weights_only=True)
    # the STORM family (agents learning in imagination) keeps a separate "ac"; planners (TD-MPC2, scalezero) do not
    assert "wm" in state and ("ac" in state) == issubclass(get_agent(agent).cls, ImaginationAgent)
    if multi and env == "atari100k":
        protocol = json.loads((folder / "metadata.json").read_text())["protocol"]
        assert protocol["Pong"]["action_set"] == "full"


def test_continuous_actor_samples_in_box():
    from mowbench.models.heads import ContinuousActionDist

    torch.manual_seed(0)
    dist = ContinuousActionDist(torch.randn(1000, 8))
    a = dist.sample()
    assert a.shape == (1000, 4)
    assert dist.dist.stddev.min() >= 0.1 - 1e-6 and dist.dist.stddev.max() <= 1.0 + 1e-6
    assert dist.mode().abs().max() <= 1.0
    assert torch.isfinite(dist.log_prob(a)).all() and dist.entropy().shape == (1000,)


def test_bench_prints_one_json_object():
    out = subprocess.run([sys.executable, "-m", "mowbench.bench", "agent=storm", *MICRO,
                          "bench.repeats=1", "bench.act_steps=5"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["sizes"]["actions"] == 6 and result["task"] == "Pong"
    for key in ("s_per_world_model_update", "s_per_imagination", "s_per_agent_update", "s_per_train_step",
                "s_per_imagination_reference_cache", "acting_env_steps_per_s"):
        assert result[key] > 0, key
    assert set(result["parameters"]) == {"world_model", "actor_critic", "slow_critic"}
    assert min(result["gflop"].values()) > 0 and result["matmul_gflop_per_s"] > 0
    assert result["dispatched_ops"].keys() == result["gflop"].keys() and min(result["dispatched_ops"].values()) > 0
    assert result["s_per_train_step_at_matmul_rate"] < result["s_per_train_step"]  # a floor, below the real step


def test_bench_flop_and_op_counts_of_a_matmul_and_a_linear_backward():
    from mowbench.bench import phase_counts

    a, b = torch.ones(8, 16), torch.ones(16, 4)
    assert phase_counts(lambda: a @ b) == (2 * 8 * 16 * 4 / 1e9, 1)
    # views (view, t) reach no kernel and are not counted: mm, relu, sum
    assert phase_counts(lambda: (a @ b).view(-1).t().relu().sum())[1] == 3
    layer = torch.nn.Linear(16, 4, bias=False)
    # forward 2*B*in*out, backward twice that (input and weight gradients)
    x = torch.ones(8, 16, requires_grad=True)
    assert phase_counts(lambda: layer(x).sum().backward())[0] == 3 * 2 * 8 * 16 * 4 / 1e9


def test_bench_counts_the_flops_of_packed_cpu_inference():
    """Calls without gradients on CPU run oneDNN's packed ops, which torch's FLOP counter does not know: the bench
    counts them as the torch ops of the same maths (imagination once counted 4.4 of its ~850 GFLOP)."""
    from mowbench.bench import phase_counts
    from mowbench.models.packed import Conv2d, Linear

    linear, conv = Linear(512, 512), Conv2d(128, 256, 4, 2, 1, bias=False)
    x, frames = torch.randn(16, 512), torch.randn(2, 128, 8, 8)
    with torch.no_grad():
        linear(x), conv(frames)  # packed on first use
        assert linear.packed and conv.packed
        assert phase_counts(lambda: linear(x))[0] == 2 * 16 * 512 * 512 / 1e9
        # 2 x frames x out channels x 4 x 4 output pixels x in channels x 4 x 4 kernel taps
        assert phase_counts(lambda: conv(frames))[0] == 2 * 2 * 256 * 16 * 128 * 16 / 1e9
        assert linear.packed and conv.packed


def test_bench_of_acting_alone_in_env_workers_and_a_bad_part_is_one_line():
    """bench.only=acting: the agent's and random actions' env-steps/s over one stream per task, here with the envs in
    two worker processes (the workers' own step count is what the evaluation figures use)."""
    args = [sys.executable, "-m", "mowbench.bench", "agent=mow", "env=minatar", *MICRO, "bench.repeats=1",
            "bench.act_steps=10", "train.env_workers=2"]
    out = subprocess.run([*args, "bench.only=acting"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["env_workers"] == 2 and result["n_tasks"] == result["acting_streams"] == 5
    assert result["acting_env_steps_per_s"] > 0 and result["random_acting_env_steps_per_s"] > 0
    bad = subprocess.run([*args, "bench.only=updates"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip() == "error: bench.only='updates'; allowed: acting (unset: every figure)"
