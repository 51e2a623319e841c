"""Analysis core: HNS, aggregate metrics against hand-computed matrices, reproducible rliable intervals,
external-score CSVs and results folders with their notes and errors."""

import json

import numpy as np
import pandas as pd
import pytest

from mowbench.analysis.metrics import interval_estimates, iqm, mean, median, optimality_gap
from mowbench.analysis.scores import (
    AnalysisError,
    human_normalised,
    read_results,
    read_scores_csv,
    reference_table,
    score_matrices,
)

MATRIX = np.array([[0.0, 0.5, 1.0, 10.0], [0.2, 0.4, 3.0, 2.0]])  # 2 runs x 4 tasks


def test_aggregate_metrics_hand_computed():
    # per-task means over runs: 0.1, 0.45, 2.0, 6.0
    assert mean(MATRIX) == pytest.approx(2.1375)
    assert median(MATRIX) == pytest.approx((0.45 + 2.0) / 2)
    # all 8 scores sorted: 0, .2, .4, .5, 1, 2, 3, 10 -> drop 2 at each end -> mean(.4, .5, 1, 2)
    assert iqm(MATRIX) == pytest.approx(0.975)
    # min(x, 1): 0, .5, 1, 1, .2, .4, 1, 1 -> mean .6375 -> gap .3625
    assert optimality_gap(MATRIX) == pytest.approx(0.3625)


def test_hns_against_the_reference_table():
    ref = reference_table()
    assert len(ref) == 26 and ref.loc["Pong", "random"] == -20.7 and ref.loc["Breakout", "human"] == 30.5
    scores = pd.DataFrame({"method": "m", "task": ["Pong", "Pong", "Breakout"], "seed": [0, 1, 0],
                           "score": [14.6, -20.7, 16.1]})
    assert human_normalised(scores)["hns"].tolist() == pytest.approx([1.0, 0.0, (16.1 - 1.7) / (30.5 - 1.7)])
    with pytest.raises(AnalysisError, match=r"no human/random reference score for task\(s\) \['Tetris'\]"):
        human_normalised(pd.DataFrame({"method": "m", "task": ["Tetris"], "seed": [0], "score": [1.0]}))


def test_intervals_are_reproducible_for_a_seed_and_bracket_the_point():
    rng = np.random.default_rng(0)
    matrices = {"a": rng.normal(1.0, 0.3, (5, 6)), "b": rng.normal(0.5, 0.3, (5, 6))}
    one = interval_estimates(matrices, reps=500, seed=3)
    two = interval_estimates(matrices, reps=500, seed=3)
    assert one == two
    assert interval_estimates(matrices, reps=500, seed=4) != one
    for method in matrices:
        for name, (point, lower, upper) in one[method].items():
            assert lower <= point <= upper, (method, name)
        assert one[method]["mean"][0] == pytest.approx(mean(matrices[method]))


def test_external_scores_csv_and_its_errors(tmp_path):
    good = tmp_path / "published.csv"
    good.write_text("method,task,seed,score\nstorm (published),Pong,0,11.3\nstorm (published),Breakout,0,15.9\n")
    frame = read_scores_csv(good)
    assert frame["score"].tolist() == [11.3, 15.9] and frame["seed"].tolist() == [0, 0]
    missing = tmp_path / "missing.csv"
    missing.write_text("method,task,score\nx,Pong,1\n")
    with pytest.raises(AnalysisError, match=r"missing.csv: missing column\(s\) \['seed'\]"):
        read_scores_csv(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("method,task,seed,score\nx,Pong,0,1.0\nx,Breakout,0,lots\n")
    with pytest.raises(AnalysisError, match=r"bad.csv: line 3: score='lots' is not a number"):
        read_scores_csv(bad)
    with pytest.raises(AnalysisError, match="nowhere.csv: no such file"):
        read_scores_csv(tmp_path / "nowhere.csv")


def make_run(root, method, task_folder, seed, evals, done=True):
    folder = root / "atari100k" / method / task_folder / f"seed_{seed}"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"method": method}))
    lines = ["step,task,episode,return,length,success"]
    lines += [f"{step},{task},{i},{ret},100," for step, task, rets in evals for i, ret in enumerate(rets)]
    (folder / "eval.csv").write_text("\n".join(lines) + "\n")
    if done:
        (folder / "DONE.json").write_text("{}")


def test_results_folders_final_scores_partial_runs_and_mismatch_notes(tmp_path):
    make_run(tmp_path, "storm", "Pong", 0, [(50, "Pong", [0.0]), (100, "Pong", [10.0, 12.0])])
    make_run(tmp_path, "storm", "Breakout", 0, [(100, "Breakout", [5.0])])
    make_run(tmp_path, "mow", "all2", 0, [(100, "Pong", [1.0]), (100, "Breakout", [2.0])])
    make_run(tmp_path, "mow", "all2", 1, [(60, "Pong", [3.0]), (60, "Breakout", [4.0])], done=False)
    scores, notes = read_results(tmp_path, "atari100k")
    mine = scores.set_index(["method", "task", "seed"])["score"]
    assert mine[("storm", "Pong", 0)] == 11.0  # mean of the final (largest-step) evaluation
    assert mine[("mow", "Breakout", 0)] == 2.0 and ("mow", "Pong", 1) not in mine.index
    assert any("1 unfinished run(s) left out" in n for n in notes)
    with_partial, notes = read_results(tmp_path, "atari100k", include_partial=True)
    assert len(with_partial) == 6 and any("unfinished: its last evaluation (step 60) is used" in n for n in notes)
    matrices, tasks, notes = score_matrices(human_normalised(with_partial), "hns")
    assert tasks == ["Breakout", "Pong"] and matrices["mow"].shape == (2, 2) and matrices["storm"].shape == (1, 2)
    assert any("different numbers of seeds" in n for n in notes)
    with pytest.raises(AnalysisError, match="no such results directory"):
        read_results(tmp_path / "none", "atari100k")
    with pytest.raises(AnalysisError, match="unknown suite 'pong'"):
        read_results(tmp_path, "pong")


def test_cli_writes_tables_and_figures_from_results_and_published_scores(tmp_path, capsys):
    from mowbench.analysis.__main__ import main

    results = tmp_path / "results"
    for seed, (pong, breakout) in enumerate([(10.0, 20.0), (12.0, 24.0)]):
        make_run(results, "mow", "all2", seed, [(100, "Pong", [pong]), (100, "Breakout", [breakout])])
    published = tmp_path / "published.csv"
    published.write_text("method,task,seed,score\nstorm (published),Pong,0,11.3\nstorm (published),Breakout,0,15.9\n")
    out = tmp_path / "out"
    assert main([str(results), "--suite", "atari100k", "--scores", str(published), "--out", str(out),
                 "--reps", "200"]) == 0
    printed = capsys.readouterr().out
    aggregate = pd.read_csv(out / "aggregate.csv")
    assert list(aggregate.columns) == ["method", "metric", "point", "lower", "upper"]
    assert set(aggregate["method"]) == {"mow", "storm (published)"}
    assert set(aggregate["metric"]) == {"mean", "median", "iqm", "og"}
    # golden table: raw mean +- std over seeds (population std), one column per method
    expected = ("| task | mow | storm (published) |\n|---|---|---|\n| Breakout | 22.0 ± 2.0 | 15.9 |\n"
                "| Pong | 11.0 ± 1.0 | 11.3 |\n")
    assert (out / "per_task_raw.md").read_text() == expected and expected in printed
    tex = (out / "per_task_raw.tex").read_text()
    assert tex.startswith("\\begin{tabular}{lrr}\n\\toprule") and "22.0 $\\pm$ 2.0" in tex
    mow_mean = aggregate.set_index(["method", "metric"]).loc[("mow", "mean"), "point"]
    hns = [(11.0 + 20.7) / 35.3, (22.0 - 1.7) / 28.8]
    assert mow_mean == pytest.approx(np.mean(hns))
    for name in ("interval_estimates", "performance_profiles", "probability_of_improvement"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    assert "different numbers of seeds" in (out / "notes.txt").read_text()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from mowbench.analysis.__main__ import main

    assert main([str(tmp_path / "none"), "--suite", "atari100k", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "none: no such results directory" in err and len(err.splitlines()) == 1
    assert main([str(tmp_path), "--suite", "tetris", "--out", str(tmp_path / "o")]) == 2
    assert "unknown suite 'tetris'; allowed: atari100k, metaworld, minatar" in capsys.readouterr().err
    (tmp_path / "atari100k").mkdir()
    assert main([str(tmp_path), "--suite", "atari100k", "--out", str(tmp_path / "o")]) == 2
    assert "no atari100k scores found" in capsys.readouterr().err
