"""The end-of-session hook's side: render the session's run report and say what happened.

reports/plugin.py calls :func:`report_at_session_end` from ``pytest_sessionfinish`` on the
controller, after worker manifests are merged. It never raises: a report that cannot be
rendered is announced in red with its error, and the session keeps the exit status its
tests earned (a broken reporter fails the report's own unit tests instead).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any


def report_at_session_end(run_dir: Path, terminal: Any | None) -> bool:
    """Render ``run_dir``'s report; True when it was written. ``terminal`` is pytest's terminal reporter."""

    def say(text: str, **markup: bool) -> None:
        if terminal is not None:
            terminal.write_line(text, **markup)
        else:
            print(text)

    try:
        from reports.render import render_report

        result = render_report(run_dir)
    except Exception as err:  # noqa: BLE001 - the report must never hide the tests' outcome
        say(f"refusal-circuits report: NOT rendered for {run_dir}: {type(err).__name__}: {err}", red=True, bold=True)
        for line in traceback.format_exception(err)[-4:]:
            say(line.rstrip(), red=True)
        return False
    missing = f", {len(result.missing)} result(s) missing" if result.missing else ""
    say(f"refusal-circuits report: {result.html_path} ({result.html_bytes / 1e6:.1f} MB, {result.figures} figures"
        f"{missing}; run {result.status}) and {result.md_path.name}", green=not result.missing, yellow=bool(result.missing))
    return True
