"""Tables as CSV, Markdown and LaTeX (booktabs) from one DataFrame of already formatted strings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd


def interval_text(point: float, lower: float, upper: float, scale: float = 1.0, digits: int = 1) -> str:
    """'point [lower, upper]' of an estimate and its interval, scaled (e.g. to percent)."""
    return f"{point * scale:.{digits}f} [{lower * scale:.{digits}f}, {upper * scale:.{digits}f}]"


def metric_label(metric: str) -> str:
    """Display name of an aggregate metric: IQM, OG, Mean, Median."""
    return metric.upper() if metric in ("iqm", "og") else metric.capitalize()


def cells(table: pd.DataFrame, bold: pd.DataFrame | None, mark: Callable[[str], str],
          escape: Callable[[str], str] = str) -> list[list[str]]:
    """The table's rows as escaped strings (index first), `mark` applied to the cells `bold` flags."""
    flags = np.zeros(table.shape, dtype=bool) if bold is None else bold.reindex_like(table).fillna(False).to_numpy()
    return [[escape(str(i)), *(mark(escape(str(v))) if f else escape(str(v)) for v, f in zip(row, flag, strict=True))]
            for i, row, flag in zip(table.index, table.to_numpy(), flags, strict=True)]


def markdown(table: pd.DataFrame, bold: pd.DataFrame | None = None) -> str:
    """A Markdown table; cells flagged in `bold` (same shape, bool) in **bold**."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells(table, bold, lambda x: f"**{x}**")]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def latex(table: pd.DataFrame, bold: pd.DataFrame | None = None, rules: tuple[int, ...] = ()) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); cells flagged in `bold` in \\textbf; a \\midrule
    before each row index in `rules` (e.g. between per-game and aggregate rows)."""
    cols = "l" + "r" * len(table.columns)
    header = " & ".join(_tex(str(c)) for c in [table.index.name or "", *table.columns])
    body = [(r"\midrule" + "\n" if k in rules else "") + " & ".join(row) + r" \\"
            for k, row in enumerate(cells(table, bold, lambda x: rf"\textbf{{{x}}}", _tex))]
    return "\n".join([rf"\begin{{tabular}}{{{cols}}}", r"\toprule", header + r" \\", r"\midrule", *body,
                      r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_table(table: pd.DataFrame, out: Path, name: str, bold: pd.DataFrame | None = None,
                rules: tuple[int, ...] = ()) -> str:
    """Write <name>.csv, <name>.md and <name>.tex; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv")
    md = markdown(table, bold)
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.tex").write_text(latex(table, bold, rules))
    return md


def atari_layout(final: pd.DataFrame, iqm: dict[str, float], methods: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Atari 100k papers' table: the games as rows and `methods` as columns (raw score, mean over runs), then
    Mean and Median HNS (%, over games of the per-game mean over runs: all runs), IQM HNS (%, the bootstrap's
    point `iqm`) and the number of superhuman games (per-game mean HNS >= 1: at least human, as IRIS counts its
    10 of 26). Returns the formatted table and the best cell(s) of every row (the highest: every Atari score is
    better higher)."""
    raw = final.groupby(["task", "method"])["score"].mean().unstack("method").reindex(columns=methods)  # (games, M)
    hns = final.groupby(["task", "method"])["hns"].mean().unstack("method").reindex(columns=methods)
    summary = pd.DataFrame({"Mean HNS (%)": hns.mean() * 100, "Median HNS (%)": hns.median() * 100,
                            "IQM HNS (%)": pd.Series(iqm).reindex(methods) * 100,
                            "Superhuman games": (hns >= 1).sum().where(hns.notna().any())}).T
    values = pd.concat([raw, summary])
    values.index.name = "game"
    best = values.eq(values.max(axis=1), axis=0)
    text = values.map(lambda v: "–" if pd.isna(v) else f"{v:.1f}")
    text.loc["Superhuman games"] = values.loc["Superhuman games"].map(lambda v: "–" if pd.isna(v) else f"{v:.0f}")
    return text, best
