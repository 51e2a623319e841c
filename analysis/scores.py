"""Scores from results/ and from external CSVs as one long table, and their normalisation.

Long format (one row per run, task and evaluation step): method, task, seed, score [, step]. Our runs
contribute every evaluation in eval.csv (the mean over its episodes: return, or success for Meta-World);
`final_scores` keeps the last one per run and task, `curve_matrices` the history. External/published
scores come as CSV files with the same columns (without `step`, each row is a final score).
"""

from __future__ import annotations

import collections
import functools
import io
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mowbench import results

SUITES = ("atari100k", "metaworld", "minatar")
COLUMNS = ("method", "task", "seed", "score")


class AnalysisError(ValueError):
    """Bad analysis input: one line naming the file (or task) and the problem."""


@functools.cache
def reference_text(*parts: str) -> str:
    """A file shipped with mowbench under analysis/reference/ (package data: read once per process)."""
    return resources.files("mowbench.analysis").joinpath("reference", *parts).read_text()


def read_reference_csv(text: str) -> pd.DataFrame:
    """A shipped CSV without its # comment lines."""
    return pd.read_csv(io.StringIO("\n".join(line for line in text.splitlines() if line and not line.startswith("#"))))


def reference_table(name: str = "atari100k") -> pd.DataFrame:
    """Reference scores shipped with mowbench (analysis/reference/<name>.csv), indexed by task if it has one."""
    table = read_reference_csv(reference_text(f"{name}.csv"))
    return table.set_index("task") if "task" in table.columns else table


# Published per-run or per-game Atari 100k scores of other methods: analysis/reference/published/ (index.csv
# names them; SOURCES.md is their provenance). Only Atari 100k has them.
PUBLISHED_SUITE = "atari100k"
PUBLISHED_KINDS = {"runs": "runs", "means": "one mean per game", "derived": "runs, derived from training curves"}


def published_index() -> pd.DataFrame:
    """name -> file, display (the method name in every table and figure), kind, source."""
    return read_reference_csv(reference_text("published", "index.csv")).set_index("name")


def resolve_published(spec: str) -> list[str]:
    """'all' or comma-separated names (any case) -> index names; an unknown name is an AnalysisError."""
    names = list(published_index().index)
    if spec == "all":
        return names
    chosen = []
    for part in (p.strip() for p in spec.split(",")):
        match = [n for n in names if n.lower() == part.lower()]
        if not match:
            raise AnalysisError(f"--with-published {part!r}: unknown; allowed: all, {', '.join(names)}")
        chosen += [m for m in match if m not in chosen]
    return chosen


def published_scores(name: str) -> pd.DataFrame:
    """One shipped method's final scores: method (its display name), task, seed, score, source."""
    row = published_index().loc[name]
    frame = read_reference_csv(reference_text("published", row["file"]))
    return frame.assign(method=row["display"], source=row["source"])[[*COLUMNS, "source"]]


def list_published() -> str:
    """The table --list-published prints: name, kind, runs per game, games, source."""
    lines = ["name | method | kind | runs per game | games | source", "---|---|---|---|---|---"]
    for name, row in published_index().iterrows():
        runs = published_scores(str(name)).groupby("task").size()
        count = "1 (mean)" if row["kind"] == "means" else (f"{runs.min()}" if runs.min() == runs.max()
                                                             else f"{runs.min()}-{runs.max()}")
        lines.append(f"{name} | {row['display']} | {PUBLISHED_KINDS[row['kind']]} | {count} | {len(runs)} | "
                     f"{row['source']}")
    return "\n".join(lines) + "\n"


def published(suite: str, names: list[str], methods: set[str]) -> tuple[pd.DataFrame, set[str], list[str]]:
    """The shipped published scores `names` (resolve_published) as methods beside ours: their rows, their
    display names, and notes. A method of that name already given (e.g. with --scores) is not replaced.
    Per-game means are one "run" per game: their intervals cover no seed variation (noted); derived data is
    named as such in its display name, so every table and figure shows it."""
    if suite != PUBLISHED_SUITE:
        return pd.DataFrame(columns=[*COLUMNS, "source"]), set(), [
            f"no published per-task scores are shipped for {suite}" + (" (see metaworld_literature)"
                                                                      if suite == "metaworld" else "")]
    index, frames, shipped, notes = published_index(), [], set(), []
    for name in names:
        row = index.loc[name]
        if row["display"] in methods:
            notes.append(f"{row['display']} is already given; the shipped one is not added")
            continue
        frames.append(published_scores(name))
        shipped.add(row["display"])
        if row["kind"] == "means":
            notes.append(f"{row['display']}: {row['source']}; one value per game (a mean over the paper's seeds), "
                         "so its intervals cover no seed variation")
        elif row["kind"] == "derived":
            notes.append(f"{row['display']}: DERIVED, not published as final scores: {row['source']}")
        else:
            notes.append(f"{row['display']}: {row['source']}")
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, "source"])
    return frame, shipped, notes


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


OPTIONAL_COLUMNS = ("step", "source")


def read_scores_csv(path: Path) -> pd.DataFrame:
    """External scores: CSV with columns method,task,seed,score (optional: step, source). Strict: a row of the
    wrong width, another column, a seed or step that is not an integer, or a score that is not a finite
    number is an AnalysisError naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise AnalysisError(f"{path}: no such file")
    try:
        header, rows = results.read_csv_rows(path, COLUMNS)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    extra = [c for c in header if c not in COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        raise AnalysisError(f"{path}: unknown column(s) {extra}; allowed: {','.join(COLUMNS + OPTIONAL_COLUMNS)}")
    records = []
    try:
        for line, row in rows:
            record = {"method": row["method"], "task": row["task"], "source": row.get("source") or str(path)}
            for column in ("seed", "score") + (("step",) if "step" in row else ()):
                record[column] = results.finite_number(row[column], path, line, column, integer=column != "score")
            records.append(record)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    columns = [*COLUMNS, *(["step"] if "step" in header else []), "source"]
    return pd.DataFrame(records, columns=columns).astype({"seed": int})


def check_tasks(scores: pd.DataFrame, suite: str) -> None:
    """Refuse scores of a task `suite` does not have (a typo, or another suite's file). The task names come
    from the suite's env module, which imports numpy and cv2 only (its simulator when an env is made)."""
    from mowbench.envs import suite_module

    known = list(suite_module(suite).TASKS)
    unknown = scores[~scores["task"].isin(known)]
    if len(unknown):
        first = unknown.iloc[0]
        raise AnalysisError(f"task {first['task']!r} (method {first['method']!r}, in {first['source']}) is not a "
                            f"task of {suite}; allowed: {', '.join(known)}")


def check_unique(scores: pd.DataFrame) -> None:
    """One score per (method, task, seed) and evaluation step: a duplicate (the same run in two results roots,
    a single-task and a multi-task run under one method name, a CSV row given twice) would be averaged
    silently."""
    step = scores["step"].fillna(-1) if "step" in scores.columns else pd.Series(-1, index=scores.index)
    keys = pd.DataFrame({"method": scores["method"], "task": scores["task"], "seed": scores["seed"], "step": step})
    duplicated = keys.duplicated(keep=False)
    if duplicated.any():
        first = keys[duplicated].iloc[0]
        same = (keys == first).all(axis=1)
        sources = sorted(set(scores.loc[same, "source"].astype(str)))
        at = f", step {int(first['step'])}" if first["step"] >= 0 else ""
        raise AnalysisError(f"duplicate score for method {first['method']!r}, task {first['task']!r}, seed "
                            f"{int(first['seed'])}{at} in {' and '.join(sources)}; each (method, task, seed) must "
                            "come from one run or row: rename one method or leave one source out")


def run_history(folder: Path, done: bool, column: str) -> tuple[dict[str, dict[int, float]], str | None]:
    """A run's evaluations (task -> step -> mean `column`), or why it cannot be used: its metadata.json
    missing or corrupt, its eval.csv missing or truncated, or (finished) without the final evaluation, at
    DONE.json's step, of every task it trained. A bad value in eval.csv is an AnalysisError."""
    read = {}
    for name in ["metadata.json", *([results.DONE] if done else [])]:
        if not (folder / name).exists():
            return {}, f"has no {name}"
        try:
            read[name] = results.read_json(folder / name)
        except ValueError:
            read[name] = None
        if not isinstance(read[name], dict):
            return {}, f"has a corrupt {name} (not a JSON object)"
    if not (folder / "eval.csv").exists():
        return {}, "has no eval.csv"
    try:
        history = results.evaluations(folder, column)
    except results.TruncatedFile as err:
        return {}, str(err).removeprefix(f"{folder}{os.sep}")
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    final, tasks = read.get(results.DONE, {}).get("step"), read["metadata.json"].get("tasks", [])
    lacking = [t for t in tasks if final is not None and final not in history.get(t, {})]
    if lacking:
        return {}, f"eval.csv has no final evaluation (step {final}) of {', '.join(lacking[:5])}"
    return history, None


def failure_text(folder: Path) -> str:
    """Why a run failed, in one line, from its FAILED.json (whatever state that file is in)."""
    try:
        data = results.read_failure(folder) or {}
    except (OSError, ValueError):
        return f"its {results.FAILED} is unreadable"
    reason = " ".join(str(data.get("reason") or "no reason given").split())
    kind = data.get("kind") or "diverged"  # FAILED marks a run that diverged unless it says otherwise
    return reason if kind in reason else f"{kind}: {reason}"


# Settings that legitimately differ between the runs of one experiment (beside results.INERT_KEYS)
PER_RUN_KEYS = ("seed", "device", "task")
# config.yaml holds null for "the protocol's default": metadata.json's `evaluation` holds what was in force
RESOLVED_EVALUATION = {"mode": "train.eval_mode", "episodes": "train.eval_episodes", "greedy": "train.eval_greedy",
                       "random_episodes": "train.random_episodes"}


def fingerprint(config: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
    """A run's result-changing settings as dotted keys -> values: its config less the inert and per-run keys,
    with the evaluation protocol and precision as resolved at run time ('auto' or null would otherwise differ
    from an explicit equal value)."""
    flat = results.flat_items(config)
    evaluation = metadata.get("evaluation")
    if isinstance(evaluation, dict):
        flat.update({key: evaluation[name] for name, key in RESOLVED_EVALUATION.items() if name in evaluation})
    if "precision" in flat and metadata.get("precision") is not None:
        flat["precision"] = metadata["precision"]
    return {k: v for k, v in sorted(flat.items()) if k not in results.INERT_KEYS and k not in PER_RUN_KEYS}


def run_settings(folder: Path) -> tuple[str | None, str | None]:
    """A run's fingerprint as a JSON string (None without config.yaml: older runs), or why it cannot be read."""
    if not (folder / "config.yaml").exists():
        return None, None
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        return None, "has a corrupt config.yaml (not a YAML mapping)"
    metadata = results.read_json(folder / "metadata.json")  # run_history read it already
    return json.dumps(fingerprint(config, metadata), sort_keys=True, default=str), None


def episode_counts(folder: Path) -> dict[tuple[str, int], int]:
    """(task, step) -> how many episodes that evaluation averages, counted from eval.csv's rows (run_history has
    checked every value already, so no number is parsed but the step)."""
    _, rows = results.read_csv_rows(folder / "eval.csv", ("step", "task"))
    return dict(collections.Counter((row["task"], int(float(row["step"]))) for _, row in rows))


def with_evaluation(folder: Path, name: str, column: str, history: dict[str, dict[int, float]]
                    ) -> tuple[dict[str, dict[int, float]], Path | None, str | None]:
    """A finished run's history with its final evaluation replaced by its evaluation `name` (`mowbench evaluate`:
    RUN_DIR/evaluations/<name>/, at the run's final step), that evaluation's folder (its config and metadata
    then give the run's settings), or why it cannot be used."""
    other = folder / "evaluations" / name
    if not results.is_done(other):
        return {}, None, f"has no finished evaluation {name!r} (mowbench evaluate {folder} name={name})"
    try:
        replaced = results.evaluations(other, column)
    except results.TruncatedFile as err:
        return {}, None, str(err).removeprefix(f"{folder}{os.sep}")
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    out = {task: dict(steps) for task, steps in history.items()}
    for task, steps in replaced.items():
        for step, score in steps.items():
            out.setdefault(task, {})[step] = score
    return out, other, None


def read_results(results_dir: Path, suite: str, include_partial: bool = False, evaluation: str | None = None
                 ) -> tuple[pd.DataFrame, list[str]]:
    """Every evaluation of every run of `suite` under results_dir (the results/README.md layout).

    Failed runs (FAILED.json: diverged) are always left out and named in the notes. Unfinished runs (no
    DONE.json) are left out, or with include_partial kept (their last evaluation then counts as final); either
    way the returned notes say which. A finished run whose metadata.json, config.yaml or eval.csv is missing
    (config.yaml may be: older runs), corrupt or truncated is left out and named in the notes; a non-numeric or
    infinite value in an eval.csv is an AnalysisError. Meta-World scores are success rates, others returns.
    Each row also has `settings` (the run's fingerprint as JSON, None without config.yaml) and `episodes`
    (how many episodes its evaluation averages). With `evaluation`, each finished run's final evaluation is its
    evaluation of that name (mowbench evaluate), its settings that evaluation's; runs without it are left out and
    named, unfinished runs too."""
    root = Path(results_dir)
    if not root.is_dir():
        raise AnalysisError(f"{root}: no such results directory")
    if suite not in SUITES:
        raise AnalysisError(f"unknown suite {suite!r}; allowed: {', '.join(SUITES)}")
    column = "success" if suite == "metaworld" else "return"
    rows, notes, partial = [], [], []
    departures: dict[str, list[str]] = {}  # method -> the known departures its runs recorded
    for folder in sorted(f for f in (root / suite).glob("*/*/seed_*") if f.is_dir()):
        method, seed = folder.parent.parent.name, folder.name.removeprefix("seed_")
        where = folder.relative_to(root)
        if not seed.isdigit():
            notes.append(f"{where}: not a run folder (seed_<integer>), left out")
            continue
        if (folder / results.FAILED).exists():  # before DONE.json: a failed run's numbers are never used
            notes.append(f"{where} failed ({failure_text(folder)}): left out")
            continue
        done = results.is_done(folder)
        if not done and not include_partial:
            if (folder / "metadata.json").exists():
                partial.append(str(where))
            continue
        history, problem = run_history(folder, done, column)
        source = folder
        if evaluation is not None and not problem:
            if not done:
                notes.append(f"{where} is unfinished, so it has no evaluation {evaluation!r}: left out")
                continue
            history, source, problem = with_evaluation(folder, evaluation, column, history)
        settings, problem = run_settings(source) if not problem else (None, problem)
        if problem:
            notes.append(f"{where} ({'finished' if done else 'unfinished'}) {problem}: left out")
            continue
        counts = episode_counts(folder) | (episode_counts(source) if source != folder else {})
        recorded = results.read_json(folder / "metadata.json").get("departures")
        if recorded and method not in departures:
            departures[method] = list(recorded)
        for task, steps in history.items():
            rows += [{"method": method, "task": task, "seed": int(seed), "score": score, "step": step,
                      "source": str(source), "partial": not done, "settings": settings,
                      "episodes": counts[(task, step)]} for step, score in steps.items()]
        if not done:
            last = max((max(steps) for steps in history.values()), default="none")
            notes.append(f"{where} is unfinished: its last evaluation (step {last}) is used")
    if evaluation is not None:
        notes.append(f"final scores: each run's re-evaluation {evaluation!r} (RUN_DIR/evaluations/{evaluation}, "
                     "mowbench evaluate), not the evaluation it made when it finished")
    for method, items in departures.items():
        notes.append(f"{method}: known departures from its paper and published code (recorded by its runs): "
                     + "; ".join(items))
    if partial:
        notes.append(f"{len(partial)} unfinished run(s) left out (use --include-partial): {', '.join(partial[:5])}"
                     + (" ..." if len(partial) > 5 else ""))
    return pd.DataFrame(rows, columns=[*COLUMNS, "step", "source", "partial", "settings", "episodes"]), notes


def runs_text(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def shown(value: Any) -> str:
    """A setting's value as config.yaml spells it (true, null, [8, 16]); strings bare."""
    return value if isinstance(value, str) else json.dumps(value)


ABSENT = "(not set)"  # a key a run's (older or newer) mowbench did not have


def differing_keys(prints: list[dict[str, Any]]) -> list[str]:
    """Keys whose value differs among the fingerprints that have them. A key only some have (a field a later
    mowbench added or removed) is no difference on its own, as in results.changed_settings."""
    values: dict[str, set[str]] = {}
    for fp in prints:
        for key, value in fp.items():
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
    return sorted(k for k, v in values.items() if len(v) > 1)


def value_counts(values: list[str]) -> list[tuple[str, int]]:
    """(value, runs) most runs first, then in natural order."""
    return sorted(collections.Counter(values).items(), key=lambda item: (-item[1], natural_key(item[0])))


def naming_keys(rows: list[tuple[str, ...]], keys: list[str]) -> list[int]:
    """Indices of the fewest keys, taken in order, that tell the rows' distinct value tuples apart (env.protocol
    alone, not also the eval_* values the protocol sets): each key is kept only if it separates more groups."""
    target, chosen = len(set(rows)), []
    for i in range(len(keys)):
        if len({tuple(r[j] for j in [*chosen, i]) for r in rows}) > len({tuple(r[j] for j in chosen) for r in rows}):
            chosen.append(i)
        if len({tuple(r[j] for j in chosen) for r in rows}) == target:
            break
    return chosen


def split_settings(scores: pd.DataFrame, split: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Refuse (or with `split` relabel) a method whose runs have different result-changing settings, so that no
    row averages two experiments. Relabelled runs are named by their values, e.g. 'storm [env.protocol=storm]';
    runs without settings (no config.yaml, external scores) keep the method's name and are noted."""
    if "settings" not in scores.columns:
        return scores, []
    notes, labels = [], scores["method"].copy()
    for method, frame in sorted(scores.groupby("method"), key=lambda item: natural_key(str(item[0]))):
        runs = frame.drop_duplicates(["source", "seed"])
        known = runs[runs["settings"].notna()]
        unknown = len(runs) - len(known)
        if unknown and len(known):
            notes.append(f"{method}: {unknown} of {runs_text(len(runs))} have no recorded settings (no config.yaml: "
                         "older runs or external scores), so they could not be checked against the others")
        prints = {s: json.loads(s) for s in known["settings"].unique()}
        keys = differing_keys(list(prints.values()))
        if not keys:
            continue
        values = {s: tuple(shown(fp[k]) if k in fp else ABSENT for k in keys) for s, fp in prints.items()}
        per_run = [values[s] for s in known["settings"]]
        if not split:
            parts = [f"{k} ({'; '.join(f'{v}: {runs_text(n)}' for v, n in value_counts([r[i] for r in per_run]))})"
                     for i, k in enumerate(keys)]
            raise AnalysisError(f"method {method!r} holds runs of different settings: {', '.join(parts)}; they would "
                                "be averaged into one row: pass --split-settings to label each by its values, or "
                                "give one experiment per method name (method=<name>)")
        named = naming_keys(per_run, keys)
        label = {s: f"{method} [{', '.join(f'{keys[i]}={v[i]}' for i in named)}]" for s, v in values.items()}
        mask = frame.index[frame["settings"].notna()]
        labels[mask] = frame.loc[mask, "settings"].map(label)
        groups = value_counts([label[s] for s in known["settings"]])
        notes.append(f"{method}: runs of different settings ({', '.join(keys)}) are shown apart, labelled by "
                     f"{', '.join(keys[i] for i in named)}: "
                     + ", ".join(f"{g} ({runs_text(n)})" for g, n in sorted(groups, key=lambda x: natural_key(x[0])))
                     + (f"; the {runs_text(unknown)} without settings keep the label {method!r}" if unknown else ""))
    return scores.assign(method=labels), notes


def episode_notes(scores: pd.DataFrame) -> list[str]:
    """Per method whose evaluation points average different numbers of episodes (periodic evaluations of 5, a
    final one of 100; or runs of different eval_episodes): how many at which steps."""
    if "episodes" not in scores.columns:
        return []
    notes = []
    counted = scores.dropna(subset=["episodes", "step"])
    for method, frame in sorted(counted.groupby("method"), key=lambda item: natural_key(str(item[0]))):
        if frame["episodes"].nunique() < 2:
            continue
        final = frame["step"] == frame.groupby(["source", "seed", "task"])["step"].transform("max")
        runs = frame.drop_duplicates(["source", "seed"]).shape[0]
        parts = []
        for count, points in frame.assign(final=final).groupby("episodes"):
            steps = points["step"].nunique()
            where = "the final step" if points["final"].all() else f"{steps} step" + ("" if steps == 1 else "s")
            had = points.drop_duplicates(["source", "seed"]).shape[0]
            parts.append(f"{int(count)} at {where}" + (f" of {had} of {runs_text(runs)}" if had < runs else ""))
        notes.append(f"{method}: evaluation points average different episode counts ({', '.join(parts)}); curves "
                     "mix their noise levels")
    return notes


def suite_coverage(scores: pd.DataFrame, suite: str) -> dict[str, list[str]]:
    """Methods whose scores cover fewer tasks than the suite's full table -> their tasks (the suite's order)."""
    from mowbench.envs import suite_module

    every = list(suite_module(suite).TASKS)
    owned = scores.groupby("method")["task"].agg(set)
    return {str(m): [t for t in every if t in own] for m, own in owned.items() if len(set(every) & own) < len(every)}


def coverage_note(method: str, tasks: list[str], suite: str) -> str:
    """'<method>: aggregates over 1 of the 26 atari100k tasks (Pong): ...', naming the fewer of covered/missing."""
    from mowbench.envs import suite_module

    every = list(suite_module(suite).TASKS)
    missing = [t for t in every if t not in tasks]
    names = tasks if len(tasks) <= len(missing) else missing
    listed = ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else "")
    return (f"{method}: aggregates over {len(tasks)} of the {len(every)} {suite} tasks "
            f"({listed if names is tasks else 'all but ' + listed}): not comparable with full-suite aggregates")


def random_returns(final: pd.DataFrame) -> pd.DataFrame:
    """The random policy's returns the runs behind `final` recorded beside their final evaluation (summary.json's
    random_return, one per run and task; a re-evaluation's run is read): task, seed, score, the same (task, seed)
    in several methods' runs averaged."""
    rows = []
    for source in sorted(final["source"].dropna().unique()):
        folder = Path(source)
        if folder.parent.name == "evaluations":  # a re-evaluation (mowbench evaluate): its run's summary
            folder = folder.parent.parent
        try:
            summary = results.read_json(folder / "summary.json")
        except (OSError, ValueError):
            continue
        seed = int(folder.name.removeprefix("seed_")) if folder.name.startswith("seed_") else None
        for task, ret in ((summary or {}).get("random_return") or {}).items():
            rows.append({"task": task, "seed": seed, "score": float(ret)})
    frame = pd.DataFrame(rows, columns=["task", "seed", "score"])
    return frame.groupby(["seed", "task"], as_index=False)["score"].mean()


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
        if not table.isna().any().any():
            matrices[str(method)] = table[own].to_numpy(dtype=float)
            continue
        # seeds not shared by every task (published runs seeded per game, or a run missing a task): the bootstrap
        # resamples runs within each task, so each task's runs in seed order, the first n of each (the fewest)
        runs = {task: group.sort_values("seed")[column].to_numpy(dtype=float) for task, group in frame.groupby("task")}
        n = min(len(r) for r in runs.values())
        counts = sorted({len(r) for r in runs.values()})
        notes.append(f"{method}: not every seed has every task; each task's first {n} runs by seed are used "
                     + (f"({counts[0]}-{counts[-1]} per task)" if len(counts) > 1 else "(all of them)"))
        matrices[str(method)] = np.stack([runs[task][:n] for task in own], axis=1)  # (n, tasks)
    seeds = {m: len(x) for m, x in matrices.items()}
    if len(set(seeds.values())) > 1:
        notes.append("methods have different numbers of seeds: " + ", ".join(f"{m} {n}" for m, n in seeds.items()))
    return matrices, tasks, notes
