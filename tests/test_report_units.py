"""The report's parts: number formatting, the circuit SVG, the command, and the pytest hooks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from fixtures.storage import REPO_ROOT
from reports import fmt
from reports.circuit_svg import circuit_svg, columns, build_graph, dot_source
from reports.cli import default_run_dir, main
from reports.context import claim_rows, VerdictLine
from reports.session import report_at_session_end
from reports.synthetic import build_run


# ----------------------------------------------------------------------------- formatting

def test_estimates_always_carry_their_interval():
    est = {"value": 0.825, "ci_low": 0.68, "ci_high": 0.913, "alpha": 0.05, "n": 40}
    assert fmt.estimate(est) == "0.825 [95% CI 0.68, 0.913, n=40]"
    assert fmt.estimate(est, pct=True) == "82.5% [95% CI 68.0%, 91.3%, n=40]"
    assert fmt.estimate({"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "alpha": 0.1}) == "0.5 [90% CI 0.4, 0.6]"
    assert fmt.estimate({"value": 0.5}) == "0.5 (no CI recorded)"
    assert fmt.estimate(None) == "n/a (not recorded)" and fmt.estimate({"value": None}) == "n/a"


def test_p_values_sizes_and_counts():
    assert fmt.p_value(0.0004) == "p < 0.001" and fmt.p_value(0.0312) == "p = 0.0312" and fmt.p_value(None) == "n/a"
    assert fmt.byte_size(2 * 1024 ** 3) == "2.00 GiB" and fmt.seconds(300) == "5.0 min"
    assert fmt.params(134_515_008) == "135M" and fmt.params(8.03e9) == "8.03B"
    assert fmt.number(float("nan")) == "n/a" and fmt.number(True) == "n/a"


def test_completion_truncation():
    text = "x" * 200
    short = fmt.truncate_completion(text, show=False)
    assert short.startswith("x" * fmt.COMPLETION_CHARS) and short.endswith("[truncated]") and len(short) < 120
    assert fmt.truncate_completion(text, show=True) == text
    assert fmt.truncate_completion("Sorry, no.", show=False) == "Sorry, no."


def test_phase_names_for_missing_notes():
    assert fmt.phase_of("phase3/heads") == "phase 3" and fmt.phase_of("h3/cross_category") == "the H3 test"


# ----------------------------------------------------------------------------- verdict rows

def _line(claim, status, evidence="patching", **numbers):
    return VerdictLine(claim=claim, status=status, summary=f"{claim} {status}", evidence=evidence, numbers=numbers,
                       evidence_result=None)


def test_overall_line_wins_and_lines_are_combined_otherwise():
    rows = {r.claim: r for r in claim_rows([
        _line("H1", "supported"), _line("H1", "refuted", evidence="overall"),
        _line("H2", "supported"), _line("H2", "supported", evidence="ablation"),
        _line("H3", "supported"), _line("H3", "refuted", evidence="ablation"),
        _line("S2", "inconclusive", title="a stretch goal")], {})}
    assert (rows["H1"].status, rows["H1"].combined) == ("refuted", False)
    assert (rows["H2"].status, rows["H2"].combined) == ("supported", True)
    assert rows["H3"].status == "inconclusive"  # disagreeing lines never combine into a verdict
    assert rows["C1"].status == "missing" and rows["S2"].title == "a stretch goal"
    assert list(rows) == ["H1", "H2", "H3", "C1", "C2", "C3", "S2"]


# ----------------------------------------------------------------------------- circuit diagram

NODES = [{"id": "in", "label": "embed", "kind": "Resid", "layer": None},
         {"id": "a", "label": "L1H2", "kind": "Head", "layer": 1, "weight": 0.4},
         {"id": "b", "label": 'L3N7 "<b>"', "kind": "Neuron", "layer": 3, "weight": -0.2},
         {"id": "out", "label": "logits", "kind": "", "layer": None}]
EDGES = [{"source": "in", "target": "a", "weight": 0.5}, {"source": "a", "target": "b", "weight": -0.3},
         {"source": "b", "target": "out", "weight": 1.0}, {"source": "a", "target": "ghost", "weight": 0.1}]


def test_python_layout_orders_columns_by_layer():
    g = build_graph(NODES, EDGES)
    col = columns(g)
    assert col["in"] < col["a"] < col["b"] < col["out"] and "ghost" in col
    svg, engine = circuit_svg(NODES, EDGES, use_graphviz=False)
    assert engine == "python" and svg.startswith("<svg") and svg.count("<g class=\"circuit-node\">") == 5
    assert "&lt;b&gt;" in svg and "<b>" not in svg and svg.count("circuit-edge") == 4


def test_dot_source_quotes_labels():
    src = dot_source(build_graph(NODES, EDGES))
    assert 'label="L3N7 \\"<b>\\""' in src and src.startswith("digraph")


def test_the_recorded_dot_and_the_report_dot_come_from_one_writer(monkeypatch):
    """Phase 5.1 records its graph as DOT and the report lays its diagram out from DOT: both are
    hypotheses.circuit_dot.dot, the report's with its style arguments only."""
    from hypotheses import circuit_dot
    from hypotheses.circuit import CircuitGraph
    from reports.circuit_svg import REPORT_STYLE

    g = build_graph(NODES, EDGES)
    calls = []
    monkeypatch.setattr(circuit_dot, "dot", lambda graph, **style: calls.append((graph, style)) or "DOT")
    estimate = SimpleNamespace(to_dict=dict)
    faith = SimpleNamespace(positions=6, value=estimate, random=estimate, difference=estimate, n_random=2,
                            score_harmful=1.0, score_circuit=0.5, score_harmless=0.0, n_pairs=4, circuit=())
    recorded = CircuitGraph(graph=g, nodes=(), pinned={}, faithfulness=faith, prompts=("p",)).record()
    assert recorded.dot == "DOT" and dot_source(g) == "DOT"
    assert calls == [(g, {}), (g, REPORT_STYLE)]
    sources = [path for folder in ("instruments", "fixtures", "hypotheses", "reports")
               for path in sorted((REPO_ROOT / folder).rglob("*.py")) if "digraph" in path.read_text()]
    assert sources == [REPO_ROOT / "hypotheses" / "circuit_dot.py"], "a second DOT writer"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed (the Python layout is used)")
def test_graphviz_layout_when_installed():
    svg, engine = circuit_svg(NODES, EDGES)
    assert engine == "graphviz" and "<svg" in svg and "<?xml" not in svg


# ----------------------------------------------------------------------------- command line

def test_command_renders_a_run_and_the_latest_by_default(tmp_path, capsys):
    older = build_run(tmp_path, tag="-old")
    newer = build_run(tmp_path, tag="-new")
    assert main([str(older)]) == 0 and (older / "report.html").exists() and (older / "report.md").exists()
    assert "wrote" in capsys.readouterr().out
    assert default_run_dir(tmp_path) == newer
    assert main(["--runs-root", str(tmp_path)]) == 0 and (newer / "report.html").exists()
    assert main([str(tmp_path / "nowhere")]) == 2 and "no manifest.json" in capsys.readouterr().err
    assert main(["--runs-root", str(tmp_path / "empty")]) == 2
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "report.html" in capsys.readouterr().out


def test_command_refuses_to_overwrite_another_runs_report(tmp_path, capsys):
    a, b = build_run(tmp_path, seed=1), build_run(tmp_path, seed=2)
    assert main([str(a)]) == 0
    shutil.copy(a / "report.md", b / "report.md")
    assert main([str(b)]) == 2 and "--force" in capsys.readouterr().err
    assert main([str(b), "--force"]) == 0


# ----------------------------------------------------------------------------- session hooks

class _Terminal:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def write_line(self, text: str, **markup: bool) -> None:
        self.lines.append((text, markup))


def test_session_end_reports_success_and_failure_without_raising(tmp_path, monkeypatch):
    term = _Terminal()
    assert report_at_session_end(build_run(tmp_path), term)
    assert "report.html" in term.lines[-1][0]

    def broken(run_dir, **kw):
        raise RuntimeError("template exploded")

    monkeypatch.setattr("reports.render.render_report", broken)
    term = _Terminal()
    assert not report_at_session_end(tmp_path, term)
    assert "NOT rendered" in term.lines[0][0] and "template exploded" in term.lines[0][0]
    assert term.lines[0][1].get("red")


SESSION_TESTS = '''
import pytest

@pytest.mark.report
def test_reads_results_last(recorder):
    assert (recorder.run_dir / "manifest.json").exists()

def test_records_something(recorder):
    recorder.save("phase2/refusal_rates", numbers={"harmful": {"refusal_rate": {"value": 0.5, "ci_low": 0.4,
                  "ci_high": 0.6}}, "harmless": {}})
'''


def _pytest_session(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_session.py").write_text(textwrap.dedent(SESSION_TESTS))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fixtures.plugin", "-p", "reports.plugin",
                           "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), "-v", "--model", "tiny",
                           str(tmp_path / "test_session.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_pytest_session_renders_its_report_and_orders_report_tests_last(tmp_path):
    run = tmp_path / "run"
    out = _pytest_session(tmp_path, "--run-dir", str(run))
    assert out.returncode == 0, out.stdout + out.stderr
    order = [line for line in out.stdout.splitlines() if "::test_" in line and "PASSED" in line]
    assert "test_records_something" in order[0] and "test_reads_results_last" in order[1]
    assert "refusal-circuits report:" in out.stdout and (run / "report.html").exists()
    assert "refused 50.0% [95% CI 40.0%, 60.0%]" in (run / "report.md").read_text()
    skipped = _pytest_session(tmp_path, "--run-dir", str(tmp_path / "run2"), "--no-refusal-report")
    assert skipped.returncode == 0 and not (tmp_path / "run2" / "report.html").exists()


def test_graphviz_output_is_embedded_without_prolog_or_links(tmp_path, monkeypatch):
    """The dot path, with a stand-in dot that answers like Graphviz (prolog, doctype, an xlink)."""
    fake = tmp_path / "dot"
    fake.write_text('#!/bin/sh\ncat > /dev/null\nprintf \'<?xml version="1.0"?>\\n<!DOCTYPE svg>\\n'
                    '<svg width="10pt"><a xlink:href="https://example.com"><g class="node"><title>a</title>'
                    '</g></a></svg>\\n\'\n')
    fake.chmod(0o755)
    monkeypatch.setattr("reports.circuit_svg.shutil.which", lambda name: str(fake))
    svg, engine = circuit_svg(NODES, EDGES)
    assert engine == "graphviz" and svg.startswith('<svg class="circuit"')
    assert "example.com" not in svg and "<?xml" not in svg and "<title>a</title>" in svg
    fake.write_text("#!/bin/sh\nexit 3\n")  # a failing dot falls back to the Python layout
    assert circuit_svg(NODES, EDGES)[1] == "python"
