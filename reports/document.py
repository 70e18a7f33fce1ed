"""The write-up as data: sections of paragraphs, tables, lists and figures.

Both report.html and report.md are rendered from one :class:`Document`, so they carry the
same text by construction. Text is plain ``str`` everywhere (the HTML template escapes it,
the Markdown one neutralises markup); only figures carry ready HTML (``markupsafe.Markup``)
that the figure builders made from escaped pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from markupsafe import Markup


@dataclass(frozen=True, kw_only=True)
class Span:
    """A run of text, optionally a link (``href`` is always an in-page ``#anchor``), bold or code.

    ``title`` is a tooltip in the HTML (e.g. a full hash behind its short form); Markdown has none.
    """

    text: str
    href: str | None = None
    strong: bool = False
    code: bool = False
    title: str | None = None


Inline = tuple[Span, ...]


def spans(*parts: str | Span) -> Inline:
    return tuple(p if isinstance(p, Span) else Span(text=str(p)) for p in parts)


@dataclass(frozen=True, kw_only=True)
class Paragraph:
    parts: Inline
    css: str = ""  # e.g. "refuted" or "warning": styling only, the words carry the meaning


@dataclass(frozen=True, kw_only=True)
class Bullets:
    items: tuple[Inline, ...]


@dataclass(frozen=True, kw_only=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Inline, ...], ...]
    css: str = ""
    row_css: tuple[str, ...] = ()  # per row (e.g. the verdict status), styling only
    dom_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Missing:
    """A result the run did not record: shown where its figure or table would have been."""

    result: str
    text: str


@dataclass(frozen=True, kw_only=True)
class Figure:
    dom_id: str
    title: str
    caption: Inline
    html: Markup
    kind: str = "plotly"  # plotly | svg | html: what the browser check expects inside
    source: Any = field(default=None, compare=False, repr=False)  # the plotly Figure, for notebooks


@dataclass(frozen=True, kw_only=True)
class Preformatted:
    text: str


Block = Union[Paragraph, Bullets, Table, Missing, Figure, Preformatted]


@dataclass(frozen=True, kw_only=True)
class Section:
    dom_id: str
    title: str
    blocks: tuple[Block, ...] = ()
    level: int = 2
    children: tuple["Section", ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class Document:
    title: str
    run_key: str
    sections: tuple[Section, ...]


def para(*parts: str | Span, css: str = "") -> Paragraph:
    return Paragraph(parts=spans(*parts), css=css)


def cell(*parts: str | Span) -> Inline:
    return spans(*parts)


def table(headers: tuple[str, ...] | list[str], rows: list[tuple[Inline | str, ...]], *, css: str = "",
          row_css: tuple[str, ...] = (), dom_id: str = "") -> Table:
    norm = tuple(tuple(c if isinstance(c, tuple) else spans(str(c)) for c in row) for row in rows)
    return Table(headers=tuple(headers), rows=norm, css=css, row_css=row_css, dom_id=dom_id)


def bullets(items: list[Inline | str]) -> Bullets:
    return Bullets(items=tuple(i if isinstance(i, tuple) else spans(i) for i in items))


def inline_text(parts: Inline) -> str:
    return "".join(p.text for p in parts)


def all_figures(doc: Document) -> list[Figure]:
    out: list[Figure] = []

    def walk(section: Section) -> None:
        out.extend(b for b in section.blocks if isinstance(b, Figure))
        for child in section.children:
            walk(child)

    for s in doc.sections:
        walk(s)
    return out


def missing(result: str, reason: str | None = None) -> Missing:
    """``missing: phase 3 did not record phase3/heads`` (or why its file could not be read)."""
    from reports.fmt import phase_of

    text = f"missing: {phase_of(result)} did not record {result}"
    if reason:
        text = f"missing: {result} was recorded by {phase_of(result)} but cannot be read ({reason})"
    return Missing(result=result, text=text)
