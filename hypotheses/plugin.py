"""The hypotheses' side of the pytest session: recording verdicts, and listing them at the end.

Registered in the root ``conftest.py`` after ``fixtures.plugin``, whose ``recorder`` and
``refusal_config`` fixtures it uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures.config import RefusalConfig
from fixtures.plugin import RUN_DIR_KEY
from hypotheses.verdicts import Verdict


@pytest.fixture
def record_verdict(request: pytest.FixtureRequest, recorder, refusal_config: RefusalConfig):
    """Record a hypothesis verdict; in ``--refusal-verdicts strict`` a non-supported one fails the test."""

    def record(verdict: Verdict) -> Verdict:
        name = f"verdicts/{verdict.claim}--{verdict.evidence or 'overall'}"
        recorder.save(name, numbers={"test": request.node.nodeid}, verdict=verdict.to_dict())
        if refusal_config.verdicts == "strict" and verdict.status != "supported":
            pytest.fail(f"{verdict.claim} [{verdict.evidence}] is {verdict.status.upper()} (strict verdicts): "
                        f"{verdict.summary}", pytrace=False)
        return verdict

    return record


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """List every verdict of this run, loudly, whatever the exit status."""
    run_dir = Path(config.stash.get(RUN_DIR_KEY, ""))
    files = sorted((run_dir / "results").glob("verdicts_*.json")) if (run_dir / "results").is_dir() else []
    if not files:
        return
    terminalreporter.section("refusal-circuits verdicts")
    for path in files:
        v = json.loads(path.read_text())["verdict"]
        colour = {"supported": {"green": True}, "refuted": {"red": True}}.get(v["status"], {"yellow": True})
        terminalreporter.write(f"{v['status'].upper():>12}  ", bold=True, **colour)
        numbers = v.get("numbers") or {}
        power = ""
        if numbers.get("n") is not None and numbers.get("min_detectable_effect") is not None:
            power = (f" [n = {numbers['n']} ({numbers.get('split', '')}) detects >= "
                     f"{numbers['min_detectable_effect']:.3g}; bar {numbers.get('bar')}]")
        terminalreporter.write_line(f"{v['claim']} [{v['evidence'] or 'overall'}]: {v['summary']}{power}")
    terminalreporter.write_line(f"run directory: {run_dir}")
