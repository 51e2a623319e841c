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
- atari_table (Atari): the papers' layout, the 26 games as rows and the methods as columns (raw means), then
  mean, median and IQM HNS and the number of superhuman games, the best of each row in bold;
- with --with-published all|NAME[,NAME...]: published Atari 100k methods shipped in analysis/reference/published
  (13 methods' runs or per-game means and STORM's per-game means; --list-published shows them) as methods
  beside ours, named "<method> (published)" ("published, derived" for data reduced from training curves),
  the papers' aggregates as point-only rows of aggregate_table, and for Meta-World the literature table
  metaworld_literature with the settings that make its numbers comparable or not (never mixed with our runs);
- report.html: every table and figure above on one self-contained page, with the notes and the command;
- notes.txt: what was left out or could not be compared (also printed): failed runs (FAILED.json, always left
  out), unfinished or damaged runs, methods over fewer tasks than the suite's table (their aggregate_table row
  says "(k of N tasks)"), evaluation points averaging different episode counts.

One method name must hold one experiment: runs of a method whose config.yaml differ in a result-changing
setting (any but seed, device, task and mowbench.results.INERT_KEYS; the evaluation protocol as resolved in
metadata.json) are refused, naming the settings, unless --split-settings.

Flags:
  RESULTS_DIR        results roots in the results/README.md layout (default: results)
  --suite            atari100k | metaworld | minatar
  --scores FILE      external or published scores, CSV with method,task,seed,score[,step] (repeatable)
  --out DIR          where everything is written (created; never inside a run folder)
  --seed N           bootstrap seed (default 0); --reps N bootstrap resamples (default 50000)
  --include-partial  also use unfinished runs (their last evaluation; noted); failed runs are never used
  --evaluation NAME  each finished run's final evaluation from RUN_DIR/evaluations/NAME (mowbench evaluate)
  --split-settings   a method whose runs differ in settings becomes one method per settings, labelled by the
                     values that tell them apart, e.g. "storm [env.protocol=standard]" (default: refused)
  --grid NAME        also the ablation table and plot of grid NAME (mowbench/conf/grid/NAME.yaml)
  --with-published   all (the default when given bare) or NAME[,NAME...]: add shipped published scores
  --list-published   print the shipped published methods (runs per game, kind, source) and exit
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from mowbench import machine, results
from mowbench.analysis import figures
from mowbench.analysis.ablation_table import grid_table, load_cells
from mowbench.analysis.metrics import interval_estimates, iqm_curves
from mowbench.analysis.report import Report
from mowbench.analysis.scores import (
    SUITES,
    AnalysisError,
    check_tasks,
    check_unique,
    coverage_note,
    curve_matrices,
    episode_notes,
    final_scores,
    human_normalised,
    list_published,
    published,
    published_aggregates,
    random_returns,
    read_results,
    read_scores_csv,
    reference_table,
    resolve_published,
    score_matrices,
    split_settings,
    suite_coverage,
)
from mowbench.analysis.tables import atari_layout, interval_text, write_table

NORMALISED = {"atari100k": ("hns", "human-normalised score"), "metaworld": ("score", "success rate"),
              "minatar": ("score", "return (not normalised)")}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mowbench.analysis", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, help="results roots (default: results)")
    parser.add_argument("--suite", help="atari100k | metaworld | minatar (required)")
    parser.add_argument("--scores", action="append", type=Path, default=[], help="external scores CSV")
    parser.add_argument("--out", type=Path, help="output folder (required)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples")
    parser.add_argument("--include-partial", action="store_true", help="use unfinished runs' last evaluation")
    parser.add_argument("--evaluation", metavar="NAME", help="each run's final evaluation from its evaluation NAME "
                        "(`mowbench evaluate RUN_DIR name=NAME`) instead of its own")
    parser.add_argument("--split-settings", action="store_true",
                        help="label a method's runs of different settings apart instead of refusing them")
    parser.add_argument("--grid", help="grid name: its ablation table and plot")
    parser.add_argument("--with-published", nargs="?", const="all", metavar="all|NAME[,NAME...]",
                        help="add shipped published scores (bare: all; names: --list-published)")
    parser.add_argument("--list-published", action="store_true", help="list the shipped published methods")
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--suite", args.suite), ("--out", args.out)) if value is None]
    if missing and not args.list_published:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


# A folder holding any of these is a run folder (results/README.md): tables written there would mix with the run's
# files, and a rerun or a cleanup of the run would take them along
RUN_FILES = ("metadata.json", results.DONE, results.FAILED, "config.yaml", "checkpoint.pt", results.LOCK, "eval.csv")


def run_folder_around(path: Path) -> Path | None:
    """The run folder that `path` is or lies inside (checking it and each existing parent), or None."""
    resolved = path.resolve()
    for folder in (resolved, *resolved.parents):
        if folder.is_dir() and any((folder / name).exists() for name in RUN_FILES):
            return folder
    return None


def load(args: argparse.Namespace) -> tuple[pd.DataFrame, list[str], set[str]]:
    """Every score (Atari: with hns), the notes so far, and the names of the published methods among them."""
    inside = run_folder_around(args.out)
    if inside is not None:
        raise AnalysisError(f"--out {args.out} is inside the run folder {inside}; allowed: a folder outside every "
                            "run folder")
    if args.suite not in SUITES:
        raise AnalysisError(f"unknown suite {args.suite!r}; allowed: {', '.join(SUITES)}")
    if args.reps < 1:
        raise AnalysisError(f"--reps={args.reps}; allowed: a positive integer")
    if args.grid:
        load_cells(args.grid)  # an unknown grid fails here, before anything is read
    chosen = resolve_published(args.with_published) if args.with_published else []  # so does an unknown name
    roots = args.results or ([] if args.scores else [Path("results")])
    frames, notes = [], []
    for root in roots:
        frame, more = read_results(root, args.suite, args.include_partial, args.evaluation)
        frames.append(frame)
        notes += more
    frames += [read_scores_csv(path) for path in args.scores]
    shipped: set[str] = set()
    if args.with_published:
        per_task, shipped, more = published(args.suite, chosen, {m for f in frames if len(f) for m in f["method"]})
        frames.append(per_task)
        notes += more
    scores = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else None
    if scores is None:
        where = ", ".join(map(str, [*roots, *args.scores]))
        raise AnalysisError(f"no {args.suite} scores found in {where} (finished runs need DONE.json; "
                            "see --include-partial)")
    scores, more = split_settings(scores, args.split_settings)  # before check_unique: one seed, two experiments
    notes += more
    check_tasks(scores, args.suite)
    check_unique(scores)
    notes += episode_notes(scores)
    if args.suite == "atari100k":
        scores = human_normalised(scores)
    return scores, notes, shipped


HUMAN_SCORED = ("atari100k",)  # suites whose scores are normalised by human (and random) references
GAP_SUITES = ("atari100k", "metaworld")  # scores with a level of 1 (human, success): the optimality gap applies


def with_random_row(aggregate: pd.DataFrame, final: pd.DataFrame, reps: int, seed: int, scale: float
                    ) -> tuple[pd.DataFrame, list[str]]:
    """The aggregate table with a 'random policy' row: the random-policy returns the runs recorded beside their
    final evaluation (scores.random_returns), aggregated as the methods are."""
    rows = random_returns(final)
    matrix = rows.pivot_table(index="seed", columns="task", values="score").dropna(axis=1).to_numpy()
    estimate = interval_estimates({"random policy": matrix}, reps=reps, seed=seed)["random policy"]
    row = {k: interval_text(*estimate[k], scale) for k in aggregate.columns if k in estimate}
    row |= {"tasks": str(matrix.shape[1]), "runs": str(matrix.shape[0])}
    return pd.concat([aggregate, pd.DataFrame([row], index=["random policy"])]).fillna("–"), []


def coverage_label(method: str, tasks: list[str] | None, suite: str) -> str:
    """A method's aggregate_table row name, saying when it aggregates fewer tasks than the suite has."""
    from mowbench.envs import suite_module

    return method if tasks is None else f"{method} ({len(tasks)} of {len(suite_module(suite).TASKS)} tasks)"


def per_task_tables(scores: pd.DataFrame, column: str, scale: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    def fmt(values: pd.Series, scale: float = 1.0) -> str:
        m, s = values.mean() * scale, values.std(ddof=0) * scale
        return f"{m:.1f} ± {s:.1f}" if len(values) > 1 else f"{m:.1f}"

    raw = scores.groupby(["task", "method"])["score"].apply(fmt).unstack("method").fillna("–")
    norm = scores.groupby(["task", "method"])[column].apply(lambda v: fmt(v, scale)).unstack("method").fillna("–")
    raw.index.name = norm.index.name = "task"
    return raw, norm


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.list_published:
        print(list_published(), end="")
        return 0
    try:
        scores, notes, shipped = load(args)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    column, label = NORMALISED[args.suite]
    final = final_scores(scores)
    matrices, tasks, more = score_matrices(final, column)
    notes += more
    estimates = interval_estimates(matrices, reps=args.reps, seed=args.seed)
    if args.suite not in GAP_SUITES:  # raw returns have no level the gap could be measured from
        estimates = {m: {k: v for k, v in e.items() if k != "og"} for m, e in estimates.items()}
    order = figures.by_iqm(estimates)
    figures.set_palette(order, shipped)  # one colour per method in every figure
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = Report(f"mowbench analysis: {args.suite}")
    rows = [{"method": m, "metric": k, "point": p, "lower": lo, "upper": hi}
            for m, metrics in estimates.items() for k, (p, lo, hi) in metrics.items()]
    pd.DataFrame(rows).to_csv(out / "aggregate.csv", index=False)
    scale = 100.0 if args.suite in ("atari100k", "metaworld") else 1.0
    unit = " (%)" if scale == 100.0 else ""
    aggregate = pd.DataFrame({m: {k: interval_text(*estimates[m][k], scale) for k in estimates[m]}
                              for m in order}).T  # by IQM, the best first
    aggregate["tasks"] = [str(matrices[m].shape[1]) for m in order]  # what each row aggregates: its matrix
    aggregate["runs"] = [str(matrices[m].shape[0]) for m in order]  # runs (seeds) per task
    if args.suite not in HUMAN_SCORED:  # no human reference: a random policy's returns are the floor to read from
        aggregate, more = with_random_row(aggregate, final, args.reps, args.seed, scale)
        notes += more
    partial_suite = suite_coverage(final, args.suite)
    notes += [coverage_note(m, tasks_, args.suite) for m, tasks_ in partial_suite.items()]
    aggregate.index = [coverage_label(m, partial_suite.get(m), args.suite) for m in aggregate.index]
    printed_rows = False
    if args.with_published and args.suite == "atari100k":
        printed, more = published_aggregates(args.suite)
        aggregate = pd.concat([aggregate, printed]).fillna("–")
        printed_rows = not printed.empty
        notes += more
    aggregate.index.name = "method"
    aggregate.columns = [f"{c}{unit}" if c not in ("tasks", "runs") else c for c in aggregate.columns]
    raw, norm = per_task_tables(final, column, scale)
    intervals = f"95% CIs ({args.reps} bootstrap resamples, seed {args.seed})"
    print(f"# {args.suite}: {label}, {len(tasks)} tasks, {intervals}\n")

    def table(name: str, heading: str, frame: pd.DataFrame, caption: str = "", bold: pd.DataFrame | None = None,
              rules: tuple[int, ...] = ()) -> None:
        print(write_table(frame, out, name, bold, rules))
        report.table(name, heading, frame, bold, caption, rules)

    table("aggregate_table", f"Aggregates of the {label}{unit}", aggregate,
          f"Point estimate [{intervals}], methods by IQM; the tasks and the runs (seeds) per task each row "
          "aggregates."
          + (" Rows 'as printed' are the papers' own numbers, without intervals." if printed_rows else "")
          + (" The random policy: each run's own uniformly random legal actions, same protocol."
             if "random policy" in aggregate.index else ""))
    if args.suite == "atari100k":
        ours = [m for m in matrices if m not in shipped]
        layout, bold = atari_layout(final, {m: e["iqm"][0] for m, e in estimates.items()},
                                    ours + [m for m in order if m in shipped])
        table("atari_table", "Atari 100k: raw score per game (mean over runs) and HNS aggregates", layout,
              "Best of each row in bold. Mean and median: over games of the per-game mean HNS; IQM: over all runs "
              "and games; superhuman: games with mean HNS >= 1 (at least human).", bold, rules=(len(layout) - 4,))
    if args.suite != "metaworld":  # Meta-World's raw score is its success rate: the next table, in percent
        table("per_task_raw", "Raw score per task (mean ± std over runs)", raw)
    table("per_task_normalised", f"{label.capitalize()} per task{unit} (mean ± std over runs)", norm)
    if args.suite == "metaworld" and args.with_published:
        table("metaworld_literature", "Meta-World in the literature (success %, as reported)",
              reference_table("metaworld_literature").set_index("method"),
              "Points from papers, never runs of ours: comparable only where observations, steps, goals and the "
              "reward version match (last column).")

    def figure(name: str, heading: str, caption: str = "") -> None:
        report.figure(name, heading, (out / name).with_suffix(".png"), caption)

    grey = " Ours in colour, published methods in grey." if shipped else ""
    figures.interval_estimates(estimates, scale, label, out / "interval_estimates", shipped)
    figure("interval_estimates", "Aggregate metrics with 95% CIs", "Methods ordered by IQM." + grey)
    figures.performance_profiles(matrices, label, out / "performance_profiles", shipped, order)
    figure("performance_profiles", "Performance profiles", "Fraction of runs x tasks above each threshold." + grey)
    if len(matrices) > 1:
        own = {m: sorted(final.loc[final["method"] == m, "task"].unique()) for m in matrices}  # matrices' columns
        figures.probability_of_improvement(matrices, out / "probability_of_improvement", shipped, order, own)
        figure("probability_of_improvement", "Probability of improvement P(X > Y)",
               "On the tasks both methods have" + (": each of ours against every other method." if shipped else "."))
    curves, more = curve_matrices(scores, column)
    notes += more
    if curves:
        figures.sample_efficiency(iqm_curves(curves, reps=args.reps, seed=args.seed), label, scale,
                                  out / "sample_efficiency")
        figure("sample_efficiency", "Sample efficiency (IQM against agent steps)")
        figures.learning_curves(scores, out / "learning_curves",
                                "success (%)" if args.suite == "metaworld" else "return",
                                scale if args.suite == "metaworld" else 1.0)
        figure("learning_curves", "Learning curves per task")
    else:
        notes.append("no evaluation histories (only final scores): no sample-efficiency or learning curves")
    if args.grid:
        table_, cells, swept, more = grid_table(args.grid, matrices, estimates, scale, args.reps, args.seed)
        notes += more
        table(f"grid_{args.grid}", f"Grid {args.grid}", table_)
        if any(c["estimates"] for c in cells):
            figures.ablation(cells, swept, scale, label, out / f"ablation_{args.grid}")
            figure(f"ablation_{args.grid}", f"Ablation {args.grid}")
    (out / "notes.txt").write_text("".join(f"- {n}\n" for n in notes))
    command = shlex.join(["python", "-m", "mowbench.analysis", *argv])
    results.atomic_write_text(out / "report.html", report.render(command, notes, machine.git_state()["commit"]))
    for note in notes:
        print(f"note: {note}")
    print(f"[mowbench.analysis] wrote tables, figures and report.html to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
