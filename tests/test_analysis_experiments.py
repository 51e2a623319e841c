"""The analysis never shows a wrong number without a word: failed runs are left out and named, a method name holds
one experiment (runs of different settings are refused, or labelled apart with --split-settings), aggregates over
part of a suite are marked, evaluation points of different episode counts are noted, and --out never writes into
a run folder. Run folders are real (a micro run, copied) or written with the config the runner would write."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mowbench import results
from mowbench.analysis.__main__ import main
from mowbench.analysis.scores import AnalysisError, episode_notes, read_results, split_settings
from mowbench.config import compose_config, plan
from tests.conftest import MICRO, REPO

SPLIT_HINT = ("they would be averaged into one row: pass --split-settings to label each by its values, or give one "
              "experiment per method name (method=<name>)")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A finished micro MinAtar run: periodic evaluations of 1 episode at steps 20 and 40, the final one of 2."""
    from mowbench.runner import execute

    root = tmp_path_factory.mktemp("real")
    execute(compose_config(["env=minatar", "task=breakout", f"results_dir={root}", "train.warmup=20",
                            "train.steps=60", "train.eval_episodes=2", "train.eval_max_steps=20",
                            "train.eval_every=20", "train.periodic_eval_episodes=1", *MICRO]))
    return root / "minatar" / "storm" / "breakout" / "seed_0"


def copy_run(run: Path, root: Path, seed: int, method: str = "storm") -> Path:
    folder = results.run_dir(root, "minatar", method, "breakout", seed)
    shutil.copytree(run, folder)
    return folder


def write_settings(folder: Path, suite: str, task: str, seed: int, *overrides: str):
    """config.yaml and metadata.json's resolved settings as the runner writes them for these overrides."""
    p = plan(compose_config([f"env={suite}", f"task={task}", f"seed={seed}", f"results_dir={folder.parents[3]}",
                             *MICRO, *overrides]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(p.cfg)))
    path = folder / "metadata.json"
    meta = json.loads(path.read_text()) if path.exists() else {"suite": suite, "tasks": [task], "seed": seed}
    meta.update({"precision": p.precision, "evaluation": {
        "mode": p.train.eval_mode, "episodes": p.train.eval_episodes, "greedy": p.train.eval_greedy,
        "parallel_envs": 1, "random_episodes": p.train.random_episodes}})
    path.write_text(json.dumps(meta))
    return p


def atari_run(root: Path, method: str, task: str, seed: int, evals: list[tuple[int, str, list[float]]],
              *overrides: str, settings: bool = True) -> Path:
    """A finished Atari run folder (no emulator needed): eval.csv rows per (step, task, episode returns); with
    `settings`, the config.yaml and metadata.json the runner would write for `overrides`."""
    folder = results.run_dir(root, "atari100k", method, task, seed)
    folder.mkdir(parents=True)
    tasks = sorted({t for _, t, _ in evals})
    (folder / "metadata.json").write_text(json.dumps({"method": method, "tasks": tasks}))
    if settings:
        write_settings(folder, "atari100k", task, seed, *overrides)
    lines = ["step,task,episode,return,length,success,mode"]
    lines += [f"{step},{t},{i},{ret},100,,full" for step, t, rets in evals for i, ret in enumerate(rets)]
    (folder / "eval.csv").write_text("\n".join(lines) + "\n")
    (folder / results.DONE).write_text(json.dumps({"step": max(step for step, _, _ in evals)}))
    return folder


def analyse(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mowbench.analysis", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def notes_of(out: Path) -> list[str]:
    return [line.removeprefix("- ") for line in (out / "notes.txt").read_text().splitlines()]


def final_mean(folder: Path) -> float:
    rows = [line.split(",") for line in (folder / "eval.csv").read_text().splitlines()[1:]]
    last = max(int(r[0]) for r in rows)
    return float(np.mean([float(r[3]) for r in rows if int(r[0]) == last]))


@pytest.mark.parametrize("include_partial", [False, True], ids=["finished only", "include partial"])
def test_failed_runs_are_left_out_and_named(real_run, tmp_path, capsys, include_partial):
    """A failed run is never scored: not with DONE.json beside its FAILED.json, not with --include-partial."""
    root = tmp_path / "results"
    copy_run(real_run, root, 0)
    failed = copy_run(real_run, root, 1)  # failed after a DONE.json (e.g. copied over): FAILED wins
    (failed / results.FAILED).write_text(json.dumps({"reason": "loss wm/total is nan at step 57", "step": 57,
                                               "last_checkpoint": 40}))
    unfinished = copy_run(real_run, root, 2)
    (unfinished / results.DONE).unlink()
    (unfinished / results.FAILED).write_text(json.dumps({  # the trainer's fields; a reason of two lines stays one note
        "kind": "diverged", "reason": "training diverged: wm/total=nan\n(first non-finite update at step 30, "
        "detected at step 40)", "step": 30, "detected_at": 40, "last_checkpoint": None}))
    for folder in (failed, unfinished):  # a score that would show in every table if the run were used
        (folder / "eval.csv").write_text((folder / "eval.csv").read_text().replace(",0.0,", ",1000.0,"))
    out = tmp_path / "out"
    assert main([str(root), "--suite", "minatar", "--out", str(out), "--reps", "50",
                 *(["--include-partial"] if include_partial else [])]) == 0
    notes = notes_of(out)
    assert "minatar/storm/breakout/seed_1 failed (diverged: loss wm/total is nan at step 57): left out" in notes
    assert ("minatar/storm/breakout/seed_2 failed (training diverged: wm/total=nan (first non-finite "
            "update at step 30, detected at step 40)): left out") in notes
    assert not [n for n in notes if "unfinished" in n]
    assert (out / "per_task_raw.md").read_text().splitlines()[2] == f"| breakout | {final_mean(real_run):.1f} |"
    scores, _ = read_results(root, "minatar", include_partial)
    assert sorted(scores["seed"].unique()) == [0]
    capsys.readouterr()


def two_protocols(tmp_path: Path) -> tuple[Path, Path]:
    """storm under protocol storm (seeds 0-2, one root) and standard (seeds 0-1, another root): Pong only."""
    storm, standard = tmp_path / "storm_protocol", tmp_path / "standard_protocol"
    for seed, ret in enumerate([10.0, 12.0, 14.0]):
        atari_run(storm, "storm", "Pong", seed, [(100, "Pong", [ret])])
    for seed, ret in enumerate([-20.0, 0.0]):
        atari_run(standard, "storm", "Pong", seed, [(100, "Pong", [ret])], "env.protocol=standard")
    return storm, standard


def test_a_method_of_two_protocols_is_refused_in_one_line(tmp_path):
    """Same seeds in two roots: the settings are named, not reported as duplicates; nothing is written."""
    storm, standard = two_protocols(tmp_path)
    out = tmp_path / "out"
    done = analyse(str(storm), str(standard), "--suite", "atari100k", "--out", str(out), "--reps", "50")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: method 'storm' holds runs of different settings: env.protocol (storm: 3 runs; standard: 2 runs), "
        "train.eval_episodes (20: 3 runs; 100: 2 runs), train.eval_mode (reference: 3 runs; full: 2 runs), "
        "train.random_episodes (20: 3 runs; 100: 2 runs); " + SPLIT_HINT]
    assert not out.exists()


def test_split_settings_labels_each_experiment_with_its_own_numbers(tmp_path, capsys):
    storm, standard = two_protocols(tmp_path)
    out = tmp_path / "out"
    assert main([str(storm), str(standard), "--suite", "atari100k", "--out", str(out), "--reps", "50",
                 "--split-settings"]) == 0
    capsys.readouterr()
    hns = lambda returns: np.mean([(r + 20.7) / (14.6 + 20.7) for r in returns])  # noqa: E731 - Pong's HNS
    points = pd.read_csv(out / "aggregate.csv").set_index(["method", "metric"])["point"]
    assert points[("storm [env.protocol=storm]", "mean")] == pytest.approx(hns([10.0, 12.0, 14.0]))
    assert points[("storm [env.protocol=standard]", "mean")] == pytest.approx(hns([-20.0, 0.0]))
    assert sorted({m for m, _ in points.index}) == ["storm [env.protocol=standard]", "storm [env.protocol=storm]"]
    assert (out / "per_task_raw.md").read_text().splitlines()[0::2] == [
        "| task | storm [env.protocol=standard] | storm [env.protocol=storm] |", "| Pong | -10.0 ± 10.0 | 12.0 ± 1.6 |"]
    table = pd.read_csv(out / "aggregate_table.csv")
    assert table["method"].tolist() == ["storm [env.protocol=storm] (1 of 26 tasks)",  # by IQM, the best first
                                        "storm [env.protocol=standard] (1 of 26 tasks)"]
    notes = notes_of(out)
    assert ("storm: runs of different settings (env.protocol, train.eval_episodes, train.eval_mode, "
            "train.random_episodes) are shown apart, labelled by env.protocol: storm [env.protocol=standard] "
            "(2 runs), storm [env.protocol=storm] (3 runs)") in notes
    assert ("storm [env.protocol=standard]: aggregates over 1 of the 26 atari100k tasks (Pong): not comparable "
            "with full-suite aggregates") in notes


def test_null_eval_episodes_equals_the_protocols_value(real_run, tmp_path, capsys):
    """config.yaml's null (the protocol's 10 MinAtar episodes) and an explicit 10 are one experiment: the
    resolved values in metadata.json decide. A run without config.yaml is noted, not refused."""
    root = tmp_path / "results"
    explicit, default = copy_run(real_run, root, 0), copy_run(real_run, root, 1)
    assert write_settings(explicit, "minatar", "breakout", 0, "train.eval_episodes=10").train.eval_episodes == 10
    assert write_settings(default, "minatar", "breakout", 1, "train.eval_episodes=null").train.eval_episodes == 10
    assert "  eval_episodes: 10\n" in (explicit / "config.yaml").read_text()
    assert "  eval_episodes: null\n" in (default / "config.yaml").read_text()
    (copy_run(real_run, root, 2) / "config.yaml").unlink()  # an older run
    out = tmp_path / "out"
    assert main([str(root), "--suite", "minatar", "--out", str(out), "--reps", "50"]) == 0
    capsys.readouterr()
    assert pd.read_csv(out / "aggregate.csv")["method"].unique().tolist() == ["storm"]
    assert ("storm: 1 of 3 runs have no recorded settings (no config.yaml: older runs or external scores), so they "
            "could not be checked against the others") in notes_of(out)
    # without the resolved values, null and 10 would differ: the check is what merges them above
    meta = json.loads((default / "metadata.json").read_text())
    del meta["evaluation"]
    (default / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(AnalysisError) as err:
        split_settings(read_results(root, "minatar")[0])
    assert str(err.value) == ("method 'storm' holds runs of different settings: train.eval_episodes (10: 1 run; null: "
                              "1 run), train.eval_greedy (false: 1 run; null: 1 run), train.eval_mode (full: 1 run; "
                              "null: 1 run), train.random_episodes (10: 1 run; null: 1 run); " + SPLIT_HINT)


def test_fewer_tasks_than_the_suite_are_marked(tmp_path, capsys):
    root = tmp_path / "results"
    games = list(pd.read_csv(REPO / "analysis" / "reference" / "atari100k.csv", comment="#")["task"])
    assert len(games) == 26
    atari_run(root, "storm", "Pong", 0, [(100, "Pong", [0.0])], settings=False)
    atari_run(root, "mow", "all26", 0, [(100, g, [5.0]) for g in games], settings=False)
    atari_run(root, "iris", "all25", 0, [(100, g, [5.0]) for g in games if g != "UpNDown"], settings=False)
    out = tmp_path / "out"
    assert main([str(root), "--suite", "atari100k", "--out", str(out), "--reps", "50"]) == 0
    capsys.readouterr()
    notes = notes_of(out)
    assert ("storm: aggregates over 1 of the 26 atari100k tasks (Pong): not comparable with full-suite aggregates"
            in notes)
    assert ("iris: aggregates over 25 of the 26 atari100k tasks (all but UpNDown): not comparable with full-suite "
            "aggregates") in notes
    assert not [n for n in notes if n.startswith("mow: aggregates")]
    assert sorted(pd.read_csv(out / "aggregate_table.csv")["method"]) == [
        "iris (25 of 26 tasks)", "mow", "storm (1 of 26 tasks)"]
    assert any(line.startswith("| storm (1 of 26 tasks) | ") for line in (out / "aggregate_table.md").open())
    assert "storm: 1 of 26 tasks" in " ".join(notes)  # the note on different task sets stays


def test_evaluation_points_of_different_episode_counts_are_noted(real_run, tmp_path, capsys):
    root = tmp_path / "results"
    copy_run(real_run, root, 0)
    out = tmp_path / "out"
    assert main([str(root), "--suite", "minatar", "--out", str(out), "--reps", "50"]) == 0
    capsys.readouterr()
    assert ("storm: evaluation points average different episode counts (1 at 2 steps, 2 at the final step); curves "
            "mix their noise levels") in notes_of(out)
    atari = tmp_path / "atari"
    periodic = [(step, "Pong", [1.0] * 5) for step in (20, 40, 60, 80)]
    atari_run(atari, "a", "Pong", 0, [*periodic, (100, "Pong", [2.0] * 100)], settings=False)
    atari_run(atari, "a", "Pong", 1, [*periodic, (100, "Pong", [2.0] * 20)], settings=False)
    for seed in (0, 1):
        atari_run(atari, "b", "Pong", seed, [*periodic, (100, "Pong", [2.0] * 5)], settings=False)
    assert episode_notes(read_results(atari, "atari100k")[0]) == [
        "a: evaluation points average different episode counts (5 at 4 steps, 20 at the final step of 1 of 2 runs, "
        "100 at the final step of 1 of 2 runs); curves mix their noise levels"]


def test_out_inside_a_run_folder_is_refused(real_run, tmp_path, capsys):
    root = tmp_path / "results"
    folder = copy_run(real_run, root, 0)
    failed = results.run_dir(root, "minatar", "storm", "breakout", 1)
    failed.mkdir()
    (failed / results.FAILED).write_text("{}")  # a failed run's folder holds nothing else, and is one still
    before = sorted(root.rglob("*"))
    done = analyse(str(root), "--suite", "minatar", "--out", str(folder / "tables"), "--reps", "50")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"error: --out {folder / 'tables'} is inside the run folder "
                                        f"{folder.resolve()}; allowed: a folder outside every run folder"]
    for out, run in ((folder, folder), (folder / "a" / "b", folder), (failed / "tables", failed)):
        assert main([str(root), "--suite", "minatar", "--out", str(out), "--reps", "50"]) == 2
        assert capsys.readouterr().err == (f"error: --out {out} is inside the run folder {run.resolve()}; "
                                           "allowed: a folder outside every run folder\n")
    assert sorted(root.rglob("*")) == before  # nothing written
    assert main([str(root), "--suite", "minatar", "--out", str(root / "tables"), "--reps", "50"]) == 0
    capsys.readouterr()
