"""Scores from results/ and from external CSVs as one long table, and their normalisation.

Long format (one row per run and task): method, task, seed, score [, step]. Our runs contribute the
final evaluation (summary.json's final_return; Meta-World: the mean success of the final evaluation
episodes). External/published scores come as CSV files with the same columns.
"""

from __future__ import annotations

import io
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
    """Reference scores shipped with mowbench (analysis/reference/<name>.csv), indexed by task."""
    text = resources.files("mowbench.analysis").joinpath("reference", f"{name}.csv").read_text()
    rows = [line for line in text.splitlines() if line and not line.startswith("#")]
    return pd.read_csv(io.StringIO("\n".join(rows))).set_index("task")


def human_normalised(scores: pd.DataFrame, reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add column `hns` = (score - random) / (human - random); a task without references is an error."""
    ref = reference_table("atari100k") if reference is None else reference
    missing = sorted(set(scores["task"]) - set(ref.index))
    if missing:
        raise AnalysisError(f"no human/random reference score for task(s) {missing}; known: {', '.join(ref.index)}")
    random, human = scores["task"].map(ref["random"]), scores["task"].map(ref["human"])
    return scores.assign(hns=(scores["score"] - random) / (human - random))


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
    """Final scores of every run of `suite` under results_dir (the results/README.md layout).

    Unfinished runs (no DONE.json) are left out, or with include_partial use their last evaluation;
    either way the returned notes say which. Meta-World scores are success rates, others returns."""
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
        final = R.last_evaluation(folder, "success" if suite == "metaworld" else "return")
        for task, (step, score) in final.items():
            rows.append({"method": method, "task": task, "seed": seed, "score": score, "step": step,
                         "source": str(folder), "partial": not done})
        if not done:
            notes.append(f"{folder.relative_to(root)} is unfinished: its last evaluation (step "
                         f"{max(s for s, _ in final.values()) if final else 'none'}) is used")
    if partial:
        notes.append(f"{len(partial)} unfinished run(s) left out (use --include-partial): {', '.join(partial[:5])}"
                     + (" ..." if len(partial) > 5 else ""))
    return pd.DataFrame(rows, columns=[*COLUMNS, "step", "source", "partial"]), notes


def score_matrices(scores: pd.DataFrame, column: str = "score") -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Per method a (runs x tasks) matrix of `column` (runs = seeds), tasks in a common sorted order.

    Methods with different task sets or seed counts are not silently averaged: the notes say so, and a
    method is only compared on its own tasks."""
    notes = []
    tasks = sorted(scores["task"].unique())
    matrices = {}
    for method, frame in scores.groupby("method", sort=True):
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
