"""report.html: every table and figure of one analysis run on one self-contained page (figures embedded as
data URIs, no script, no server: it opens from the file system), with the notes, the command that made it and
the mowbench version (and commit, where the code is a git checkout)."""

from __future__ import annotations

import base64
import datetime
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mowbench import __version__
from mowbench.analysis.tables import cells

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; }
tr.rule td { border-top: 2px solid #444; }
img { max-width: 100%; margin: 0.5em 0 1.5em; }
.caption, .meta { color: #555; font-size: 13px; }
.scroll { overflow-x: auto; }
"""


@dataclass
class Report:
    """Sections in the order added; `write` puts them on one page."""

    title: str
    sections: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # tables' body rows and figures, for the caller's checks

    def table(self, name: str, heading: str, table: pd.DataFrame, bold: pd.DataFrame | None = None,
              caption: str = "", rules: tuple[int, ...] = ()) -> None:
        """A table (its body rows: table's rows; `bold` cells in <strong>; a rule above each row in `rules`)."""
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in [table.index.name or "", *table.columns])
        body = "".join(
            ('<tr class="rule">' if k in rules else "<tr>") + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
            for k, row in enumerate(cells(table, bold, lambda x: f"<strong>{x}</strong>", html.escape)))
        self.sections.append(
            f'<h2 id="{name}">{html.escape(heading)}</h2>' + self._caption(caption)
            + f'<div class="scroll"><table class="data" data-name="{name}" data-rows="{len(table)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        self.counts[name] = len(table)

    def figure(self, name: str, heading: str, png: Path, caption: str = "") -> None:
        """A PNG embedded as a data URI (the page needs no file beside it)."""
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        self.sections.append(f'<h2 id="{name}">{html.escape(heading)}</h2>' + self._caption(caption)
                             + f'<img class="figure" data-name="{name}" alt="{html.escape(heading)}" '
                             f'src="data:image/png;base64,{data}">')
        self.counts[name] = 1

    @staticmethod
    def _caption(text: str) -> str:
        return f'<p class="caption">{html.escape(text)}</p>' if text else ""

    def render(self, command: str, notes: list[str], commit: str | None = None) -> str:
        made = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        version = f"mowbench {__version__}" + (f" (commit {commit})" if commit else "")
        index = "".join(f'<li><a href="#{n}">{html.escape(n)}</a></li>' for n in self.counts)
        note_list = "".join(f"<li>{html.escape(n)}</li>" for n in notes) or "<li>none</li>"
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>"
                f'<p class="meta">Made by <code>{html.escape(command)}</code> with {html.escape(version)}, '
                f"{made}.</p><ul>{index}</ul>" + "".join(self.sections)
                + f'<h2 id="notes">Notes</h2><ul class="notes">{note_list}</ul></body></html>\n')
