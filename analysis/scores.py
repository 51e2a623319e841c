"""Scores from results/ and from external CSVs as one long table, and their normalisation.

Long format (one row per run, task and evaluation step): method, task, seed, score [, step]. Our runs
contribute every evaluation in eval.csv (the mean over its episodes: return, or success for Meta-World);
`final_scores` keeps the last one per run and task, `curve_matrices` the history. External/published
scores come as CSV files with the same columns (without `step`, each row is a final score).
"""

from __future__ import annotations

import io
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from mowbench import results as R

SUITES = ("atari100k", "metaworld", "minatar")
COLUMNS = ("method", "task", "seed", "score")


class AnalysisError(ValueError):
    """Bad analysis input: one line naming the file (or task) and the problem."""


def reference_table(name: str = "atari100k") -> pd.DataFrame:
    """Reference scores shipped with mowbench (analysis/reference/<name>.csv), indexed by task if it has one."""
    text = resources.files("mowbench.analysis").joinpath("reference", f"{name}.csv").read_text()
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    table = pd.read_csv(io.StringIO("\n".join(rows)))
    return table.set_index("task") if "task" in table.columns else table


PUBLISHED_PER_TASK = {"atari100k": ("storm", "storm (published)", "STORM's per-game means (arXiv 2310.09615, "
                                                                  "Table 1)")}


def published(suite: str, methods: set[str]) -> tuple[pd.DataFrame, list[str]]:
    """Shipped published per-task scores of `suite` as an extra method (one row per task, seed 0), and notes.

    Papers print per-task means over seeds, so this method has one "run": its intervals cover no seed
    variation (noted). A method of that name already given (e.g. with --scores) is not replaced."""
    if suite not in PUBLISHED_PER_TASK:
        return pd.DataFrame(columns=list(COLUMNS)), [f"no published per-task scores are shipped for {suite}"]
    column, method, source = PUBLISHED_PER_TASK[suite]
    if method in methods:
        return pd.DataFrame(columns=list(COLUMNS)), [f"{method} is already given; the shipped one is not added"]
    ref = reference_table(suite)
    frame = pd.DataFrame({"method": method, "task": ref.index, "seed": 0, "score": ref[column].to_numpy(),
                          "source": source})
    return frame, [f"{method}: {source}; one value per task (a mean over the paper's seeds), so its intervals "
                   "cover no seed variation"]


def human_normalised(scores: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add column `hns` = (score - random) / (human - random); a task without references is an error."""
    ref = reference_table("atari100k") if reference is None else reference
    missing = sorted(set(scores["task"]) - set(ref.index))
    if missing:
        raise AnalysisError(f"no human/random reference score for task(s) {missing}; known: {', '.join(ref.index)}")
    random, human = scores["task"].map(ref["random"]), scores["task"].map(ref["human"])
    return scores.assign(hns=(scores["score"] - random) / (human - random))


def published_aggregates(suite: str) -> tuple[pd.DataFrame, list[str]]:
    """The shipped published aggregates of `suite` as point-only rows (mean, median) of the aggregate table,
    and notes naming their sources."""
    table = reference_table("published_aggregates")
    mine = table[table["suite"] == suite]
    metric = {"mean_hns": "mean", "median_hns": "median", "success": "mean"}
    rows: dict[str, dict[str, str]] = {}
    for _, r in mine.iterrows():
        value = f"{r['value']:.1f}" + (f" ± {r['std']:.1f}" if pd.notna(r["std"]) else "")
        rows.setdefault(f"{r['method']}, as printed", {})[metric[r["metric"]]] = value
    sources: dict[str, list[str]] = {}
    for m, src in zip(mine["method"], mine["source"], strict=True):
        if src not in sources.setdefault(m, []):
            sources[m].append(src)
    notes = [f"{m}, as printed: {'; '.join(src)} (point estimates as published, no intervals)"
             for m, src in sources.items()]
    if not rows:
        notes.append(f"no published aggregates are shipped for {suite}")
    return pd.DataFrame(rows).T.reindex(columns=["mean", "median", "iqm", "og"]), notes


def read_scores_csv(path: Path) -> pd.DataFrame:
    """External scores: CSV with columns method,task,seed,score (optional step)."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path, comment="#")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise AnalysisError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise AnalysisError(f"{path}: missing column(s) {missing}; required: {','.join(COLUMNS)} (optional: step)")
    for column in ("score", "seed") + (("step",) if "step" in frame.columns else ()):
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column][values.isna()]
        if len(bad):
            line = int(bad.index[0]) + 2  # header is line 1
            raise AnalysisError(f"{path}: line {line}: {column}={bad.iloc[0]!r} is not a number")
        frame[column] = values
    frame["method"] = frame["method"].astype(str)
    frame["task"] = frame["task"].astype(str)
    frame["seed"] = frame["seed"].astype(int)
    frame["source"] = str(path)
    return frame


def read_results(results_dir: Path, suite: str, include_partial: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Every evaluation of every run of `suite` under results_dir (the results/README.md layout).

    Unfinished runs (no DONE.json) are left out, or with include_partial kept (their last evaluation then
    counts as final); either way the returned notes say which. Meta-World scores are success rates,
    others returns."""
    root = Path(results_dir)
    if not root.is_dir():
        raise AnalysisError(f"{root}: no such results directory")
    if suite not in SUITES:
        raise AnalysisError(f"unknown suite {suite!r}; allowed: {', '.join(SUITES)}")
    rows, notes, partial = [], [], []
    for meta in sorted((root / suite).glob("*/*/seed_*/metadata.json")):
        folder = meta.parent
        method, seed = folder.parent.parent.name, int(folder.name.removeprefix("seed_"))
        done = (folder / "DONE.json").exists()
        if not done and not include_partial:
            partial.append(str(folder.relative_to(root)))
            continue
        history = R.evaluations(folder, "success" if suite == "metaworld" else "return")
        for task, steps in history.items():
            rows += [{"method": method, "task": task, "seed": seed, "score": score, "step": step,
                      "source": str(folder), "partial": not done} for step, score in steps.items()]
        if not done:
            last = max((max(steps) for steps in history.values()), default="none")
            notes.append(f"{folder.relative_to(root)} is unfinished: its last evaluation (step {last}) is used")
    if partial:
        notes.append(f"{len(partial)} unfinished run(s) left out (use --include-partial): {', '.join(partial[:5])}"
                     + (" ..." if len(partial) > 5 else ""))
    return pd.DataFrame(rows, columns=[*COLUMNS, "step", "source", "partial"]), notes


def final_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """The last evaluation of each (method, task, seed); rows without a step are final scores already."""
    if "step" not in scores.columns:
        return scores
    step = scores["step"].fillna(np.inf)
    last = step.groupby([scores["method"], scores["task"], scores["seed"]]).transform("max")
    return scores[step == last].reset_index(drop=True)


def curve_matrices(scores: pd.DataFrame, column: str = "score") -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                                       list[str]]:
    """Per method with an evaluation history: (steps, runs x tasks x steps array of `column`).

    Only the steps at which every run of the method evaluated every one of its tasks are used (noted when
    some are dropped); methods without steps (published final scores) have no curve."""
    curves, notes = {}, []
    if "step" not in scores.columns:
        return curves, notes
    for method, frame in sorted(scores.dropna(subset=["step"]).groupby("method"), key=lambda x: natural_key(str(x[0]))):
        seeds, tasks = sorted(frame["seed"].unique()), sorted(frame["task"].unique())
        table = frame.pivot_table(index=["seed", "task"], columns="step", values=column, aggfunc="mean")
        table = table.reindex(pd.MultiIndex.from_product([seeds, tasks]))  # a missing (seed, task) is all NaN
        shared = table.columns[table.notna().all()]
        if len(shared) < len(table.columns):
            notes.append(f"{method}: curves use the {len(shared)} of {len(table.columns)} evaluation steps that "
                         "every run and task has")
        if len(shared) < 2:
            continue
        cube = table[shared].to_numpy(dtype=float).reshape(len(seeds), len(tasks), len(shared))
        curves[str(method)] = (shared.to_numpy(dtype=float), cube)
    return curves, notes


def natural_key(name: str) -> list:
    """Sort key that orders numbers inside names by value: mow-n_clusters=3 before mow-n_clusters=12."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def score_matrices(scores: pd.DataFrame, column: str = "score") -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Per method a (runs x tasks) matrix of `column` (runs = seeds), tasks in a common sorted order.

    Methods with different task sets or seed counts are not silently averaged: the notes say so, and a
    method is only compared on its own tasks."""
    notes = []
    tasks = sorted(scores["task"].unique())
    matrices = {}
    for method, frame in sorted(scores.groupby("method"), key=lambda item: natural_key(str(item[0]))):
        own = sorted(frame["task"].unique())
        if own != tasks:
            notes.append(f"{method}: {len(own)} of {len(tasks)} tasks (missing: {sorted(set(tasks) - set(own))[:5]})")
        table = frame.pivot_table(index="seed", columns="task", values=column, aggfunc="mean")
        if table.isna().any().any():
            notes.append(f"{method}: not every seed has every task; seeds with gaps are dropped")
            table = table.dropna()
        matrices[str(method)] = table[own].to_numpy(dtype=float)
    seeds = {m: len(x) for m, x in matrices.items()}
    if len(set(seeds.values())) > 1:
        notes.append("methods have different numbers of seeds: " + ", ".join(f"{m} {n}" for m, n in seeds.items()))
    return matrices, tasks, notes
