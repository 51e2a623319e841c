"""Small matplotlib helpers that render to PNG bytes (written atomically by the caller); headless."""

from __future__ import annotations

import io

import numpy as np


def heatmap_png(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cbar: str,
                vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> bytes:
    """A labelled heatmap of matrix (len(rows), len(cols)) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
