"""Render a run directory's report.html and report.md, atomically, never over another run's report.

The HTML is one self-contained file: CSS and plotly.js are inlined (plotly.js once, only
when a figure needs it), every figure is a div or an inline SVG, and a Content Security
Policy forbids the page from fetching anything, so it opens offline and a stray external
reference fails loudly in the browser check instead of silently needing a network.

Each report is stamped with its run's identity (context.run_key). Re-rendering a run
replaces its own report; a report stamped by a different run (a copied directory, a
misdirected --run-dir) is not overwritten unless ``force`` is given.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup

from fixtures.storage import atomic_write_bytes
from reports.context import RunContext, load_run
from reports.document import Document, all_figures
from reports.plots import PLOT_CONFIG
from reports.templating import TEMPLATES, environments

HTML_NAME, MD_NAME = "report.html", "report.md"
_HTML_KEY = re.compile(r'<meta name="refusal-run" content="([^"]*)"')
_MD_KEY = re.compile(r"<!-- refusal-run: ([^ ]*) -->")


class ReportConflictError(RuntimeError):
    """The run directory holds a report made from a different run."""


@dataclass(frozen=True, kw_only=True)
class RenderResult:
    html_path: Path
    md_path: Path
    html_bytes: int
    md_bytes: int
    seconds: float
    figures: int
    missing: tuple[str, ...]
    status: str


def _plotly_js() -> Markup:
    from plotly.offline import get_plotlyjs

    return Markup(get_plotlyjs())


def render_strings(doc: Document, ctx: RunContext) -> tuple[str, str]:
    html_env, md_env = environments()
    needs_plotly = any(f.kind == "plotly" for f in all_figures(doc))
    css = Markup((TEMPLATES / "style.css").read_text())
    html = html_env.get_template("report.html.j2").render(doc=doc, ctx=ctx, css=css,
                                                           plotly_js=_plotly_js() if needs_plotly else None,
                                                           plot_config=Markup(json.dumps(PLOT_CONFIG)))
    md = md_env.get_template("report.md.j2").render(doc=doc, ctx=ctx)
    return html, md


def stamped_key(path: Path) -> str | None:
    """The run identity a report file was made for; '' when it carries none (not ours)."""
    if not path.exists():
        return None
    head = path.read_text(errors="replace")[:4096]
    found = (_HTML_KEY if path.suffix == ".html" else _MD_KEY).search(head)
    return found.group(1) if found else ""


def check_ownership(run_dir: Path, run_key: str) -> None:
    for name in (HTML_NAME, MD_NAME):
        key = stamped_key(run_dir / name)
        if key is not None and key != run_key:
            owner = f"run {key}" if key else "no recorded run"
            raise ReportConflictError(
                f"{run_dir / name} is the report of {owner}, not of this run ({run_key}); it was not overwritten. "
                "Render into the right run directory, or pass --force to replace it.")


def render_report(run_dir: Path | str, *, force: bool = False) -> RenderResult:
    """Render ``run_dir``'s report.html and report.md from that directory alone."""
    start = time.perf_counter()
    ctx = load_run(run_dir)
    if not force:
        check_ownership(ctx.run_dir, ctx.run_key)
    from reports.write_up import build_document

    doc = build_document(ctx)
    html, md = render_strings(doc, ctx)
    html_bytes, md_bytes = html.encode(), md.encode()
    atomic_write_bytes(ctx.run_dir / HTML_NAME, html_bytes)
    atomic_write_bytes(ctx.run_dir / MD_NAME, md_bytes)
    return RenderResult(html_path=ctx.run_dir / HTML_NAME, md_path=ctx.run_dir / MD_NAME, html_bytes=len(html_bytes),
                        md_bytes=len(md_bytes), seconds=round(time.perf_counter() - start, 3),
                        figures=len(all_figures(doc)), missing=ctx.missing, status=ctx.status)
