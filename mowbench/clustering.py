"""MoW's warm-up task clustering (docs/methods/mow.md): per-task gradient vectors, their cosine
similarity, and k-means on the unit sphere; plus the random assignment used by the ablation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def sketch(grad: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """A fixed random projection of one layer's gradient (any shape) to `dim` numbers: a count sketch,
    entry i added with sign s(i) to bucket b(i), both drawn once from `seed` (the same for every task).
    Like a Gaussian projection it preserves inner products in expectation (E[<Pa, Pb>] = <a, b>), at O(n)
    cost and without an n x dim matrix (a paper-size layer has 4M entries). A gradient with at most `dim`
    entries is kept as it is (exact)."""
    flat = grad.detach().float().flatten()
    n = flat.numel()
    if n <= dim:
        return flat
    g = torch.Generator().manual_seed(seed)
    bucket = torch.randint(dim, (n,), generator=g).to(flat.device)
    sign = (torch.randint(2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(flat.device)
    return torch.zeros(dim, device=flat.device).index_add_(0, bucket, flat * sign)


def gradient_vector(grads: list[torch.Tensor], reduce: str = "sketch", dim: int = 256) -> torch.Tensor:
    """One task's gradients (one tensor per parameter tensor, i.e. per layer) -> one vector (docs/methods/mow.md).

    sketch (default): each layer's gradient projected to `dim` numbers (sketch(), seeded by the layer's
    position so every task gets the same projection), scaled to unit length, concatenated: every layer
    weighs the same in the cosine similarity, however large it is, and within a layer the direction of
    the gradient is kept. flat: the same with the whole flattened gradient of each layer (exact, memory
    grows with the model). layer_mean: each layer reduced to the mean of its entries (an earlier reading of
    the paper's "averaged per layer"; it keeps one number per layer and loses almost all of the signal;
    kept for comparison only).
    """
    if reduce == "layer_mean":
        return torch.stack([g.float().mean() for g in grads])
    if reduce == "flat":
        return torch.cat([F.normalize(g.float().flatten(), dim=0) for g in grads])
    if reduce == "sketch":
        return torch.cat([F.normalize(sketch(g, dim, seed=i), dim=0) for i, g in enumerate(grads)])
    raise ValueError(f"cluster_grad_reduce={reduce!r}; allowed: sketch, flat, layer_mean")


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


def kmeans_cosine(vectors: torch.Tensor, k: int, n_init: int = 100, seed: int = 0, select: str = "inertia",
                  iters: int = 100) -> np.ndarray:
    """Cluster rows of (N, D) by cosine similarity into k non-empty groups -> labels (N,).

    k-means on L2-normalised vectors is run `n_init` times; `select` keeps the run with the lowest inertia,
    the k-means objective itself (sum of squared distances to the centres, on unit vectors 2 - 2 cos: the most
    similar grouping), ties broken by the more even group sizes ("inertia", default); or the run with the most
    even group sizes, ties broken by the lower inertia ("even": evenness then overrides similarity).
    """
    n = vectors.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"n_clusters={k}; allowed: 1..{n} (the number of tasks)")
    if select not in ("inertia", "even"):
        raise ValueError(f"cluster_select={select!r}; allowed: inertia, even")
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


def cluster_quality(similarity: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """How similar the grouping is, from the (N, N) cosine similarity matrix and labels (N,):

    silhouette: the mean over tasks of (b - a) / max(a, b) with cosine distance 1 - cos, a = the mean distance
    to the other members of the task's cluster, b = the smallest mean distance to another cluster's members; a
    task alone in its cluster scores 0 (sklearn's convention); None with one cluster or every task alone.
    within: per cluster, the mean cosine similarity over its pairs of distinct tasks (None for one task)."""
    sim = np.asarray(similarity, dtype=np.float64)
    labels = np.asarray(labels)
    n, k = len(labels), int(labels.max()) + 1 if len(labels) else 0
    dist = 1.0 - sim
    within: list[float | None] = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        pairs = [sim[i, j] for i in members for j in members if i < j]
        within.append(float(np.mean(pairs)) if pairs else None)
    silhouette = None
    if 1 < k < n:
        scores = []
        for i in range(n):
            own = np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))
            if len(own) == 0:
                scores.append(0.0)
                continue
            a = dist[i, own].mean()
            b = min(dist[i, labels == c].mean() for c in range(k) if c != labels[i] and np.any(labels == c))
            scores.append(float((b - a) / max(a, b)) if max(a, b) > 0 else 0.0)
        silhouette = float(np.mean(scores))
    return {"silhouette_cosine": silhouette, "within_cluster_cosine": within}


def random_assignment(n_tasks: int, k: int, seed: int) -> np.ndarray:
    """Tasks dealt into k groups of near-equal size in a random order (the `clustering=random` ablation)."""
    if not 1 <= k <= n_tasks:
        raise ValueError(f"n_clusters={k}; allowed: 1..{n_tasks} (the number of tasks)")
    labels = np.arange(n_tasks) % k
    return canonical_labels(np.random.default_rng(seed).permutation(labels))
