"""The report reads the claims table: titles and bars from the run's config, every line with its
n, power, control and side effect, the pre-registration, and the new H1 / H2 results."""

from __future__ import annotations

import html as htmllib
import json
import re

import pytest

from hypotheses import claims
from reports.claim_lines import strip_status
from reports.context import VerdictLine, claim_rows, load_run
from reports.synthetic import CATEGORIES, build_run
from tests.reporting import render, section, text_of

BARS = {"h1_fraction": 0.1, "h1_share": 0.9, "min_heads": 7, "ablation_drop": 0.25, "gradient_r": 0.6}





@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("claims"), verdicts={**dict.fromkeys(claims.CLAIM_ORDER, "inconclusive")})


@pytest.fixture(scope="module")
def rendered(run):
    return render(run)


# ----------------------------------------------------------------------------- one place for the claims

def test_non_default_bars_reach_every_title(tmp_path):
    page, md = render(build_run(tmp_path, bars=BARS, verdicts={"H1": "supported", "C1": "supported",
                                                               "C2": "refuted", "S1": "inconclusive"}))
    for text in (text_of(page), htmllib.unescape(md)):  # Markdown writes ">" as "&gt;", which it renders as ">"
        for bar in ("fewer than 10%", "more than 90%", "At least 7 heads", "more than 25%", "r > 0.6"):
            assert bar in text, bar
        assert "fewer than 5%" not in text and "At least 10 heads" not in text


def test_titles_and_order_come_from_the_claims_table(run):
    ctx = load_run(run)
    assert [r.claim for r in ctx.claims] == list(claims.CLAIM_ORDER)  # S1 recorded here, so shown
    for row in ctx.claims:
        assert row.title == claims.title(row.claim, ctx.config)


def test_synthetic_lines_are_the_claims_tables_lines(run):
    ctx = load_run(run)
    rows = {r.claim: r for r in ctx.claims}
    for claim in claims.CLAIMS:
        got = [line.evidence for line in rows[claim.id].evidence_lines]
        assert got == list(claim.evidence(CATEGORIES)), claim.id  # H3's categories in the recorded order
        for line in rows[claim.id].evidence_lines:
            assert line.evidence_result == claim.line(line.evidence).result
            assert line.numbers["bar"] == claim.bar_of(line.evidence, ctx.config)
    assert [ln.evidence for ln in rows["C3"].evidence_lines] == ["reproducibility"]


def test_a_line_without_evidence_result_reads_it_from_the_table():
    from reports.context import evidence_result

    assert evidence_result("H2", "direction", {}) == "h2/accumulation"
    assert evidence_result("H3", "weapons", {}) == "h3/cross_category"
    assert evidence_result("H3", "overall", {}) is None and evidence_result("S9", "patching", {}) is None
    assert evidence_result("H2", "direction", {"evidence_result": "phase5/direction"}) == "phase5/direction"


# ----------------------------------------------------------------------------- each line, read once

def test_each_line_shows_n_power_bar_control_and_side_effect(rendered):
    page, md = rendered
    h1 = section(md, "#### H1: ")
    ablation = next(x for x in h1.splitlines() if x.startswith("- **ablation**"))
    assert ("— INCONCLUSIVE: 0.42 [95% CI 0.3, 0.54] vs matched random heads + neurons 0.05 [95% CI 0.01, 0.09] "
            "→ difference 0.37 [95% CI 0.24, 0.5] (the difference is held to the bar); bar 0.6 (supported above it).") \
        in ablation
    assert "n = 40 (test) detects a true value ≥ 0.75 with 80% power." in ablation
    assert "Side effect on harmless prompts: KL 0.04 nats, CE +0.02 nats (limit 0.1 / 0.1): within the limit." \
        in ablation
    assert "Holm-adjusted p = 0.06" in ablation and "(correction: holm)" in ablation
    assert "The ablation effect is 0.42 [95% CI 0.30, 0.55]." in ablation  # the decision's own sentence
    assert ablation.count("INCONCLUSIVE") == 1
    weapons = next(x for x in section(md, "#### H3: ").splitlines() if x.startswith("- **weapons**"))
    assert "n = 21 (val + test)" in weapons
    assert "n = 21 (val + test) detects" in text_of(page)


def test_the_verdict_table_lists_each_line_once(rendered):
    _, md = rendered
    row = next(x for x in md.splitlines() if x.startswith("| [**H1**]"))
    for evidence in claims.claim("H1").evidence():
        assert row.count(f"{evidence} inconclusive:") == 1
    assert "ablation inconclusive: difference from the control 0.37 [95% CI 0.24, 0.5]; bar 0.6" in row
    assert row.count("INCONCLUSIVE") == 2  # the verdict column and the reason's "H1 is INCONCLUSIVE", once each


def test_a_line_that_broke_the_model_says_so(tmp_path):
    run = build_run(tmp_path, verdicts={"C2": "inconclusive"})
    path = run / "results" / "verdicts_C2--ablation.json"
    data = json.loads(path.read_text())
    data["verdict"]["numbers"]["side_effect"] |= {"kl_harmless": 0.4, "answer_ce_increase": None, "ok": False}
    path.write_text(json.dumps(data))
    page, md = render(run)
    assert "KL 0.4 nats, CE not measured (limit 0.1 / 0.1): OVER the limit" in md
    assert "side effect OVER the limit" in next(x for x in md.splitlines() if x.startswith("| [**C2**]"))
    assert "over the limit in this run: C2 ablation." in md


def test_an_old_line_without_the_new_numbers_reads_as_before(tmp_path):
    run = build_run(tmp_path, verdicts={"H1": "refuted"}, overall=False, preregistration=False)
    for path in (run / "results").glob("verdicts_H1--*.json"):
        data = json.loads(path.read_text())
        data["verdict"]["numbers"] = {"title": "an old title"}
        path.write_text(json.dumps(data))
    page, md = render(run)
    row = next(x for x in md.splitlines() if x.startswith("| [**H1**]"))
    assert "H1 is REFUTED: patching refuted: The patching effect is 0.42 [95% CI 0.30, 0.55]." in row
    line = next(x for x in section(md, "#### H1: ").splitlines() if x.startswith("- **patching**"))
    assert line.startswith("- **patching** — REFUTED: The patching effect is 0.42 [95% CI 0.30, 0.55]. (see ")
    assert "an old title" not in md  # a claim of the table reads its title from the config
    for absent in ("Side effects.", "Held-out scoring.", "Controls decide.", "Multiplicity."):
        assert absent not in md  # the methodology claims only what the lines recorded


def test_a_verdict_is_never_said_twice():
    assert strip_status("H1 is INCONCLUSIVE: H1 is INCONCLUSIVE (a, b)", "H1") == "(a, b)"
    assert strip_status("INCONCLUSIVE: the CI straddles the bar", "H1") == "the CI straddles the bar"
    assert strip_status("H2 is REFUTED: x", "H1") == "H2 is REFUTED: x"  # another claim's words stay
    assert strip_status("overall, H1 is supported", "H1") == "overall, H1 is supported"
    lines = [VerdictLine(claim="H1", status="inconclusive", evidence="overall", numbers={}, evidence_result=None,
                         summary="H1 is INCONCLUSIVE (patching: supported; ablation: refuted).")]
    from reports.sections_front import status_sentence

    sentence = status_sentence(claim_rows(lines, {})[0])
    assert sentence == "H1 is INCONCLUSIVE (patching: supported; ablation: refuted)."
    # an overall verdict that only lists its lines reads as a tally: the lines follow with their numbers
    listed = lines + [VerdictLine(claim="H1", status=s, evidence=e, summary="x", numbers={}, evidence_result=None)
                      for e, s in (("patching", "supported"), ("ablation", "refuted"))]
    listed[0] = VerdictLine(claim="H1", status="inconclusive", evidence="overall", evidence_result=None,
                            summary="Lines of evidence: patching supported; ablation refuted.",
                            numbers={"lines": {"patching": "supported", "ablation": "refuted"}})
    assert status_sentence(claim_rows(listed, {})[0]) == \
        "H1 is INCONCLUSIVE: of its 2 lines of evidence, 1 is supported and 1 refuted."


CAPITALS = re.compile(r"\b(?:SUPPORTED|REFUTED|INCONCLUSIVE|NOT EVALUATED)\b")


def _said_once(claim: str, text: str) -> None:
    """A claim's verdict sentence names the claim and a status in capitals once each, and says how only once."""
    assert len(re.findall(rf"\b{re.escape(claim)} (?:is|was)\b", text)) == 1, text
    assert len(CAPITALS.findall(text)) == 1, text
    assert "combined from its lines" not in text and "criterion met" not in text and "criterion not met" not in text


def _verdict_sentences(ctx) -> list[tuple[str, str]]:
    from reports.sections_front import _why, status_sentence

    return [(row.claim, text) for row in ctx.claims for text in (status_sentence(row), _why(row, ctx))]


def _mixed_run(tmp_path):
    """Lines that disagree, a one-line criterion and a claim without an overall line."""
    run = build_run(tmp_path, verdicts={"H1": "inconclusive", "H2": "refuted", "C1": "refuted", "C2": "supported"},
                    overall=False)
    for name, status in (("H1--patching", "supported"), ("H1--gradients", "refuted"), ("H2--attention", "inconclusive")):
        path = run / "results" / f"verdicts_{name}.json"
        data = json.loads(path.read_text())
        data["verdict"]["status"] = status
        path.write_text(json.dumps(data))
    return run


def test_no_verdict_sentence_repeats_its_status_or_claim(tmp_path):
    runs = [build_run(tmp_path / s, verdicts=dict.fromkeys(claims.CLAIM_ORDER, s), overall=o)
            for s in ("supported", "refuted", "inconclusive") for o in (True, False)] + [_mixed_run(tmp_path / "m")]
    for run in runs:
        ctx = load_run(run)
        for claim, text in _verdict_sentences(ctx):
            _said_once(claim, text)
        _, md = render(run)
        for row in ctx.claims:  # each line in its claim's section says its own status once
            for line in section(md, f"#### {row.claim}: ").splitlines():
                if line.startswith("- **"):
                    assert len(CAPITALS.findall(line)) == 1, line


def test_sentences_the_decisions_compose_read_once(tmp_path):
    """Lines as hypotheses.decisions writes them (a too-small prompt file for H3, a gated H1) read once too."""
    from fixtures.config import RefusalConfig
    from fixtures.recording import Recorder
    from hypotheses import decisions as d
    from tests.test_decisions import behaviour

    cfg = RefusalConfig(model="tiny", n_bootstrap=200)
    h3 = d.one_category(("weapons",), behaviour(True), cfg)
    h1 = [d.no_behaviour("H1", e, behaviour(False), cfg) for e in claims.claim("H1").evidence()]
    run = build_run(tmp_path, verdicts={})
    rec = Recorder(run_dir=run)
    for v in h3 + [d.overall("H3", h3, cfg)] + h1 + [d.overall("H1", h1, cfg)]:
        rec.save(f"verdicts/{v.claim}--{v.evidence}", numbers={"test": "decisions"}, verdict=v.to_dict())
    sentences = [(claim, text) for claim, text in _verdict_sentences(load_run(run)) if claim in ("H1", "H3")]
    for claim, text in sentences:
        _said_once(claim, text)
    assert sentences[2] == ("H3", "H3 is INCONCLUSIVE on all 2 of its lines of evidence.")
    assert sentences[3][1].startswith("H3 is INCONCLUSIVE: weapons inconclusive: H3 needs at least 2 harm categories "
                                      "with train and test pairs (≥1 each); the prompt file has 1: weapons.")


# ----------------------------------------------------------------------------- pre-registration

def test_preregistration_hash_heads_the_report_and_the_methodology(run, rendered):
    page, md = rendered
    sha = json.loads((run / "manifest.json").read_text())["preregistration"]["sha256"]
    assert sha == json.loads((run / "preregistration.json").read_text())["sha256"]
    assert page.count(f'<span title="{sha}"><code>{sha[:12]}</code></span>') == 2  # top and methodology
    assert page.index(sha[:12]) < page.index('id="verdict-table"')
    promise = ("the bars, alpha, corrections, split sizes and selected components were written to "
               "preregistration.json and hashed before any stage scored a test pair")
    assert md.count(promise) == 2 and f"pre-registration sha256 | {sha}" in md
    assert md.count("(preregistration.json reproduces this hash)") == 2
    assert "Its decision rules: supported when every line's CI above its bar" in md
    assert "CHANGED" not in md and "pre-registration MISMATCH" not in md and "does NOT reproduce" not in md


def test_an_edited_preregistration_file_is_flagged(tmp_path):
    run = build_run(tmp_path, verdicts={"H1": "supported"})
    path = run / "preregistration.json"
    body = json.loads(path.read_text())
    body["record"]["lines"][0]["bar"] = 0.01  # a bar lowered after the run
    path.write_text(json.dumps(body))
    _, md = render(run)
    assert md.count("WARNING: preregistration.json does NOT reproduce the manifest's pre-registration hash") == 2
    (run / "preregistration.json").unlink()
    _, md = render(run)
    assert "preregistration.json is missing or unreadable here, so the hash cannot be checked" in md


def test_changed_bars_and_a_stale_line_are_flagged(tmp_path):
    run = build_run(tmp_path, prereg_changed=True, verdicts={"H1": "supported"})
    path = run / "results" / "verdicts_H1--gradients.json"
    data = json.loads(path.read_text())
    data["verdict"]["numbers"]["preregistration"] = "f" * 64
    path.write_text(json.dumps(data))
    page, md = render(run)
    assert md.count("WARNING: the pre-registered bars CHANGED AFTER the components were selected") == 2
    assert "Recorded note: h1_share lowered after the components were selected (synthetic)" in md
    assert "gradients supported" in md and "pre-registration MISMATCH" in md
    assert f"WARNING: this line was decided under pre-registration {'f' * 12}, not the run's" in md
    assert md.count("pre-registration MISMATCH") == 1  # only the stale line


def test_a_run_without_preregistration_says_so(tmp_path):
    page, md = render(build_run(tmp_path, preregistration=False, verdicts={"H2": "refuted"}))
    assert "no pre-registration recorded" in md and "no pre-registration recorded" in text_of(page)
    assert "pre-registered before any test pair" not in md
    assert "WARNING: this line cites pre-registration" not in md  # its lines cite no hash either


# ----------------------------------------------------------------------------- the new results

def _spec(page: str, dom_id: str) -> dict:
    raw = re.search(rf'<script type="application/json" id="{dom_id}-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def test_effect_share_curve_has_every_family_and_the_bar(tmp_path):
    page, md = render(build_run(tmp_path, bars=BARS))
    spec = _spec(page, "fig-effect-share")
    names = {t.get("name") for t in spec["data"]}
    assert {"heads", "neurons", "heads+neurons", "heads+neurons by parameters", "H1's bar"} <= names
    bar = next(t for t in spec["data"] if "bar" in str(t.get("name")))
    assert bar["x"] == [0.1] and bar["y"] == [0.9]
    effect = section(md, "#### Effect share of the top components (H1)")
    assert "At the bar's fraction of 10%: heads: the top 10% (2 of 24) restore" in effect
    assert "more than 90% of the gap from at most 10% of the components" in effect
    assert "the top 156 components, holding 10% of the 295k parameters" in effect


def test_accumulation_and_keyword_control_are_shown(rendered):
    page, md = rendered
    spec = _spec(page, "fig-accumulation")
    assert spec["data"] and len(spec["layout"]["shapes"]) == 3  # the three thirds
    acc = section(md, "#### Accumulation along the refusal direction")
    assert "0.15 [95% CI 0.09, 0.21, n=40]" in acc and "5 random directions" in acc and "p = 0.004" in acc
    assert "| middle | 2, 3 | 0.2 [95% CI 0.15, 0.25, n=40] |" in acc
    keyword = _spec(page, "fig-keyword-attention")
    names = [t.get("name") for t in keyword["data"]]
    assert "harmless analogues&#x27; matched tokens" in names or "harmless analogues' matched tokens" in names
    assert "contrast" in names
    words = section(md, "#### Attention to harm keywords")
    assert "The peak layer, chosen on 8 val pairs, is 0" in words and "matched tokens 1.05" in words


# ----------------------------------------------------------------------------- methodology

def test_methodology_describes_the_method_recorded(rendered):
    _, md = rendered
    method = section(md, "## Methodology")
    assert ("scores every head and MLP neuron at once on 64 train pairs. The top 30 heads by AtP are verified by "
            "exact patching on the same train pairs") in method
    assert "over 24 heads on 16 train pairs is descriptive only" in method
    assert "test: H1 patching, H1 parameters, H1 ablation, H1 gradients, H2 attention" in method
    assert "val + test: H3 weapons, H3 cyber, H3 &lt;fraud&gt;." in method
    assert "(80% power, from the line's measured standard error)" in method
    assert "ablation (against matched random heads + neurons): the difference is held to the bar" in method
    assert "H2 direction (against random directions): the statistic must beat it" in method
    assert "at most 0.1 nats and the answer cross-entropy at most 0.1 nats" in method
    assert "intersection-union test" in method and "C1: holm over the verified heads" in method
    assert "Holm-adjusted one-sided p-value is below alpha / 2 = 0.025" in method
    assert "H3's 3 category lines are corrected across the categories" in method
    assert "by count (the patching line" in method and "by parameter count (the parameters line" in method


def test_methodology_says_n_a_for_what_the_ranking_did_not_record(tmp_path):
    run = build_run(tmp_path, verdicts={"H1": "supported"})
    path = run / "results" / "phase3_heads.json"
    data = json.loads(path.read_text())
    for key in ("n_candidates", "n_pairs_atp", "n_pairs_sweep"):
        data["numbers"].pop(key)
    path.write_text(json.dumps(data))
    method = section(render(run)[1], "## Methodology")
    assert "scores every head and MLP neuron at once on n/a train pairs. The top n/a heads by AtP" in method
    assert "over 24 heads on n/a train pairs is descriptive only" in method


def test_a_line_whose_estimate_is_its_difference_shows_its_own_drop():
    from reports.claim_lines import measure

    diff = {"value": 0.37, "ci_low": 0.15, "ci_high": 0.58}
    control = {"name": "random", "estimate": {"value": 0.05, "ci_low": 0.0, "ci_high": 0.1}, "difference": diff}
    drop = {"value": 0.42, "ci_low": 0.2, "ci_high": 0.61}
    text = measure({"estimate": diff, "bar": 0.6, "control": control, "drop": drop})
    assert text == ("0.42 [95% CI 0.2, 0.61] vs random 0.05 [95% CI 0, 0.1] → difference 0.37 [95% CI 0.15, 0.58]; "
                    "bar 0.6 (supported above it)")
    assert measure({"estimate": diff, "bar": 0.6, "control": control}).startswith(
        "estimate not recorded vs random 0.05 [95% CI 0, 0.1] → difference 0.37")
    # a recorded "none" rule means the line has no control
    assert measure({"estimate": drop, "bar": 0.6, "control": {"name": "none: x", "rule": "none"}}) == \
        "0.42 [95% CI 0.2, 0.61]; bar 0.6 (supported above it)"
    assert measure({}) is None


def test_a_run_that_selected_nothing_says_so(tmp_path):
    """A run that decided no verdict pre-registers its bars with no selection, and the report says which."""
    import json as _json

    from fixtures.recording import write_preregistration
    from fixtures.storage import stable_hash

    run = build_run(tmp_path, verdicts={"H1": "inconclusive"})
    rec = {"bars": {"h1_share": 0.8}, "selected": None, "note": "this run decided no verdict"}
    note = write_preregistration(run, rec, stable_hash("preregistration", rec))
    manifest = _json.loads((run / "manifest.json").read_text())
    manifest["preregistration"] = note
    (run / "manifest.json").write_text(_json.dumps(manifest))
    _, md = render(run)
    assert "no component was selected (this run decided no verdict)" in md and "selected components were" not in md
