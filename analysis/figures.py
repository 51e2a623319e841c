"""Figures (PNG and PDF, headless): the analysis's interval estimates, performance profiles, probability of
improvement, sample-efficiency curves, per-task learning curves and a grid's ablation plot; and the labelled heatmap
that runs write as artifacts (MoW's clusters and routing)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mowbench.analysis.scores import natural_key
from mowbench.analysis.tables import metric_label


def _plt():  # noqa: ANN202 - pyplot, imported headless on first use
    import matplotlib

    matplotlib.use("Agg")
    # TrueType (Type 42) fonts in PDF and PostScript: venues' checks refuse the Type 3 fonts matplotlib embeds by
    # default
    matplotlib.rcParams["pdf.fonttype"] = 42
    matplotlib.rcParams["ps.fonttype"] = 42
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, rect: tuple[float, float, float, float] | None = None) -> None:  # noqa: ANN001
    fig.tight_layout(rect=rect)
    for ext in ("png", "pdf"):
        fig.savefig(path.with_suffix(f".{ext}"), dpi=150)
    _plt().close(fig)


def heatmap_png(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cbar: str,
                vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> bytes:
    """A labelled heatmap of matrix (len(rows), len(cols)) as PNG bytes."""
    plt = _plt()
    h, w = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * w + 2.5), max(3.0, 0.3 * h + 1.5 + 0.06 * max(
        (len(c) for c in cols), default=0))))
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    long_labels = w > 8 or max((len(c) for c in cols), default=0) > 4
    ax.set_xticks(range(w), cols, rotation=90 if long_labels else 0, fontsize=7)
    ax.set_yticks(range(h), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


GREY = "#8c8c8c"


PALETTE: dict[str, str] = {}  # method -> colour, the same in every figure of a report (set_palette)


def set_palette(methods: list[str], published: frozenset[str] | set[str] = frozenset()) -> None:
    """One colour per method of ours for every figure of the report: tab10 in `methods`' order (e.g. by IQM)."""
    PALETTE.clear()
    PALETTE.update({m: f"C{i % 10}" for i, m in enumerate(m for m in methods if m not in published)})


def colour(method: str, fallback: int = 0) -> str:
    return PALETTE.get(method, f"C{fallback % 10}")


def styles(methods: list[str], published: frozenset[str] | set[str]) -> dict[str, dict]:
    """Line/bar style per method: ours in colour (the report's palette; tab10, thick), published ones in grey (thin;
    line styles tell them apart), so 15+ methods stay readable and ours stand out."""
    ours = [m for m in methods if m not in published]
    dashes = ["-", "--", ":", "-."]
    out: dict[str, dict] = {m: {"color": colour(m, i), "linewidth": 2.0, "linestyle": "-"}
                            for i, m in enumerate(ours)}
    for i, m in enumerate(m for m in methods if m in published):
        out[m] = {"color": GREY, "linewidth": 1.0, "linestyle": dashes[i % len(dashes)], "alpha": 0.8}
    return out


def by_iqm(estimates: dict[str, dict[str, tuple[float, float, float]]]) -> list[str]:
    """Methods from the highest IQM point estimate to the lowest."""
    return sorted(estimates, key=lambda m: -estimates[m]["iqm"][0])


def interval_estimates(estimates: dict[str, dict[str, tuple[float, float, float]]], scale: float, label: str,
                       path: Path, published: frozenset[str] | set[str] = frozenset()) -> None:
    """One panel per metric: point and 95% CI per method (rliable's usual figure), methods ordered by IQM (the
    best on top), ours in colour and published ones in grey."""
    plt = _plt()
    methods = by_iqm(estimates)[::-1]  # barh draws from the bottom up
    style = styles(methods, published)
    metrics = list(next(iter(estimates.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.32 * len(methods) + 1.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        for i, method in enumerate(methods):
            point, lo, hi = (v * scale for v in estimates[method][metric])
            ax.barh(i, hi - lo, left=lo, height=0.6, alpha=0.7, color=style[method]["color"])
            ax.plot([point, point], [i - 0.3, i + 0.3], color="black")
            ax.plot(point, i, "o", color="black", markersize=3)
        span = [v * scale for m in methods for v in estimates[m][metric][1:]]
        pad = 0.1 * (max(span) - min(span)) or 0.1 * max(abs(max(span)), 1.0)
        ax.set_xlim(min(span) - pad, max(span) + pad)  # bars are sticky: margins() would not apply
        ax.set_yticks(range(len(methods)), methods if metric == metrics[0] else [""] * len(methods),
                      fontsize=7 if len(methods) > 8 else 9)
        if metric == metrics[0]:
            for tick, method in zip(ax.get_yticklabels(), methods, strict=True):
                tick.set_color("dimgray" if method in published else "black")
                tick.set_fontweight("normal" if method in published else "bold")
        ax.set_title(metric_label(metric))
        ax.set_xlabel(label)
    _save(fig, path)


def performance_profiles(matrices: dict[str, np.ndarray], label: str, path: Path,
                         published: frozenset[str] | set[str] = frozenset(), order: list[str] | None = None) -> None:
    """Fraction of runs x tasks with score > tau, against tau; legend in `order` (e.g. by IQM) outside the
    axes, ours in colour, published ones in grey line styles."""
    plt = _plt()
    methods = order or list(matrices)
    style = styles(methods, published)
    values = np.concatenate([m.ravel() for m in matrices.values()])
    # up to the 99th percentile: a few games far above human (Boxing, Krull) would squash every curve to the left
    taus = np.linspace(min(0.0, values.min()), max(np.percentile(values, 99), 1.0), 201)
    profile = {m: np.array([(matrices[m] > t).mean() for t in taus]) for m in methods}
    theirs = [m for m in methods if m in published]
    # many published methods: their range as one grey band and the best BAND_LABELLED of them (in `order`) as
    # labelled lines, instead of a line each that no reader can tell apart
    banded = len(theirs) > BAND_ABOVE
    shown = [m for m in methods if m not in published] + (theirs[:BAND_LABELLED] if banded else theirs)
    fig, ax = plt.subplots(figsize=(5 + (2.5 if len(shown) > 6 else 0), 3.5 + 0.05 * len(shown)))
    if banded:
        stack = np.stack([profile[m] for m in theirs])
        ax.fill_between(taus, stack.min(0), stack.max(0), color=GREY, alpha=0.25, linewidth=0,
                        label=f"published: range of {len(theirs)} methods")
    for method in shown:
        ax.plot(taus, profile[method], label=method, **style[method])
    ax.set_xlabel(f"{label} (tau)")
    ax.set_ylabel("fraction of runs with score > tau")
    if len(shown) > 6:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    _save(fig, path)


BAND_ABOVE = 4  # published methods beyond which a performance profile draws them as a band
BAND_LABELLED = 3  # the best published methods still drawn as labelled lines beside the band


def probability_of_improvement(matrices: dict[str, np.ndarray], path: Path,
                               published: frozenset[str] | set[str] = frozenset(),
                               order: list[str] | None = None, tasks: dict[str, list[str]] | None = None) -> None:
    """P(X > Y) (rliable's Mann-Whitney estimate) on the tasks both methods have (`tasks`: each matrix's
    columns; None: pairs with the same number of tasks): with our methods beside published ones, each of ours
    (rows) against every other method (columns); otherwise every pair. Cells are annotated; methods in `order`
    (e.g. by IQM)."""
    from rliable import metrics

    plt = _plt()
    methods = order or list(matrices)
    ours = [m for m in methods if m not in published]
    rows = ours if ours and len(ours) < len(methods) else methods
    cols = [m for m in methods if m not in rows] if rows is ours else methods
    prob = np.full((len(rows), len(cols)), np.nan)
    for i, x in enumerate(rows):
        for j, y in enumerate(cols):
            if x == y:
                continue
            if tasks is None:
                if matrices[x].shape[1] == matrices[y].shape[1]:
                    prob[i, j] = metrics.probability_of_improvement(matrices[x], matrices[y])
                continue
            shared = sorted(set(tasks[x]) & set(tasks[y]))
            if shared:
                prob[i, j] = metrics.probability_of_improvement(matrices[x][:, [tasks[x].index(t) for t in shared]],
                                                                matrices[y][:, [tasks[y].index(t) for t in shared]])
    fig, ax = plt.subplots(figsize=(0.55 * len(cols) + 3.5, 0.45 * len(rows) + 2.2))
    im = ax.imshow(prob, vmin=0, vmax=1, cmap="RdBu", aspect="auto")
    for (i, j), p in np.ndenumerate(prob):
        if not np.isnan(p):
            ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(p - 0.5) > 0.35 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        tick.set_color("dimgray" if tick.get_text() in published else "black")
    ax.set_xlabel("Y")
    ax.set_ylabel("X")
    ax.set_title("P(X > Y)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)


def sample_efficiency(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], label: str,
                      scale: float, path: Path) -> None:
    """IQM against agent steps per task, with its 95% interval as a band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (method, (steps, point, lo, hi)) in enumerate(curves.items()):
        c = colour(method, i)
        if len(steps) == 1:  # one evaluation: a point with its interval, not a line of one point
            ax.errorbar(steps, point * scale, yerr=[(point - lo) * scale, (hi - point) * scale], fmt="o", color=c,
                        markersize=5, capsize=3, label=method)
            continue
        ax.plot(steps, point * scale, marker="o", markersize=3, label=method, color=c)
        ax.fill_between(steps, lo * scale, hi * scale, alpha=0.2, color=c)
    ax.set_xlabel("agent steps per task")
    ax.set_ylabel(f"IQM {label}")
    ax.legend(fontsize=7)
    _save(fig, path)


def learning_curves(scores, path: Path, ylabel: str = "return", scale: float = 1.0) -> None:  # noqa: ANN001
    """One panel per task: each method's mean over seeds of the raw score (times `scale`: the report's unit)
    against steps, min-max band; a method with one evaluation is a marker. Each panel's x axis spans the budgets
    of the methods it shows."""
    plt = _plt()
    frame = scores.dropna(subset=["step"])
    tasks = sorted(frame["task"].unique())
    cols = min(len(tasks), 6)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows + 0.6), squeeze=False)
    for ax, task in zip(axes.ravel(), tasks, strict=False):
        here = frame[frame["task"] == task]
        for i, method in enumerate(sorted(here["method"].unique(), key=natural_key)):
            mine = here[here["method"] == method]
            stats = mine.groupby("step")["score"].agg(["mean", "min", "max"]) * scale
            c = colour(method, i)
            if len(stats) == 1:
                ax.plot(stats.index, stats["mean"], "o", markersize=5, color=c, label=method)
                ax.vlines(stats.index, stats["min"], stats["max"], color=c, alpha=0.5)
                continue
            ax.plot(stats.index, stats["mean"], label=method, color=c)
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.2, color=c)
        ax.set_title(task, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(tasks):]:
        ax.axis("off")
    legend: dict[str, object] = {}  # every method of every panel, once
    for ax in axes.ravel():
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(name, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=7)
    fig.supxlabel("agent steps", fontsize=8)
    fig.supylabel(ylabel, fontsize=8)
    legend_rows = -(-len(labels) // 4)
    _save(fig, path, rect=(0, 0, 1, 1 - (0.05 + 0.03 * legend_rows) / max(rows * 0.7, 1)))


def ablation(rows: list[dict], swept: str, scale: float, label: str, path: Path) -> None:
    """A grid's metrics (IQM and mean, 95% CIs) against the swept value, one point per cell with results."""
    plt = _plt()
    rows = [r for r in rows if r["estimates"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.1 * len(rows) + 3), 3.4))
    xs = range(len(rows))
    for ax, metric in zip(axes, ("iqm", "mean"), strict=True):
        point, lo, hi = (np.array([r["estimates"][metric][i] * scale for r in rows]) for i in range(3))
        ax.errorbar(xs, point, yerr=[point - lo, hi - point], fmt="o-", capsize=3)
        for x, r in zip(xs, rows, strict=True):
            if r["default"]:
                ax.plot(x, point[x], "*", color="black", markersize=10)
        crowded = len(rows) > 4
        ax.set_xticks(list(xs), [r["label"] for r in rows], rotation=30 if crowded else 0,
                      ha="right" if crowded else "center", fontsize=7)
        ax.set_xlabel(swept)
        ax.set_title(f"{metric_label(metric)} {label}", fontsize=9)
    _save(fig, path)
