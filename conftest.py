"""pytest entry point: the suite's three plugins, lowest layer first.

fixtures.plugin: options, seeds, the session fixtures and the run's status; hypotheses.plugin:
recording verdicts and listing them; reports.plugin: the ``report`` tests last and the run's
report at the end.
"""

pytest_plugins = ["fixtures.plugin", "hypotheses.plugin", "reports.plugin"]
