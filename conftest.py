"""pytest entry point: options, seeds, and the session fixtures (in fixtures/plugin.py)."""

pytest_plugins = ["fixtures.plugin"]
