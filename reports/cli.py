"""Command line: render the report of one run directory (default: the latest run).

    python -m reports                      latest run of the configured model (pyproject), else of any model
    python -m reports runs/organism/<id>   that run
    python -m reports RUN_DIR --force      replace a report stamped by another run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fixtures.recording import RUNS_ROOT, latest_run_dir


def default_run_dir(root: Path = RUNS_ROOT) -> Path | None:
    """The latest run of the model configured in pyproject.toml; else the newest run of any model."""
    from fixtures.config import ConfigError, resolve
    from fixtures.models import model_alias
    from fixtures.storage import REPO_ROOT

    try:
        alias = model_alias(resolve({}, pyproject=REPO_ROOT / "pyproject.toml").model)
    except (ConfigError, ValueError, OSError):
        alias = None
    if alias is not None and (found := latest_run_dir(alias, root=root)) is not None:
        return found
    candidates = [latest_run_dir(d.name, root=root) for d in sorted(root.glob("*")) if d.is_dir()] if root.exists() else []
    candidates = [c for c in candidates if c is not None]
    # run ids start with a UTC stamp, so the newest run sorts last across models too
    return max(candidates, key=lambda p: p.name) if candidates else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reports",
        description="Render report.html (self-contained, offline) and report.md into a run directory, from that "
                    "directory's manifest.json and results/ only.")
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="run directory (runs/<model>/<run-id>); default: the latest run of the configured "
                             "model, else the newest run under runs/")
    parser.add_argument("--runs-root", type=Path, default=RUNS_ROOT, help=f"where runs live (default: {RUNS_ROOT})")
    parser.add_argument("--force", action="store_true",
                        help="replace a report.html/report.md that was made from a different run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from reports.context import RunDirError
    from reports.render import ReportConflictError, render_report

    run_dir = args.run_dir or default_run_dir(args.runs_root)
    if run_dir is None:
        print(f"no run directory with a manifest.json under {args.runs_root}; run ./suite main first "
              "or pass RUN_DIR", file=sys.stderr)
        return 2
    try:
        result = render_report(run_dir, force=args.force)
    except (RunDirError, ReportConflictError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = f"; missing: {', '.join(result.missing)}" if result.missing else ""
    print(f"wrote {result.html_path} ({result.html_bytes / 1e6:.2f} MB, {result.figures} figures) and "
          f"{result.md_path.name} in {result.seconds:.1f} s; run status {result.status}{missing}")
    return 0
