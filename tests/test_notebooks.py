"""The example notebooks execute (nbclient) against the tiny model, so they cannot rot.

exploration.ipynb runs every instrument once on `tiny`; results.ipynb compiles a run's
figures and tables, here of a small synthetic run directory passed through REFUSAL_RUN_DIR.
Both run from notebooks/, as a reader would open them.
"""

from __future__ import annotations

import time

import pytest

from fixtures.storage import REPO_ROOT
from reports.synthetic import build_run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = REPO_ROOT / "notebooks"


def execute(name: str, monkeypatch, **env: str):
    for key, value in {"OMP_NUM_THREADS": "1", "PLOTLY_RENDERER": "plotly_mimetype", **env}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook, time.perf_counter() - start


def outputs(notebook) -> list[dict]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def test_notebooks_are_stored_without_outputs():
    for name in ("exploration.ipynb", "results.ipynb"):
        assert outputs(nbformat.read(NOTEBOOKS / name, as_version=4)) == [], f"{name}: clear outputs before committing"


def test_exploration_runs_every_instrument_on_tiny(monkeypatch):
    notebook, seconds = execute("exploration.ipynb", monkeypatch, REFUSAL_NOTEBOOK_MODEL="tiny")
    outs = outputs(notebook)
    figures = [o for o in outs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 6, "each instrument plots its result"
    text = "".join(o.get("text", "") for o in outs)
    assert "tiny: " in text and "top head effect:" in text and "CI" in text
    print(f"exploration.ipynb executed in {seconds:.1f} s")


def test_results_compiles_a_run(monkeypatch, tmp_path):
    run = build_run(tmp_path, omit=("phase5/circuit",), status="failed")
    notebook, seconds = execute("results.ipynb", monkeypatch, REFUSAL_RUN_DIR=str(run))
    outs = outputs(notebook)
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outs)
    assert "**REFUTED**" in markdown and "H2 is REFUTED" in markdown
    assert "missing: phase 5 did not record phase5/circuit" in markdown
    assert sum("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outs) >= 10
    assert (run / "report.html").exists()
    print(f"results.ipynb executed in {seconds:.1f} s")
