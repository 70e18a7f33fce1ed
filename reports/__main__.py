"""``python -m reports [RUN_DIR]``: render a run directory's report (see reports/cli.py)."""

from reports.cli import main

raise SystemExit(main())
