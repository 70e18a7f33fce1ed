"""The report's two jinja2 environments (HTML autoescaped, Markdown escaped by ``finalize``)
and the Markdown of one block; apart from rendering so that a page of blocks (the validation
card's, a notebook's) needs no run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

TEMPLATES = Path(__file__).resolve().parent / "templates"


class Raw(str):
    """Markdown text that must not be escaped (inside code spans and fenced blocks)."""


def md_escape(value: object) -> str:
    """Neutralise HTML in Markdown text (viewers render raw HTML) and keep table pipes literal."""
    if isinstance(value, Raw):
        return value
    text = "" if value is None else str(value)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def md_code(text: object, in_table: bool = False) -> Raw:
    """A code span whose fence is longer than any backtick run inside it."""
    text = str(text).replace("\n", " ")
    if in_table:
        text = text.replace("|", "\\|")
    runs = [len(m) for m in re.findall(r"`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return Raw(f"{fence}{pad}{text}{pad}{fence}")


def md_fence(text: object) -> Raw:
    text = str(text)
    runs = [len(m) for m in re.findall(r"`+", text)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return Raw(f"{fence}\n{text.rstrip()}\n{fence}")


def md_cell(text: object) -> Raw:
    return Raw(md_escape(str(text).replace("\n", " ")))


def _kind(block: object) -> str:
    return type(block).__name__.lower()


def environments() -> tuple[Environment, Environment]:
    """(html, markdown) environments. HTML autoescapes everything; Markdown escapes every output
    through ``finalize`` unless a filter marked it Raw."""
    common = {"loader": FileSystemLoader(TEMPLATES), "undefined": StrictUndefined, "trim_blocks": True,
              "lstrip_blocks": True, "keep_trailing_newline": True}
    html = Environment(autoescape=True, **common)
    md = Environment(autoescape=False, finalize=md_escape, **common)
    for env in (html, md):
        env.filters["kind"] = _kind
    md.filters.update(code=md_code, fence=md_fence, cell=md_cell, raw=Raw)
    return html, md


def block_markdown(block: Any) -> str:
    """A block as the report's Markdown (figures as a reference line)."""
    macros: Any = environments()[1].get_template("blocks.md.j2").module
    return str(macros.block(block))
