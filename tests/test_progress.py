"""Progress where work is long and silent (MoW's clustering warm-up, the analysis's bootstrap), and a warning when
torch's threads outnumber the CPUs the process may use."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np

from mowbench import machine
from mowbench.logger import Ticker, duration
from tests.conftest import MICRO, REPO


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ticker_prints_at_start_then_at_most_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    ticker = Ticker("phase", 10, every_s=10.0, stream=out)
    ticker.clock, ticker.start, ticker.last = clock, 0.0, 0.0
    for i in range(10):
        clock.now = 4.0 * (i + 1)  # a tick every 4 s: lines at 12 s (3 done), 24 s (6), 36 s (9), 40 s (the end)
        ticker.tick()
    lines = out.getvalue().splitlines()
    assert lines == ["[mowbench] phase: 0/10", "[mowbench] phase: 3/10, 12 s, ~28 s left",
                     "[mowbench] phase: 6/10, 24 s, ~16 s left", "[mowbench] phase: 9/10, 36 s, ~4 s left",
                     "[mowbench] phase: 10/10, 40 s, done"]


def test_duration_reads_as_a_person_would_say_it():
    assert [duration(s) for s in (5, 59.6, 185, 7440)] == ["5 s", "1 min 0 s", "3 min 5 s", "2 h 4 min"]


def test_thread_warning_names_the_threads_and_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(machine, "usable_cpus", lambda: 2)
    assert machine.thread_warning(2, 8) is None and machine.thread_warning(0, 2) is None
    assert "threads=4 on 2 usable CPU(s)" in machine.thread_warning(4, 1)
    assert "torch's default of 8 threads on 2 usable CPU(s)" in machine.thread_warning(0, 8)


def test_a_run_with_too_many_threads_warns_before_training(tmp_path):
    threads = machine.usable_cpus() + 3
    out = subprocess.run([sys.executable, "-m", "mowbench.run", *MICRO, "task=breakout", f"results_dir={tmp_path}",
                          "train.warmup=20", "train.steps=30", "train.eval_episodes=1", "train.eval_max_steps=10",
                          "train.replay_capacity=100", f"threads={threads}"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert f"warning: threads={threads} on {machine.usable_cpus()} usable CPU(s)" in out.stderr


def test_mow_warm_up_and_the_bootstrap_report_progress(micro_cfg, capsys):
    from mowbench.analysis.metrics import bootstrap
    from mowbench.runner import execute

    execute(micro_cfg("agent=mow", "env=minatar", "task=[breakout,asterix]", "agent.cluster_warmup_updates=3"))
    err = capsys.readouterr().err
    assert "[mowbench] MoW clustering warm-up (3 shared updates, then 2 task gradients): 0/5" in err
    assert "[mowbench] MoW clustering warm-up (3 shared updates, then 2 task gradients): 5/5" in err and "done" in err
    bootstrap({"a": np.ones((3, 2)), "b": np.zeros((3, 2))}, lambda x: np.array([x.mean()]), reps=50, seed=0)
    err = capsys.readouterr().err
    assert "[mowbench] bootstrap of lambda (50 resamples): 0/2" in err and ": 2/2, " in err
