"""Helpers the report tests share: render a run directory and read its text."""

from __future__ import annotations

import html as htmllib
import re

from reports.render import render_report


def render(run_dir):
    result = render_report(run_dir)
    return result.html_path.read_text(), result.md_path.read_text()


def text_of(page: str) -> str:
    return htmllib.unescape(re.sub(r"<[^>]+>", "", page))


def section(md: str, heading: str) -> str:
    """The Markdown from a heading line to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = md.index(heading + "\n") if heading + "\n" in md else md.index(heading)
    rest = md[start + len(heading):]
    nxt = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: nxt.start()] if nxt else rest
