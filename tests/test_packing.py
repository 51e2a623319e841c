"""slurm.runs_per_gpu=K: K runs of a grid trained at once by one array task, each in its own process. Chunking and
the refusal of a bad value; status per run from the runs' exit records; and on the real single-node SLURM: packed
runs equal runs trained alone, survive a preemption of their task together, and one killed run is failed alone and
resubmitted alone."""

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from mowbench import machine
from mowbench.grid import chunked, expand, parse_args, threads_share, unit_states
from mowbench.results import LOCK, atomic_write_json, is_done
from tests.conftest import REPO
from tests.test_grid import REQUIRE_SLURM, SLURM, release_requeued, run_grid, wait_for

# two runs (STORM: one per game), packed into one task; 400 steps: training outlasts the signal sent at the first
# checkpoint (step 40) by seconds
PACKED = ["grid=smoke", "agent=[storm]", "launcher=slurm", "slurm=local", "slurm.runs_per_gpu=2", "train.steps=400"]


def test_units_are_chunked_by_runs_per_gpu_and_a_bad_value_is_refused(tmp_path, monkeypatch):
    assert chunked(list("abcde"), 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert chunked(list("ab"), 4) == [["a", "b"]]
    for cpus, runs, share in [(16, 4, 4), (16, 3, 5), (2, 2, 1), (2, 8, 1), (8, 1, 8)]:  # each run's torch threads
        monkeypatch.setattr(machine, "usable_cpus", lambda cpus=cpus: cpus)
        assert threads_share(runs) == share
    assert parse_args(["grid=smoke", f"results_dir={tmp_path}"]).slurm["runs_per_gpu"] == 1
    assert parse_args(["grid=smoke", "slurm.runs_per_gpu=4", f"results_dir={tmp_path}"]).slurm["runs_per_gpu"] == 4
    for bad, shown in [("0", "0"), ("two", "'two'"), ("1.5", "1.5"), ("true", "True")]:
        with pytest.raises(ValueError) as err:
            parse_args(["grid=smoke", f"slurm.runs_per_gpu={bad}", f"results_dir={tmp_path}"])
        assert str(err.value) == (f"slurm runs_per_gpu={shown}; allowed: a positive integer (the runs one job trains "
                                  "at once on its GPU; 1: one run per job)")


def test_status_of_a_packed_run_follows_its_own_exit(tmp_path, monkeypatch):
    """While the packed task is RUNNING, a run whose process left on its own is failed (its log named), one still
    training is running, and one that left on a signal to the task is the task's (running, then requeued)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho '4242 RUNNING'\n")
    (fake / "squeue").chmod(0o755)
    req = parse_args(["grid=smoke", "seeds=[7]", "agent=[storm]", f"results_dir={tmp_path}"])
    units = expand(req)
    logs = tmp_path / "grids" / "smoke" / "logs" / "4242"
    logs.mkdir(parents=True)
    record = {u.key: {"job_id": "4242", "launcher": "slurm", "cell": k, "stderr": str(logs / f"cell_{k}.log"),
                      "exit_record": str(logs / f"cell_{k}.json")} for k, u in enumerate(units)}
    atomic_write_json(tmp_path / "grids" / "smoke" / "jobs.json", record)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")

    def states(first, second):
        for k, exit_record in enumerate((first, second)):
            atomic_write_json(logs / f"cell_{k}.json", {"pid": 1, "started": "x", **exit_record})
        return [(r["state"], r["log"]) for r in unit_states(req, units)]

    killed = {"returncode": -9, "killed_by": "SIGKILL", "signalled": None}
    assert states(killed, {"returncode": None}) == [("failed", str(logs / "cell_0.log")),
                                                     ("running", str(logs / "cell_1.log"))]
    assert [s for s, _ in states({"returncode": 0, "signalled": "SIGUSR2"}, {**killed, "signalled": "SIGUSR2"})] \
        == ["running", "running"]
    (fake / "squeue").write_text("#!/bin/sh\nexit 0\n")  # the task has left the queue: failed, as unpacked
    assert [s for s, _ in states({"returncode": None}, {"returncode": None})] == ["failed", "failed"]


def checksum(path):
    state = torch.load(path, weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes() if torch.is_tensor(state[key]) else repr(state[key]).encode())
    return digest.hexdigest()


def learning(folder):
    """The run's logged metrics but its speed."""
    return [line for line in (folder / "metrics.csv").read_text().splitlines() if ",perf/" not in line]


def exit_record(job, key):
    return json.loads(open(job[key]["exit_record"]).read())


def started(job, units):
    """Every packed run has started and checkpointed once (the trainer's signal handlers are installed)."""
    return all((u.folder / "checkpoint.pt").exists() and (u.folder / LOCK).exists() and
               os.path.exists(job[u.key]["exit_record"]) for u in units)


@pytest.mark.slow(seconds=60)
@pytest.mark.skipif(not SLURM and not REQUIRE_SLURM, reason="no SLURM here (start one: slurm/local-cluster.sh start)")
def test_packed_runs_equal_runs_alone_and_resume_together_after_a_preemption(tmp_path):
    """Two runs in one array task, at the same time; SLURM's USR2 to the task: both checkpoint, the task is requeued
    once, both resume and finish the full budget, with exactly the results of each run trained alone."""
    assert SLURM, "MOWBENCH_REQUIRE_SLURM=1 but sbatch/sinfo do not work (slurm/local-cluster.sh start)"
    args = [*PACKED, "seeds=[7]", f"results_dir={tmp_path / 'grid'}"]
    req = parse_args(args)
    units = expand(req)
    alone = [subprocess.Popen([sys.executable, "-m", "mowbench.run", *[
        f"results_dir={tmp_path / 'alone'}" if o.startswith("results_dir=") else o for o in u.overrides]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO) for u in units]
    assert "submitted 2 run(s) in 1 task(s) of up to 2 runs" in run_grid(*args)
    job = json.loads((tmp_path / "grid" / "grids" / "smoke" / "jobs.json").read_text())
    assert {job[u.key]["job_id"] for u in units} == {job[units[0].key]["job_id"]}  # one array task
    assert sorted(job[u.key]["cell"] for u in units) == [0, 1]
    job_id = job[units[0].key]["job_id"]
    wait_for(lambda: started(job, units), 240, "both runs' first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job_id])
    metas = [u.folder / "metadata.json" for u in units]
    wait_for(lambda: all(json.loads(m.read_text())["sessions"][0].get("preempted") == "SIGUSR2" for m in metas), 120,
             "both runs to checkpoint on USR2")
    release_requeued(job_id)
    wait_for(lambda: all(is_done(u.folder) for u in units), 300, "both runs to finish")
    for u, meta in zip(units, metas, strict=True):
        sessions = json.loads(meta.read_text())["sessions"]
        assert len(sessions) == 2 and sessions[1]["resumed_from_step"] == sessions[0]["last_step"] > 0
        assert json.loads((u.folder / "summary.json").read_text())["step"] == 400
    # the requeued task trained both at once: each started before either ended
    wait_for(lambda: all(exit_record(job, u.key).get("ended") for u in units), 60, "both runs' exit records")
    records = [exit_record(job, u.key) for u in units]
    assert max(r["started"] for r in records) < min(r["ended"] for r in records)
    assert all(r["returncode"] == 0 for r in records)
    assert [r["threads"] for r in records] == ["1", "1"]  # the task's CPUs shared (2 at most, 2 runs), not 2 each
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1 " in shown  # requeued once, for both runs
    assert [r["state"] for r in unit_states(req, units)] == ["done", "done"]
    for proc in alone:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    for u in units:
        ref = tmp_path / "alone" / u.folder.relative_to(tmp_path / "grid")
        assert (u.folder / "eval.csv").read_text() == (ref / "eval.csv").read_text()
        assert learning(u.folder) == learning(ref)
        assert (json.loads((u.folder / "summary.json").read_text())["final_return"]
                == json.loads((ref / "summary.json").read_text())["final_return"])
        assert checksum(u.folder / "model.pt") == checksum(ref / "model.pt")


@pytest.mark.slow(seconds=40)
@pytest.mark.skipif(not SLURM and not REQUIRE_SLURM, reason="no SLURM here (start one: slurm/local-cluster.sh start)")
def test_a_killed_packed_run_fails_alone_and_is_resubmitted_alone(tmp_path):
    """kill -9 of one of two packed runs: the other goes on and finishes; status shows the killed one failed (its
    log) while the task still runs; a resubmission submits that one run, which resumes and finishes; the first task
    ends failed once its other run has finished."""
    assert SLURM, "MOWBENCH_REQUIRE_SLURM=1 but sbatch/sinfo do not work (slurm/local-cluster.sh start)"
    args = [*PACKED, "seeds=[8]", f"results_dir={tmp_path}"]
    req = parse_args(args)
    units = expand(req)
    run_grid(*args)
    job = json.loads((tmp_path / "grids" / "smoke" / "jobs.json").read_text())
    victim, other = sorted(units, key=lambda u: job[u.key]["cell"])
    wait_for(lambda: started(job, units), 240, "both runs' first checkpoint")
    os.kill(exit_record(job, victim.key)["pid"], signal.SIGKILL)
    wait_for(lambda: exit_record(job, victim.key)["returncode"] is not None, 60, "the killed run's exit record")
    assert exit_record(job, victim.key)["killed_by"] == "SIGKILL"
    rows = {r["unit"]: r for r in unit_states(req, units)}
    assert rows[other.key]["state"] == "running"
    assert rows[victim.key]["state"] == "failed" and rows[victim.key]["log"] == job[victim.key]["stderr"]
    assert os.path.exists(job[victim.key]["stderr"])
    assert "submitted 1 run(s)" in run_grid(*args)
    again = json.loads((tmp_path / "grids" / "smoke" / "jobs.json").read_text())
    assert again[victim.key]["job_id"] != job[victim.key]["job_id"]
    assert again[other.key] == job[other.key]
    wait_for(lambda: all(is_done(u.folder) for u in units), 300, "both runs to finish")
    sessions = json.loads((victim.folder / "metadata.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed_from_step"] >= 40
    assert json.loads((victim.folder / "summary.json").read_text())["step"] == 400
    first = job[victim.key]["job_id"]
    wait_for(lambda: first not in subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True,
                                                 text=True).stdout.split(), 60, "the first task to end")
    assert "RuntimeError: 1 of 2 runs of this job failed" in open(job[victim.key]["task_log"]).read()
    assert [r["state"] for r in unit_states(req, units)] == ["done", "done"]
