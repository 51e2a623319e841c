"""A grid's ablation table: one row per cell (swept value or variant), its aggregate metrics, and the
probability of improvement over the grid's `default` configuration (docs/analysis.md, ablation tables).

Cells come from the grid file (mowbench/conf/grid/<name>.yaml) exactly as `mowbench.grid` names their
results methods. For a grid with one swept key, methods found in the results with the same key but a value
the file does not list (a sweep changed on the command line, e.g. agent.n_clusters=[3,24]) are rows too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from mowbench.analysis.metrics import improvement_intervals
from mowbench.analysis.scores import AnalysisError
from mowbench.analysis.tables import interval_text, metric_label


@dataclasses.dataclass
class Cell:
    label: str  # the swept value(s) or the variant, e.g. n_clusters=3, no_task_loss
    method: str  # results method, e.g. mow-n_clusters=3
    default: bool
    order: Any  # sort key: the swept value when numeric


def sort_key(value: Any, position: int) -> tuple:
    """Cells with a numeric swept value sort by it, the others keep their grid-file position, after them."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return (0, value) if numeric else (1, position)


def load_cells(name: str) -> tuple[list[Cell], str, dict[str, Any]]:
    """The grid's cells and the name of what it sweeps; an unknown grid is a one-line error."""
    from mowbench import experiments

    try:
        spec = experiments.load_grid(name)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    out = []
    for i, (point, variant, defining) in enumerate(experiments.cells(spec)):
        try:
            _, method = experiments.cell_method(spec, [], point, variant, defining)
        except ValueError as err:
            raise AnalysisError(f"grid {name}: {err}") from None
        label = variant or ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
        value = next(iter(point.values())) if len(point) == 1 and not variant else None
        out.append(Cell(label, method, experiments.is_default(spec, point, variant), sort_key(value, i)))
    swept = [k.split(".")[-1] for k in spec.get("axes") or {}] + (["variant"] if spec.get("variants") else [])
    return out, ", ".join(swept) or "cell", spec


def extra_cells(cells: list[Cell], spec: dict[str, Any], methods: list[str]) -> list[Cell]:
    """Methods of the results that are further values of a one-key grid's swept key."""
    axes = spec.get("axes") or {}
    if len(axes) != 1 or spec.get("variants") or not cells:
        return []
    key = next(iter(axes)).split(".")[-1]
    prefix = cells[0].method.rsplit(f"-{key}=", 1)[0] + f"-{key}="
    known = {c.method for c in cells}
    out = []
    for method in methods:
        raw = method[len(prefix):]
        if method.startswith(prefix) and method not in known and "-" not in raw:
            try:
                value: Any = float(raw) if "." in raw else int(raw)
            except ValueError:
                value = None
            out.append(Cell(f"{key}={raw}", method, False, sort_key(value, len(cells) + len(out))))
    return out


def grid_table(name: str, matrices: dict[str, np.ndarray], estimates: dict[str, dict[str, tuple]], scale: float,
               reps: int, seed: int) -> tuple[pd.DataFrame, list[dict[str, Any]], str, list[str]]:
    """(formatted table, rows for the ablation plot, swept name, notes)."""
    cells, swept, spec = load_cells(name)
    cells = sorted(cells + extra_cells(cells, spec, list(matrices)), key=lambda c: c.order)
    notes = [f"grid {name}: no results for {c.method} ({c.label})" for c in cells if c.method not in matrices]
    default = next((c for c in cells if c.default), None)
    pairs = {}
    if default is None:
        notes.append(f"grid {name}: the grid file names no default cell; no probability of improvement")
    elif default.method not in matrices:
        notes.append(f"grid {name}: the default cell {default.method} has no results; no probability of improvement")
    else:
        base = matrices[default.method]
        for c in cells:
            if c is default or c.method not in matrices:
                continue
            if matrices[c.method].shape[1] != base.shape[1]:
                notes.append(f"grid {name}: {c.method} has other tasks than the default; no probability of improvement")
                continue
            pairs[c.method] = (matrices[c.method], base)
    improvement = improvement_intervals(pairs, reps=reps, seed=seed) if pairs else {}
    unit = " (%)" if scale == 100.0 else ""
    records, rows = [], []
    for c in cells:
        est = estimates.get(c.method)
        record = {swept: c.label + (" (default)" if c.default else ""), "method": c.method,
                  "runs": len(matrices[c.method]) if c.method in matrices else 0}
        for metric in ("iqm", "mean", "median", "og"):
            record[f"{metric_label(metric)}{unit}"] = "–" if est is None else interval_text(*est[metric], scale)
        poi = improvement.get(c.method)
        record["P(> default)"] = interval_text(*poi, digits=2) if poi else "–"
        records.append(record)
        rows.append({"label": c.label, "method": c.method, "default": c.default, "estimates": est})
    return pd.DataFrame(records).set_index(swept), rows, swept, notes
