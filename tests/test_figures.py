"""Figures and tables a paper can print: one colour per method in every figure, a method with one evaluation drawn
as a marker, aggregates ordered by IQM with task and run counts, many published methods as a band in the
performance profile, a random-policy row and no optimality gap for raw returns, TrueType fonts in the PDFs."""

from __future__ import annotations

import json

import matplotlib.colors as mcolors
import pandas as pd
import pytest

from mowbench.analysis import figures
from mowbench.analysis.__main__ import main


def minatar_results(root, methods: dict[str, list[float]], steps=(100, 200)):
    """Finished MinAtar runs of breakout and asterix, three seeds per method, with evaluations at `steps` and a
    random-policy return of 0.5 (breakout) and 1.5 (asterix) in each run's summary.json."""
    for method, levels in methods.items():
        for seed in range(3):
            for task, level in zip(("breakout", "asterix"), levels, strict=True):
                folder = root / "minatar" / method / task / f"seed_{seed}"
                folder.mkdir(parents=True)
                (folder / "metadata.json").write_text(json.dumps({"method": method, "tasks": [task]}))
                rows = [f"{s},{task},0,{level * (i + 1) / len(steps) + seed},10," for i, s in enumerate(steps)]
                (folder / "eval.csv").write_text("step,task,episode,return,length,success\n" + "\n".join(rows) + "\n")
                random = {"breakout": 0.5, "asterix": 1.5}[task]
                (folder / "summary.json").write_text(json.dumps({"random_return": {task: random}}))
                (folder / "DONE.json").write_text(json.dumps({"step": steps[-1]}))


@pytest.fixture
def saved(monkeypatch):
    """Every figure the analysis makes, kept open by name (its file stem) for inspection."""
    kept = {}

    def save(fig, path, rect=None):  # noqa: ANN001
        kept[path.stem] = fig
        fig.savefig(path.with_suffix(".png"))

    monkeypatch.setattr(figures, "_save", save)
    return kept


def colours_of(fig) -> dict[str, str]:  # noqa: ANN001
    """label -> colour of every labelled line, collection or error bar of a figure's axes."""
    out = {}
    for ax in fig.axes:
        for artist in [*ax.lines, *ax.collections, *ax.containers]:
            label = artist.get_label()
            if label.startswith("_"):
                continue
            if hasattr(artist, "get_color"):
                out[label] = mcolors.to_hex(artist.get_color())
            elif hasattr(artist, "lines"):  # an errorbar container
                out[label] = mcolors.to_hex(artist.lines[0].get_color())
    return out


def test_minatar_report_rules(tmp_path, saved, capsys):
    minatar_results(tmp_path / "results", {"alpha": [2.0, 4.0], "beta": [6.0, 9.0]})
    out = tmp_path / "out"
    assert main([str(tmp_path / "results"), "--suite", "minatar", "--out", str(out), "--reps", "50"]) == 0
    table = pd.read_csv(out / "aggregate_table.csv")
    assert table["method"].tolist() == ["beta (2 of 5 tasks)", "alpha (2 of 5 tasks)", "random policy"]  # by IQM
    assert list(table.columns) == ["method", "mean", "median", "iqm", "tasks", "runs"]  # no OG for raw returns
    assert table["tasks"].tolist() == [2, 2, 2] and table["runs"].tolist() == [3, 3, 3]
    assert table.loc[2, "mean"].startswith("1.0 ")  # (0.5 + 1.5) / 2: each run's own random returns
    assert "og" not in set(pd.read_csv(out / "aggregate.csv")["metric"])
    caption = (out / "report.html").read_text()
    assert "as printed" not in caption and "random legal actions" in caption
    # one colour per method in every figure
    curves = colours_of(saved["learning_curves"])
    efficiency = colours_of(saved["sample_efficiency"])
    profile = colours_of(saved["performance_profiles"])
    for method in ("alpha", "beta"):
        assert curves[method] == efficiency[method] == profile[method] == mcolors.to_hex(figures.PALETTE[method])
    assert curves["alpha"] != curves["beta"]
    bars = {tick.get_text(): mcolors.to_hex(bar.get_facecolor()[:3]) for tick, bar in zip(
        saved["interval_estimates"].axes[0].get_yticklabels(), saved["interval_estimates"].axes[0].patches,
        strict=True)}
    assert bars == {m: mcolors.to_hex(figures.PALETTE[m]) for m in ("alpha", "beta")}
    for pdf in out.glob("*.pdf"):  # TrueType (Type 42) fonts, never Type 3
        data = pdf.read_bytes()
        assert b"/Type3" not in data and b"/FontFile2" in data, pdf.name


def test_a_method_with_one_evaluation_is_a_marker(tmp_path, saved):
    minatar_results(tmp_path / "results", {"alpha": [2.0, 4.0]}, steps=(100,))
    minatar_results(tmp_path / "results", {"beta": [6.0, 9.0]})
    assert main([str(tmp_path / "results"), "--suite", "minatar", "--out", str(tmp_path / "out"), "--reps",
                 "50"]) == 0
    lines = {line.get_label(): line for ax in saved["learning_curves"].axes for line in ax.lines}
    assert lines["alpha"].get_marker() == "o" and lines["alpha"].get_linestyle() == "None"
    assert lines["beta"].get_linestyle() == "-"


def test_performance_profile_legend_with_fourteen_published(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    published = {f"paper{i}" for i in range(14)}
    matrices = {m: rng.random((3, 5)) + (i / 10) for i, m in enumerate(["ours", *sorted(published)])}
    order = sorted(matrices, key=lambda m: -matrices[m].mean())
    figures.set_palette(order, published)
    kept = {}
    original = figures._save
    figures._save = lambda fig, path, rect=None: kept.setdefault("fig", fig)
    try:
        figures.performance_profiles(matrices, "score", tmp_path / "p", published, order)
    finally:
        figures._save = original
    labels = [t.get_text() for t in kept["fig"].axes[0].get_legend().get_texts()]
    best = [m for m in order if m in published][:figures.BAND_LABELLED]
    assert labels[0] == "published: range of 14 methods"
    assert sorted(labels[1:]) == sorted(["ours", *best])
