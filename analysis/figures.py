"""Figures of the analysis (PNG and PDF, headless): interval estimates, performance profiles, probability
of improvement."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():  # noqa: ANN202 - pyplot, imported headless on first use
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:  # noqa: ANN001
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(path.with_suffix(f".{ext}"), dpi=150)
    _plt().close(fig)


def interval_estimates(estimates: dict[str, dict[str, tuple[float, float, float]]], scale: float, label: str,
                       path: Path) -> None:
    """One panel per metric: point and 95% CI per method (rliable's usual figure)."""
    plt = _plt()
    methods = list(estimates)
    metrics = list(next(iter(estimates.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(methods) + 1.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        for i, method in enumerate(methods):
            point, lo, hi = (v * scale for v in estimates[method][metric])
            ax.barh(i, hi - lo, left=lo, height=0.6, alpha=0.7)
            ax.plot([point, point], [i - 0.3, i + 0.3], color="black")
            ax.plot(point, i, "o", color="black", markersize=3)
        span = [v * scale for m in methods for v in estimates[m][metric][1:]]
        pad = 0.1 * (max(span) - min(span)) or 0.1 * max(abs(max(span)), 1.0)
        ax.set_xlim(min(span) - pad, max(span) + pad)  # bars are sticky: margins() would not apply
        ax.set_yticks(range(len(methods)), methods if metric == metrics[0] else [""] * len(methods))
        ax.set_title(metric.upper() if metric in ("iqm", "og") else metric.capitalize())
        ax.set_xlabel(label)
    _save(fig, path)


def performance_profiles(matrices: dict[str, np.ndarray], label: str, path: Path) -> None:
    """Fraction of runs x tasks with score > tau, against tau."""
    plt = _plt()
    values = np.concatenate([m.ravel() for m in matrices.values()])
    taus = np.linspace(min(0.0, values.min()), max(values.max(), 1.0), 201)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, m in matrices.items():
        ax.plot(taus, [(m > t).mean() for t in taus], label=method)
    ax.set_xlabel(f"{label} (tau)")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.legend(fontsize=7)
    _save(fig, path)


def probability_of_improvement(matrices: dict[str, np.ndarray], path: Path) -> None:
    """P(X > Y) for every pair of methods with the same tasks (rliable's Mann-Whitney estimate)."""
    from rliable import metrics

    plt = _plt()
    methods = list(matrices)
    prob = np.full((len(methods), len(methods)), np.nan)
    for i, x in enumerate(methods):
        for j, y in enumerate(methods):
            if i != j and matrices[x].shape[1] == matrices[y].shape[1]:
                prob[i, j] = metrics.probability_of_improvement(matrices[x], matrices[y])
    fig, ax = plt.subplots(figsize=(1.0 * len(methods) + 3, 0.8 * len(methods) + 2))
    im = ax.imshow(prob, vmin=0, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=7)
    ax.set_xlabel("Y")
    ax.set_ylabel("X")
    ax.set_title("P(X > Y)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)
