"""Runs that go wrong never look finished: divergence, a signal during the final evaluation, seeds and names refused
before any folder exists, and files readable as the umask allows. Real processes and files throughout."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from mowbench.grid import expand, parse_args, unit_states
from mowbench.results import FAILED, is_done, run_dir
from mowbench.trainer import CHECKPOINT, SEED_LIMIT, Diverged, DivergenceGuard
from tests.conftest import REPO

# the micro STORM run the reliability checks use (seconds on one core)
SM = ["env=minatar", "preset=micro", "agent=storm", "task=breakout", "threads=1", "train.steps=160", "train.warmup=40",
      "train.eval_episodes=2", "train.eval_max_steps=40", "train.checkpoint_every=40", "train.progress=false",
      "train.tensorboard=false"]
DIVERGE = ["agent.wm_lr=1e6", "agent.ac_lr=1e6"]
# SM's largest env seed above its run seed: the random policy's evaluation (key 10,000) and its 5th env (MinAtar's
# 5 periodic-evaluation episodes and 5 reference envs outnumber SM's 2 final episodes); one task
OFFSET = 7919 * (10_000 + 1) + 104_729 * 4


def run(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "mowbench.run", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env, **kwargs)


def one_line_error(out):
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


def test_the_guard_finds_the_first_non_finite_update_without_reading_the_device():
    guard = DivergenceGuard()
    # on the meta device a tensor has no values: any read (item, bool, a sync) would raise, so observe reads none
    meta = {"wm/loss": torch.zeros((), device="meta"), "wm/grad_norm": torch.zeros((), device="meta")}
    guard.observe(meta, 1)
    guard = DivergenceGuard()
    for step in range(1, 10):
        grad = float("inf") if step >= 7 else 1.0
        metrics = {"wm/loss": torch.tensor(0.5), "wm/grad_norm": torch.tensor(grad), "lr": 1e-4}
        guard.observe(metrics, step)
        if step < 7:
            guard.check(metrics, step)
    with pytest.raises(Diverged) as err:
        guard.check(metrics, 9)
    assert str(err.value) == ("training diverged: wm/grad_norm=inf (first non-finite update at step 7, detected at "
                              "step 9)")
    assert err.value.step == 7 and err.value.names == ["wm/grad_norm"]
    host = DivergenceGuard()  # a metric the agent reports as a Python float
    host.observe({"ac/loss": float("nan")}, 3)
    with pytest.raises(Diverged, match=r"ac/loss=nan \(first non-finite update at step 3"):
        host.check({"ac/loss": float("nan")}, 5)


@pytest.mark.slow(seconds=60)
def test_a_diverged_run_is_failed_never_finished(tmp_path):
    """lr=1e6 makes every loss NaN from the first update: the run stops with one line naming the losses, the step and
    the last good checkpoint, is marked failed (no DONE.json), keeps only finite checkpoints, refuses a rerun with
    the same settings, shows as failed with its reason in grid status, is not resubmitted, and the analysis leaves it
    out and names it."""
    out = run(*SM, "seed=1", "train.log_every=20", *DIVERGE, f"results_dir={tmp_path}")
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 1)
    line = one_line_error(out)
    failure = json.loads((folder / FAILED).read_text())
    first = failure["step"]  # the first update (step 41) makes the weights huge, a later one NaN
    assert 41 <= first < 60
    assert line == (f"error: {folder}: training diverged: wm/loss=nan, ac/policy_loss=nan, ac/value_loss=nan and 11 "
                    f"more metrics (first non-finite update at step {first}, detected at step 60); last good "
                    f"checkpoint: {folder / CHECKPOINT} (step 40); marked failed in FAILED.json (lower the learning "
                    "rates or try another seed: see the docs' 'When a run fails')")
    assert not is_done(folder) and not (folder / "summary.json").exists()
    assert (failure["kind"], failure["detected_at"], failure["last_checkpoint"]) == ("diverged", 60, 40)
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    assert state["counters"]["step"] == 40
    assert all(torch.isfinite(v).all() for v in state["agent"]["wm"].values() if v.is_floating_point())
    again = one_line_error(run(*SM, "seed=1", "train.log_every=20", *DIVERGE, f"results_dir={tmp_path}"))
    assert f"{folder} failed (training diverged: wm/loss=nan" in again and "try another seed" in again
    # a command of several runs goes on after one diverges, then fails naming each
    both = run(*SM, "task=[breakout,space_invaders]", "seed=3", *DIVERGE, f"results_dir={tmp_path}")
    line = one_line_error(both)
    assert line.startswith("error: 2 runs failed: ") and line.count("training diverged: wm/loss=nan") == 2
    assert all((run_dir(tmp_path, "minatar", "storm", game, 3) / FAILED).exists()
               for game in ("breakout", "space_invaders"))
    # a grid's diverged run: failed with the reason in status, and not submitted again
    grid = ["grid=smoke", "seeds=[2]", "agent=[storm]", "task=breakout", f"results_dir={tmp_path}", *DIVERGE]
    first_submission = run(*grid, "launcher=local", "wait=true")
    assert first_submission.returncode == 0 and "submitted 1 run(s)" in first_submission.stdout
    req = parse_args(grid)
    [row] = unit_states(req, expand(req))
    assert row["state"] == "failed" and row["reason"].startswith("training diverged: wm/loss=nan")
    status = subprocess.run([sys.executable, "-m", "mowbench.grid", "status", *grid], capture_output=True, text=True,
                            cwd=REPO, timeout=300).stdout
    assert "failed: 1" in status and "training diverged: wm/loss=nan" in status
    resubmit = run(*grid, "launcher=local")
    assert resubmit.returncode == 0, resubmit.stderr
    assert "nothing to submit" in resubmit.stdout
    assert "1 failed run(s) not resubmitted (they diverged" in resubmit.stdout
    # beside a healthy seed, the analysis tables only the healthy one and names the failed one
    healthy = run(*SM, "seed=0", "train.log_every=20", f"results_dir={tmp_path}")
    assert healthy.returncode == 0, healthy.stderr
    report = subprocess.run([sys.executable, "-m", "mowbench.analysis", "--suite", "minatar", str(tmp_path), "--out",
                             str(tmp_path / "analysis"), "--reps", "200"], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert report.returncode == 0, report.stderr
    notes = (tmp_path / "analysis" / "notes.txt").read_text()
    assert "minatar/storm/breakout/seed_1 failed (training diverged: wm/loss=nan" in notes
    assert "seed_1" not in (tmp_path / "analysis" / "per_task_raw.csv").read_text()


def long_final_evaluation(results, *extra):
    """A micro run whose only checkpoint is the one at the end of training (checkpoint_every=0), then a final
    evaluation long enough (400 episodes, two envs at a time) to be signalled in."""
    args = [*SM, "train.checkpoint_every=0", "train.eval_episodes=400", "train.eval_envs=2", *extra,
            f"results_dir={results}"]
    return subprocess.Popen([sys.executable, "-m", "mowbench.run", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.1)


@pytest.mark.slow(seconds=90)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGUSR2, 0), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_loses_no_training_and_ends_as_if_never_sent(tmp_path, sig, code):
    """Training ends with a checkpoint; a signal during the final evaluation checkpoints nothing new, leaves (SIGTERM:
    status 143), and the rerun only evaluates, with the same results as an uninterrupted run."""
    reference = long_final_evaluation(tmp_path / "ref")
    assert reference.wait(timeout=600) == 0, reference.communicate()
    proc = long_final_evaluation(tmp_path / "cut")
    folder = run_dir(tmp_path / "cut", "minatar", "storm", "breakout", 0)
    wait_for(lambda: (folder / CHECKPOINT).exists(), proc)  # the end of training: the final evaluation runs now
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "checkpointed at step 160" in out and not is_done(folder)
    sessions = json.loads((folder / "metadata.json").read_text())["sessions"]
    assert sessions[0]["last_step"] == 160 and sessions[0]["preempted"] == signal.Signals(sig).name
    again = long_final_evaluation(tmp_path / "cut")
    assert again.wait(timeout=600) == 0, again.communicate()
    sessions = json.loads((folder / "metadata.json").read_text())["sessions"]
    assert sessions[1]["resumed_from_step"] == 160  # nothing trained again
    ref = run_dir(tmp_path / "ref", "minatar", "storm", "breakout", 0)
    assert (folder / "eval.csv").read_text() == (ref / "eval.csv").read_text()
    mine, theirs = (json.loads((f / "summary.json").read_text()) for f in (folder, ref))
    assert mine["final_return"] == theirs["final_return"] and mine["random_return"] == theirs["random_return"]
    assert mine["updates"] == theirs["updates"] == 120


@pytest.mark.parametrize(("args", "message"), [
    (["seed=4294967295"], f"seed=4294967295; allowed: 0 to {SEED_LIMIT - OFFSET} here (the run seeds envs up to "
                          f"seed + {OFFSET}, and numpy takes seeds up to 2**32-1)"),
    (["seed=1099511627776"], f"seed=1099511627776; allowed: 0 to {SEED_LIMIT - OFFSET} here"),
    (["method='../../../escaped'"], "method='../../../escaped'; allowed: one folder name of letters, digits and _ . = "
                                    "+ , - (not starting with . or -, at most 200 characters)"),
    (["method=/tmp/absolute"], "method='/tmp/absolute'; allowed: one folder name"),
    (["method=x/y"], "method='x/y'; allowed: one folder name"),
    (["method=.hidden"], "method='.hidden'; allowed: one folder name"),
])
def test_bad_seeds_and_names_are_refused_before_any_folder(tmp_path, args, message):
    results = tmp_path / "deep" / "results"
    line = one_line_error(run(*SM, *args, f"results_dir={results}"))
    assert message in line
    assert not (tmp_path / "deep").exists() and not list(tmp_path.glob("**/escaped"))


def test_grid_seeds_and_names_are_checked_with_every_cell(tmp_path):
    line = one_line_error(run("grid=smoke", "seeds=[1099511627776]", f"results_dir={tmp_path}"))
    assert "invalid cell(s), nothing submitted" in line and "seed=1099511627776; allowed: 0 to" in line
    assert one_line_error(run("grid=../smoke", f"results_dir={tmp_path}")).startswith("error: grid='../smoke'; allowed")
    assert not (tmp_path / "grids").exists()


@pytest.mark.slow(seconds=30)
def test_the_largest_allowed_seed_runs_to_the_end(tmp_path):
    """The seed limit is exact: the largest seed allowed derives every env seed the run uses within numpy's range."""
    out = run(*SM, "train.steps=60", "train.warmup=40", f"seed={SEED_LIMIT - OFFSET}", f"results_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.glob(f"minatar/storm/breakout/seed_{SEED_LIMIT - OFFSET}/DONE.json"))) == 1


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_results_checkpoints_and_reports_keep_the_umasks_mode(tmp_path, umask):
    """Atomic writes go through temporary files, which mkstemp makes 0600: renamed into place, they would hide
    results from colleagues. Every file takes 0666 less the umask, as a plain open() would give it."""
    out = run(*SM, "train.steps=60", "train.keep_checkpoint=true", f"results_dir={tmp_path}",
              preexec_fn=lambda: os.umask(umask))
    assert out.returncode == 0, out.stderr
    analysis = subprocess.run([sys.executable, "-m", "mowbench.analysis", "--suite", "minatar", str(tmp_path),
                               "--out", str(tmp_path / "report"), "--reps", "100"], capture_output=True, text=True,
                              cwd=REPO, timeout=300, preexec_fn=lambda: os.umask(umask))
    assert analysis.returncode == 0, analysis.stderr
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    files = [*folder.iterdir(), tmp_path / "report" / "report.html", tmp_path / "report" / "aggregate.csv"]
    assert {"DONE.json", "summary.json", "model.pt", CHECKPOINT, "metadata.json", "eval.csv"} <= {f.name for f in files}
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
