"""Tables as CSV, Markdown and LaTeX (booktabs) from one DataFrame of already formatted strings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def interval_text(point: float, lower: float, upper: float, scale: float = 1.0, digits: int = 1) -> str:
    """'point [lower, upper]' of an estimate and its interval, scaled (e.g. to percent)."""
    return f"{point * scale:.{digits}f} [{lower * scale:.{digits}f}, {upper * scale:.{digits}f}]"


def metric_label(metric: str) -> str:
    """Display name of an aggregate metric: IQM, OG, Mean, Median."""
    return metric.upper() if metric in ("iqm", "og") else metric.capitalize()


def markdown(table: pd.DataFrame) -> str:
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(table.index, table.to_numpy(),
                                                                               strict=True)]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$")):
        text = text.replace(a, b)
    return text


def latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs})."""
    cols = "l" + "r" * len(table.columns)
    header = " & ".join(_tex(str(c)) for c in [table.index.name or "", *table.columns])
    body = [" & ".join(_tex(str(c)) for c in [i, *row]) + r" \\" for i, row in zip(table.index, table.to_numpy(),
                                                                                   strict=True)]
    return "\n".join([rf"\begin{{tabular}}{{{cols}}}", r"\toprule", header + r" \\", r"\midrule", *body,
                      r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_table(table: pd.DataFrame, out: Path, name: str) -> str:
    """Write <name>.csv, <name>.md and <name>.tex; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv")
    md = markdown(table)
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.tex").write_text(latex(table))
    return md
