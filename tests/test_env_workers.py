"""train.env_workers=N: the run's envs in N worker processes (mowbench.envs.workers) give the frames, episodes and
results the same envs give in the training process; a worker's death or an env's error is one clear exception;
the workers outlive the signals the training process checkpoints on."""

import hashlib
import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from mowbench.config import compose_config
from mowbench.envs import make_env, reset_all, step_all
from mowbench.envs.atari import TASKS as ATARI26
from mowbench.envs.workers import RemoteEnv, WorkerDied, env_workers
from mowbench.results import run_dir
from mowbench.runner import execute
from tests.conftest import MICRO


def atari_cfg() -> dict:
    cfg = compose_config(["env=atari100k", "env.image_size=16"])["env"]
    return {**cfg, "action_set": "full", "run_seed": 0}


@pytest.mark.slow(seconds=10)
def test_the_26_atari_games_in_two_workers_step_as_in_process():
    """All 26 games, 2 workers: the same frames, rewards, life losses and ends for 40 random steps (sticky actions,
    resets included), mid-episode states that carry across processes, one env stepped alone, and close."""
    cfg, rng = atari_cfg(), np.random.default_rng(0)
    local = [make_env("atari100k", ATARI26, i, cfg, 3) for i in range(26)]
    with env_workers(2, "atari100k", ATARI26, cfg) as workers:
        remote = [workers.make(i, 3) for i in range(26)]
        assert all(isinstance(e, RemoteEnv) for e in remote) and sorted(workers.live) == [13, 13]
        assert [e.info for e in remote] == [e.info for e in local]
        assert [e.life_loss_terminal for e in remote] == [e.life_loss_terminal for e in local]
        for a, b in zip(reset_all(remote), reset_all(local), strict=True):
            assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
        for t in range(40):
            actions = [int(rng.integers(18)) for _ in local]
            for i, (a, b) in enumerate(zip(step_all(remote, actions), step_all(local, actions), strict=True)):
                assert np.array_equal(a.obs, b.obs), (t, ATARI26[i])
                assert (a.reward, a.terminated, a.truncated, a.life_loss) == (b.reward, b.terminated, b.truncated,
                                                                              b.life_loss)
        # a state read from a worker continues in this process exactly, and one from here in a worker
        fresh = make_env("atari100k", ATARI26, 7, cfg, 99)
        fresh.set_state(remote[7].get_state())
        other = workers.make(7, 98)
        other.set_state(local[7].get_state())
        for _ in range(20):
            a, b, c = fresh.step(1), local[7].step(1), other.step(1)
            remote[7].step(1)
            assert np.array_equal(a.obs, b.obs) and np.array_equal(b.obs, c.obs) and a.reward == b.reward == c.reward
        for e in remote:
            e.close()
        assert sorted(workers.live) == [0, 1] and len(workers.free[0]) + len(workers.free[1]) == 2 * 256 - 1
    for e in [*local, fresh]:
        e.close()


def test_a_worker_error_is_the_envs_own_and_a_dead_worker_is_named():
    """An env that fails to build raises its own exception in the training process (with the worker's traceback as
    a note); a worker ignores the signals the trainer checkpoints on; a killed worker is named in one line."""
    cfg = {**compose_config(["env=minatar"])["env"], "run_seed": 0}
    tasks = ["breakout", "asterix"]
    with pytest.raises(ValueError, match="train.env_workers=0; allowed: a positive integer"):
        env_workers(0, "minatar", tasks, cfg)
    with env_workers(2, "minatar", tasks, cfg) as workers:
        env = workers.make(0, 1)
        broken = workers.make(5, 1)  # no task 5: make_env's IndexError, raised when the env is first used
        with pytest.raises(IndexError) as err:
            broken.reset()
        assert any("in env worker" in note for note in err.value.__notes__)
        env.reset()
        for name in ("SIGTERM", "SIGUSR2", "SIGINT"):
            os.kill(workers.procs[env.worker].pid, getattr(signal, name))
        time.sleep(0.3)
        assert env.step(0).obs.shape == (16, 16, 3)  # still there
        workers.procs[env.worker].kill()
        workers.procs[env.worker].wait()
        with pytest.raises(WorkerDied, match=rf"env worker {env.worker} \(pid \d+\) ended with exit code -9"):
            env.step(0)


def run_files(folder):
    """What a run wrote that its results are: returns, episodes, metrics (timing aside), the final weights."""
    metrics = [line for line in (folder / "metrics.csv").read_text().splitlines() if "perf/" not in line]
    weights = torch.load(folder / "model.pt", weights_only=True)
    digest = hashlib.sha256()
    for key, value in sorted(flatten(weights)):
        digest.update(key.encode() + value.float().numpy().tobytes())
    summary = json.loads((folder / "summary.json").read_text())
    return {"eval": (folder / "eval.csv").read_text(), "episodes": (folder / "episodes.csv").read_text(),
            "metrics": metrics, "weights": digest.hexdigest(), "summary": summary}


def flatten(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            yield f"{prefix}{key}", value


@pytest.mark.slow(seconds=60)
def test_an_mt10_run_with_two_env_workers_is_the_in_process_run(tmp_path):
    """MT10 from pixels, a multi-task agent (monolithic STORM, micro): training streams, the final evaluation and the
    random baseline with env_workers=2 give the returns, episodes, metrics and weights of env_workers=0."""
    base = ["agent=monolithic", "env=metaworld", "task=MT10", "train.warmup=8", "train.steps=14",
            "train.updates_per_step=0.5", "train.eval_episodes=1", "train.random_episodes=2", "train.eval_envs=4",
            "train.replay_capacity=100", "env.image_size=16", "env.episode_length=6", "env.fast_render=true",
            "env.multisample=false", *MICRO]
    files = []
    for n in (0, 2):
        out = tmp_path / f"workers_{n}"
        [(_, summary)] = execute(compose_config([*base, f"train.env_workers={n}", f"results_dir={out}"]))
        assert summary["step"] == 14 and len(summary["final_return"]) == 10 and len(summary["random_return"]) == 10
        files.append(run_files(run_dir(out, "metaworld", "monolithic", "all10", 0)))
    assert files[0]["summary"]["episodes"] == dict.fromkeys(files[0]["summary"]["final_return"], 2)  # resets too
    assert files[0] == files[1]


@pytest.mark.slow(seconds=30)
def test_an_atari_run_preempted_and_resumed_in_env_workers_is_the_uninterrupted_in_process_run(tmp_path):
    """Three Atari games (monolithic STORM, micro): a run with env_workers=2, stopped mid-episode and resumed (the
    envs' emulator states cross the checkpoint through the workers), ends as the same run with env_workers=0 and no
    stop; the worker count is not a setting of the run (a resume may change it)."""
    base = ["agent=monolithic", "env=atari100k", "task=[Pong,Breakout,Boxing]", "train.warmup=20", "train.steps=50",
            "train.updates_per_step=0.25", "train.eval_episodes=2", "train.eval_max_steps=30", "train.eval_mode=full",
            "train.replay_capacity=100", "env.image_size=16", *MICRO]
    alone = tmp_path / "alone"
    execute(compose_config([*base, f"results_dir={alone}"]))
    split = tmp_path / "split"
    [(_, first)] = execute(compose_config([*base, "train.env_workers=2", "train.stop_at=33", f"results_dir={split}"]))
    assert first is None  # preempted, checkpointed at step 33
    execute(compose_config([*base, "train.env_workers=1", f"results_dir={split}"]))
    folder = run_dir(split, "atari100k", "monolithic", "all3", 0)
    sessions = json.loads((folder / "metadata.json").read_text())["sessions"]
    assert [s["resumed_from_step"] for s in sessions] == [None, 33] and sessions[1]["env_restart"] == []
    assert run_files(folder) == run_files(run_dir(alone, "atari100k", "monolithic", "all3", 0))


EGL_SCRIPT = """
import json, os, sys
import numpy as np
from mowbench.envs import reset_all, step_all
from mowbench.envs.workers import env_workers
cfg, out = json.loads(sys.argv[1]), sys.argv[2]
with env_workers(2, "metaworld", ["reach-v3", "push-v3"], cfg) as workers:
    envs = [workers.make(i, 5) for i in range(2)]
    frames, rng = [np.stack(reset_all(envs))], np.random.default_rng(0)
    for _ in range(3):
        frames.append(np.stack([s.obs for s in step_all(envs, [rng.uniform(-1, 1, 4) for _ in envs])]))
    gl = [e.info.protocol["gl"] for e in envs]
np.save(out, np.stack(frames))
print(json.dumps({"gl": gl, **{k: os.environ[k] for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}}))
"""


@pytest.mark.slow(seconds=30)
def test_metaworld_renders_through_egl_in_env_workers_the_frames_osmesa_renders(tmp_path):
    """env.gl=egl (what a GPU node chooses) with 2 env workers: the training process sets MUJOCO_GL=egl before any
    worker starts, each worker's envs render through MuJoCo's EGL context (here Mesa's EGL over llvmpipe, which CPU
    machines have; a GPU node's driver renders there), and the frames at full quality are osmesa's in this process
    bit for bit (the same rasterizer behind both). A fresh process: MUJOCO_GL is fixed once mujoco is imported."""
    import subprocess
    import sys

    from tests.conftest import REPO

    cfg = {**compose_config(["env=metaworld", "preset=micro"])["env"], "image_size": 32, "run_seed": 0}
    out = subprocess.run([sys.executable, "-c", EGL_SCRIPT, json.dumps({**cfg, "gl": "egl"}), str(tmp_path / "f.npy")],
                         capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"gl": ["egl", "egl"], "MUJOCO_GL": "egl",
                                                               "PYOPENGL_PLATFORM": "egl"}
    remote = np.load(tmp_path / "f.npy")
    local = [make_env("metaworld", ["reach-v3", "push-v3"], i, {**cfg, "gl": "osmesa"}, 5) for i in range(2)]
    frames, rng = [np.stack(reset_all(local))], np.random.default_rng(0)
    for _ in range(3):
        frames.append(np.stack([s.obs for s in step_all(local, [rng.uniform(-1, 1, 4) for _ in local])]))
    assert local[0].info.protocol["gl"] == "osmesa" and remote.shape == (4, 2, 32, 32, 3)
    assert remote.std() > 10  # real frames, not blank ones
    np.testing.assert_array_equal(remote, np.stack(frames))
    for env in local:
        env.close()
