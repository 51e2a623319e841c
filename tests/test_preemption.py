"""Hard kills, SIGUSR2 (SLURM's pre-timeout signal) and SIGTERM: the run resumes and ends as if never stopped."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from mowbench.results import run_dir
from mowbench.trainer import CHECKPOINT
from tests.conftest import MICRO, REPO

ARGS = ["task=breakout", "train.warmup=20", "train.steps=400", "train.updates_per_step=0.5",
        "train.eval_episodes=1", "train.eval_max_steps=30",
        "train.replay_capacity=1000", "train.checkpoint_every=50", "train.keep_checkpoint=true", *MICRO]


def launch(results):
    return subprocess.Popen([sys.executable, "-m", "mowbench.run", *ARGS, f"results_dir={results}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "no checkpoint appeared"
        time.sleep(0.2)


def final_state(results):
    return torch.load(run_dir(results, "minatar", "storm", "breakout", 0) / CHECKPOINT, weights_only=True)


def assert_same_run(a, b):
    ca, cb = a["counters"], b["counters"]
    assert (ca["step"], ca["updates"]) == (cb["step"], cb["updates"]) == (400, 190)
    for key in ("obs", "action", "reward", "terminal"):
        assert torch.equal(a["replay"]["buffers"][0][key], b["replay"]["buffers"][0][key])
    for key, value in a["agent"]["wm"].items():
        assert torch.equal(value, b["agent"]["wm"][key]), key


def test_sigkill_then_rerun_resumes_exactly(tmp_path):
    ref = launch(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.communicate()
    proc = launch(tmp_path / "killed")
    wait_for(run_dir(tmp_path / "killed", "minatar", "storm", "breakout", 0) / CHECKPOINT, proc)
    time.sleep(1.0)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert not (run_dir(tmp_path / "killed", "minatar", "storm", "breakout", 0) / "DONE.json").exists()
    again = launch(tmp_path / "killed")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert_same_run(final_state(tmp_path / "ref"), final_state(tmp_path / "killed"))


@pytest.mark.parametrize(("sig", "code", "message"), [
    (signal.SIGUSR2, 0, "checkpointed at step"),  # SLURM's pre-timeout signal
    (signal.SIGTERM, 143, "SIGTERM; checkpointed at step"),  # what SLURM and most schedulers send first
])
def test_a_signal_checkpoints_and_leaves_then_resumes(tmp_path, sig, code, message):
    """SIGUSR2 or SIGTERM in a standalone run: checkpoint, release the lock, leave (SIGTERM: with status 143);
    the rerun resumes and finishes."""
    proc = launch(tmp_path)
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    wait_for(folder / CHECKPOINT, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert message in out and not (folder / "DONE.json").exists()
    assert not (folder / "RUNNING.lock").exists()
    stopped_at = torch.load(folder / CHECKPOINT, weights_only=True)["counters"]["step"]
    assert 50 <= stopped_at < 400
    again = launch(tmp_path)
    assert again.wait(timeout=600) == 0
    assert (folder / "DONE.json").exists() and final_state(tmp_path)["counters"]["step"] == 400
