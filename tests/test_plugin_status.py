"""A run's status in its manifest, a run directory that cannot be written, and a model that cannot
be loaded.

Only a failure or an error fails a run: skips (in a test, in a fixture's setup, from
``pytest.importorskip`` or a marker) and xfails leave it ``finished``. Each session runs in
a pytest subprocess with the suite's plugins; no model is loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.storage import REPO_ROOT, unwritable_reason

pytest_plugins = ["pytester"]

PLUGINS = ("-p", "fixtures.plugin", "-p", "hypotheses.plugin", "-p", "reports.plugin")

SESSION = '''
import pytest

@pytest.fixture
def skips_in_setup(recorder):
    pytest.skip("a fixture that skips while setting up")

@pytest.fixture
def breaks_in_setup(recorder):
    raise RuntimeError("a fixture that breaks while setting up")

@pytest.mark.phase2
def test_records(recorder):
    recorder.save("phase2/something", numbers={"x": 1})

def test_skips_in_its_body(recorder):
    pytest.skip("not on this model")

def test_skips_in_a_fixture(skips_in_setup):
    pass

def test_import_or_skip(recorder):
    pytest.importorskip("a_module_that_is_not_installed")

@pytest.mark.skip(reason="marked")
def test_marked_skip(recorder):
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure(recorder):
    assert False

def test_fails(recorder):
    assert False, "a real failure"

def test_errors_in_setup(breaks_in_setup):
    pass
'''


@pytest.fixture
def session(pytester, monkeypatch):
    """Run the session's tests selected by ``-k``; returns (outcome, the manifest's status)."""
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pytester.makeini("[pytest]\nmarkers =\n    phase2: a phase\n")
    pytester.makepyfile(test_session=SESSION)

    def run(select: str) -> tuple[pytest.RunResult, str]:
        run_dir = pytester.path / "run"
        result = pytester.runpytest_subprocess(*PLUGINS, "-p", "no:cacheprovider", "--model", "tiny",
                                               "--run-dir", str(run_dir), "--no-refusal-report", "-k", select,
                                               timeout=300)
        return result, json.loads((run_dir / "manifest.json").read_text())["status"]

    return run


def test_passes_and_skips_of_every_kind_finish_the_run(session):
    result, status = session("not fails and not errors")
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert status == "finished"


def test_a_failure_fails_the_run(session):
    result, status = session("records or fails")
    result.assert_outcomes(passed=1, failed=1)
    assert status == "failed"


def test_an_error_in_setup_fails_the_run(session):
    result, status = session("records or errors")
    result.assert_outcomes(passed=1, errors=1)
    assert status == "failed"


# ----------------------------------------------------------------------------- an unwritable --run-dir

def test_unwritable_reason_names_what_is_in_the_way(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert unwritable_reason(a_file / "run") == f"{a_file} is a file, not a folder"
    assert "no folder can be created in /proc" in unwritable_reason(Path("/proc/refusal-run"))
    fresh = tmp_path / "new" / "run"
    assert unwritable_reason(fresh) is None and not (tmp_path / "new").exists()  # the probe creates nothing
    assert list(tmp_path.iterdir()) == [a_file]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder regardless of its mode")
def test_unwritable_reason_finds_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        assert "no folder can be created in" in unwritable_reason(locked / "run")
    finally:
        locked.chmod(0o755)


def test_an_unwritable_run_dir_is_a_usage_error_before_any_test_runs(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pytester.makepyfile(test_never="def test_never(tmp_path_factory):\n    open('ran', 'w').close()\n")
    blocked = pytester.path / "a-file"
    blocked.write_text("")
    result = pytester.runpytest_subprocess(*PLUGINS, "-p", "no:cacheprovider", "--model", "tiny",
                                           "--run-dir", str(blocked / "run"), timeout=300)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"--run-dir {blocked / 'run'} cannot be written: {blocked} is a file, not a folder" in err
    assert "Fix: pick a writable --run-dir" in err and "Traceback" not in err + result.stdout.str()
    assert not (pytester.path / "ran").exists()


# ----------------------------------------------------------------------------- a model that cannot be loaded

def test_a_model_that_cannot_be_loaded_ends_the_session_once_without_a_traceback(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pytester.makepyfile(test_needs_the_model="\n".join(f"def test_{i}(subject):\n    pass\n" for i in range(3)))
    run_dir, missing = pytester.path / "run", pytester.path / "nonexistent" / "folder"
    result = pytester.runpytest_subprocess(*PLUGINS, "-p", "no:cacheprovider", "--model", str(missing),
                                           "--run-dir", str(run_dir), "--no-refusal-report", timeout=300)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert out.count(f"--model {missing} cannot be loaded: unknown model") == 1, out
    assert "Traceback" not in out and "ModelLoadError" not in out and " error" not in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "unknown model" in manifest["model_load"]["error"]
