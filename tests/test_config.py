"""The configuration: one frozen RefusalConfig, three sources, one precedence order.

Precedence (highest first): command line, ``--refusal-config FILE``,
``[tool.refusal-circuits]`` in ``pyproject.toml``, the field default. The pytest side is
checked end to end in subprocesses (``pytest --help``, ``--strict-markers``, ``-m phase2``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fixtures.config import DEVICES, QUANTS, ConfigError, RefusalConfig, load_file, resolve
from fixtures.plugin import CONFIG_KEY
from fixtures.storage import REPO_ROOT

pytest_plugins = ["pytester"]

NODEID = re.compile(r"^(\S+?\.py)::\S+")


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _pytest_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class _Run:
    """A pytest subprocess in the repo, started at once and read when a test needs it."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                                     cwd=REPO_ROOT, env=_pytest_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._result: subprocess.CompletedProcess | None = None

    def result(self, timeout: int = 240) -> subprocess.CompletedProcess:
        if self._result is None:
            try:
                out, err = self.proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
            self._result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._result


@pytest.fixture(scope="module")
def repo_runs():
    """`pytest --help` and `pytest -m phase2 --collect-only` of the real repo, run side by side
    (each pays the torch import, so running them concurrently halves the wait on 2 cores)."""
    runs = {"help": _Run("--help"),
            "phase2": _Run("-m", "phase2", "--collect-only", "-q", "--continue-on-collection-errors")}
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.fixture
def sources(tmp_path):
    """A pyproject table and a --refusal-config file that disagree on purpose."""
    pyproject = _write(tmp_path / "pyproject.toml", """
        [tool.other]
        model = "ignored: not our table"

        [tool.refusal-circuits]
        model = "from-pyproject"
        quant = "nf4"
        seed = 7
        device = "cpu"
    """)
    config_file = _write(tmp_path / "refusal.toml", """
        model = "from-file"
        quant = "int8"
        batch-size = 3
    """)
    return pyproject, config_file


# ----------------------------------------------------------------------------- precedence

def test_defaults_when_no_source_sets_anything(tmp_path):
    config = resolve({}, pyproject=tmp_path / "absent.toml", config_file=None)
    assert config == RefusalConfig()
    assert config.model == "organism" and config.device == "auto" and config.quant == "none"


def test_precedence_cli_over_file_over_pyproject_over_default(sources):
    pyproject, config_file = sources
    config = resolve({"model": "from-cli", "quant": None, "seed": None}, pyproject=pyproject,
                     config_file=config_file)
    assert config.model == "from-cli"  # CLI beats the file and pyproject
    assert config.quant == "int8"  # the file beats pyproject
    assert config.batch_size == 3  # the file beats the default
    assert config.seed == 7 and config.device == "cpu"  # pyproject beats the default
    assert config.max_new_tokens == RefusalConfig().max_new_tokens  # nobody set it: the default


def test_cli_none_means_not_given(sources):
    pyproject, config_file = sources
    assert resolve({"model": None}, pyproject=pyproject, config_file=config_file).model == "from-file"
    assert resolve({"model": None}, pyproject=pyproject).model == "from-pyproject"


def test_pyproject_reads_only_its_own_table(tmp_path):
    pyproject = _write(tmp_path / "pyproject.toml", """
        [tool.pytest.ini_options]
        addopts = "-q"
    """)
    assert load_file(pyproject, table=True) == {}
    assert resolve({}, pyproject=pyproject) == RefusalConfig()


def test_values_from_files_are_parsed_like_flags(tmp_path):
    config_file = _write(tmp_path / "c.toml", """
        device = "CPU"
        resume = "yes"
        memory-budget-gb = "none"
        refusal-alpha = "0.01"
    """)
    config = resolve({}, config_file=config_file)
    assert config.device == "cpu" and config.resume is True
    assert config.memory_budget_gb is None and config.alpha == pytest.approx(0.01)


def test_file_keys_are_the_flags_without_dashes(tmp_path):
    """The documented spelling (`pytest --help` names, dashes dropped) and the field name both work."""
    flag_keys = _write(tmp_path / "flags.toml", """
        refusal-seed = 11
        memory-budget = 2.5
        refusal-batch-size = 5
    """)
    config = resolve({}, config_file=flag_keys)
    assert (config.seed, config.memory_budget_gb, config.batch_size) == (11, 2.5, 5)
    field_keys = _write(tmp_path / "fields.toml", "seed = 11\nmemory-budget-gb = 2.5\nbatch-size = 5\n")
    assert resolve({}, config_file=field_keys) == config
    both = _write(tmp_path / "both.toml", "seed = 1\nrefusal-seed = 2\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_file(both, table=False)


# ----------------------------------------------------------------------------- errors

def test_unknown_key_in_config_file_is_named(tmp_path):
    bad = _write(tmp_path / "bad.toml", 'model = "tiny"\nmodle_typo = "x"\n')
    with pytest.raises(ConfigError) as err:
        resolve({}, config_file=bad)
    assert "'modle_typo'" in str(err.value) and str(bad) in str(err.value)
    assert "model" in str(err.value).split("known:")[1]  # it lists the known keys


def test_unknown_key_in_pyproject_table_is_named(tmp_path):
    bad = _write(tmp_path / "pyproject.toml", '[tool.refusal-circuits]\nbatchsize = 4\n')
    with pytest.raises(ConfigError, match="'batchsize'"):
        resolve({}, pyproject=bad)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({}, config_file=tmp_path / "nope.toml")
    broken = _write(tmp_path / "broken.toml", 'model = "unterminated\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve({}, config_file=broken)


@pytest.mark.parametrize(("field", "flag", "value"), [("device", "--device", "tpu"), ("quant", "--quant", "fp3"),
                                                       ("dtype", "--dtype", "float8"),
                                                       ("verdicts", "--refusal-verdicts", "lax")])
def test_bad_choice_names_the_value(tmp_path, field, flag, value):
    with pytest.raises(ConfigError) as err:
        resolve({field: value})
    assert repr(value) in str(err.value) and flag in str(err.value)
    from_file = _write(tmp_path / "c.toml", f'{field} = "{value}"\n')
    with pytest.raises(ConfigError, match=re.escape(repr(value))):
        resolve({}, config_file=from_file)


def test_choices_are_the_documented_ones():
    assert DEVICES == ("auto", "cpu", "cuda", "mps")
    assert QUANTS == ("none", "nf4", "int8")


@pytest.mark.parametrize(("cli", "message"), [({"batch_size": 0}, "batch_size must be at least 1"),
                                              ({"n_bootstrap": "0"}, "n_bootstrap must be at least 1"),
                                              ({"alpha": 1.5}, "alpha must lie in (0, 1)"),
                                              ({"resume": "maybe"}, "expected a boolean"),
                                              ({"seed": "abc"}, "bad value for --refusal-seed")])
def test_out_of_range_values_are_rejected(cli, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(cli)


def test_config_is_frozen_and_serialisable():
    config = RefusalConfig(model="tiny")
    with pytest.raises(Exception):
        config.model = "other"  # type: ignore[misc]
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert set(config.to_dict()) == {f.name for f in RefusalConfig.fields()}


# ----------------------------------------------------------------------------- the pytest options

def test_every_field_has_a_flag_parser_and_help():
    flags = [f.metadata.get("flag") for f in RefusalConfig.fields()]
    assert all(flag and flag.startswith("--") for flag in flags)
    assert len(set(flags)) == len(flags), "two fields share a flag"
    for f in RefusalConfig.fields():
        assert callable(f.metadata["parse"]), f.name
        assert len(f.metadata["help"].strip()) >= 10, f"{f.name} has no real help text"
        if f.default is not None:  # the default survives its own parser
            assert f.metadata["parse"](f.default) == f.default, f.name


def test_pytest_help_lists_every_flag_with_its_default(repo_runs):
    result = repo_runs["help"].result()
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    assert "refusal-circuits: model, device, dataset and statistics" in help_text
    for f in RefusalConfig.fields():
        flag = f.metadata["flag"]
        assert re.search(rf"(^|\s){re.escape(flag)}[\s=]", help_text), f"{flag} missing from pytest --help"
        first_words = " ".join(f.metadata["help"].split()[:3])
        assert first_words in help_text, f"help text of {flag} missing"
        assert f"(default: {f.default})" in help_text, f"{flag} does not show its default"
    assert "--refusal-config" in help_text and "(default: none)" in help_text


def test_bad_choice_on_the_command_line_is_a_usage_error(pytester):
    result = pytester.runpytest_inprocess("-p", "fixtures.plugin", "--quant", "fp3")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = "\n".join(result.errlines)
    assert "--quant" in errors and "fp3" in errors


def test_precedence_end_to_end_through_pytest(pytester, pytestconfig):
    """The plugin resolves flag > --refusal-config > pyproject > default in a real session."""
    from fixtures.plugin import seed_everything

    pytester.makepyprojecttoml("""
        [tool.refusal-circuits]
        model = "from-pyproject"
        quant = "nf4"
        seed = 5
    """)
    pytester.makefile(".toml", file='model = "from-file"\nquant = "int8"\n')
    pytester.makepyfile(test_dump="""
        import json

        def test_dump(refusal_config):
            with open("resolved.json", "w") as handle:
                json.dump(refusal_config.to_dict(), handle)
    """)
    try:
        result = pytester.runpytest_inprocess("-p", "fixtures.plugin", "--refusal-config", "file.toml",
                                              "--model", "from-cli")
    finally:
        seed_everything(pytestconfig.stash[CONFIG_KEY].seed)  # the inner session reseeded this process
    result.assert_outcomes(passed=1)
    resolved = json.loads((pytester.path / "resolved.json").read_text())
    assert resolved["model"] == "from-cli"
    assert resolved["quant"] == "int8"
    assert resolved["seed"] == 5
    assert resolved["device"] == "auto"


# ----------------------------------------------------------------------------- markers

def test_strict_markers_rejects_an_unknown_marker(pytester):
    """The repo's own pytest settings (markers, --strict-markers) refuse a misspelt marker."""
    pytester.makepyprojecttoml((REPO_ROOT / "pyproject.toml").read_text())
    pytester.makepyfile(test_unknown_marker="""
        import pytest

        @pytest.mark.phase99_not_a_marker
        def test_x():
            pass
    """, test_known_marker="""
        import pytest

        @pytest.mark.phase2
        def test_y():
            pass
    """)
    result = pytester.runpytest_inprocess("--continue-on-collection-errors")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*'phase99_not_a_marker' not found in `markers` configuration option*"])
    result.assert_outcomes(passed=1, errors=1)  # the registered marker is fine


def _marked_files(marker: str) -> set[str]:
    out = set()
    for folder in ("tests", "hypotheses"):
        for path in (REPO_ROOT / folder).glob("test_*.py"):
            if f"mark.{marker}" in path.read_text():
                out.add(path.relative_to(REPO_ROOT).as_posix())
    return out


def test_phase2_marker_selects_only_phase2_tests(repo_runs):
    result = repo_runs["phase2"].result()
    ids = [line.strip() for line in result.stdout.splitlines() if NODEID.match(line.strip())]
    assert ids, f"no test collected under -m phase2:\n{result.stdout}\n{result.stderr}"
    files = {NODEID.match(i).group(1) for i in ids}
    assert "hypotheses/test_phase2_behavior.py" in files
    # Only modules that carry the phase2 marker: never phase 1, never the unmarked unit tests.
    assert files <= _marked_files("phase2"), files - _marked_files("phase2")
    assert "hypotheses/test_phase1_setup.py" not in files
    assert re.search(r"\d+/\d+ tests? collected \(\d+ deselected\)", result.stdout)


def test_a_test_that_leaves_torch_threads_changed_fails(pytester):
    """The plugin fails the test that leaks a thread-count change and restores the count; the
    one_torch_thread fixture is the way to run on one thread."""
    pytester.makepyfile(test_threads="""
        import pytest
        import torch

        START = torch.get_num_threads()

        def test_leaks():
            torch.set_num_threads(START + 1)

        def test_after_the_leak_the_count_is_back():
            assert torch.get_num_threads() == START

        @pytest.mark.usefixtures("one_torch_thread")
        def test_one_thread_by_fixture():
            assert torch.get_num_threads() == 1
    """)
    result = pytester.runpytest_inprocess("-p", "fixtures.plugin", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    assert "test_leaks left torch with" in result.stdout.str() and "one_torch_thread" in result.stdout.str()


def test_a_run_with_skips_and_no_failures_finishes(tmp_path):
    """On a model other than the organism the organism's bar tests skip; the run still finishes
    (``fixtures/plugin.py``: only failures and errors fail a run), and it pre-registers its bars."""
    import json

    run_dir = tmp_path / "run"
    result = _Run("hypotheses", "--model", "tiny", "-m", "phase1 or phase2", "--run-dir", str(run_dir),
                  "-q").result(timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert " skipped" in result.stdout and " failed" not in result.stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished", manifest["status"]
    assert json.loads((run_dir / "preregistration.json").read_text())["record"]["selected"] is None
