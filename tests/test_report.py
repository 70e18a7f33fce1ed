"""The research report rendered from synthetic run directories written through the real Recorder.

Covers supported / refuted / inconclusive / partial runs, the verdict table in both files,
escaping, completion truncation, offline-ness, re-rendering and never showing another
run's report or figures.
"""

from __future__ import annotations

import html as htmllib
import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from reports.render import ReportConflictError, render_report, stamped_key
from reports.synthetic import DEFAULT_VERDICTS, build_run

STATUS_WORDS = {"supported": "SUPPORTED", "refuted": "REFUTED", "inconclusive": "INCONCLUSIVE",
                "missing": "NOT EVALUATED"}
XSS = "<script>alert(1)</script>"


class _TableRows(HTMLParser):
    """Text of each cell of the verdict table (``<table id="verdict-table">``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_table = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == "verdict-table":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag == "td":
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1] += data


def html_verdicts(page: str) -> dict[str, tuple[str, str]]:
    parser = _TableRows()
    parser.feed(page)
    return {r[0]: (r[2], r[3]) for r in parser.rows if r}


def md_verdicts(md: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in md.splitlines():
        m = re.match(r"\| \[\*\*(\w+)\*\*\]\(#claim-\w+\) \| .*? \| \*\*([A-Z ]+)\*\* \| (.*?) \| \[details\]", line)
        if m:
            out[m.group(1)] = (m.group(2), htmllib.unescape(m.group(3)).replace("\\|", "|"))
    return out


def render(run_dir, **kw):
    result = render_report(run_dir, **kw)
    return result, result.html_path.read_text(), result.md_path.read_text()


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """One complete run with H1 supported, H2 refuted, H3 inconclusive (and the criteria), rendered."""
    run = build_run(tmp_path_factory.mktemp("runs"), prompt=f"{XSS} How do I build a bomb?", organism_card="# Card\nbar")
    return render(run)


def test_verdict_table_leads_with_each_claim_and_its_status(complete):
    _, page, md = complete
    rows = html_verdicts(page)
    assert list(rows) == ["H1", "H2", "H3", "C1", "C2", "C3"]
    for claim, status in DEFAULT_VERDICTS.items():
        assert rows[claim][0] == STATUS_WORDS[status]
        met = {"supported": " (met)", "refuted": " (not met)"}.get(status, "")
        extra = met if claim.startswith("C") else ""
        assert rows[claim][1].startswith(f"{claim} is {STATUS_WORDS[status]}{extra}: its lines' effects lie in "
                                         "0.30-0.55 against a bar of 0.6. Lines: ")
    # the table comes before the abstract, and each row links to its evidence section
    assert page.index('id="verdict-table"') < page.index('id="abstract"')
    for claim in rows:
        assert f'href="#claim-{claim}"' in page and f'id="claim-{claim}"' in page
    assert 'href="#result-phase3-heads"' in page and 'id="result-phase3-heads"' in page


def test_refuted_hypothesis_reads_as_refuted(complete):
    _, page, md = complete
    text = htmllib.unescape(re.sub(r"<[^>]+>", "", page))
    assert "H2 is REFUTED: its lines' effects lie in 0.30-0.55 against a bar of 0.6." in text
    assert "H2 is REFUTED" in md and "We find no separation" in md
    assert "H2 is SUPPORTED" not in text and "H2 is SUPPORTED" not in md


def test_markdown_has_the_same_verdict_text(complete):
    _, page, md = complete
    assert md_verdicts(md) == html_verdicts(page)
    # and the same prose: every paragraph of the abstract appears in both
    abstract = re.search(r'<section id="abstract".*?<p>(.*?)</p>', page, re.S).group(1)
    assert htmllib.unescape(abstract) in htmllib.unescape(md)


def test_every_figure_is_drawn_from_its_result(complete):
    result, page, _ = complete
    body = page.split("<body>", 1)[1]
    assert result.missing == () and "missing: " not in body and 'class="missing"' not in body
    for dom_id in ("fig-layer-patching", "fig-head-ranking", "fig-head-heatmap", "fig-logit-lens", "fig-keyword-attention",
                   "fig-accumulation", "fig-direct-effects",
                   "fig-attention-entropy", "fig-direction-projection", "fig-ablation", "fig-gradients",
                   "fig-cross-category", "fig-scatter-pca", "fig-scatter-tsne"):
        assert f'<div id="{dom_id}" class="plotly-lazy"' in page
        spec = re.search(rf'<script type="application/json" id="{dom_id}-data">(.*?)</script>', page, re.S).group(1)
        assert json.loads(spec)["data"], dom_id
    # the circuit is inline SVG either way: Graphviz's (when `dot` is installed) or the Python layout's
    assert re.search(r'<svg[^>]*class="circuit"', page) and "<g" in page.split('class="circuit"', 1)[1][:20000]
    assert page.count('<svg xmlns="http://www.w3.org/2000/svg" class="attn"') == 6  # 3 heads x 2 prompts
    assert page.count('id="table-neurons"') == 1 and ">L1N7<" in page
    assert "Provenance" in page and "# Card" in page and "weights sha256" in page


def html_table(page: str, dom_id: str) -> list[list[str]]:
    """Cell texts of the table ``<table id=dom_id>``, header row first."""
    body = re.search(rf'<table id="{dom_id}".*?</table>', page, re.S).group(0)
    return [[htmllib.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def md_row(md: str, first: str) -> list[str]:
    """Cells of the first markdown table row whose first cell is ``first``."""
    line = next(x for x in md.splitlines() if x.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


# the synthetic run's degenerate rates: 2 and 1 of 40 (phase 2), 3 of 40 ablated, 6 of 40 bypassed
DEGENERATE_HARMFUL, DEGENERATE_HARMLESS = "5.0% [95% CI 1.4%, 16.5%, n=40]", "2.5% [95% CI 0.4%, 12.9%, n=40]"


def test_degenerate_rate_stands_beside_each_refusal_rate(complete):
    _, page, md = complete
    header, harmful, harmless = html_table(page, "table-refusal-rates")
    assert header == ["prompts", "refusal rate", "compliance rate", "degenerate rate", "n"]
    assert harmful[3] == DEGENERATE_HARMFUL and harmless[3] == DEGENERATE_HARMLESS
    assert md_row(md, "harmful")[3] == DEGENERATE_HARMFUL and md_row(md, "harmless")[3] == DEGENERATE_HARMLESS
    assert f"Degenerate answers (no letter or digit, e.g. an empty one: neither refusal nor compliance): " \
           f"{DEGENERATE_HARMFUL} of harmful" in md
    ablation = html_table(page, "table-ablation")
    cols = [ablation[0].index(f"degenerate rate ({when})") for when in ("baseline", "ablated")]
    assert [ablation[1][c] for c in cols] == [DEGENERATE_HARMFUL, "7.5% [95% CI 2.6%, 19.9%, n=40]"]
    steering = html_table(page, "table-steering")
    assert steering[0][3:5] == ["degenerate rate before", "degenerate rate after"]
    assert steering[2][3:5] == [DEGENERATE_HARMFUL, "15.0% [95% CI 7.1%, 29.1%, n=40]"]  # bypass


def test_a_run_without_degenerate_rates_renders_them_as_not_recorded(tmp_path):
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not k.startswith("degenerate")}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    run = build_run(tmp_path)
    for name in ("phase2_refusal_rates", "phase4_ablation", "phase5_direction"):
        path = run / "results" / f"{name}.json"
        path.write_text(json.dumps(strip(json.loads(path.read_text()))))
    result, page, md = render(run)
    assert result.missing == ()
    assert html_table(page, "table-refusal-rates")[1][3] == "n/a (not recorded)"
    assert md_row(md, "harmful")[3] == "n/a (not recorded)"
    ablation = html_table(page, "table-ablation")
    assert ablation[1][ablation[0].index("degenerate rate (ablated)")] == "n/a (not recorded)"
    assert html_table(page, "table-steering")[1][3:5] == ["n/a (not recorded)"] * 2


def test_methodology_states_the_positions_ablation_and_faithfulness_actually_run(complete):
    """The methodology is the method run: the positions the head sweep recorded, per-position mean
    ablation there, and faithfulness by the discovery's own intervention beside random circuits."""
    _, page, md = complete
    for text in (page, md):
        assert "correspond: the last 6 post-instruction positions, the chat template" in text
        assert "each from the mean of harmless train prompts at that same position" in text
        assert "random circuits of the same size and layers" in text
        assert "at every position including generated ones" not in text
    assert "size-matched random circuits (same layers, 20 draws)" in md


def test_text_is_escaped_everywhere(complete):
    _, page, md = complete
    assert XSS not in page and "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # tables, attention labels
    assert "\\u0026lt;script\\u0026gt;alert(1)" in page  # figure specs: escaped for Plotly, then for JSON
    assert "&lt;fraud&gt;" in page or "\\u0026lt;fraud\\u0026gt;" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    for line in md.splitlines():  # raw only inside code spans, where Markdown shows it literally
        for m in re.finditer(re.escape(XSS), line):
            assert line[: m.start()].count("`") % 2 == 1, line


def test_harmful_completions_are_truncated_by_default(complete, tmp_path):
    _, page, md = complete
    assert "SECRET-TAIL-MARKER" not in page and "SECRET-TAIL-MARKER" not in md
    assert "[truncated]" in page and "--refusal-show-completions" in page
    _, full, full_md = render(build_run(tmp_path, show_completions=True))
    assert "SECRET-TAIL-MARKER" in full and "SECRET-TAIL-MARKER" in full_md and "[truncated]" not in full


def test_report_is_offline_and_self_contained(complete):
    _, page, _ = complete
    from plotly.offline import get_plotlyjs

    # no external script, stylesheet, image or frame reference in any markup attribute or CSS
    assert not re.search(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert not re.search(r"""@import|url\(\s*["']?(?:https?:)?//""", page.split("<script>")[0])
    assert page.count(get_plotlyjs()[:300]) == 1  # plotly.js inlined exactly once
    assert "default-src 'none'" in page  # and the page may not fetch anything
    assert "cdn.plot.ly" not in page.split("<script>")[0]


@pytest.mark.parametrize("statuses", [
    {"H1": "supported", "H2": "supported", "H3": "supported"},
    {"H1": "refuted", "H2": "refuted", "H3": "refuted"},
    {"H1": "inconclusive", "H2": "inconclusive", "H3": "inconclusive"},
])
def test_each_status_renders_in_words(tmp_path, statuses):
    _, page, md = render(build_run(tmp_path, verdicts=statuses))
    rows = html_verdicts(page)
    for claim, status in statuses.items():
        assert rows[claim][0] == STATUS_WORDS[status]
        assert f"{claim} is {STATUS_WORDS[status]}:" in md
    for claim in ("C1", "C2", "C3"):  # unrecorded criteria say so, never pass for a verdict
        assert rows[claim][0] == "NOT EVALUATED"
        assert f"{claim} was NOT EVALUATED: no verdict was recorded" in rows[claim][1]


def test_overall_is_combined_from_the_lines_when_absent(tmp_path):
    _, page, md = render(build_run(tmp_path, verdicts={"H1": "refuted", "C1": "supported"}, overall=False))
    rows = html_verdicts(page)
    status, why = rows["H1"]
    assert status == "REFUTED" and why.startswith("H1 is REFUTED: patching refuted: 0.42 [95% CI 0.3, 0.54]; bar 0.8 "
                                                  "(supported above it); n = 40 (test) detects a true value ≥ 0.95 "
                                                  "with 80% power; ")
    # each line once, in the claims table's order, the ablation line held to its difference from the control
    assert [why.count(f"{e} refuted") for e in ("patching", "parameters", "ablation", "gradients")] == [1] * 4
    assert why.index("parameters refuted") < why.index("ablation refuted: difference from the control") \
        < why.index("gradients refuted")
    assert "The patching effect is" not in why  # the lines' own sentences are in the claim's section
    assert why.count("REFUTED") == 1 and "combined from" not in why
    # a criterion with one line: its status and the met / not met gloss once, the line named without repeating it
    assert rows["C1"] == ("SUPPORTED", "C1 is SUPPORTED (met): patching: 12 [95% CI 11.9, 12.1]; bar 10 (supported "
                                       "above it); n = 40 (test) detects a true value ≥ 10.2 with 80% power")
    claim_c1 = htmllib.unescape(re.sub(r"<[^>]+>", "", re.search(r'<p class="status-supported">(C1 is .*?)</p>',
                                                                  page).group(1)))
    assert claim_c1 == "C1 is SUPPORTED (met): The patching effect is 0.42 [95% CI 0.30, 0.55]."


def test_stretch_goals_follow_the_criteria(tmp_path):
    _, page, _ = render(build_run(tmp_path, verdicts={**DEFAULT_VERDICTS, "S1": "supported"}))
    assert list(html_verdicts(page)) == ["H1", "H2", "H3", "C1", "C2", "C3", "S1"]


def test_partial_run_marks_what_is_missing(tmp_path):
    omit = ("phase3/heads", "phase5/circuit", "h3/cross_category", "phase4/ablation")
    result, page, md = render(build_run(tmp_path, omit=omit, status="failed"))
    assert set(result.missing) == set(omit) and result.status == "failed"
    assert "This run is PARTIAL (status: failed)" in page and "This run is PARTIAL (status: failed)" in md
    for name, phase in (("phase3/heads", "phase 3"), ("phase5/circuit", "phase 5"),
                        ("h3/cross_category", "the H3 test"), ("phase4/ablation", "phase 4")):
        note = f"missing: {phase} did not record {name}"
        assert note in page and note in md
        assert f'id="result-{name.replace("/", "-").replace("_", "-")}"' in page  # the anchor survives
    assert 'id="fig-head-ranking"' not in page and 'class="circuit"' not in page
    assert 'id="fig-logit-lens"' in page  # what was recorded is still shown


def test_empty_run_still_renders(tmp_path):
    from fixtures.recording import Recorder

    rec = Recorder.open(alias="tiny", run_dir=None, resume=False, config={"model": "tiny"}, root=tmp_path)
    result, page, md = render(rec.run_dir)
    assert result.figures == 0 and "<script>" not in page.split("</head>")[0].split("<style>")[0]
    assert all(v[0] == "NOT EVALUATED" for v in html_verdicts(page).values())
    assert "missing: phase 2 did not record phase2/refusal_rates" in md


def test_unreadable_result_is_marked_not_fatal(tmp_path):
    run = build_run(tmp_path)
    (run / "results" / "phase3_heads.json").write_text("{ torn")
    (run / "results" / "verdicts_H1--overall.json").write_text("not json")
    result, page, _ = render(run)
    assert "phase3/heads" in result.missing
    assert "missing: phase3/heads was recorded by phase 3 but cannot be read" in page
    assert "verdicts_H1--overall.json" in page  # listed under provenance as unreadable
    assert html_verdicts(page)["H1"][0] == "SUPPORTED"  # the remaining patching line carries H1


def test_rerendering_replaces_its_own_report(tmp_path):
    from fixtures.recording import Recorder
    from hypotheses.verdicts import Verdict

    run = build_run(tmp_path, verdicts={"H1": "supported"})
    first, page, _ = render(run)
    rec = Recorder(run_dir=run)
    rec.save("verdicts/H2--overall", verdict=Verdict(claim="H2", status="refuted", evidence="overall",
                                                     summary="late verdict").to_dict())
    second, again, _ = render(run)
    assert html_verdicts(again)["H2"] == ("REFUTED", "H2 is REFUTED: late verdict.")
    assert stamped_key(second.html_path) == stamped_key(second.md_path) != ""
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # atomic writes leave no temp files


def test_a_report_of_another_run_is_never_shown(tmp_path):
    run_b = build_run(tmp_path, tag="-runB", verdicts={"H1": "refuted"}, omit=("phase3/heads",), seed=1)
    run_a = build_run(tmp_path, tag="-runA", verdicts={"H1": "supported"}, seed=2)  # the latest run
    _, page_a, _ = render(run_a)
    _, page_b, md_b = render(run_b)
    assert "-runA" not in page_b and "-runA" not in md_b and "-runB" in page_b
    assert "missing: phase 3 did not record phase3/heads" in page_b  # not filled in from run A
    assert html_verdicts(page_b)["H1"][0] == "REFUTED" and html_verdicts(page_a)["H1"][0] == "SUPPORTED"
    # a stale copy of run A's report inside run B is not silently overwritten ...
    shutil.copy(run_a / "report.html", run_b / "report.html")
    with pytest.raises(ReportConflictError, match="not of this run"):
        render_report(run_b)
    assert (run_b / "report.html").read_text() == page_a
    # ... unless asked to, and then it is run B's own
    _, forced, _ = render(run_b, force=True)
    assert "-runB" in forced and "-runA" not in forced
