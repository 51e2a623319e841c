"""`python -m mowbench.analysis --suite atari100k [RESULTS_DIR ...] [--scores FILE.csv ...] [--grid NAME] --out DIR`

Regenerates, from results folders and/or external score CSVs:
- aggregate.csv: method,metric,point,lower,upper for mean, median, iqm and og (optimality gap) of the
  human-normalised score (Atari), success rate (Meta-World) or raw return (MinAtar), with 95%
  stratified-bootstrap intervals (rliable; --reps, reproducible for --seed);
- per_task_raw, per_task_normalised and aggregate_table as .csv, .md and .tex (booktabs); the Markdown is
  also printed;
- figures (PNG and PDF): interval_estimates, performance_profiles, probability_of_improvement,
  sample_efficiency (IQM against agent steps with 95% CIs, from every evaluation of the runs),
  learning_curves (per task: mean over seeds, min-max band);
- with --grid NAME: grid_<NAME> (.csv/.md/.tex: one row per cell, its metrics and the probability of
  improvement over the grid's default) and ablation_<NAME> (IQM and mean against the swept value);
- with --with-published: STORM's published per-game means as the method "storm (published)" (Atari) and
  the published aggregates (MoW, STORM, the MT50 baselines) as point-only rows of aggregate_table;
- notes.txt: what was left out or could not be compared (also printed).

Flags:
  RESULTS_DIR        results roots in the results/README.md layout (default: results)
  --suite            atari100k | metaworld | minatar
  --scores FILE      external or published scores, CSV with method,task,seed,score[,step] (repeatable)
  --out DIR          where everything is written (created)
  --seed N           bootstrap seed (default 0); --reps N bootstrap resamples (default 50000)
  --include-partial  also use unfinished runs (their last evaluation; noted)
  --grid NAME        also the ablation table and plot of grid NAME (mowbench/conf/grid/NAME.yaml)
  --with-published   add the published reference scores shipped in analysis/reference/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from mowbench.analysis import figures
from mowbench.analysis.grids import grid_table, load_cells
from mowbench.analysis.metrics import interval_estimates, iqm_curves
from mowbench.analysis.scores import (
    SUITES,
    AnalysisError,
    check_tasks,
    check_unique,
    curve_matrices,
    final_scores,
    human_normalised,
    published,
    published_aggregates,
    read_results,
    read_scores_csv,
    score_matrices,
)
from mowbench.analysis.tables import interval_text, write_table

NORMALISED = {"atari100k": ("hns", "human-normalised score"), "metaworld": ("score", "success rate"),
              "minatar": ("score", "return (not normalised)")}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mowbench.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="results roots (default: results)")
    parser.add_argument("--suite", required=True, help="atari100k | metaworld | minatar")
    parser.add_argument("--scores", action="append", type=Path, default=[], help="external scores CSV")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples")
    parser.add_argument("--include-partial", action="store_true", help="use unfinished runs' last evaluation")
    parser.add_argument("--grid", help="grid name: its ablation table and plot")
    parser.add_argument("--with-published", action="store_true", help="add the shipped published scores")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[pd.DataFrame, list[str]]:
    if args.suite not in SUITES:
        raise AnalysisError(f"unknown suite {args.suite!r}; allowed: {', '.join(SUITES)}")
    if args.reps < 1:
        raise AnalysisError(f"--reps={args.reps}; allowed: a positive integer")
    if args.grid:
        load_cells(args.grid)  # an unknown grid fails here, before anything is read
    roots = args.results or ([] if args.scores else [Path("results")])
    frames, notes = [], []
    for root in roots:
        frame, more = read_results(root, args.suite, args.include_partial)
        frames.append(frame)
        notes += more
    frames += [read_scores_csv(path) for path in args.scores]
    if args.with_published:
        per_task, more = published(args.suite, {m for f in frames if len(f) for m in f["method"]})
        frames.append(per_task)
        notes += more
    scores = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else None
    if scores is None:
        where = ", ".join(map(str, [*roots, *args.scores]))
        raise AnalysisError(f"no {args.suite} scores found in {where} (finished runs need DONE.json; "
                            "see --include-partial)")
    check_tasks(scores, args.suite)
    check_unique(scores)
    if args.suite == "atari100k":
        scores = human_normalised(scores)
    return scores, notes


def per_task_tables(scores: pd.DataFrame, column: str, scale: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    def fmt(values: pd.Series, scale: float = 1.0) -> str:
        m, s = values.mean() * scale, values.std(ddof=0) * scale
        return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"

    raw = scores.groupby(["task", "method"])["score"].apply(fmt).unstack("method").fillna("–")
    norm = scores.groupby(["task", "method"])[column].apply(lambda v: fmt(v, scale)).unstack("method").fillna("–")
    raw.index.name = norm.index.name = "task"
    return raw, norm


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        scores, notes = load(args)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    column, label = NORMALISED[args.suite]
    final = final_scores(scores)
    matrices, tasks, more = score_matrices(final, column)
    notes += more
    estimates = interval_estimates(matrices, reps=args.reps, seed=args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"method": m, "metric": k, "point": p, "lower": lo, "upper": hi}
            for m, metrics in estimates.items() for k, (p, lo, hi) in metrics.items()]
    pd.DataFrame(rows).to_csv(out / "aggregate.csv", index=False)
    scale = 100.0 if args.suite in ("atari100k", "metaworld") else 1.0
    unit = " (%)" if scale == 100.0 else ""
    aggregate = pd.DataFrame({m: {k: interval_text(*v, scale) for k, v in metrics.items()}
                              for m, metrics in estimates.items()}).T
    if args.with_published:
        printed, more = published_aggregates(args.suite)
        aggregate = pd.concat([aggregate, printed]).fillna("–")
        notes += more
    aggregate.index.name = "method"
    aggregate.columns = [f"{c}{unit}" for c in aggregate.columns]
    raw, norm = per_task_tables(final, column, scale)
    print(f"# {args.suite}: {label}, {len(tasks)} tasks, 95% CIs ({args.reps} bootstrap resamples, seed {args.seed})\n")
    print(write_table(aggregate, out, "aggregate_table"))
    print(write_table(raw, out, "per_task_raw"))
    print(write_table(norm, out, "per_task_normalised"))
    figures.interval_estimates(estimates, scale, label, out / "interval_estimates")
    figures.performance_profiles(matrices, label, out / "performance_profiles")
    if len(matrices) > 1:
        figures.probability_of_improvement(matrices, out / "probability_of_improvement")
    curves, more = curve_matrices(scores, column)
    notes += more
    if curves:
        figures.sample_efficiency(iqm_curves(curves, reps=args.reps, seed=args.seed), label, scale,
                                  out / "sample_efficiency")
        figures.learning_curves(scores, out / "learning_curves", "success" if args.suite == "metaworld" else "return")
    else:
        notes.append("no evaluation histories (only final scores): no sample-efficiency or learning curves")
    if args.grid:
        table, cells, swept, more = grid_table(args.grid, matrices, estimates, scale, args.reps, args.seed)
        notes += more
        print(write_table(table, out, f"grid_{args.grid}"))
        if any(c["estimates"] for c in cells):
            figures.ablation(cells, swept, scale, label, out / f"ablation_{args.grid}")
    (out / "notes.txt").write_text("".join(f"- {n}\n" for n in notes))
    for note in notes:
        print(f"note: {note}")
    print(f"[mowbench.analysis] wrote tables and figures to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
