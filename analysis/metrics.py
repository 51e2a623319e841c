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


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y): mean over tasks of P(x_m > y_m) + P(x_m = y_m) / 2 over all pairs of runs.

    The Mann-Whitney U statistic divided by n_x * n_y, as rliable computes it per task with scipy, in one
    vectorised pass (x: runs_x x tasks, y: runs_y x tasks), so bootstrapping it stays cheap."""
    greater = (x[:, None, :] > y[None, :, :]).mean(axis=(0, 1))
    equal = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return float(np.mean(greater + 0.5 * equal))


def iqm_per_step(cube: np.ndarray) -> np.ndarray:
    """IQM at every evaluation step of a runs x tasks x steps array -> (steps,).

    The same trimming as scipy.stats.trim_mean (int(0.25 n) scores cut at each end), written out because
    it runs once per bootstrap resample."""
    flat = np.sort(cube.reshape(-1, cube.shape[-1]), axis=0)  # (runs * tasks, steps)
    cut = int(0.25 * flat.shape[0])
    return flat[cut:flat.shape[0] - cut].mean(axis=0)


def bootstrap(scores: dict[str, np.ndarray | tuple[np.ndarray, ...]], fn: Callable[..., np.ndarray], reps: int,
              seed: int, confidence: float = 0.95) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per key: (point, lower, upper) of fn with rliable's stratified bootstrap over runs (per task).

    A value that is a tuple of matrices is resampled independently per matrix (for pairwise fns).
    rliable 1.2.0 draws from numpy's *global* RNG even when given a RandomState, so the global RNG is
    seeded right before each key's call (and restored after): intervals are reproducible for a seed, and a
    method's interval does not change when other methods are added to the comparison."""
    from rliable import library

    from mowbench.logger import Ticker

    out = {}
    saved = np.random.get_state()
    ticker = Ticker(f"bootstrap of {getattr(fn, '__name__', 'a metric').strip('<>')} ({reps:,} resamples)", len(scores))
    try:
        for key, value in scores.items():
            np.random.seed(seed)
            with warnings.catch_warnings():  # arch 7.2 deprecates the RandomState rliable 1.2.0 passes it
                warnings.simplefilter("ignore", FutureWarning)
                points, intervals = library.get_interval_estimates(
                    {key: value}, fn, reps=reps, confidence_interval_size=confidence,
                    random_state=np.random.RandomState(seed))
            out[key] = (np.atleast_1d(points[key]), np.atleast_1d(intervals[key][0]),
                        np.atleast_1d(intervals[key][1]))
            ticker.tick()
    finally:
        np.random.set_state(saved)
    return out


def interval_estimates(matrices: dict[str, np.ndarray], reps: int = 50_000, seed: int = 0,
                       confidence: float = 0.95) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per method and metric (mean, median, iqm, og): (point, lower, upper), rliable stratified bootstrap."""

    def all_metrics(x: np.ndarray) -> np.ndarray:
        return np.array([fn(x) for fn in METRICS.values()])

    out = bootstrap(matrices, all_metrics, reps, seed, confidence)
    return {method: {name: (float(p[i]), float(lo[i]), float(hi[i])) for i, name in enumerate(METRICS)}
            for method, (p, lo, hi) in out.items()}


def iqm_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], reps: int = 50_000, seed: int = 0,
               ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per method: (steps, IQM, lower, upper) at every shared evaluation step (sample-efficiency curves)."""
    out = bootstrap({m: cube for m, (_, cube) in curves.items()}, iqm_per_step, reps, seed)
    return {m: (curves[m][0], *out[m]) for m in curves}


def improvement_intervals(pairs: dict[str, tuple[np.ndarray, np.ndarray]], reps: int = 50_000, seed: int = 0,
                          ) -> dict[str, tuple[float, float, float]]:
    """Per named pair (X, Y) with the same tasks: P(X > Y) with its 95% interval."""
    out = bootstrap(pairs, lambda x, y: np.array([probability_of_improvement(x, y)]), reps, seed)
    return {key: (float(p[0]), float(lo[0]), float(hi[0])) for key, (p, lo, hi) in out.items()}
