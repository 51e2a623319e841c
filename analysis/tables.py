"""Tables as CSV, Markdown and LaTeX (booktabs) from one DataFrame of already formatted strings."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


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
