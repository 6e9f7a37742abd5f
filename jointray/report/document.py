"""A report as data (sections of headings, notes, tables and figures) and its rendering to one HTML file.

The HTML is self-contained: every figure is embedded as a base64 PNG (the PNG files stay beside it
for slides and papers), and the page needs no server, script or network. A table cell that shows a
figure from ``summary.json`` carries its key (``data-metric``), and every such number also goes to
``<report>.json``, so what the page says can be checked against what ``evaluate`` measured.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jinja2

from jointray.report.figures import SavedFigure

DISCLAIMER = ("jointray is research software. Its predictions are not a diagnosis and must not be used for clinical "
              "decisions; a qualified person reviews every case.")


def number(value: float | None, digits: int = 4) -> str:
    """``value`` to ``digits`` decimals; "n/a" for a missing or non-finite one."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


@dataclass
class Cell:
    text: str
    key: str | None = None  # the number's name in summary.json / <report>.json
    link: str | None = None  # an anchor in the page
    text_cell: bool = False  # left-aligned words, not a number


@dataclass
class Block:
    kind: str  # heading, note, warning, table, figure
    text: str = ""
    anchor: str | None = None
    caption: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[Cell]] = field(default_factory=list)
    figure: SavedFigure | None = None


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, anchor: str | None = None) -> None:
        self.blocks.append(Block("heading", text=text, anchor=anchor))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text=text))

    def warning(self, text: str) -> None:
        self.blocks.append(Block("warning", text=text))

    def table(self, columns: list[str], rows: list[list[Cell]], caption: str = "") -> None:
        self.blocks.append(Block("table", columns=columns, rows=rows, caption=caption))

    def figure(self, figure: SavedFigure, anchor: str | None = None) -> None:
        self.blocks.append(Block("figure", figure=figure, caption=figure.caption, anchor=anchor))


@dataclass
class Document:
    title: str
    meta: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    numbers: dict[str, float | None] = field(default_factory=dict)  # every keyed number shown

    def value(self, key: str, value: float | None, digits: int = 4) -> Cell:
        """A table cell showing ``value`` under ``key``, recorded in :attr:`numbers`."""
        finite = value is not None and math.isfinite(value)
        self.numbers[key] = float(value) if finite else None
        return Cell(number(value, digits), key=key)

    @property
    def figures(self) -> list[SavedFigure]:
        return [b.figure for s in self.sections for b in s.blocks if b.figure is not None]


def to_html(document: Document) -> str:
    """The page, figures embedded."""
    template = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
        resources.files("jointray.report").joinpath("templates/report.html").read_text())
    sections = []
    for section in document.sections:
        blocks = []
        for block in section.blocks:
            entry = {"kind": block.kind, "text": block.text, "anchor": block.anchor, "caption": block.caption,
                     "columns": block.columns, "rows": block.rows}
            if block.figure is not None:
                entry |= {"data": base64.b64encode(block.figure.data).decode("ascii"),
                          "width": block.figure.width, "height": block.figure.height}
            blocks.append(entry)
        sections.append({"anchor": section.anchor, "title": section.title, "blocks": blocks})
    return template.render(title=document.title, meta=document.meta, sections=sections, disclaimer=DISCLAIMER)


def render(document: Document, path: Path) -> Path:
    """Write ``document`` to ``path`` (HTML, figures embedded) and its numbers to ``path`` with ``.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_html(document))
    figures = [{"path": str(f.path) if f.path else None, "width": f.width, "height": f.height, "caption": f.caption}
               for f in document.figures]
    path.with_suffix(".json").write_text(json.dumps({"numbers": document.numbers, "figures": figures}, indent=2) + "\n")
    return path
