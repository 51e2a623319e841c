"""The GPU-ready hot path, checked on CPU: updates hand back metrics as tensors (read at log intervals in one
copy), masked per-task sums equal the indexed ones, the replay's placement and its byte count, and bf16
autocast through the experts' grouped matmul."""

import functools
import math

import pytest
import torch

from mowbench.agents.base import make_agent, read_metrics
from mowbench.config import compose_config
from mowbench.envs.base import ActionSpace, TaskInfo
from mowbench.machine import host_memory_available
from mowbench.ops import harmonious_loss
from mowbench.replay import random_batch, replay_bytes, replay_device
from tests.conftest import MICRO
from tests.test_mow import make_mow

ATARI = TaskInfo("atari100k", "Pong", 0, 64, ActionSpace(True, 18))
MW = TaskInfo("metaworld", "reach-v3", 0, 64, ActionSpace(False, 4))
GIB = 2**30


def test_read_metrics_reads_tensors_and_keeps_numbers_in_order():
    metrics = {"a": torch.tensor(1.5), "b": 2, "c": torch.tensor([3.25]), "d": torch.tensor(float("nan"))}
    out = read_metrics(metrics)
    assert list(out) == ["a", "b", "c", "d"]
    assert out["a"] == 1.5 and out["b"] == 2.0 and out["c"] == 3.25 and math.isnan(out["d"])
    assert all(type(v) is float for v in out.values())


@pytest.mark.parametrize("name", ["storm", "mow"])
def test_an_update_hands_back_tensors_not_numbers_read_from_the_device(name):
    """Every metric of a (post-warm-up) update is a detached tensor, so nothing in it waits for a GPU."""
    if name == "mow":
        agent = make_mow(n_tasks=2)
    else:
        torch.manual_seed(0)
        agent = make_agent("storm", compose_config(["agent=storm", *MICRO])["agent"],
                           [TaskInfo("minatar", "t0", 0, 16, ActionSpace(True, 6))], torch.device("cpu"), "fp32")
    infos = list(agent.tasks)

    def sample(n, length):
        return random_batch(infos, n, length, torch.device("cpu"))

    agent.update(sample)  # MoW: the warm-up clustering comes first (its report is read on the host)
    metrics = agent.update(sample)
    assert metrics and all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())
    assert all(math.isfinite(v) for v in read_metrics(metrics).values())


def test_masked_harmonious_loss_equals_the_sum_over_the_tasks_present():
    losses, log_sigma = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, math.log(2.0), 0.0])
    present = torch.tensor([True, True, False])
    expected = (1.0 / 1 + math.log(2.0)) + (2.0 / 2 + math.log(3.0))  # L/sigma + ln(1 + sigma) of tasks 0, 1
    assert harmonious_loss(losses, log_sigma, present).item() == pytest.approx(expected)
    assert harmonious_loss(losses[present], log_sigma[present]).item() == pytest.approx(expected)


def test_mow_world_model_loss_logs_nan_for_a_task_absent_from_the_batch():
    agent = make_mow(n_tasks=3)
    batch = random_batch(agent.tasks, 4, 8, torch.device("cpu"))
    batch = batch.rows(torch.nonzero(batch.task != 2).flatten())  # no row of task 2
    _, metrics = agent.world_model_loss(batch)
    out = read_metrics(metrics)
    assert math.isnan(out["wm/task_loss/t2"]) and math.isfinite(out["wm/task_loss/t0"])
    assert math.isfinite(out["wm/loss"]) and math.isfinite(out["wm/task_loss_mean"])


def test_replay_bytes_by_hand():
    # per step: 64 x 64 x 3 frame + 8 (long action) + 4 (reward) + 4 (terminal)
    assert replay_bytes(10, [ATARI, ATARI]) == 2 * 10 * (12_288 + 16)
    assert replay_bytes(10, [MW]) == 10 * (12_288 + 16 + 8)  # four float32 action values


def test_replay_placement():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    paper_atari = replay_bytes(100_000, [ATARI] * 26)  # 26 games x 100k steps: 29.8 GiB
    assert paper_atari / GIB == pytest.approx(29.8, abs=0.05)
    assert replay_device(None, gpu, paper_atari, 79 * GIB) == gpu  # an H100's free memory: on the GPU
    assert replay_device(None, gpu, paper_atari, 22 * GIB) == cpu  # a 24 GiB card: pinned CPU memory
    assert replay_device(True, gpu, paper_atari, 31 * GIB) == gpu and replay_device(False, gpu, 1, 79 * GIB) == cpu
    with pytest.raises(ValueError, match=r"^train\.replay_on_device=true: the replay takes 29\.8 GiB and the GPU "
                                         r"has 22\.0 GiB free; allowed: false \(host memory\) or null \(by size\)$"):
        replay_device(True, gpu, paper_atari, 22 * GIB)  # forced, it would not fit: one line, not CUDA's error
    assert replay_device(None, cpu, 1, None) == cpu and replay_device(True, cpu, 1, None) == cpu


def test_host_memory_available_reads_memavailable_and_the_tightest_cgroup_limit(tmp_path):
    """MemAvailable, or a memory cgroup's limit less its usage where that is smaller: cgroup v2 (SLURM's --mem on
    a current node) and v1, a limit set on a parent of the process's cgroup, none (v2 'max', v1's huge number),
    and a container that sees its own cgroup as the mount's root."""
    def tree(meminfo_gib, cgroup_line, files):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        (root / "proc" / "self").mkdir(parents=True)
        (root / "proc" / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_gib * 2**20} kB\n")
        (root / "proc" / "self" / "cgroup").write_text(cgroup_line + "\n")
        for rel, text in files.items():
            (root / "cg" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "cg" / rel).write_text(text)
        return host_memory_available(root / "proc", root / "cg")

    job = "/slurm/uid_0/job_7/step_0"
    v2 = {f"{job[1:]}/memory.max": str(8 * GIB), f"{job[1:]}/memory.current": str(GIB)}
    assert tree(16, f"0::{job}", v2) == (7 * GIB, f"the memory limit of cgroup {tmp_path}/0/cg{job}")
    assert tree(4, f"0::{job}", v2) == (4 * GIB, "MemAvailable")  # the node has less free than the job may take
    no_limit = {f"{job[1:]}/memory.max": "max", f"{job[1:]}/memory.current": str(GIB)}
    assert tree(16, f"0::{job}", no_limit) == (16 * GIB, "MemAvailable")
    parent = {"slurm/uid_0/job_7/memory.limit_in_bytes": str(6 * GIB),
              "slurm/uid_0/job_7/memory.usage_in_bytes": str(2 * GIB),
              f"{job[1:]}/memory.limit_in_bytes": "9223372036854771712",
              f"{job[1:]}/memory.usage_in_bytes": str(2 * GIB)}
    v1 = {f"memory/{k}": v for k, v in parent.items()}
    assert tree(16, f"4:memory:{job}", v1)[0] == 4 * GIB  # v1, the job's limit above the step's cgroup
    container = {"memory/memory.limit_in_bytes": str(3 * GIB), "memory/memory.usage_in_bytes": str(GIB)}
    assert tree(16, "4:memory:/docker/abc", container)[0] == 2 * GIB  # its cgroup folder is the mount's root
    assert host_memory_available(tmp_path / "none", tmp_path / "none") is None
    here = host_memory_available()  # this machine: Linux, so at least MemAvailable
    assert here is not None and 0 < here[0] < 2**50


def test_batch_to_its_own_device_is_the_same_batch():
    batch = random_batch([ATARI], 2, 3, torch.device("cpu"))
    assert batch.to(torch.device("cpu")) is batch


def test_mow_update_in_bf16_on_cpu_runs_the_grouped_experts_under_autocast():
    agent = make_mow(n_tasks=2)
    agent.autocast_bf16 = True  # as precision=bf16 sets it
    batch = random_batch(agent.tasks, 4, 8, torch.device("cpu"))
    loss, _ = agent.world_model_loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    grad = agent.wm.experts.blocks[0].qkv.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize("name", ["storm", "mow"])
def test_compile_true_gives_the_results_of_eager(name):
    """Two full updates and a batched act of a compiled agent equal the eager agent's (same seed)."""
    from mowbench.agents.base import get_agent

    outs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        infos = [TaskInfo("minatar", f"t{k}", k, 16, ActionSpace(True, 6)) for k in range(2 if name == "mow" else 1)]
        agent = make_agent(name, compose_config([f"agent={name}", *MICRO, f"agent.compile={compile_}"])["agent"],
                           infos, torch.device("cpu"), "fp32")
        if compile_:
            assert get_agent(name).cls is type(agent) and agent.cfg.compile
        torch.manual_seed(1)
        sample = functools.partial(random_batch, infos, device=torch.device("cpu"))
        metrics = [read_metrics(agent.update(sample)) for _ in range(2)]
        contexts = [agent.new_context(k, seed=k) for k in range(len(infos))]
        obs = [torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy() for _ in infos]
        actions = agent.act_batch(contexts, obs)
        outs.append((metrics, actions, [p.detach().clone() for p in agent.wm.parameters()]))
    (m_e, a_e, p_e), (m_c, a_c, p_c) = outs
    for eager, compiled in zip(m_e, m_c, strict=True):
        assert eager.keys() == compiled.keys()
        for k in eager:
            assert compiled[k] == pytest.approx(eager[k], rel=1e-3, abs=1e-4, nan_ok=True), k
    assert a_e == a_c
    # Adam turns a rounding-sized gradient into a step of up to lr whatever its size, so a parameter whose gradient
    # is rounding noise may step +lr in one run and -lr in the other at each of the 2 updates: up to 4 x lr apart
    # (seen on one torch thread: 2.01e-3 at wm_lr 1e-3 on 2 of 384 elements)
    bound = 2 * 2 * agent.cfg.wm_lr
    for a, b in zip(p_e, p_c, strict=True):
        torch.testing.assert_close(a, b, atol=bound, rtol=1e-3)


def test_bench_times_the_evaluation_in_the_runs_mode():
    """Atari's storm protocol evaluates as STORM's reference code did (5 envs per task in lockstep, no env per
    episode): the bench times that mode and counts every env step: 5 streams x 20 capped steps, where full mode's 2
    episodes would step 40 times."""
    from mowbench.bench import bench

    cfg = compose_config(["agent=storm", "preset=micro", "env=atari100k", "task=Pong"])
    figures = bench({**cfg, "bench": {**BENCH_FAST, "eval_steps": 20}})
    assert figures["eval_mode"] == "reference"
    assert figures["eval_env_steps_timed"] == figures["random_env_steps_timed"] == 5 * 20
    figures = bench({**compose_config(["agent=storm", "preset=micro", "env=atari100k", "task=Pong",
                                       "train.eval_mode=full"]), "bench": {**BENCH_FAST, "eval_steps": 20}})
    assert figures["eval_mode"] == "full" and figures["eval_env_steps_timed"] == 2 * 20


BENCH_FAST = {"repeats": 1, "act_steps": 5, "flops": False, "reference": False}


def test_bench_profile_names_the_ops_of_most_self_time():
    """bench.profile=N: a phase's N ops of most self time with their call counts (on CPU, host time)."""
    from mowbench.bench import profile_phase

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    out = profile_phase(lambda: [(a @ b).sin() for _ in range(5)], torch.device("cpu"), top=2)
    assert [row[0] for row in out["host_top"]] == ["aten::mm", "aten::sin"]
    assert [row[2] for row in out["host_top"]] == [5, 5] and out["host_top"][0][1] >= out["host_top"][1][1] > 0
    assert out["profiled_wall_ms"] > 0 and "device_top" not in out


def test_acting_figure_is_the_median_of_timed_blocks(monkeypatch):
    """The bench times `repeats` blocks of acting and reports their median rate (one block's rate is noisy on a
    shared CPU): with a clock that makes the blocks last 1, 4 and 2 s, 10 env steps each, the figure is 5/s."""
    import types

    import mowbench.bench as bench_module

    class Env:
        def reset(self):
            return 0

        def step(self, action):
            return types.SimpleNamespace(done=False, obs=0)

    agent = types.SimpleNamespace(new_context=lambda i: i, act_batch=lambda contexts, obs: [0] * len(contexts))
    ticks = iter([0.0, 1.0, 1.0, 5.0, 5.0, 7.0])
    monkeypatch.setattr(bench_module.time, "perf_counter", lambda: next(ticks))
    out = bench_module.acting_figures(agent, [Env(), Env()], act_steps=10, repeats=3)
    assert out["acting_env_steps_per_s_blocks"] == [10.0, 2.5, 5.0]
    assert out["acting_env_steps_per_s"] == 5.0 and out["acting_streams"] == 2


def test_projected_hours_by_hand():
    from mowbench.bench import projection
    from mowbench.trainer import TrainConfig

    train = TrainConfig(steps=1000, warmup=100, updates_per_step=1.0, eval_every=500, eval_episodes=10,
                        periodic_eval_episodes=5, random_episodes=20)
    figures = {"acting_env_steps_per_s": 100.0, "s_per_train_step": 0.5, "eval_env_steps_per_s": 100.0,
               "s_per_eval_env": 0.5, "random_env_steps_per_s": 1000.0, "s_per_random_env": 0.2}
    out = projection(figures, train, n_tasks=2, eval_episode_steps=50)
    # acting 2 x 1000 / 100 = 20 s; updates 900 x 0.5 = 450 s; evaluations 2 x (10 + 5 at step 500) = 30
    # episodes of 50 / 100 + 0.5 = 1 s each; random baseline 2 x 20 = 40 episodes of 50 / 1000 + 0.2 = 0.25 s
    assert out["acting"] * 3600 == pytest.approx(20) and out["updates"] * 3600 == pytest.approx(450)
    assert out["evaluation"] * 3600 == pytest.approx(30) and out["random_baseline"] * 3600 == pytest.approx(10)
    assert out["total"] * 3600 == pytest.approx(510)
    assert out["eval_episodes_per_s"] == pytest.approx(1.0)
    # reference mode: no env per episode, eval_parallel per task per evaluation: 2 evaluations x 2 tasks x 3 envs
    # x 0.5 s + 30 x 50 / 100 = 21 s; random baseline 2 x 3 envs x 0.2 + 40 x 50 / 1000 = 3.2 s
    train.eval_mode, train.eval_parallel = "reference", 3
    out = projection(figures, train, n_tasks=2, eval_episode_steps=50)
    assert out["evaluation"] * 3600 == pytest.approx(21) and out["random_baseline"] * 3600 == pytest.approx(3.2)
    train.random_baseline = False
    assert projection(figures, train, n_tasks=2, eval_episode_steps=50)["total"] * 3600 == pytest.approx(491)
