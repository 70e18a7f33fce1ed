"""The session's report in a real browser (headless Chromium through playwright).

Collected last (marker ``report``), so in CI it opens the report of the run the phases
just recorded. When this session recorded no results (only unit tests ran), it checks a
synthetic complete run instead and says so. It asserts what a reader needs: no console
errors, no network requests, every figure drawn, the verdict table equal to the recorded
verdicts. Size, load time and a screenshot are kept in the run directory, not asserted.
"""

from __future__ import annotations

import json

import pytest

from reports import browser
from hypotheses.verdicts import combine
from reports.context import KNOWN_RESULTS
from reports.render import render_report
from reports.sections_front import STATUS_WORD
from reports.synthetic import build_run

pytestmark = [pytest.mark.report, pytest.mark.browser]


def _has_results(run_dir) -> bool:
    results = run_dir / "results"
    shown = {name.replace("/", "_") for name in KNOWN_RESULTS}
    return results.is_dir() and any(p.stem in shown or p.stem.startswith("verdicts_") for p in results.glob("*.json"))


def recorded_verdicts(run_dir) -> dict[str, str]:
    """Each claim's status read straight from the verdict files (not through the reporter):
    its "overall" line, else the lines combined; claims H1-H3 and C1-C3 always appear."""
    lines: dict[str, list[dict]] = {claim: [] for claim in ("H1", "H2", "H3", "C1", "C2", "C3")}
    for path in sorted((run_dir / "results").glob("verdicts_*.json")):
        verdict = json.loads(path.read_text())["verdict"]
        lines.setdefault(verdict["claim"], []).append(verdict)
    out = {}
    for claim, found in lines.items():
        overall = [v["status"] for v in found if v.get("evidence") in ("", "overall", None)]
        status = overall[0] if overall else combine([v["status"] for v in found]) if found else "missing"
        out[claim] = STATUS_WORD[status]
    return out


def test_report_renders_in_chromium(recorder, capsys):
    reason = browser.available()
    if reason:
        pytest.skip(f"browser check skipped: {reason}")
    target = recorder.run_dir
    note = f"the session's run {target}"
    if not _has_results(target):
        target = build_run(recorder.run_dir / "browser-check")
        note = f"a synthetic complete run at {target} (this session recorded no results to report)"
    result = render_report(target)
    check = browser.check_report(result.html_path, screenshot=target / "report.png")
    (target / "report_browser.json").write_text(check.to_json())
    with capsys.disabled():
        print(f"\nbrowser check of {note}: {check.html_bytes / 1e6:.2f} MB, load event after {check.load_seconds:.2f} s, "
              f"all {len(check.figures)} figures drawn after {check.ready_seconds:.2f} s; screenshot {check.screenshot}")

    assert check.console_errors == [], check.console_errors
    assert check.external_requests == [], "the report fetched something: it must work offline"
    assert len(check.figures) == result.figures
    undrawn = [f["id"] for f in check.figures if f["drawn"] <= 0]
    assert undrawn == [], f"figures that did not render: {undrawn}"
    shown = {row["claim"]: row["verdict"] for row in check.verdicts}
    assert shown == recorded_verdicts(target)
    for row in check.verdicts:
        assert row["why"].startswith(f"{row['claim']} ")
    assert (target / "report.png").stat().st_size > 0
    assert json.loads((target / "report_browser.json").read_text())["html_bytes"] == result.html_bytes
