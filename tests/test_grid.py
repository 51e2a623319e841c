"""Grids: expansion, overrides, refusals before submission, local dispatch, and the smoke grid end to end
through a real single-node SLURM (slurm/local-cluster.sh): array, preemption + requeue, status, resubmission."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mowbench.config import compose_config
from mowbench.experiments import method_name
from mowbench.grid import expand, parse_args, unit_states
from mowbench.results import LOCK, atomic_write_json, is_done, run_dir
from tests.conftest import REPO

SLURM = shutil.which("sbatch") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0
REQUIRE_SLURM = os.environ.get("MOWBENCH_REQUIRE_SLURM") == "1"


def test_smoke_grid_expands_to_runs_with_method_names(tmp_path):
    req = parse_args(["grid=smoke", f"results_dir={tmp_path}"])
    units = expand(req)
    assert sorted(u.key for u in units) == sorted([
        "minatar/storm/breakout/seed_0", "minatar/storm/space_invaders/seed_0",
        "minatar/storm/breakout/seed_1", "minatar/storm/space_invaders/seed_1",
        "minatar/mow/all2/seed_0", "minatar/mow/all2/seed_1"])
    storm = next(u for u in units if u.key == "minatar/storm/space_invaders/seed_1")
    assert "task=space_invaders" in storm.overrides and "seed=1" in storm.overrides
    mow = next(u for u in units if u.key.startswith("minatar/mow"))
    assert "agent.n_clusters=2" in mow.overrides  # the grid's per-agent overrides
    assert not (tmp_path / "grids").exists()  # expanding writes nothing


def test_command_line_narrows_and_changes_a_grid(tmp_path):
    req = parse_args(["grid=ablate_clusters", "seeds=[3]", "agent.n_clusters=[1,3]", "task=[Pong,Breakout,Qbert]",
                      f"results_dir={tmp_path}"])
    keys = sorted(u.key for u in expand(req))
    assert keys == ["atari100k/mow-n_clusters=1/all3/seed_3", "atari100k/mow-n_clusters=3/all3/seed_3"]
    components = expand(parse_args(["grid=ablate_components", "seeds=[0]", "task=[Pong,Breakout]",
                                    "agent.n_clusters=2", f"results_dir={tmp_path}"]))
    assert {u.key.split("/")[1] for u in components} == {
        "mow-full", "mow-no_task_loss", "mow-no_balance_loss", "mow-random_clusters", "mow-no_clusters",
        "mow-no_expert_transformers", "mow-no_shared_transformer"}
    assert method_name("mow", {"agent.top_k": 4}, None) == "mow-top_k=4"


def test_main_grid_has_all_methods_and_seeds(tmp_path):
    units = expand(parse_args(["grid=main_atari26", f"results_dir={tmp_path}"]))
    by_method = {}
    for u in units:
        by_method.setdefault(u.key.split("/")[1], []).append(u)
    assert len(by_method["mow"]) == 5 and len(by_method["monolithic"]) == 5 and len(by_method["scalezero-lite"]) == 5
    assert len(by_method["storm"]) == 26 * 5  # one run per game and seed


def test_moe_ablation_grid_runs_scalezero_with_and_without_moe(tmp_path):
    units = expand(parse_args(["grid=ablate_moe", "seeds=[0]", f"results_dir={tmp_path}"]))
    cells = {u.key.split("/")[1]: u for u in units}
    assert set(cells) == {"scalezero-lite", "scalezero-lite-dense"}
    assert all(u.key.endswith("/all26/seed_0") for u in units)
    assert compose_config(cells["scalezero-lite"].overrides)["agent"]["moe"] is True
    dense = compose_config(cells["scalezero-lite-dense"].overrides)
    assert dense["agent"]["moe"] is False and dense["agent"]["name"] == "scalezero-lite"


def test_update_ratio_grid_has_a_storm_matched_cell(tmp_path):
    """ablate_update_ratio: four cells of MoW on the 26 games; storm_matched gives each game STORM's per-step
    signal (16 sequences of 64 steps and 1,024 imagination starts per env step of that game)."""
    units = expand(parse_args(["grid=ablate_update_ratio", "seeds=[0]", f"results_dir={tmp_path}"]))
    cells = {u.key.split("/")[1]: u for u in units}
    assert set(cells) == {"mow-default", "mow-seqs4", "mow-updates4", "mow-storm_matched"}
    assert all(u.key.endswith("/all26/seed_0") for u in units)
    matched = compose_config(cells["mow-storm_matched"].overrides)
    assert (matched["agent"]["batch_per_task"], matched["agent"]["imag_per_task"]) == (16, 1024)
    assert matched["train"]["updates_per_step"] == 1.0
    default = compose_config(cells["mow-default"].overrides)
    assert (default["agent"]["batch_per_task"], default["agent"]["imag_per_task"]) == (1, 40)
    assert compose_config(cells["mow-updates4"].overrides)["train"]["updates_per_step"] == 4


@pytest.mark.parametrize("args,message", [
    (["grid=nope"], "unknown grid 'nope'; allowed: ablate_clusters"),
    (["grid=smoke", "foo=1"], "Could not override 'foo'"),
    (["grid=smoke", "seeds=[-1]"], "seeds=[-1]; allowed: a list of non-negative integers"),
    (["grid=smoke", "launcher=pbs"], "launcher='pbs'; allowed: auto, slurm, local, debug"),
    (["grid=smoke", "slurm=nowhere"], "unknown slurm settings 'nowhere'"),
    (["grid=smoke", "slurm.gpu=1"], "unknown slurm setting(s) ['gpu']"),
    (["grid=smoke", "slurm.runs_per_gpu=0"], "slurm runs_per_gpu=0; allowed: a positive integer"),
    (["grid=smoke", "agent=[mow]", "agent.n_clusters=5"], "invalid cell(s), nothing submitted"),
    (["grid=smoke", "agent.n_clusters=5"], "Key 'n_clusters' is not in struct"),  # storm has no clusters
])
def test_bad_grid_input_is_one_line_and_submits_nothing(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mowbench.run", *args, f"results_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error: ") and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "grids").exists()


def run_grid(*args):
    """The grid command as a user runs it (a subprocess: submitit's local launcher manages child processes)."""
    out = subprocess.run([sys.executable, "-m", "mowbench.run", *args], capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_local_launcher_runs_a_grid_and_a_resubmission_submits_nothing(tmp_path):
    args = ["grid=smoke", "seeds=[0]", "agent=[storm]", "task=breakout", "launcher=local", "wait=true",
            f"results_dir={tmp_path}"]
    assert "submitted 1 run(s)" in run_grid(*args)
    req = parse_args(args)
    [row] = unit_states(req, expand(req))
    assert row["state"] == "done" and row["step"] == 160
    assert "nothing to submit (1 done, 0 running, 0 pending of 1)" in run_grid(*args)


@pytest.mark.skipif(shutil.which("squeue") is not None and not SLURM and not REQUIRE_SLURM,
                    reason="squeue is installed but SLURM does not answer (slurm/local-cluster.sh start)")
def test_a_failed_run_is_resubmitted(tmp_path):
    """A unit whose recorded job left the queue without finishing is 'failed' and is submitted again."""
    args = ["grid=smoke", "seeds=[1]", "agent=[storm]", "task=space_invaders", "launcher=local", "wait=true",
            f"results_dir={tmp_path}"]
    req = parse_args(args)
    [unit] = expand(req)
    atomic_write_json(tmp_path / "grids" / "smoke" / "jobs.json",
                        {unit.key: {"job_id": "424242", "launcher": "slurm", "stderr": "/nowhere/424242_0_log.err"}})
    [row] = unit_states(req, [unit])
    assert row["state"] == "failed" and row["log"] == "/nowhere/424242_0_log.err"
    assert "submitted 1 run(s)" in run_grid(*args)
    assert is_done(unit.folder)


def test_a_resubmission_stops_when_squeue_cannot_answer(tmp_path):
    """With SLURM unreachable, recorded jobs must not be taken for gone (that would queue each pending job
    twice): one line, nothing submitted. The real squeue needs 18-60 s to give up, so a stand-in on PATH
    fails the way it does."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
                                 "(connect failure)' >&2\nexit 1\n")
    (fake / "squeue").chmod(0o755)
    args = ["grid=smoke", "seeds=[1]", "agent=[storm]", "task=breakout", "launcher=local", f"results_dir={tmp_path}"]
    [unit] = expand(parse_args(args))
    jobs = tmp_path / "grids" / "smoke" / "jobs.json"
    atomic_write_json(jobs, {unit.key: {"job_id": "424242", "launcher": "slurm", "stderr": "/nowhere/x.err"}})
    before = jobs.read_text()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "mowbench.run", *args], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip() == ("error: squeue failed (slurm_load_jobs error: Unable to contact slurm controller "
                                  "(connect failure)); cannot tell which recorded jobs are still queued, so nothing "
                                  "is submitted or reported; retry when SLURM answers")
    assert jobs.read_text() == before and not unit.folder.exists()


def wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow(seconds=140)
@pytest.mark.skipif(not SLURM and not REQUIRE_SLURM, reason="no SLURM here (start one: slurm/local-cluster.sh start)")
def test_smoke_grid_on_real_slurm_survives_preemption_and_is_never_duplicated(tmp_path):
    """Driven through the commands a user types (subprocesses), against the real single-node SLURM."""
    assert SLURM, "MOWBENCH_REQUIRE_SLURM=1 but sbatch/sinfo do not work (slurm/local-cluster.sh start)"
    args = ["grid=smoke", "launcher=slurm", "slurm=local", f"results_dir={tmp_path}"]
    req = parse_args(args)
    units = expand(req)
    refused = subprocess.run([sys.executable, "-m", "mowbench.run", *args, "slurm.gpus_per_node=1"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode != 0 and "has no GPUs" in refused.stderr  # this node has no GRES
    assert not (tmp_path / "grids" / "smoke" / "jobs.json").exists()
    t0 = time.time()
    assert "submitted 6 run(s)" in run_grid(*args)
    assert time.time() - t0 < 120  # returns at once, the jobs run in the background
    jobs = json.loads((tmp_path / "grids" / "smoke" / "jobs.json").read_text())
    assert len({j["job_id"].split("_")[0] for j in jobs.values()}) == 1  # one job array
    # preempt one run in the middle: SLURM's USR2, as before a time limit
    victim = next(u for u in units if u.key == "minatar/storm/breakout/seed_0")
    wait_for(lambda: (victim.folder / "checkpoint.pt").exists() and (victim.folder / LOCK).exists(), 240,
             "the victim's first checkpoint")
    job_id = jobs[victim.key]["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id])  # its exit code can be non-zero while the job handles it
    meta = victim.folder / "metadata.json"
    wait_for(lambda: json.loads(meta.read_text())["sessions"][0].get("last_step"), 120, "the checkpoint on USR2")
    # a resubmission while runs are queued or running submits none of them again
    assert "nothing to submit" in run_grid(*args)
    release_requeued(job_id)
    wait_for(lambda: all(is_done(u.folder) for u in units), 600, "every run of the grid to finish")
    summary = json.loads((victim.folder / "summary.json").read_text())
    assert summary["step"] == 160  # the full budget, after the requeue
    sessions = json.loads(meta.read_text())["sessions"]
    assert len(sessions) == 2 and sessions[0]["resumed_from_step"] is None
    assert sessions[1]["resumed_from_step"] == sessions[0]["last_step"] > 0
    status = subprocess.run([sys.executable, "-m", "mowbench.grid", "status", *args], capture_output=True,
                            text=True, cwd=REPO, timeout=300).stdout
    assert "done: 6 running: 0 pending: 0 preempted: 0 failed: 0 mismatch: 0 missing: 0" in status
    assert "nothing to submit (6 done" in run_grid(*args)


def test_a_corrupt_jobs_record_does_not_stop_grid_status(tmp_path):
    """jobs.json is bookkeeping; the run folders are the truth: a garbage record is named, and status works. A
    corrupt file inside one run folder is a warning too: that run shows no figures, the others do."""
    record = tmp_path / "grids" / "smoke" / "jobs.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"minatar/storm/breakout/seed_0": {"job_id": ')
    finished, unfinished = (tmp_path / "minatar" / "storm" / "breakout" / f"seed_{k}" for k in (0, 1))
    for folder in (finished, unfinished):
        folder.mkdir(parents=True)
    (finished / "DONE.json").write_text("{}")
    (finished / "summary.json").write_text("garb")  # and a cut eval.csv in an unfinished run
    (unfinished / "eval.csv").write_text("step,task,episode,return\n20,breakout,0,1.")
    out = subprocess.run([sys.executable, "-m", "mowbench.grid", "status", "grid=smoke", f"results_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "jobs.json is corrupt (not JSON" in out.stderr and "going on without it" in out.stderr
    assert "minatar/storm/breakout/seed_0" in out.stdout and "minatar/storm/breakout/seed_1" in out.stdout
    assert "summary.json is corrupt (not JSON" in out.stderr and "eval.csv is truncated" in out.stderr


def test_mt50_grids_hold_the_tdmpc2_family(tmp_path):
    """main_mt50 has the TD-MPC2 family beside MoW; ablate_language's cells are newt (language), newt-onehot
    (a learned embedding) and tdmpc2, each composing to what its name says."""
    main = expand(parse_args(["grid=main_mt50", "seeds=[0]", f"results_dir={tmp_path}"]))
    methods = {u.key.split("/")[1] for u in main}
    assert methods == {"mow", "monolithic", "tdmpc2", "newt", "pwm"}
    units = expand(parse_args(["grid=ablate_language", "seeds=[0]", f"results_dir={tmp_path}"]))
    cells = {u.key.split("/")[1]: u for u in units}
    assert set(cells) == {"newt", "newt-onehot", "tdmpc2"} and all("/all50/" in u.key for u in units)
    assert compose_config(cells["newt"].overrides)["agent"]["task_embedding"] == "language"
    assert compose_config(cells["newt-onehot"].overrides)["agent"]["task_embedding"] == "learned"
    assert compose_config(cells["tdmpc2"].overrides)["agent"]["name"] == "tdmpc2"


def grid_command(*args):
    return subprocess.run([sys.executable, "-m", "mowbench.run", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)


@pytest.mark.slow(seconds=40)
def test_a_grid_refuses_cells_whose_folders_hold_other_settings(tmp_path):
    """A grid judges existing run folders as a standalone run does: a cell whose folder holds a run of other settings
    (a longer budget, another preset) is refused before anything is submitted, and shown as such in status, whose
    hint keeps every option that finds the grid."""
    args = ["grid=smoke", "seeds=[0]", "agent=[storm]", "task=breakout", "launcher=local", f"results_dir={tmp_path}"]
    first = grid_command(*args, "wait=true")
    assert first.returncode == 0 and "submitted 1 run(s)" in first.stdout, first.stderr
    assert (f"status: python -m mowbench.grid status grid=smoke 'seeds=[0]' 'agent=[storm]' task=breakout "
            f"launcher=local results_dir={tmp_path}") in first.stdout
    jobs = (tmp_path / "grids" / "smoke" / "jobs.json").read_text()
    longer = grid_command(*args, "train.steps=1000")
    assert longer.returncode != 0 and longer.stderr.strip() == (
        "error: grid smoke: cell minatar/storm/breakout/seed_0 holds a run of other settings (train.steps: 160 -> 1000)"
        "; nothing submitted: use another results_dir for these settings, or delete those folders to train them again")
    assert (tmp_path / "grids" / "smoke" / "jobs.json").read_text() == jobs
    status = subprocess.run([sys.executable, "-m", "mowbench.grid", "status", *args, "preset=tiny"],
                            capture_output=True, text=True, cwd=REPO, timeout=300).stdout
    assert "minatar/storm/breakout/seed_0  mismatch" in status and "other settings: agent." in status
    assert "done: 0" in status and "mismatch: 1" in status
    # an unreadable config.yaml: that cell is named, the rest of the grid is still listed
    config = run_dir(tmp_path, "minatar", "storm", "breakout", 0) / "config.yaml"
    config.write_text("{unclosed: [")
    status = subprocess.run([sys.executable, "-m", "mowbench.grid", "status", *args], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert status.returncode == 0 and "mismatch" in status.stdout and "config.yaml is unreadable" in status.stdout
    # the same seed twice is one run folder, submitted once
    units = expand(parse_args([*args, "seeds=[0,0,1]"]))
    assert sorted(u.key for u in units) == ["minatar/storm/breakout/seed_0", "minatar/storm/breakout/seed_1"]


def release_requeued(job):
    """SLURM holds a requeued job for ~2 minutes (Reason=BeginTime): once it is pending again, let it start now, but
    not in the second its last run was stopped: slurmd refuses a credential issued in the second the job's previous
    one was revoked ("Job credential revoked"), and the job then never runs again."""
    seen = []

    def pending():
        state = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout
        if state.strip() != "PENDING":
            return False
        seen.append(time.time())
        return time.time() - seen[0] >= 2.0 and subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"],
                                                                 capture_output=True).returncode == 0
    wait_for(pending, 120, "the requeued job to be pending")


def slurm_jobs(name):
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout.split("\n")
    return sorted({line.split()[0].split("_")[0] for line in out if line.strip() and name in line})


@pytest.mark.slow(seconds=60)
@pytest.mark.skipif(not SLURM and not REQUIRE_SLURM, reason="no SLURM here (start one: slurm/local-cluster.sh start)")
def test_simultaneous_submissions_of_one_grid_submit_once_and_a_bad_partition_is_one_line(tmp_path):
    assert SLURM, "MOWBENCH_REQUIRE_SLURM=1 but sbatch/sinfo do not work (slurm/local-cluster.sh start)"
    args = ["grid=smoke", "seeds=[5]", "launcher=slurm", "slurm=local", f"results_dir={tmp_path}"]
    bad = grid_command(*args, "slurm.partition=nowhere")
    assert bad.returncode != 0
    assert bad.stderr.strip() == "error: slurm partition='nowhere' not found by sinfo; allowed: debug"
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".sh", ".pkl")]
    both = [subprocess.Popen([sys.executable, "-m", "mowbench.run", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in both]
    record_path = tmp_path / "grids" / "smoke" / "jobs.json"
    try:
        assert all(p.returncode == 0 for p in both), outs
        said = sorted("submitted 3 run(s)" in out for out, _ in outs)
        assert said == [False, True], outs  # one submits the grid's 3 runs, the other finds them queued
        assert any("nothing to submit (0 done, " in out for out, _ in outs), outs
        record = json.loads(record_path.read_text())
        arrays = {j["job_id"].split("_")[0] for j in record.values()}
        assert len(record) == 3 and len(arrays) == 1  # one job array, recorded once
        assert arrays <= set(slurm_jobs("mowbench-smoke"))
    finally:  # the runs themselves are not needed: free the cluster for the other tests
        for array in {j["job_id"].split("_")[0] for j in json.loads(record_path.read_text()).values()}:
            subprocess.run(["scancel", array])


@pytest.mark.slow(seconds=50)
@pytest.mark.skipif(not SLURM and not REQUIRE_SLURM, reason="no SLURM here (start one: slurm/local-cluster.sh start)")
def test_on_slurm_a_cancelled_run_is_preempted_and_a_signal_in_the_final_evaluation_requeues(tmp_path):
    """Through a results_dir with a space and a non-ASCII letter: scancel (SIGTERM) checkpoints and leaves, and status
    calls the run preempted, not failed; the resubmitted run resumes, ends training with a checkpoint, and SLURM's
    USR2 during the final evaluation requeues it; the requeued job evaluates again without training again."""
    assert SLURM, "MOWBENCH_REQUIRE_SLURM=1 but sbatch/sinfo do not work (slurm/local-cluster.sh start)"
    results = tmp_path / "my résults"
    args = ["grid=smoke", "seeds=[3]", "agent=[storm]", "task=breakout", "launcher=slurm", "slurm=local",
            f"results_dir='{results}'", "train.checkpoint_every=0", "train.eval_episodes=1000", "train.eval_envs=2"]
    req = parse_args(args)
    [unit] = expand(req)
    assert unit.folder == results / "minatar" / "storm" / "breakout" / "seed_3"
    meta, ckpt = unit.folder / "metadata.json", unit.folder / "checkpoint.pt"
    assert "submitted 1 run(s)" in run_grid(*args)
    job = json.loads((results / "grids" / "smoke" / "jobs.json").read_text())[unit.key]["job_id"]
    wait_for(lambda: meta.exists() and (unit.folder / LOCK).exists(), 240, "the run to start")
    time.sleep(1.0)  # the trainer's handlers are installed once it trains (training takes seconds: the signal may
    subprocess.run(["scancel", job])  # come in training or in the final evaluation; either is checkpointed)
    wait_for(lambda: json.loads(meta.read_text())["sessions"][0].get("preempted") == "SIGTERM", 120,
             "the checkpoint on SIGTERM")
    wait_for(lambda: job not in subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True,
                                               text=True).stdout.split(), 120, "the cancelled job to leave")
    [row] = unit_states(req, [unit])
    assert row["state"] == "preempted" and "checkpointed on SIGTERM" in row["reason"]
    stopped = json.loads(meta.read_text())["sessions"][0]["last_step"]  # in training, or already evaluating (160)
    cut = ckpt.stat().st_mtime_ns
    assert "submitted 1 run(s)" in run_grid(*args)
    job = json.loads((results / "grids" / "smoke" / "jobs.json").read_text())[unit.key]["job_id"]

    def evaluating():  # the second session runs the final evaluation: it resumed at 160, or has trained to 160
        sessions = json.loads(meta.read_text())["sessions"]
        return len(sessions) == 2 and (stopped == 160 or ckpt.stat().st_mtime_ns != cut)

    wait_for(evaluating, 240, "the final evaluation")
    time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job])
    assert torch.load(ckpt, weights_only=True)["counters"]["step"] == 160
    wait_for(lambda: json.loads(meta.read_text())["sessions"][1].get("preempted") == "SIGUSR2", 120,
             "the final evaluation to stop on USR2")
    release_requeued(job)
    wait_for(lambda: is_done(unit.folder), 400, "the run to finish")
    sessions = json.loads(meta.read_text())["sessions"]
    assert [s.get("preempted") for s in sessions] == ["SIGTERM", "SIGUSR2", None]
    assert sessions[1]["last_step"] == 160 and sessions[2]["resumed_from_step"] == 160  # no training done twice
    summary = json.loads((unit.folder / "summary.json").read_text())
    assert summary["step"] == 160 and summary["updates"] == 60
    [row] = unit_states(req, [unit])
    assert row["state"] == "done"
