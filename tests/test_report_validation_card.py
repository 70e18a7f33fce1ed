"""The suite's validation card in every report's methodology: its truth-by-verdict table, the null
false-positive rate and the findings in both files; an absent or malformed card said in words."""

from __future__ import annotations

import html as htmllib
import json
import re

import pytest

from fixtures.storage import CODE_VERSION
from reports import validation_card as vc
from reports.context import load_run
from reports.render import render_report, render_strings
from reports.synthetic import build_run
from reports.write_up import build_document

LONG_TITLE = "A minority of components carries most of the refusal effect, measured by exact patching"


def _counts(s: int, i: int, r: int) -> dict:
    return {"supported": s, "inconclusive": i, "refuted": r, "n": s + i + r}


def _rate(k: int, n: int, low: float, high: float) -> dict:
    return {"k": k, "n": n, "rate": k / n if n else None, "ci_low": low if n else None, "ci_high": high if n else None}


def _line(key: str, true: tuple, false: tuple, null: tuple, power: tuple, fpr_false: tuple, fpr_null: tuple,
          title: str = "") -> dict:
    claim, evidence = key.split("/")
    return {"key": key, "claim": claim, "evidence": evidence, "title": title or f"{claim} title",
            "true": _counts(*true), "false": _counts(*false), "null": _counts(*null), "power": _rate(*power),
            "fpr_false": _rate(*fpr_false), "fpr_null": _rate(*fpr_null), "wrong_refutations": true[2]}


def card_json(**overrides) -> dict:
    """A small card in the format of docs/validation_card.json: three designs, 70 runs."""
    runs = ([{"member": "sparse", "seed": s, "kind": "planted"} for s in range(10)]
            + [{"member": "null", "seed": s, "kind": "null"} for s in range(50)]
            + [{"member": "sparse", "seed": s, "kind": "shuffled"} for s in range(10)])
    lines = [
        _line("H1/patching", (4, 1, 0), (0, 2, 3), (0, 50, 0), (4, 5, 0.284, 0.995), (0, 5, 0.0, 0.522),
              (0, 50, 0.0, 0.0711), title=LONG_TITLE),
        _line("H2/attention", (2, 3, 0), (1, 3, 1), (0, 50, 0), (2, 5, 0.053, 0.853), (1, 5, 0.005, 0.716),
              (0, 50, 0.0, 0.0711)),
        _line("H3/category", (5, 0, 0), (0, 0, 0), (2, 48, 0), (5, 5, 0.478, 1.0), (0, 0, 0, 0),
              (2, 50, 0.0049, 0.137)),
        _line("H1/overall", (3, 1, 1), (0, 5, 0), (0, 50, 0), (3, 5, 0.147, 0.947), (0, 5, 0.0, 0.522),
              (0, 50, 0.0, 0.0711)),
    ]
    card = {"version": 1, "generated": "2026-12-01T19:00:00Z", "code_version": CODE_VERSION,
            "command": "./suite validate --quick", "mode": "quick", "seconds": 812.4, "machine": "2 CPU cores",
            "config": {"seed": 0},
            "members": [{"name": n, "description": "d", "truth": {}, "hard_case": ""}
                        for n in ("sparse", "hydra", "superposition")],
            "runs": runs, "lines": lines,
            "null_fpr": {"k": 2, "n": 48, "rate": 2 / 48, "ci_low": 0.0051, "ci_high": 0.1425, "n_gate_passed": 48,
                         "n_shuffled": 10, "shuffled_supported": 0},
            "findings": ["H2's keyword mask counted the BOS token; it now excludes it",
                         "the null gate let <degenerate> runs through"]}
    card.update(overrides)
    return card


# (key, true S/I/R, power, false S/I/R, FPR false, null S/I/R, FPR null, wrong verdicts), as the report prints them
EXPECTED = {
    "H1/patching": ("4 / 1 / 0 of 5", "4/5 = 80.0% [95% CI 28.4%, 99.5%]", "0 / 2 / 3 of 5",
                    "0/5 = 0.0% [95% CI 0.0%, 52.2%]", "0 / 50 / 0 of 50", "0/50 = 0.0% [95% CI 0.0%, 7.1%]", "none"),
    "H2/attention": ("2 / 3 / 0 of 5", "2/5 = 40.0% [95% CI 5.3%, 85.3%]", "1 / 3 / 1 of 5",
                     "1/5 = 20.0% [95% CI 0.5%, 71.6%]", "0 / 50 / 0 of 50", "0/50 = 0.0% [95% CI 0.0%, 7.1%]",
                     "WRONG: 1 supported when false"),
    "H3/category": ("5 / 0 / 0 of 5", "5/5 = 100.0% [95% CI 47.8%, 100.0%]", "no case", "n/a", "2 / 48 / 0 of 50",
                    "2/50 = 4.0% [95% CI 0.5%, 13.7%]", "none"),  # a null has no truth per line: a rate, not wrong
    "H1/overall": ("3 / 1 / 1 of 5", "3/5 = 60.0% [95% CI 14.7%, 94.7%]", "0 / 5 / 0 of 5",
                   "0/5 = 0.0% [95% CI 0.0%, 52.2%]", "0 / 50 / 0 of 50", "0/50 = 0.0% [95% CI 0.0%, 7.1%]",
                   "WRONG: 1 refuted when true"),
}
NULL_FPR = "4.2% [95% CI 0.5%, 14.2%]"


def write(tmp_path, data, name="validation_card.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("card-runs"))


def report(run, card_path) -> tuple[str, str]:
    ctx = load_run(run, validation_card=card_path)
    return render_strings(build_document(ctx), ctx)


def text_of(page: str) -> str:
    return htmllib.unescape(re.sub(r"<[^>]+>", "", page))


def methodology_md(md: str) -> str:
    return md[md.index("## Methodology\n"):md.index("## Results\n")]


def html_rows(page: str) -> list[tuple[str, list[str]]]:
    """(tr class, cell texts) of the validation card's table, header row first."""
    body = re.search(r'<table id="table-validation-card".*?</table>', page, re.S).group(0)
    return [(cls, [text_of(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S)])
            for cls, row in re.findall(r'<tr(?: class="([^"]*)")?>(.*?)</tr>', body, re.S)]


def md_row(md: str, key: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| **{key}** |"))
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


@pytest.fixture(scope="module")
def with_card(run, tmp_path_factory):
    return report(run, write(tmp_path_factory.mktemp("card"), card_json()))


def test_table_numbers_appear_in_html_and_markdown(with_card):
    page, md = with_card
    header, *rows = html_rows(page)
    assert header[1] == ["line", "claim", "true: S / I / R", "power", "false: S / I / R", "FPR (false)",
                         "null: S / I / R", "FPR (null)", "wrong verdicts"]
    assert [cells[0] for _, cells in rows] == list(EXPECTED)
    for cls, cells in rows:
        assert tuple(cells[2:]) == EXPECTED[cells[0]], cells[0]
        assert md_row(md, cells[0])[2:] == list(EXPECTED[cells[0]]), cells[0]
        assert cls == ("" if EXPECTED[cells[0]][-1] == "none" else "card-wrong"), cells[0]
    # a long title is shortened, a short one kept
    assert rows[0][1][1].endswith("…") and len(rows[0][1][1]) <= vc.TITLE_CHARS and rows[1][1][1] == "H2 title"


def test_summary_null_rate_and_findings_in_both_files(with_card):
    page, md = with_card
    meth = methodology_md(md)
    for text in (text_of(page), htmllib.unescape(meth)):
        assert ("./suite validate --quick, quick mode, generated 2026-12-01T19:00:00Z, code version "
                f"{CODE_VERSION}, 13.5 min on 2 CPU cores) ran the studies on 3 planted designs") in text
        assert "(sparse, hydra, superposition): 70 runs, of which 10 planted, 50 null" in text
        assert "10 with shuffled labels" in text
        assert (f"Null false-positive rate (null runs that passed the behaviour gate with any hypothesis "
                f"supported): 2/48 = {NULL_FPR}; 48 of 50 null runs passed the gate.") in text
        assert "Shuffled labels: 0 of 10 runs had a hypothesis supported." in text
        assert "another version of the instruments" not in text
    assert "<li>H2&#39;s keyword mask counted the BOS token; it now excludes it</li>" in page
    assert "- H2's keyword mask counted the BOS token; it now excludes it" in meth
    assert "&lt;degenerate&gt;" in page and "<degenerate>" not in page and "&lt;degenerate&gt;" in meth
    assert 'id="validation-card"' in page and "### Validation card" in meth


def test_absent_card_says_run_suite_validate(run, tmp_path):
    page, md = report(run, tmp_path / "nowhere.json")
    for text in (text_of(page), methodology_md(md)):
        assert "No validation card is committed: run ./suite validate" in text
    assert 'id="table-validation-card"' not in page
    assert vc.load_card(tmp_path / "nowhere.json") is None


@pytest.mark.parametrize("data, why", [
    ("{not json", "JSONDecodeError"),
    ("[1, 2]", "the card is not an object"),
    (card_json(version=2), "it is version 2; this report reads version 1"),
    ({k: v for k, v in card_json().items() if k != "lines"}, "the card has no 'lines'"),
    (card_json(lines=[{**card_json()["lines"][0], "power": None}]), "lines[0].power is not an object"),
    (card_json(lines=[{k: v for k, v in card_json()["lines"][0].items() if k != "false"}]), "lines[0] has no 'false'"),
    (card_json(null_fpr={"k": "two", "n": 48}), "null_fpr.k is not a whole number"),
])
def test_malformed_card_gives_a_sentence_not_a_crash(run, tmp_path, data, why):
    path = write(tmp_path, data)
    page, md = report(run, path)
    for text in (text_of(page), htmllib.unescape(methodology_md(md))):
        assert f"The validation card {path} cannot be read" in text and why in text
        assert "run ./suite validate to write it again" in text
    assert 'id="table-validation-card"' not in page and vc.load_card(path) is None


def test_load_card_gives_the_view_the_report_needs(tmp_path):
    card = vc.load_card(write(tmp_path, card_json()))
    assert card is not None and card.mode == "quick" and card.n_null == 50 and card.n_runs == 70
    assert [line.wrong for line in card.lines] == [False, True, False, True]  # supported on a null is a rate
    assert card.lines[0].power == vc.Rate(k=4, n=5, rate=0.8, ci_low=0.284, ci_high=0.995)
    assert card.null_fpr.rate.k == 2 and len(card.findings) == 2


def test_a_card_of_another_code_version_is_flagged(run, tmp_path):
    page, md = report(run, write(tmp_path, card_json(code_version="other")))
    assert f"The card was made with code version other, this run with {CODE_VERSION}" in methodology_md(md)


def test_the_default_path_and_the_env_override(run, tmp_path, monkeypatch):
    monkeypatch.delenv(vc.ENV_VAR, raising=False)
    assert vc.resolve() == vc.DEFAULT_PATH == vc.REPO_ROOT / "docs" / "validation_card.json"
    path = write(tmp_path, card_json())
    monkeypatch.setenv(vc.ENV_VAR, str(path))
    assert vc.resolve() == path and vc.resolve(tmp_path / "x.json") == tmp_path / "x.json"
    result = render_report(run, force=True)  # render_report reads the card through load_run's default
    md = result.md_path.read_text()
    assert md_row(md, "H2/attention")[2:] == list(EXPECTED["H2/attention"])
