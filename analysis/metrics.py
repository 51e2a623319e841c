"""Aggregate metrics over (runs x tasks) score matrices, and their rliable stratified-bootstrap intervals."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import scipy.stats


def mean(scores: np.ndarray) -> float:
    """Mean over tasks of the per-task mean over runs (the papers' "mean HNS")."""
    return float(np.mean(np.mean(scores, axis=0)))


def median(scores: np.ndarray) -> float:
    """Median over tasks of the per-task mean over runs."""
    return float(np.median(np.mean(scores, axis=0)))


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean: mean of all run x task scores after dropping the bottom and top 25%."""
    return float(scipy.stats.trim_mean(scores, proportiontocut=0.25, axis=None))


def optimality_gap(scores: np.ndarray, gamma: float = 1.0) -> float:
    """Mean over all run x task scores of gamma - min(score, gamma)."""
    return float(gamma - np.mean(np.minimum(scores, gamma)))


METRICS: dict[str, Callable[[np.ndarray], float]] = {"mean": mean, "median": median, "iqm": iqm,
                                                    "og": optimality_gap}


def interval_estimates(matrices: dict[str, np.ndarray], reps: int = 50_000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per method and metric: (point, lower, upper) with rliable's stratified bootstrap.

    rliable 1.2.0 draws from numpy's *global* RNG even when given a RandomState, so the global RNG is
    seeded right before the call (and restored after) to make the intervals reproducible."""
    from rliable import library

    def all_metrics(x: np.ndarray) -> np.ndarray:
        return np.array([fn(x) for fn in METRICS.values()])

    saved = np.random.get_state()
    try:
        np.random.seed(seed)
        with warnings.catch_warnings():  # arch 7.2 deprecates the RandomState rliable 1.2.0 passes it
            warnings.simplefilter("ignore", FutureWarning)
            points, intervals = library.get_interval_estimates(
                matrices, all_metrics, reps=reps, confidence_interval_size=confidence,
                random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(saved)
    return {method: {name: (float(points[method][i]), float(intervals[method][0, i]),
                            float(intervals[method][1, i]))
                     for i, name in enumerate(METRICS)}
            for method in matrices}
