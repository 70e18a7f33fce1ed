"""The front of the write-up: verdict table, abstract, introduction, methodology, claim evidence.

Prose is assembled from the run's results and configuration: a claim's status is spelled
out in capitals once ("H1 is REFUTED: ..."; its lines' statuses in lower case), thresholds
come from the recorded config, and a number appears only through reports.fmt, with its interval.
"""

from __future__ import annotations

from typing import Mapping

from hypotheses.verdicts import STATUSES
from reports import claim_lines, fmt, preregistration
from reports.claim_lines import STATUS_WORD, strip_status, word  # noqa: F401 - STATUS_WORD is imported from here
from reports.context import KNOWN_RESULTS, ClaimRow, RunContext, anchor
from reports.document import Block, Inline, Section, Span, bullets, cell, para, spans, table


def _status_head(row: ClaimRow) -> str:
    """``H1 is REFUTED``; for the criteria and stretch goals supported means met (hypotheses/decisions.py)."""
    head = f"{row.claim} is {word(row.status)}"
    if row.claim[:1] in ("C", "S") and row.status in ("supported", "refuted"):
        head += " (met)" if row.status == "supported" else " (not met)"
    return head


def _lists_lines(row: ClaimRow) -> bool:
    """True when the overall verdict's sentence only lists its lines' statuses (``numbers.lines``)."""
    overall = next((line for line in row.lines if line.is_overall), None)
    return overall is not None and isinstance(overall.numbers.get("lines"), Mapping) and bool(row.evidence_lines)


def _tallied(row: ClaimRow) -> str:
    """``H1 is INCONCLUSIVE: of its 4 lines of evidence, 2 are supported, 1 refuted and 1 inconclusive.``"""
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    for line in row.evidence_lines:
        counts[line.status] = counts.get(line.status, 0) + 1
    counts = {s: k for s, k in counts.items() if k}
    n = len(row.evidence_lines)
    if list(counts) == [row.status]:  # every line agrees with the claim: its status once
        return f"{_status_head(row)} on {'its one line' if n == 1 else f'all {n} of its lines'} of evidence."
    (status, k), *rest = counts.items()
    parts = [f"{k} {'is' if k == 1 else 'are'} {status}"] + [f"{k} {s}" for s, k in rest]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{_status_head(row)}: of its {n} line{'' if n == 1 else 's'} of evidence, {listed}."


def _joined(head: str, rest: str) -> str:
    rest = rest.strip()
    if not rest:
        return f"{head}."
    text = f"{head} {rest}" if rest.startswith("(") else f"{head}: {rest}"
    return text if text.endswith((".", "!", "?")) else f"{text}."


def status_sentence(row: ClaimRow) -> str:
    """``H1 is REFUTED: <why>``, the status said once; the words carry the verdict, colour only repeats it."""
    if row.status == "missing":
        return f"{row.claim} was NOT EVALUATED: no verdict was recorded in this run."
    lines = row.evidence_lines
    if _lists_lines(row) or (row.combined and len(lines) > 1):  # a tally: each line follows with its numbers
        return _tallied(row)
    if row.combined and len(lines) == 1:  # the claim is its one line: that line's sentence, without its status
        return _joined(_status_head(row), strip_status(lines[0].summary, row.claim))
    return _joined(_status_head(row), strip_status(row.summary, row.claim))


def _why(row: ClaimRow, ctx: RunContext) -> str:
    """The verdict table's reason: the claim's status once, then each line once, briefly."""
    lines = row.evidence_lines
    if not lines:
        return status_sentence(row)
    if len(lines) == 1 and lines[0].status == row.status:  # the line's status is the claim's: not said again
        briefs = claim_lines.brief(lines[0], ctx, status=False)
    else:
        briefs = "; ".join(claim_lines.brief(line, ctx) for line in lines)
    if row.combined or _lists_lines(row):  # the lines are the reason: a list of them would repeat them
        return f"{_status_head(row)}: {briefs}"
    return f"{status_sentence(row).rstrip('.')}. Lines: {briefs}"


def _result_link(name: str) -> Span:
    """A link to a result's section; a result the report has no section for is named, not linked."""
    if name in KNOWN_RESULTS:
        return Span(text=name, href="#" + anchor(name))
    return Span(text=name, code=True)


def _evidence_links(row: ClaimRow) -> Inline:
    parts: list[Span] = [Span(text="details", href="#" + row.anchor)]
    seen = set()
    for line in row.lines:
        if line.evidence_result and line.evidence_result not in seen:
            seen.add(line.evidence_result)
            parts += [Span(text=", "), _result_link(line.evidence_result)]
    return tuple(parts)


def verdict_section(ctx: RunContext) -> Section:
    rows = [(cell(Span(text=r.claim, href="#" + r.anchor, strong=True)), r.title,
             cell(Span(text=word(r.status), strong=True)), _why(r, ctx), _evidence_links(r)) for r in ctx.claims]
    blocks: list[Block] = []
    if ctx.manifest.get("synthetic"):
        blocks.append(para("SYNTHETIC run: the numbers below are seeded noise written to test the report, not "
                           "measurements of any model.", css="warning"))
    if (ctx.manifest.get("config") or {}).get("rehearsal"):
        blocks.append(para("REHEARSAL run: it measured the time and memory of every stage at this subject's size, "
                           "with a reduced design (fixtures.config.REHEARSAL_DESIGN) and whether or not the "
                           "subject refuses. Its verdicts mean nothing; read its phase table for cost.",
                           css="warning"))
    if ctx.partial:
        gone = ", ".join(ctx.missing) if ctx.missing else "none"
        blocks.append(para(f"This run is PARTIAL (status: {ctx.status}). Results it did not record: {gone}. Every "
                           "figure below comes from this run directory only; what is missing is marked missing.",
                           css="warning"))
    blocks += preregistration.blocks(ctx)
    blocks.append(table(("claim", "statement", "verdict", "why", "evidence"), rows, css="verdicts",
                        row_css=tuple(f"status-{r.status}" for r in ctx.claims), dom_id="verdict-table"))
    return Section(dom_id="verdicts", title="Verdicts", blocks=tuple(blocks))


def _verdict_list(ctx: RunContext, claims: tuple[str, ...]) -> str:
    rows = {r.claim: r for r in ctx.claims}
    return "; ".join(f"{c} is {STATUS_WORD[rows[c].status]}" if c in rows and rows[c].status in STATUS_WORD
                     else f"{c} is {rows[c].status.upper()}" for c in claims if c in rows)


def abstract(ctx: RunContext) -> Section:
    model = ctx.model
    size = (ctx.manifest.get("model_load") or {}).get("memory_estimate", {}).get("n_params")
    what = (f"{ctx.model_name} ({model.get('n_layers', 'n/a')} layers, "
            f"{fmt.params(size)} parameters, quantization {model.get('quant', ctx.config.get('quant', 'n/a'))})")
    rates = ctx.numbers("phase2/refusal_rates")
    text = [f"We ask how {what} decides to refuse harmful requests, using contrastive pairs of harmful and harmless "
            "prompts, activation patching, ablation, gradient attribution and a refusal direction."]
    if rates:
        harm, good = rates.get("harmful") or {}, rates.get("harmless") or {}
        text.append(f"It refuses {fmt.estimate(harm.get('refusal_rate'), pct=True)} of held-out "
                    f"harmful prompts and {fmt.estimate(good.get('refusal_rate'), pct=True)} "
                    "of their harmless analogues (degenerate answers, with no letter or digit and counted as "
                    f"neither: {fmt.estimate(harm.get('degenerate_rate'), pct=True)} and "
                    f"{fmt.estimate(good.get('degenerate_rate'), pct=True)}).")
    text.append(f"Hypotheses: {_verdict_list(ctx, ('H1', 'H2', 'H3'))}. Success criteria: "
                f"{_verdict_list(ctx, ('C1', 'C2', 'C3'))}.")
    circuit = ctx.numbers("phase5/circuit")
    if circuit.get("faithfulness") is not None:
        rest = ("with every other head and neuron patched from the harmless analogue"
                if circuit.get("intervention") else "with everything else mean-ablated")
        text.append(f"The reconstructed circuit keeps {fmt.estimate(circuit['faithfulness'])} of the refusal score "
                    f"{rest}" + (f" (random circuits of its size: {fmt.estimate(circuit['faithfulness_random'])})."
                                 if circuit.get("faithfulness_random") else "."))
    drops = [c for c in ctx.numbers("phase4/ablation").get("conditions") or [] if c.get("kind") == "circuit"]
    if drops:
        c = drops[0]
        text.append(f"Ablating {c.get('label') or c.get('name')} lowers the refusal rate by "
                    f"{fmt.estimate(c.get('relative_drop'), pct=True)} (relative; Holm {fmt.p_value(c.get('p_holm'))}).")
    if (ctx.manifest.get("config") or {}).get("rehearsal"):
        text.insert(0, "This is a REHEARSAL: it measures what each stage costs at this size; no verdict below "
                       "says anything about how the model refuses.")
    if ctx.partial:
        text.append(f"This run is partial: {len(ctx.missing)} of the expected results are missing and marked so.")
    return Section(dom_id="abstract", title="Abstract", blocks=(para(" ".join(text)),))


def _bar_phrase(ctx: RunContext) -> str:
    if preregistration.sha(ctx) is None:
        return f"a bar on a confidence interval ({preregistration.NONE_RECORDED})"
    return "a bar on a confidence interval, pre-registered before any test pair was scored"


def introduction(ctx: RunContext) -> Section:
    return Section(dom_id="introduction", title="Introduction", blocks=(
        para("Chat models are trained to decline harmful requests. Whether that behaviour is implemented by a small, "
             "identifiable mechanism matters for auditing it and for knowing how easily it can be removed. Following "
             "the circuits programme (activation patching, attribution patching, ablation) and the finding that "
             "refusal is mediated by a single residual-stream direction (Arditi et al., 2024), this report tests "
             f"three hypotheses on {ctx.model_name}, each decided by {_bar_phrase(ctx)}:"),
        bullets([cell(Span(text=r.claim, strong=True, href="#" + r.anchor), f": {r.title}.")
                 for r in ctx.claims if r.claim.startswith("H")]),
        para("A hypothesis is SUPPORTED only when its interval clears the bar, REFUTED when it lies on the wrong side, "
             "and INCONCLUSIVE otherwise. A refuted hypothesis is a result, reported as such."),
    ))


def claim_evidence(ctx: RunContext) -> Section:
    children = []
    for row in ctx.claims:
        blocks: list[Block] = [para(status_sentence(row), css=f"status-{row.status}")]
        items = []
        for line in row.evidence_lines:
            parts: list[Span | str] = [Span(text=line.evidence, strong=True),
                                       f" — {claim_lines.details(line, ctx)}"]
            if line.evidence_result:
                parts += [" (see ", _result_link(line.evidence_result), ")"]
            items.append(spans(*parts))
        if items:
            blocks.append(bullets(items))
        children.append(Section(dom_id=row.anchor, title=f"{row.claim}: {row.title}", blocks=tuple(blocks), level=4))
    return Section(dom_id="evidence", title="Evidence by claim", level=3, children=tuple(children))
