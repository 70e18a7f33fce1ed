"""The report's side of the pytest session: tests marked ``report`` run last, and the run's
report is rendered when the session ends (unless ``--no-refusal-report``).

Registered in the root ``conftest.py`` after ``fixtures.plugin``, which chooses the run
directory and folds xdist workers' manifests into it before this renders.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.plugin import CONFIG_KEY, RUN_DIR_KEY
from reports.session import report_at_session_end


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``report`` read what the phases recorded in this session, so they run last
    (a stable sort: every other test keeps its order)."""
    items.sort(key=lambda item: item.get_closest_marker("report") is not None)


@pytest.hookimpl(trylast=True)  # after fixtures.plugin's sessionfinish has merged the workers' manifests
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """report.html/report.md of this run, on the controller, when a test recorded one; printed, never
    raised (reports.session), so the tests' results stand. A unit-test session records no run."""
    if getattr(session.config, "workerinput", None) is not None:
        return
    run_dir = session.config.stash.get(RUN_DIR_KEY, None)
    config = session.config.stash.get(CONFIG_KEY, None)
    if run_dir is None or config is None or not config.report or not (Path(run_dir) / "manifest.json").exists():
        return
    report_at_session_end(Path(run_dir), session.config.pluginmanager.get_plugin("terminalreporter"))
