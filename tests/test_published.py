"""The field beside our runs (issue 15): the published Atari 100k methods shipped inside the package, checked
against the aggregates their sources printed; the papers' table layout; the Meta-World literature table; and
report.html, opened in a real headless browser (Debian's chromium driven by Selenium)."""

import os
import re
import shutil
from importlib import resources

import numpy as np
import pandas as pd
import pytest

from mowbench.analysis.__main__ import main
from mowbench.analysis.scores import (
    AnalysisError,
    human_normalised,
    published_index,
    published_scores,
    resolve_published,
    score_matrices,
)
from mowbench.analysis.tables import atari_layout, latex, markdown
from mowbench.config import compose_config
from mowbench.results import run_dir
from mowbench.runner import execute
from tests.conftest import MICRO

# What the sources printed (mean HNS, median HNS), to the digits they printed: SOURCES.md and the papers.
# IRIS: arXiv 2209.00588 (mean 1.046); SimPLe, SPR, DrQ(eps), CURL: rliable's notebook (Agarwal et al. 2021);
# EfficientZero: its paper (194.3% / 109.0%); DIAMOND: its paper (mean 1.46).
PRINTED = {"IRIS": (1.046, None), "SimPLe": (0.3320, 0.1341), "SPR": (0.616, 0.396), "DrQ_eps": (0.465, 0.313),
           "CURL": (0.261, 0.092), "EfficientZero": (1.943, 1.090), "DIAMOND": (1.46, None)}


def per_game_hns(name):
    """(games,) mean HNS over each game's runs of one shipped method."""
    return human_normalised(published_scores(name)).groupby("task")["hns"].mean()


@pytest.mark.parametrize("name", sorted(PRINTED))
def test_shipped_files_reproduce_the_printed_aggregates(name):
    """Mean and median over the 26 games of the per-game mean HNS, within the rounding of the printed digits:
    a corrupted, truncated or misread file cannot go unnoticed."""
    games = per_game_hns(name)
    assert len(games) == 26
    mean, median = PRINTED[name]
    tol = lambda printed: 0.5 * 10.0 ** -len(str(printed).split(".")[1])  # noqa: E731 - half the last digit
    assert games.mean() == pytest.approx(mean, abs=tol(mean))
    if median is not None:
        assert games.median() == pytest.approx(median, abs=tol(median))


def test_every_shipped_method_is_indexed_with_its_sources():
    """14 methods (13 published sets and STORM's per-game means), each with 26 games, a kind and a source;
    derived data says so in its name; SOURCES.md travels inside the package."""
    index = published_index()
    assert len(index) == 14 and set(index["kind"]) == {"runs", "means", "derived"}
    for name, row in index.iterrows():
        frame = published_scores(name)
        assert frame["task"].nunique() == 26 and frame["score"].notna().all(), name
        assert (frame["seed"] == -1).all() == (row["kind"] == "means"), name
        assert ("derived" in row["display"]) == (row["kind"] == "derived"), name
        assert row["display"].endswith(("(published)", "(published, derived)"))
    sources = resources.files("mowbench.analysis").joinpath("reference", "published", "SOURCES.md").read_text()
    for name, row in index.iterrows():
        assert row["file"] in sources, name
    assert resolve_published("iris,spr") == ["IRIS", "SPR"] and len(resolve_published("all")) == 14
    with pytest.raises(AnalysisError, match=r"^--with-published 'Dreamer': unknown; allowed: all, BBF, "):
        resolve_published("IRIS,Dreamer")


def test_runs_not_shared_across_games_give_each_game_its_first_runs():
    """BBF's runs are seeded per game (52 to 60 per game): the bootstrap matrix takes each game's first 52 by
    seed (rliable resamples runs within each game, so a row need not be one run across games), noted."""
    bbf = human_normalised(published_scores("BBF"))
    matrices, tasks, notes = score_matrices(bbf, "hns")
    matrix = matrices["BBF (published)"]
    assert matrix.shape == (52, 26)
    first = bbf[bbf["task"] == "Pong"].sort_values("seed")["hns"].to_numpy()[:52]
    assert np.array_equal(matrix[:, tasks.index("Pong")], first)
    assert any("each task's first 52 runs by seed are used (52-60 per task)" in n for n in notes)


def test_atari_layout_by_hand():
    """Two methods on Pong (random -20.7, human 14.6) and Breakout (1.7, 30.5): raw means per game, mean and
    median HNS of the per-game means, the IQM given, superhuman games; the best of every row flagged."""
    final = human_normalised(pd.DataFrame({
        "method": ["a", "a", "a", "b", "b"], "task": ["Pong", "Pong", "Breakout", "Pong", "Breakout"],
        "seed": [0, 1, 0, 0, 0], "score": [14.6, -20.7, 59.3, 21.66, 1.7]}))
    table, best = atari_layout(final, {"a": 0.8, "b": 0.6}, ["a", "b"])
    # a: Pong mean -3.05 -> HNS 0.5, Breakout HNS 2.0; b: Pong HNS (21.66 + 20.7) / 35.3 = 1.2, Breakout 0
    assert table.loc["Pong"].tolist() == ["-3.0", "21.7"] and table.loc["Breakout"].tolist() == ["59.3", "1.7"]
    assert table.loc["Mean HNS (%)"].tolist() == ["125.0", "60.0"]
    assert table.loc["Median HNS (%)"].tolist() == ["125.0", "60.0"]
    assert table.loc["IQM HNS (%)"].tolist() == ["80.0", "60.0"]
    assert table.loc["Superhuman games"].tolist() == ["1", "1"]
    assert best.loc["Pong"].tolist() == [False, True] and best.loc["Mean HNS (%)"].tolist() == [True, False]
    assert best.loc["Superhuman games"].tolist() == [True, True]  # ties: both bold
    assert "| Pong | -3.0 | **21.7** |" in markdown(table, best)
    tex = latex(table, best, rules=(2,))
    assert r"Pong & -3.0 & \textbf{21.7} \\" in tex and "\\midrule\nMean HNS (\\%) & \\textbf{125.0} & 60.0" in tex


def test_list_published_and_unknown_names(tmp_path, capsys):
    assert main(["--list-published"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 14
    assert any(line.startswith("BBF | BBF (published) | runs | 52-60 | 26 |") for line in lines)
    assert any(line.startswith("EfficientZero | EfficientZero (published) | one mean per game | 1 (mean) |")
               for line in lines)
    assert any(line.startswith("SPR | SPR (published) | runs | 100 | 26 | eloialonso/iris") for line in lines)
    out = tmp_path / "out"
    assert main([str(tmp_path), "--suite", "atari100k", "--with-published", "IRIS,Nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --with-published 'Nope': unknown; allowed: all, BBF,") and len(err.splitlines()) == 1
    assert not out.exists()  # refused before anything is written


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One real tiny STORM run on Pong (micro sizes) and the analysis of its results root with every
    published method."""
    root = tmp_path_factory.mktemp("published")
    cfg = compose_config(["agent=storm", "env=atari100k", "task=Pong", f"results_dir={root / 'results'}",
                          "train.warmup=12", "train.steps=24", "train.eval_every=12", "train.eval_episodes=1",
                          "train.periodic_eval_episodes=1", "train.eval_max_steps=20", "train.replay_capacity=100",
                          "env.image_size=16", *MICRO])
    execute(cfg)
    assert (run_dir(root / "results", "atari100k", "storm", "Pong", 0) / "DONE.json").exists()
    out = root / "out"
    argv = [str(root / "results"), "--suite", "atari100k", "--with-published", "all", "--out", str(out),
            "--reps", "300"]
    assert main(argv) == 0
    return out


def test_analysis_with_every_published_method_writes_tables_figures_and_report(analysed):
    out = analysed
    aggregate = pd.read_csv(out / "aggregate.csv")
    assert len(aggregate["method"].unique()) == 15 and "storm" in set(aggregate["method"])
    assert {"DreamerV3 (published, derived)", "DreamerV3 2023 (published, derived)"} <= set(aggregate["method"])
    iris = aggregate[(aggregate["method"] == "IRIS (published)") & (aggregate["metric"] == "mean")].iloc[0]
    assert iris["point"] == pytest.approx(1.046, abs=5e-4) and iris["lower"] < iris["point"] < iris["upper"]
    ez = aggregate[(aggregate["method"] == "EfficientZero (published)") & (aggregate["metric"] == "mean")].iloc[0]
    assert ez["lower"] == ez["point"] == ez["upper"]  # one mean per game: no seed variation to resample
    table = pd.read_csv(out / "atari_table.csv", index_col=0)
    assert len(table) == 26 + 4 and table.columns[0] == "storm"  # ours first, then published by IQM
    published_iqm = [aggregate.set_index(["method", "metric"]).loc[(m, "iqm"), "point"] for m in table.columns[1:]]
    assert published_iqm == sorted(published_iqm, reverse=True)
    md = (out / "atari_table.md").read_text()
    assert "| Superhuman games |" in md and md.count("**") >= 2 * 30  # a best cell in every row
    assert table.loc["Superhuman games", "IRIS (published)"] == 10  # IRIS: 10 of 26 superhuman, as it printed
    assert "storm (published), as printed" in (out / "aggregate_table.md").read_text()
    for name in ("interval_estimates", "performance_profiles", "probability_of_improvement", "sample_efficiency",
                 "learning_curves"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    notes = (out / "notes.txt").read_text()
    assert "DreamerV3 (published, derived): DERIVED" in notes and "storm: 1 of 26 tasks" in notes


def chromium() -> tuple[str, str] | None:
    """Debian's chromium and its driver (apt packages chromium, chromium-driver), if installed."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_report_opens_in_a_real_browser_with_every_figure_and_table(analysed):
    """report.html opened from the file system by headless chromium: every figure decodes to an image with
    pixels, every table has the rows of its CSV, the notes and the command are there, and nothing is fetched."""
    found = chromium()
    if found is None:
        assert os.environ.get("MOWBENCH_CI") != "1", "CI installs chromium and chromium-driver (scripts/test.sh)"
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        browser.get((analysed / "report.html").as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.dataset.name, i.complete, i.naturalWidth]);")
        names = {name for name, _, _ in images}
        assert names == {"interval_estimates", "performance_profiles", "probability_of_improvement",
                         "sample_efficiency", "learning_curves"}
        assert all(complete and width > 100 for _, complete, width in images), images
        tables = browser.execute_script(
            "return Array.from(document.querySelectorAll('table.data')).map("
            "t => [t.dataset.name, t.tBodies[0].rows.length]);")
        assert {name for name, _ in tables} == {"aggregate_table", "atari_table", "per_task_raw",
                                                "per_task_normalised"}
        for name, rows in tables:
            assert rows == len(pd.read_csv(analysed / f"{name}.csv")) > 0, name
        text = browser.find_element("tag name", "body").text
        assert "python -m mowbench.analysis" in text and "--with-published all" in text
        assert re.search(r"mowbench \d+\.\d+\.\d+", text) and "DERIVED" in text
        resources_loaded = browser.execute_script("return performance.getEntriesByType('resource').length;")
        assert resources_loaded == 0  # self-contained: no file or server beside the page
    finally:
        browser.quit()


def test_metaworld_literature_is_a_table_of_its_own(tmp_path):
    """Meta-World with --with-published: the literature's numbers with their settings in metaworld_literature,
    none of them in the aggregates of our runs."""
    folder = tmp_path / "results" / "metaworld" / "tdmpc2" / "reach-v3" / "seed_0"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    (folder / "eval.csv").write_text("step,task,episode,return,length,success\n100,reach-v3,0,5.0,100,1.0\n"
                                     "100,reach-v3,1,4.0,100,0.0\n")
    (folder / "DONE.json").write_text("{}")
    out = tmp_path / "out"
    assert main([str(tmp_path / "results"), "--suite", "metaworld", "--with-published", "--out", str(out),
                 "--reps", "100"]) == 0
    literature = pd.read_csv(out / "metaworld_literature.csv", index_col=0)
    assert len(literature) == 13 and literature.loc["MoW", "MT50"] == "74.5 ± 1.1"
    assert literature.loc["MoW", "observations"] == "pixels" and literature.loc["MOORE", "observations"].startswith(
        "state")
    assert literature.loc["MOORE (Meta-World+ re-run)", "reward"] == "V2"
    assert pd.read_csv(out / "aggregate.csv")["method"].unique().tolist() == ["tdmpc2"]
    assert "as printed" not in (out / "aggregate_table.md").read_text()
    assert "metaworld_literature" in (out / "report.html").read_text()
    assert "no published per-task scores are shipped for metaworld" in (out / "notes.txt").read_text()
