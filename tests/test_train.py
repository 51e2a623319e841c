"""The loop end to end at micro sizes: results layout, exact resume, finished runs immutable, bad input."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from mowbench.config import plan
from mowbench.results import run_dir
from mowbench.runner import execute
from mowbench.trainer import CHECKPOINT
from tests.conftest import REPO


def load_ckpt(folder):
    return torch.load(folder / CHECKPOINT, weights_only=True)


def test_run_writes_the_results_layout(micro_cfg, tmp_path):
    cfg = micro_cfg()
    [(name, summary)] = execute(cfg)
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    for f in ("config.yaml", "metadata.json", "summary.json", "eval.csv", "episodes.csv", "metrics.csv",
              "model.pt", "DONE.json"):
        assert (folder / f).is_file(), f
    assert not (folder / CHECKPOINT).exists()
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["precision"] == "fp32" and meta["device"]["device"] == "cpu" and meta["seed"] == 0
    assert meta["protocol"]["breakout"]["sticky_action_prob"] == 0.1
    assert "commit" in meta["git"] and meta["versions"]["torch"].startswith("2.13")
    assert meta["parameters"]["world_model"] > 0 and meta["wall_time_s"] > 0
    assert summary["step"] == 60 and summary["updates"] == 20  # 40 steps after warm-up x 0.5
    eval_rows = (folder / "eval.csv").read_text().splitlines()
    assert eval_rows[0] == "step,task,episode,return,length,success,mode" and len(eval_rows) == 2
    assert eval_rows[1].endswith(",full")  # MinAtar evaluates every episode with its whole return
    assert meta["evaluation"]["mode"] == "full" and meta["per_task_signal"]["updates_per_round"] == 0.5
    assert not list(folder.glob(".*.tmp"))  # no half-written files


def test_finished_run_is_never_overwritten(micro_cfg, tmp_path, capsys):
    cfg = micro_cfg()
    execute(cfg)
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    execute(cfg)
    assert "already finished; nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.parametrize("agent,tasks", [("storm", "breakout"), ("mow", "[breakout,space_invaders]")])
def test_checkpoint_stop_resume_is_exact(micro_cfg, tmp_path, agent, tasks):
    """A run stopped at step 40 and resumed ends in the same state as one that never stopped (MoW: its
    warm-up clustering happens before the stop, and the clusters, router and s_k survive the resume)."""
    common = [f"agent={agent}", f"task={tasks}", "train.steps=70", "train.checkpoint_every=0",
              "train.keep_checkpoint=true"]
    straight = micro_cfg(*common, f"results_dir={tmp_path / 'a'}")
    execute(straight)
    interrupted = micro_cfg(*common, "train.stop_at=40", f"results_dir={tmp_path / 'b'}")
    [(_, summary)] = execute(interrupted)
    assert summary is None  # left early, like a preempted job
    name = "breakout" if agent == "storm" else "all2"
    folder_b = run_dir(tmp_path / "b", "minatar", agent, name, 0)
    mid = load_ckpt(folder_b)
    assert mid["counters"]["step"] == 40 and mid["replay"]["buffers"][0]["size"] == 40
    interrupted["train"]["stop_at"] = 0
    execute(interrupted)
    folder_a = run_dir(tmp_path / "a", "minatar", agent, name, 0)
    a, b = load_ckpt(folder_a), load_ckpt(folder_b)
    assert (a["counters"]["step"], a["counters"]["updates"], a["counters"]["episodes"]) == \
           (b["counters"]["step"], b["counters"]["updates"], b["counters"]["episodes"])
    for buf_a, buf_b in zip(a["replay"]["buffers"], b["replay"]["buffers"], strict=True):
        for key in ("obs", "action", "reward", "terminal"):
            assert torch.equal(buf_a[key], buf_b[key]), key
    for key, value in a["agent"]["wm"].items():
        assert torch.equal(value, b["agent"]["wm"][key]), key
    for key, value in a["agent"]["ac"].items():
        assert torch.equal(value, b["agent"]["ac"][key]), key
    if agent == "mow":
        assert torch.equal(a["agent"]["log_sigma"], b["agent"]["log_sigma"])
        assert a["agent"]["cluster_report"]["assignment"] == b["agent"]["cluster_report"]["assignment"]
        assert (folder_a / "artifacts" / "routing_final.csv").read_text() == \
               (folder_b / "artifacts" / "routing_final.csv").read_text()
    assert a["log"]["episodes.csv"] == b["log"]["episodes.csv"]
    assert (folder_b / "eval.csv").read_text() == (folder_a / "eval.csv").read_text()
    sessions = json.loads((folder_b / "metadata.json").read_text())["sessions"]
    assert [s["resumed_from_step"] for s in sessions] == [None, 40]


@pytest.mark.parametrize("override,message", [
    (["env.sticky_action_prob=2"], "sticky_action_prob=2; allowed: [0, 1]"),
    (["task=pong"], "unknown task 'pong' for suite 'minatar'; allowed: asterix"),
    (["train.steps=-5"], "train.steps=-5; allowed: a positive integer"),
    (["agent.heads=3"], "width=16 must be divisible by heads=3"),
    (["env.image_size=18"], "image_size=18 cannot be taken by an encoder with 2 stride-2 stages; "
                            "allowed: multiples of 4"),
    (["device=tpu"], "device='tpu'; allowed: auto, cpu, cuda, cuda:N"),
    (["seed=-1"], "seed=-1; allowed: a non-negative integer"),
    (["deterministic=yes"], "deterministic='yes'; allowed: true, false"),
])
def test_bad_input_is_refused_before_heavy_work(micro_cfg, override, message):
    with pytest.raises(ValueError) as err:
        plan(micro_cfg(*override))
    assert message in str(err.value)


def test_deterministic_kernels_are_set_on_cuda_only(monkeypatch):
    """deterministic=true: on a CUDA device torch's deterministic algorithms (warning where an op has none), cuDNN's
    deterministic convolutions without autotuning, a fixed cuBLAS workspace and attention by the math backend (the
    fused backends' backward passes use atomics); on CPU nothing changes (its kernels are deterministic already).
    Only torch's switches are set, so this runs without a GPU."""
    from mowbench.config import deterministic_kernels

    def fused_attention():
        b = torch.backends.cuda
        return [b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled()]

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert deterministic_kernels(torch.device("cpu"), True) is False
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert fused_attention() == [True, True, True]
    try:
        assert deterministic_kernels(torch.device("cuda"), True) is True
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert fused_attention() == [False, False, False] and torch.backends.cuda.math_sdp_enabled()
        assert deterministic_kernels(torch.device("cuda"), False) is False
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
        assert fused_attention() == [True, True, True]
    finally:  # torch's defaults back for the tests after this one (off sets every switch; it runs without a GPU)
        deterministic_kernels(torch.device("cuda"), False)


@pytest.mark.parametrize("args,message", [
    (["agent=dreamer"],
     "error: unknown agent 'dreamer'; allowed: monolithic, mow, newt, newt-nodemo, pwm, pwm-online, "
     "scalezero-lite, storm, tdmpc2"),
    (["env=atari57"], "error: unknown env 'atari57'; allowed: atari100k, metaworld, minatar"),
    (["preset=huge"], "error: unknown preset 'huge'; allowed: micro, paper, tiny"),
    (["env=atari100k", "task=Pongg"], "error: unknown task 'Pongg' for suite 'atari100k'"),
    (["env=atari100k", "env.protocol=dqn"], "error: unknown atari100k protocol 'dqn'; allowed: storm, standard"),
])
def test_cli_bad_input_gives_one_line(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mowbench.run", *args, f"results_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line]
    assert lines[-1].startswith(message), out.stderr
    assert len(lines) == 1, out.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_run_held_by_a_live_process_is_skipped_and_a_stale_lock_is_taken_over(micro_cfg, tmp_path, capsys):
    import os
    import platform
    import subprocess as sp

    from mowbench.results import LOCK

    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    folder.mkdir(parents=True)
    (folder / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": platform.node()}))  # alive: this process
    with pytest.raises(ValueError, match=r"1 run\(s\) skipped, being trained by another process: .*breakout"):
        execute(micro_cfg())  # the command fails (exit 1), the run is not called preempted
    out = capsys.readouterr().out
    assert "being trained by another process" in out and "(skipped: held by another process)" in out
    assert "(preempted)" not in out and not (folder / "DONE.json").exists()
    (folder / LOCK).write_text("")  # left empty by a full disk: stale, not "being written"
    [(_, summary)] = execute(micro_cfg("train.stop_at=20"))
    assert summary is None and not (folder / LOCK).exists()  # taken over, trained to step 20, released
    dead = sp.Popen(["true"])
    dead.wait()
    (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": platform.node()}))  # its process is gone
    [(_, summary)] = execute(micro_cfg())
    assert summary["step"] == 60 and (folder / "DONE.json").exists() and not (folder / LOCK).exists()


def test_presets_set_the_published_budgets():
    from mowbench.config import compose_config

    atari = compose_config(["env=atari100k", "preset=paper"])
    assert (atari["train"]["steps"], atari["train"]["warmup"], atari["env"]["image_size"]) == (100_000, 1024, 64)
    assert atari["agent"]["width"] == 512 and atari["agent"]["imag_per_task"] == 1024
    metaworld = compose_config(["env=metaworld", "preset=paper"])
    assert metaworld["train"]["steps"] == 150_000 and metaworld["env"]["action_repeat"] == 2  # 300k env steps
    assert compose_config(["env=metaworld", "preset=paper", "train.steps=7"])["train"]["steps"] == 7


def test_a_missing_agent_preset_is_an_error_not_a_full_size_run(tmp_path):
    """Hydra skips an optional preset file that is absent; mowbench refuses instead of running paper sizes."""
    from mowbench.config import CONF, check_agent_preset

    for name in ("storm", "mow", "monolithic"):  # every registered agent has its tiny sizes
        check_agent_preset(name, "tiny")
        check_agent_preset(name, "paper")
    (tmp_path / "agent" / "preset").mkdir(parents=True)
    (tmp_path / "agent" / "preset" / "newagent_paper.yaml").write_text("width: 8\n")
    with pytest.raises(ValueError, match="agent 'newagent' has no 'tiny' preset .* allowed for newagent: paper$"):
        check_agent_preset("newagent", "tiny", conf=tmp_path)
    assert (CONF / "agent" / "preset" / "storm_tiny.yaml").exists()


def test_a_rerun_with_other_settings_is_refused_before_any_work(micro_cfg, tmp_path):
    """A finished or started run rerun with result-relevant settings changed is a one-line error naming the
    keys; settings that cannot change results (results.INERT_KEYS: progress bar, logging, checkpointing) may change."""
    [(_, done)] = execute(micro_cfg())
    with pytest.raises(ValueError, match=r"was finished with other settings \(agent.wm_lr: 0.001 -> 0.5; "
                                         r"train.steps: 60 -> 100\); to run these settings use another results_dir"):
        execute(micro_cfg("agent.wm_lr=0.5", "train.steps=100"))
    assert execute(micro_cfg("train.progress=true", "train.log_every=7"))[0][1] == done  # inert: the old result
    cut = micro_cfg("seed=1", "train.stop_at=40")
    assert execute(cut)[0][1] is None  # preempted at step 40
    started = run_dir(tmp_path, "minatar", "storm", "breakout", 1)
    before = (started / "metrics.csv").read_text()
    with pytest.raises(ValueError, match=r"was started with other settings \(agent.width: 16 -> 32\)"):
        execute(micro_cfg("seed=1", "agent.width=32"))
    assert (started / "metrics.csv").read_text() == before and (started / CHECKPOINT).exists()  # untouched
    assert execute(micro_cfg("seed=1"))[0][1]["step"] == 60  # the same settings resume
    mow = micro_cfg("agent=mow", "task=[breakout,asterix]")
    execute({**mow, "train": {**mow["train"], "stop_at": 30}})
    other = run_dir(tmp_path, "minatar", "mow", "all2", 0)
    assert other.exists()
    with pytest.raises(ValueError, match=r"tasks: \['breakout', 'asterix'\] -> \['breakout', 'freeway'\]"):
        execute(micro_cfg("agent=mow", "task=[breakout,freeway]"))


def _race_for_lock(folder, start, results, done):
    from mowbench.results import RunLock

    start.wait()
    results.put(RunLock(folder).acquire())
    done.wait()  # hold it (alive) until every racer has answered


def test_racing_processes_take_over_a_stale_lock_exactly_once(tmp_path):
    """Six processes race for one stale lock (its process is dead), 25 times: exactly one wins each time."""
    import multiprocessing as mp
    import platform
    import subprocess as sp

    from mowbench.results import LOCK

    ctx = mp.get_context("fork")
    dead = sp.Popen(["true"])
    dead.wait()
    winners = []
    for trial in range(25):
        folder = tmp_path / f"run{trial}"
        folder.mkdir()
        (folder / LOCK).write_text(json.dumps({"pid": dead.pid, "host": platform.node()}))
        start, done, results = ctx.Barrier(6), ctx.Event(), ctx.Queue()
        racers = [ctx.Process(target=_race_for_lock, args=(folder, start, results, done)) for _ in range(6)]
        for r in racers:
            r.start()
        winners.append(sum(results.get(timeout=60) for _ in racers))
        done.set()
        for r in racers:
            r.join(timeout=60)
    assert winners == [1] * 25


def test_a_results_path_that_is_a_file_is_one_line_before_any_work(micro_cfg, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^results_dir=.*taken is a file; allowed: a folder"):
        execute(micro_cfg(f"results_dir={tmp_path / 'taken'}"))
    with pytest.raises(ValueError, match=r"^results_dir=.*taken/below cannot be written \(not a directory"):
        execute(micro_cfg(f"results_dir={tmp_path / 'taken' / 'below'}"))


@contextlib.contextmanager
def tmpfs(path, size):
    """A real tmpfs mounted at `path` for the duration (needs root: CI runs as root and sets MOWBENCH_CI=1,
    so there the tests using it can never skip)."""
    import os
    import subprocess as sp

    path.mkdir()
    if os.geteuid() != 0:
        assert os.environ.get("MOWBENCH_CI") != "1", "CI must run the tmpfs tests as root"
        pytest.skip("mounting a tmpfs needs root (CI runs as root, so this runs there)")
    assert sp.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0
    try:
        yield path
    finally:
        sp.run(["umount", str(path)])


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(micro_cfg, tmp_path):
    """A real full disk (a small tmpfs): the checkpoint write fails with one line naming the file and folder,
    the previous checkpoint stays loadable, no lock and no partial file remain; with space again the rerun
    resumes and finishes."""
    import os

    with tmpfs(tmp_path / "disk", "4m") as disk:
        args = [f"results_dir={disk}", "train.checkpoint_every=20", "train.keep_checkpoint=true"]
        assert execute(micro_cfg(*args, "train.stop_at=20"))[0][1] is None  # checkpointed at step 20
        folder = run_dir(disk, "minatar", "storm", "breakout", 0)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free - 64 * 1024))  # 64 KiB left: the logs fit, the next checkpoint does not
        with pytest.raises(ValueError, match=r"^no space left on device while writing checkpoint.pt in .*seed_0; the "
                                             r"files written before are kept"):
            execute(micro_cfg(*args))
        assert torch.load(folder / CHECKPOINT, weights_only=True)["counters"]["step"] == 20
        assert not (folder / "RUNNING.lock").exists() and not list(folder.glob(".*.tmp"))
        (folder / ".model.pt.left-by-a-kill.tmp").write_bytes(b"partial")
        filler.unlink()
        [(_, summary)] = execute(micro_cfg(*args))
        assert summary["step"] == 60 and not list(folder.glob(".*.tmp"))  # the partial file is removed


def test_a_read_only_results_disk_is_one_line_and_keeps_the_run(micro_cfg, tmp_path):
    """A real read-only mount (tmpfs remounted ro; as root, chmod would not stop writes): the rerun of a
    checkpointed run fails before any work with one line naming the path and the cause, the checkpoint and
    logs stay as they were and no lock is left; writable again, the rerun resumes and finishes."""
    import subprocess as sp

    with tmpfs(tmp_path / "disk", "8m") as disk:
        args = [f"results_dir={disk}", "train.checkpoint_every=20", "train.keep_checkpoint=true"]
        assert execute(micro_cfg(*args, "train.stop_at=20"))[0][1] is None
        folder = run_dir(disk, "minatar", "storm", "breakout", 0)
        before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        assert sp.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        with pytest.raises(ValueError, match=rf"^results_dir={disk} cannot be written \(read-only file system at "
                                             rf"{disk}/\.write-probe\..*\); allowed: a writable folder$"):
            execute(micro_cfg(*args))
        assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing touched
        assert sp.run(["mount", "-o", "remount,rw", str(disk)]).returncode == 0
        [(_, summary)] = execute(micro_cfg(*args))
        assert summary["step"] == 60 and not (folder / "RUNNING.lock").exists()


def test_corrupt_files_are_named_with_the_recovery(micro_cfg, tmp_path):
    """A truncated checkpoint.pt or metadata.json, or a garbage summary.json: one line naming the file and
    what to do, never a traceback."""
    args = ["train.keep_checkpoint=true", "train.checkpoint_every=20"]
    assert execute(micro_cfg(*args, "train.stop_at=20"))[0][1] is None
    folder = run_dir(tmp_path, "minatar", "storm", "breakout", 0)
    ckpt = folder / CHECKPOINT
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"checkpoint.pt is corrupt \(.*\); delete it to restart this run from step 0"):
        execute(micro_cfg(*args))
    assert not (folder / "RUNNING.lock").exists()
    ckpt.write_bytes(good)
    (folder / "metadata.json").write_text('{"tasks": ["breakout"], "seed"')
    with pytest.raises(ValueError, match=r"metadata.json is corrupt \(not JSON: .*\); restore it, or delete the run"):
        execute(micro_cfg(*args))
    (folder / "metadata.json").unlink()
    assert execute(micro_cfg(*args))[0][1]["step"] == 60
    (folder / "summary.json").write_text("garbage")
    with pytest.raises(ValueError, match=r"summary.json is corrupt \(not JSON: .*\); the run finished"):
        execute(micro_cfg(*args))


def tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tb"))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith("perf/")}


def test_tensorboard_keeps_every_scalar_across_a_resume(micro_cfg, tmp_path):
    """The resumed run's TensorBoard scalars equal an uninterrupted run's: none lost at the resume step."""
    args = ["train.tensorboard=true", "train.log_every=10", "train.checkpoint_every=30"]
    execute(micro_cfg(*args, f"results_dir={tmp_path / 'a'}"))
    assert execute(micro_cfg(*args, "train.stop_at=30", f"results_dir={tmp_path / 'b'}"))[0][1] is None
    execute(micro_cfg(*args, f"results_dir={tmp_path / 'b'}"))
    a, b = (tb_scalars(run_dir(tmp_path / r, "minatar", "storm", "breakout", 0)) for r in "ab")
    assert a.keys() == b.keys() and len(a) >= 10
    assert a == b
    assert [s for s, _ in a["wm/loss"]] == [30, 40, 50, 60]


def test_a_replay_larger_than_the_host_memory_is_one_line_before_any_step(micro_cfg, tmp_path, monkeypatch):
    """A replay in host memory is reserved lazily, so one that cannot fit would kill the run for memory hours
    later, as it fills (and again after each resubmission): the trainer refuses it before the first step, naming
    how many steps per task fit. Here 500 steps of one 16x16 MinAtar task take 500 x (768 + 8 + 8) bytes."""
    step = 16 * 16 * 3 + 8 + 8  # frame, action, reward and terminal of one step (the micro agent adds no field)
    monkeypatch.setattr("mowbench.trainer.host_memory_available",
                        lambda: (100 * step + 5, "the memory limit of cgroup /slurm/job_7"))
    with pytest.raises(ValueError, match=r"^train\.replay_capacity=500: the replay of 1 task\(s\) takes 0\.1 MiB of "
                                         r"host memory when it holds 200 steps per task, and 0\.1 MiB is available "
                                         r"here \(the memory limit of cgroup /slurm/job_7\); allowed: at most 100 "
                                         r"steps per task, or more memory for the job \(e\.g\. SLURM's --mem\)$"):
        execute(micro_cfg("train.steps=200"))  # 200 steps: 200 of the 500 slots are ever filled
    assert not list(tmp_path.rglob("metrics.csv")) and not list(tmp_path.rglob(CHECKPOINT))
    monkeypatch.setattr("mowbench.trainer.host_memory_available", lambda: (200 * step, "MemAvailable"))
    [(_, summary)] = execute(micro_cfg("train.steps=200"))  # fits exactly; the refused attempt left no lock
    assert summary["step"] == 200
