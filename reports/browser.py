"""Open a rendered report in headless Chromium and read back what a reader would see.

Used by tests/test_browser_report.py (which asserts on the result) and available to anyone
checking a report by hand. It measures, it does not judge: console errors, whether every
figure drew, the verdict table as the DOM shows it, a screenshot, file size and load time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# Offline and quiet: no first-run, sync, component-update or QUIC traffic from the browser itself.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Evaluated in the page: each figure's kind and whether it holds drawn elements.
_FIGURES_JS = """() => Array.from(document.querySelectorAll('figure.figure')).map(f => {
  const kind = f.dataset.kind, body = f.querySelector('.figure-body');
  let drawn = 0;
  if (kind === 'plotly') {
    const svg = body.querySelector('.main-svg');
    drawn = svg ? body.querySelectorAll('.main-svg *').length + body.querySelectorAll('canvas').length : 0;
  } else if (kind === 'svg') {
    drawn = Array.from(body.querySelectorAll('svg')).reduce((n, s) => Math.min(n, s.childElementCount), 1e9);
    if (!body.querySelector('svg')) drawn = 0;
  } else { drawn = body.childElementCount; }
  return {id: f.id, kind: kind, drawn: drawn};
})"""
_VERDICTS_JS = """() => Array.from(document.querySelectorAll('#verdict-table tbody tr')).map(r =>
  ({claim: r.cells[0].innerText.trim(), verdict: r.cells[2].innerText.trim(), why: r.cells[3].innerText.trim()}))"""
_PLOTLY_READY_JS = """() => Array.from(document.querySelectorAll('.plotly-lazy'))
  .every(d => d.dataset.drawn === 'error' || d.querySelector('.main-svg'))"""


class BrowserUnavailable(RuntimeError):
    """Chromium or python playwright is not installed (the check is skipped, not failed)."""


@dataclass
class BrowserCheck:
    report: str
    html_bytes: int
    load_seconds: float  # navigation until the load event (parsing the inlined plotly.js included)
    ready_seconds: float  # navigation until every Plotly figure (all drawn at once) has its SVG
    console_errors: list[str] = field(default_factory=list)
    figures: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, str]] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    screenshot: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def available() -> str | None:
    """None when the check can run, else why it cannot."""
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401 - only probing that it imports
    except ImportError:
        return "python playwright is not installed (pip install playwright)"
    return None


def check_report(html_path: Path, *, screenshot: Path | None = None, timeout_s: float = 120.0) -> BrowserCheck:
    reason = available()
    if reason:
        raise BrowserUnavailable(reason)
    from playwright.sync_api import sync_playwright

    html_path = Path(html_path).resolve()
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    errors: list[str] = []
    external: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:", "about:"))
                    else external.append(r.url))
            start = time.perf_counter()
            page.goto(html_path.as_uri(), wait_until="load", timeout=timeout_s * 1000)
            loaded = time.perf_counter() - start
            page.evaluate("() => window.renderAllFigures && window.renderAllFigures()")
            page.wait_for_function(_PLOTLY_READY_JS, timeout=timeout_s * 1000)
            ready = time.perf_counter() - start
            figures = page.evaluate(_FIGURES_JS)
            verdicts = page.evaluate(_VERDICTS_JS)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=False)
        finally:
            browser.close()
    return BrowserCheck(report=str(html_path), html_bytes=os.path.getsize(html_path), load_seconds=round(loaded, 3),
                        ready_seconds=round(ready, 3), console_errors=errors, figures=figures, verdicts=verdicts,
                        external_requests=external, screenshot=str(screenshot) if screenshot else None)
