"""MoW's warm-up task clustering (spec mow.md section 5): per-task gradient vectors, their cosine
similarity, and k-means on the unit sphere; plus the random assignment used by the ablation."""

from __future__ import annotations

import numpy as np
import torch


def gradient_vector(grads: list[torch.Tensor], reduce: str = "layer_mean") -> torch.Tensor:
    """One task's gradients (one tensor per parameter tensor, i.e. per layer) -> one vector.

    layer_mean: each layer's gradient averaged to one number (mow.md: "averaging within each layer"),
    giving a vector of length n_layers; flat: all gradient entries concatenated.
    """
    if reduce == "layer_mean":
        return torch.stack([g.float().mean() for g in grads])
    if reduce == "flat":
        return torch.cat([g.float().flatten() for g in grads])
    raise ValueError(f"grad_reduce={reduce!r}; allowed: layer_mean, flat")


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) cosine similarities (a zero vector is similar to nothing, itself included)."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    return (unit @ unit.T).float()


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> tuple[np.ndarray, float]:
    """Lloyd's algorithm on unit vectors (cosine distance) with k-means++ seeding; no empty cluster."""
    n = len(x)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: next centre with probability ~ squared distance to the nearest
        d = np.min([np.sum((x - c) ** 2, axis=1) for c in centres], axis=0)
        p = d / d.sum() if d.sum() > 0 else np.full(n, 1.0 / n)
        centres.append(x[rng.choice(n, p=p)])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = ((x[:, None] - c[None]) ** 2).sum(-1)  # (N, k)
        new = dist.argmin(1)
        for j in range(k):  # an empty cluster takes the point farthest from its own centre
            if not np.any(new == j):
                sizes = np.bincount(new, minlength=k)
                movable = np.flatnonzero(sizes[new] > 1)
                far = movable[np.argmax(dist[movable, new[movable]])]
                new[far] = j
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        for j in range(k):
            c[j] = x[labels == j].mean(0)
    inertia = float(((x - c[labels]) ** 2).sum())
    return labels, inertia


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel so clusters are numbered in order of their first task (labels compare across runs)."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(v), len(mapping)) for v in labels], dtype=np.int64)


def kmeans_cosine(vectors: torch.Tensor, k: int, n_init: int = 100, seed: int = 0, select: str = "even",
                  iters: int = 100) -> np.ndarray:
    """Cluster rows of (N, D) by cosine similarity into k non-empty groups -> labels (N,).

    k-means on L2-normalised vectors is run `n_init` times; `select` keeps the run with the most even
    group sizes (ties: lowest inertia), as the public gradient task-grouping reference does ("even"),
    or simply the lowest inertia ("inertia").
    """
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"n_clusters={k}; allowed: 1..{n} (the number of tasks)")
    if select not in ("even", "inertia"):
        raise ValueError(f"cluster_select={select!r}; allowed: even, inertia")
    x = torch.nn.functional.normalize(vectors.double(), dim=1).numpy()
    rng = np.random.default_rng(seed)
    best, best_key = None, None
    for _ in range(n_init):
        labels, inertia = _kmeans_once(x, k, rng, iters)
        spread = float(np.var(np.bincount(labels, minlength=k)))
        key = (spread, round(inertia, 9)) if select == "even" else (round(inertia, 9), spread)
        if best_key is None or key < best_key:
            best, best_key = labels, key
    return canonical_labels(best)


def random_assignment(n_tasks: int, k: int, seed: int) -> np.ndarray:
    """Tasks dealt into k groups of near-equal size in a random order (the `clustering=random` ablation)."""
    if not 1 <= k <= n_tasks:
        raise ValueError(f"n_clusters={k}; allowed: 1..{n_tasks} (the number of tasks)")
    labels = np.arange(n_tasks) % k
    return canonical_labels(np.random.default_rng(seed).permutation(labels))
