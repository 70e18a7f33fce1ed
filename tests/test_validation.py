"""The quick validation card binds: the suite must be right on every planted design, and quiet on nulls.

One seed per design of the planted family, five nulls that pass the behaviour gate and two
label-shuffled variants, each through the whole study (``hypotheses.validation``, the
code behind ``./suite validate --quick``). A verdict that says supported where the
design's truth is false, or refuted where it is true, fails; so does a null
false-positive rate above 5%. The full card (three seeds, 50 nulls) is committed under
docs/ by ``./suite validate``; ``test_the_committed_card_is_clean`` holds it to the same rules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fixtures import family
from hypotheses import validation as val
from reports import validate, validation_card

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def card():
    # run_all reports each study with an ETA through instruments.progress, which the plugin shows despite capture
    start, cfg = time.time(), val.family_config()
    runs = val.run_all("quick", cfg)
    return val.summarize(runs, mode="quick", seconds=time.time() - start, cfg=cfg)


def _wrong(card) -> list[str]:
    return [f for f in card["findings"] if f.startswith("WRONG")]


def test_no_wrong_verdict_on_any_planted_design(card, record_property):
    record_property("validation_findings", json.dumps(card["findings"]))
    assert not _wrong(card), "\n".join(_wrong(card))


def test_every_design_passes_the_behaviour_gate(card):
    planted = [r for r in card["runs"] if r["kind"] == "planted"]
    assert len(planted) == len(family.DESIGNS)
    assert all(r["behaviour_present"] for r in planted), [r["member"] for r in planted if not r["behaviour_present"]]


def test_nulls_reach_the_decision_rules_and_stay_below_5_percent(card, record_property):
    nf = card["null_fpr"]
    record_property("null_fpr", json.dumps(nf))
    assert nf["n_gate_passed"] == nf["n_nulls"] == val.MODES["quick"]["nulls"]
    assert nf["rate"] <= val.MAX_NULL_FPR, nf


def test_label_shuffled_models_stop_at_the_gate(card):
    shuffled = [r for r in card["runs"] if r["kind"] == "shuffled"]
    assert shuffled and not any(r["behaviour_present"] for r in shuffled)


def test_every_line_is_scored_where_true_and_where_false(card):
    for line in card["lines"]:
        if line["key"] in val.OVERALL:
            continue
        assert line["true"]["n"] and line["false"]["n"], line["key"]


def test_a_wrong_verdict_is_reported_and_fails_the_command(tmp_path):
    """The card's own rule: a supported line whose truth is false is a finding, and the command's
    exit status says so (the test above would then fail)."""
    run = val.Run(member="sparse", seed=0, kind="planted", behaviour_present=True, seconds=1.0,
                  verdicts={"C1/patching": ["supported"]}, truth={"C1/patching": False}, wrong=("C1/patching",))
    card = val.summarize([run], mode="quick", seconds=1.0, cfg=val.family_config())
    assert _wrong(card) and card["lines"][family.LINES.index("C1/patching")]["fpr_false"]["k"] == 1
    assert val.is_wrong("refuted", True) and val.is_wrong("supported", False)
    assert not val.is_wrong("inconclusive", True) and not val.is_wrong("supported", None)
    js = val.write_card(card, tmp_path)
    md = validate.write_page(js)
    assert json.loads(js.read_text())["findings"] == card["findings"] and "WRONG" in md.read_text()


def test_the_committed_card_is_clean():
    path = val.DOCS / "validation_card.json"
    if not path.exists():
        pytest.skip("no committed card: run ./suite validate")
    card = json.loads(path.read_text())
    assert card["mode"] == "full" and card["null_fpr"]["n_gate_passed"] >= 50
    assert not _wrong(card), "\n".join(_wrong(card))
    assert card["null_fpr"]["rate"] <= val.MAX_NULL_FPR
    assert {m["name"] for m in card["members"]} == {d.name for d in family.DESIGNS}


def test_suite_validate_is_an_entry_point():
    script = (Path(__file__).resolve().parent.parent / "suite").read_text()
    assert "validate) exec .venv/bin/python -m reports.validate" in script


def test_an_unwritable_card_folder_is_refused_before_any_study(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert validate.main(["--quick", "--out", str(blocker / "card")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the card to" in err and "pass --out a writable folder" in err


def test_the_committed_card_page_is_the_reports_rendering_of_its_json():
    """docs/validation_card.md is rendered from the JSON by the report's own blocks: one renderer."""
    path = val.DOCS / "validation_card.json"
    if not path.exists():
        pytest.skip("no committed card: run ./suite validate")
    page = path.with_suffix(".md").read_text()
    assert page == validation_card.markdown(validation_card.read_card(path)), (
        "docs/validation_card.md is stale: rewrite it with .venv/bin/python -c "
        "\"from pathlib import Path; from reports.validate import write_page; "
        "write_page(Path('docs/validation_card.json'))\"")
