"""Analysis core: HNS, aggregate metrics against hand-computed matrices, reproducible rliable intervals,
external-score CSVs and results folders with their notes and errors."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from mowbench.analysis.metrics import (
    interval_estimates,
    iqm,
    iqm_curves,
    iqm_per_step,
    mean,
    median,
    optimality_gap,
    probability_of_improvement,
)
from mowbench.analysis.scores import (
    AnalysisError,
    curve_matrices,
    final_scores,
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


def test_probability_of_improvement_hand_computed_and_equal_to_rliables():
    from rliable import metrics

    # task 0: pairs (1,2) (1,2) (3,2) (3,2) -> 2 of 4 greater; task 1: x = y everywhere -> ties count half
    x, y = np.array([[1.0, 5.0], [3.0, 5.0]]), np.array([[2.0, 5.0], [2.0, 5.0]])
    assert probability_of_improvement(x, y) == pytest.approx((0.5 + 0.5) / 2)
    rng = np.random.default_rng(1)
    for _ in range(5):
        x, y = rng.integers(0, 4, (5, 7)).astype(float), rng.integers(0, 4, (3, 7)).astype(float)
        assert probability_of_improvement(x, y) == pytest.approx(metrics.probability_of_improvement(x, y))


def test_iqm_curves_per_step():
    cube = np.random.default_rng(2).normal(size=(3, 5, 4))  # runs x tasks x steps
    assert iqm_per_step(cube) == pytest.approx([iqm(cube[..., i]) for i in range(4)])
    steps, point, lower, upper = iqm_curves({"m": (np.arange(4), cube)}, reps=300, seed=0)["m"]
    assert point == pytest.approx(iqm_per_step(cube)) and np.all(lower <= point) and np.all(point <= upper)


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
    history, notes = read_results(tmp_path, "atari100k")
    assert len(history) == 5  # every evaluation: storm Pong at steps 50 and 100, storm Breakout, mow 2 tasks
    scores = final_scores(history)
    mine = scores.set_index(["method", "task", "seed"])["score"]
    assert mine[("storm", "Pong", 0)] == 11.0  # mean of the final (largest-step) evaluation
    assert mine[("mow", "Breakout", 0)] == 2.0 and ("mow", "Pong", 1) not in mine.index
    assert any("1 unfinished run(s) left out" in n for n in notes)
    curves, curve_notes = curve_matrices(history)
    assert list(curves) == [] and any("storm: curves use the 1 of 2 evaluation steps" in n for n in curve_notes)
    with_partial, notes = read_results(tmp_path, "atari100k", include_partial=True)
    with_partial = final_scores(with_partial)
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
    assert "no evaluation histories" in (out / "notes.txt").read_text()  # one evaluation each: no curves
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
    assert main([str(tmp_path), "--suite", "atari100k", "--grid", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown grid 'nope'; allowed: ") and "ablate_clusters" in err
    assert len(err.splitlines()) == 1


def test_cli_grid_table_curves_and_published_scores(tmp_path, capsys):
    """ablate_topk (top_k 1, 2, 4; default 2) with results for 1, 2 and an extra value 8 and none for 4. Each
    cell's seeds score alike, so every interval is its point and the whole table is hand-computed."""
    from mowbench.analysis.__main__ import main

    results = tmp_path / "results"
    pong = {0.25: -11.875, 0.5: -3.05, 1.0: 14.6}  # raw score -> HNS (random -20.7, human 14.6)
    breakout = {0.25: 8.9, 1.0: 30.5, 2.0: 59.3}  # (random 1.7, human 30.5)
    for top_k, (p, b) in {1: (0.25, 0.25), 2: (0.5, 1.0), 8: (1.0, 2.0)}.items():
        for seed in (0, 1):
            make_run(results, f"mow-top_k={top_k}", "all2", seed,
                     [(50, "Pong", [pong[p] - 1]), (50, "Breakout", [breakout[b] - 1]),
                      (100, "Pong", [pong[p]]), (100, "Breakout", [breakout[b]])])
    out = tmp_path / "out"
    assert main([str(results), "--suite", "atari100k", "--grid", "ablate_topk", "--with-published", "storm",
                 "--out", str(out), "--reps", "100"]) == 0
    printed = capsys.readouterr().out
    expected = (
        "| top_k | method | runs | IQM (%) | Mean (%) | Median (%) | OG (%) | P(> default) |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| top_k=1 | mow-top_k=1 | 2 | 25.0 [25.0, 25.0] | 25.0 [25.0, 25.0] | 25.0 [25.0, 25.0] | 75.0 [75.0, 75.0] "
        "| 0.00 [0.00, 0.00] |\n"
        "| top_k=2 (default) | mow-top_k=2 | 2 | 75.0 [75.0, 75.0] | 75.0 [75.0, 75.0] | 75.0 [75.0, 75.0] "
        "| 25.0 [25.0, 25.0] | – |\n"
        "| top_k=4 | mow-top_k=4 | 0 | – | – | – | – | – |\n"
        "| top_k=8 | mow-top_k=8 | 2 | 150.0 [150.0, 150.0] | 150.0 [150.0, 150.0] | 150.0 [150.0, 150.0] "
        "| 0.0 [0.0, 0.0] | 1.00 [1.00, 1.00] |\n")
    assert (out / "grid_ablate_topk.md").read_text() == expected and expected in printed
    assert "\\toprule" in (out / "grid_ablate_topk.tex").read_text()
    assert pd.read_csv(out / "grid_ablate_topk.csv")["method"].tolist() == [f"mow-top_k={k}" for k in (1, 2, 4, 8)]
    # published: STORM's per-game means as a method, the papers' aggregates as point-only rows
    raw = (out / "per_task_raw.md").read_text().splitlines()
    assert "| Pong | -11.9 ± 0.0 | -3.0 ± 0.0 | 14.6 ± 0.0 | 11.3 |" in raw  # STORM paper: Pong 11.3
    norm = (out / "per_task_normalised.md").read_text().splitlines()
    assert "| Breakout | 25.0 ± 0.0 | 100.0 ± 0.0 | 200.0 ± 0.0 | 49.3 |" in norm
    assert "| mow (published), as printed | 110.4 | 37.7 | – | – |" in (out / "aggregate_table.md").read_text()
    assert norm[0] == "| task | mow-top_k=1 | mow-top_k=2 | mow-top_k=8 | storm (published) |"
    assert norm[-1].startswith("| UpNDown | – | – | – | ")  # the published method covers all 26 games
    notes = (out / "notes.txt").read_text()
    assert "grid ablate_topk: no results for mow-top_k=4 (top_k=4)" in notes
    assert "storm (published): STORM paper" in notes and "no seed variation" in notes
    for name in ("sample_efficiency", "learning_curves", "ablation_ablate_topk"):
        for ext in ("png", "pdf"):
            assert (out / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    # the curve points are the IQMs at each shared evaluation step
    curves, _ = curve_matrices(human_normalised(read_results(results, "atari100k")[0]), "hns")
    steps, cube = curves["mow-top_k=1"]
    assert steps.tolist() == [50.0, 100.0] and iqm_per_step(cube)[1] == pytest.approx(0.25)


# ---- bad data is never used silently (issue 13, item 7): one real finished run, copied and damaged ----
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A finished micro MinAtar run (real trainer, real files): results/minatar/storm/breakout/seed_0."""
    from mowbench.config import compose_config
    from mowbench.runner import execute
    from tests.conftest import MICRO

    root = tmp_path_factory.mktemp("real")
    execute(compose_config(["env=minatar", "task=breakout", f"results_dir={root}", "train.warmup=20",
                            "train.steps=40", "train.eval_episodes=1", "train.eval_max_steps=20",
                            "train.eval_every=20", "train.periodic_eval_episodes=1", *MICRO]))
    return root / "minatar" / "storm" / "breakout" / "seed_0"


def copy_run(run, root, method="storm", task="breakout", seed=0):
    import shutil

    folder = root / "minatar" / method / task / f"seed_{seed}"
    shutil.copytree(run, folder)
    return folder


def edit(path, old, new):
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def first_return(folder):
    return (folder / "eval.csv").read_text().splitlines()[1].split(",")[3]


REFUSED_DATA = [  # (damage done to a copy of the run, one-line error)
    ("duplicate", lambda f, r: copy_run(f, r, task="all1"),
     r"duplicate score for method 'storm', task 'breakout', seed 0, step 20 in .*all1/seed_0 and "
     r".*breakout/seed_0; each \(method, task, seed\) must come from one run or row"),
    ("inf", lambda f, r: edit(f / "eval.csv", "," + first_return(f) + ",", ",inf,"),
     r"eval.csv: line 2: return='inf' is not finite; allowed: a finite number"),
    ("-inf", lambda f, r: edit(f / "eval.csv", "," + first_return(f) + ",", ",-inf,"),
     r"eval.csv: line 2: return='-inf' is not finite"),
    ("nan", lambda f, r: edit(f / "eval.csv", "," + first_return(f) + ",", ",nan,"),
     r"eval.csv: line 2: return='nan' is not finite"),
    ("word", lambda f, r: edit(f / "eval.csv", "," + first_return(f) + ",", ",lots,"),
     r"eval.csv: line 2: return='lots' is not a number"),
    ("extra field", lambda f, r: edit(f / "eval.csv", ",full\n", ",full,oops\n"),
     r"eval.csv: line 2: 8 fields, the header has 7 \(step,task,episode,return,length,success,mode\)"),
    ("missing field", lambda f, r: edit(f / "eval.csv", ",full\n", "\n"),
     r"eval.csv: line 2: 6 fields, the header has 7"),
    ("another suite's run", lambda f, r: f.parent.parent.parent.rename(r / "atari100k"),
     r"task 'breakout' \(method 'storm', in .*atari100k/storm/breakout/seed_0\) is not a task of atari100k; "
     r"allowed: Alien, Amidar"),
]


@pytest.mark.parametrize("case,damage,error", REFUSED_DATA, ids=[c[0] for c in REFUSED_DATA])
def test_bad_results_data_is_a_one_line_error(real_run, tmp_path, capsys, case, damage, error):
    """On 888fdd8: duplicates were averaged, inf gave an inf aggregate (or a matplotlib traceback after 10 of
    17 outputs), 'lots' a traceback, an extra field shifted or dropped, an unknown task was tabled."""
    from mowbench.analysis.__main__ import main

    root = tmp_path / "results"
    damage(copy_run(real_run, root), root)
    out = tmp_path / "out"
    suite = "atari100k" if (root / "atari100k").exists() else "minatar"
    assert main([str(root), "--suite", suite, "--out", str(out), "--reps", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search("^error: .*" + error, err), err
    assert not out.exists()  # refused before anything is written


def test_bad_scores_csv_is_a_one_line_error(tmp_path):
    cases = {  # CSV body after the header -> error
        "x,Pong,0,inf\n": r"line 2: score='inf' is not finite",
        "x,Pong,0,1.0\nx,Pong,0,-inf\n": r"line 3: score='-inf' is not finite",
        "x,Pong,0,1.0,7\n": r"line 2: 5 fields, the header has 4",
        "x,Pong\n": r"line 2: 2 fields, the header has 4",
        "x,Pong,0.5,1.0\n": r"line 2: seed='0.5' is not an integer",
    }
    for body, error in cases.items():
        path = tmp_path / "s.csv"
        path.write_text("method,task,seed,score\n" + body)
        with pytest.raises(AnalysisError, match=re.escape(str(path)) + ": " + error):
            read_scores_csv(path)
    path.write_text("method,task,seed,score,notes\nx,Pong,0,1.0,good\n")
    with pytest.raises(AnalysisError, match=r"unknown column\(s\) \['notes'\]; allowed: method,task,seed,score,"
                                            r"step,source"):
        read_scores_csv(path)


def test_duplicate_and_unknown_external_scores_are_refused(tmp_path, capsys):
    from mowbench.analysis.__main__ import main

    twice = tmp_path / "twice.csv"
    twice.write_text("method,task,seed,score\nx,Pong,0,1.0\nx,Breakout,0,2.0\nx,Pong,0,3.0\n")
    assert main(["--scores", str(twice), "--suite", "atari100k", "--out", str(tmp_path / "o")]) == 2
    assert ("error: duplicate score for method 'x', task 'Pong', seed 0 in " + str(twice)) in capsys.readouterr().err
    typo = tmp_path / "typo.csv"
    typo.write_text("method,task,seed,score\nx,Pong,0,1.0\nx,Breakuot,0,2.0\n")
    assert main(["--scores", str(typo), "--suite", "atari100k", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"error: task 'Breakuot' (method 'x', in {typo}) is not a task of atari100k; allowed: Alien," in err
    assert main(["--scores", str(typo), "--suite", "minatar", "--out", str(tmp_path / "o")]) == 2
    assert "task 'Pong' (method 'x'" in capsys.readouterr().err  # another suite's file


LEFT_OUT = [  # (damage to a finished run, the note naming it)
    ("no eval.csv", lambda f: (f / "eval.csv").unlink(), "has no eval.csv"),
    ("empty eval.csv", lambda f: (f / "eval.csv").write_text(""), "eval.csv is truncated (empty)"),
    ("cut eval.csv", lambda f: (f / "eval.csv").write_bytes((f / "eval.csv").read_bytes()[:-9]),
     "eval.csv is truncated (its last line is cut off)"),
    ("lost final rows", lambda f: (f / "eval.csv").write_text(
        "".join(line + "\n" for line in (f / "eval.csv").read_text().splitlines()[:2])),
     "eval.csv has no final evaluation (step 40) of breakout"),
    ("no metadata", lambda f: (f / "metadata.json").unlink(), "has no metadata.json"),
    ("cut metadata", lambda f: (f / "metadata.json").write_text((f / "metadata.json").read_text()[:50]),
     "has a corrupt metadata.json (not a JSON object)"),
]


def test_finished_runs_with_missing_or_truncated_files_are_named(real_run, tmp_path, capsys):
    """On 888fdd8 these runs were dropped without a word (or, with a cut eval.csv, scored from a partial
    evaluation). Now each is left out and named in notes.txt; the good run is still analysed."""
    from mowbench.analysis.__main__ import main

    root = tmp_path / "results"
    copy_run(real_run, root, seed=0)
    for seed, (_, damage, _) in enumerate(LEFT_OUT, start=1):
        damage(copy_run(real_run, root, seed=seed))
    out = tmp_path / "out"
    assert main([str(root), "--suite", "minatar", "--out", str(out), "--reps", "50"]) == 0
    notes = (out / "notes.txt").read_text()
    for seed, (_, _, note) in enumerate(LEFT_OUT, start=1):
        assert f"minatar/storm/breakout/seed_{seed} (finished) {note}: left out" in notes, (note, notes)
    assert "seed_0" not in notes
    assert pd.read_csv(out / "aggregate.csv")["method"].unique().tolist() == ["storm"]
    capsys.readouterr()


def test_analysis_command_refuses_inf_in_one_line(real_run, tmp_path):
    """The command itself (a real process): exit 2, one line on stderr, nothing written."""
    import subprocess
    import sys

    from tests.conftest import REPO

    root = tmp_path / "results"
    folder = copy_run(real_run, root)
    edit(folder / "eval.csv", "," + first_return(folder) + ",", ",inf,")
    out = subprocess.run([sys.executable, "-m", "mowbench.analysis", str(root), "--suite", "minatar", "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"error: {folder}/eval.csv: line 2: return='inf' is not finite; "
                                               "allowed: a finite number"]
