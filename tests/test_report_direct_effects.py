"""H2's execution line in the report: the h2/direct_effects figure, its caption, its methodology, its absence."""

from __future__ import annotations

import json
import re

import pytest

from fixtures.recording import Recorder
from hypotheses import claims
from reports import fmt
from reports.fig_evidence import as_fraction
from reports.synthetic import build_run
from tests.reporting import render, section, text_of

NAME = "h2/direct_effects"





def spec(page: str, dom_id: str) -> dict:
    raw = re.search(rf'<script type="application/json" id="{dom_id}-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("direct"))


@pytest.fixture(scope="module")
def rendered(run):
    return render(run)


def test_the_figure_draws_both_blocks_per_layer_from_the_record(run, rendered):
    page, _ = rendered
    rec = Recorder(run_dir=run).load(NAME)
    figure = spec(page, "fig-direct-effects")
    bars = {t["name"]: t for t in figure["data"] if t["type"] == "bar"}
    assert set(bars) == {"attention output", "MLP output"} and figure["layout"]["barmode"] == "group"
    for name, key in (("attention output", "attn_out"), ("MLP output", "mlp_out")):
        assert bars[name]["y"] == pytest.approx(rec.arrays[key].tolist())
        assert bars[name]["x"] == list(range(rec.arrays[key].shape[0]))
    span = rec.arrays["attn_out"].shape[0] - 1
    shapes = figure["layout"]["shapes"]
    late, band, line = shapes  # the late layers, the depth's CI, the depth
    bar = claims.claim("H2").bar_of("patching", {})
    assert late["x0"] == pytest.approx(bar * span) and late["x1"] == pytest.approx(span + 0.5)
    depth = rec.numbers["depth"]
    assert (band["x0"], band["x1"]) == pytest.approx((depth["ci_low"] * span, depth["ci_high"] * span))
    assert line["x0"] == pytest.approx(depth["value"] * span)


def test_the_caption_gives_the_recorded_depth_its_ci_and_the_bar(run, rendered):
    page, md = rendered
    rec = Recorder(run_dir=run).load(NAME)
    depth = fmt.estimate(rec.numbers["depth"])
    assert as_fraction(claims.claim("H2").bar_of("patching", {})) == "2/3"
    text = section(md, "#### Direct effects on the refusal score (execution)")
    for words in (f"the effect-weighted relative depth {depth} and its CI", "relative depth above H2's bar of 2/3",
                  f"is {depth}; H2's patching line needs it above 2/3", "over 40 test pairs",
                  "(denoising, 40 test pairs;", "at the last position (the logits' direct path)"):
        assert words in text, words
        assert words in text_of(page), words
    assert "#fig-direct-effects" in text


def test_the_claims_line_links_to_the_figure(rendered):
    page, md = rendered
    assert 'href="#result-h2-direct-effects"' in page and 'id="result-h2-direct-effects"' in page
    assert "[h2/direct_effects](#result-h2-direct-effects)" in md


def test_methodology_says_what_the_line_measures(rendered):
    _, md = rendered
    method = section(md, "## Methodology")
    assert "**Direct effects (H2's execution line).**" in method
    for words in ("direct effect on the refusal score, its path to the logits alone", "Wang et al. 2022",
                  "final norm and unembedding", "recorded: last position (the logits' direct path)",
                  "Denoising on 40 test pairs", "effect-weighted relative depth", "above H2's bar of 2/3"):
        assert words in method, words


def test_an_absent_record_says_so_and_keeps_its_anchor(tmp_path):
    page, md = render(build_run(tmp_path, omit=(NAME,)))
    note = "missing: the H2 test did not record h2/direct_effects"
    assert note in page and note in md
    assert 'id="result-h2-direct-effects"' in page and 'id="fig-direct-effects"' not in page
    assert "Direct effects (H2's execution line)" not in md  # the methodology claims no step the run did not record


def test_an_unreadable_record_says_why(tmp_path):
    run = build_run(tmp_path)
    (run / "results" / "h2_direct_effects.json").write_text("{ torn")
    page, _ = render(run)
    assert "missing: h2/direct_effects was recorded by the H2 test but cannot be read" in page


def test_a_record_without_arrays_keeps_its_sentence_and_says_what_is_missing(tmp_path):
    run = build_run(tmp_path)
    rec = Recorder(run_dir=run)
    rec.save(NAME, numbers=dict(rec.load(NAME).numbers))
    page, md = render(run)
    text = section(md, "#### Direct effects on the refusal score (execution)")
    assert "missing: h2/direct_effects was recorded by the H2 test but cannot be read (arrays attn_out/mlp_out " \
           "absent)" in text
    assert "H2's patching line needs it above 2/3" in text and 'id="fig-direct-effects"' not in page
