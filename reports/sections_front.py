"""The front of the write-up: verdict table, abstract, introduction, methodology, claim evidence.

Prose is assembled from the run's results and configuration: a status is always spelled
out in capitals ("H1 is REFUTED: ..."), thresholds come from the recorded config, and a
number appears only through reports.fmt, with its interval.
"""

from __future__ import annotations

from reports import fmt
from reports.context import KNOWN_RESULTS, ClaimRow, RunContext, anchor
from reports.document import Block, Inline, Section, Span, bullets, cell, para, spans, table

STATUS_WORD = {"supported": "SUPPORTED", "refuted": "REFUTED", "inconclusive": "INCONCLUSIVE",
               "missing": "NOT EVALUATED"}


def status_sentence(row: ClaimRow) -> str:
    """``H1 is REFUTED: <summary>``; the words carry the verdict, colour only repeats it."""
    if row.status == "missing":
        return f"{row.claim} was NOT EVALUATED: no verdict was recorded in this run."
    how = " (combined from its lines of evidence)" if row.combined else ""
    if row.claim[:1] in ("C", "S") and row.status in ("supported", "refuted"):
        # for the criteria and stretch goals, supported means met (hypotheses/decisions.py)
        how += " (criterion met)" if row.status == "supported" else " (criterion not met)"
    return f"{row.claim} is {STATUS_WORD.get(row.status, row.status.upper())}{how}: {row.summary}"


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
             cell(Span(text=STATUS_WORD.get(r.status, r.status.upper()), strong=True)), status_sentence(r),
             _evidence_links(r)) for r in ctx.claims]
    blocks: list[Block] = []
    if ctx.manifest.get("synthetic"):
        blocks.append(para("SYNTHETIC run: the numbers below are seeded noise written to test the report, not "
                           "measurements of any model.", css="warning"))
    if ctx.partial:
        gone = ", ".join(ctx.missing) if ctx.missing else "none"
        blocks.append(para(f"This run is PARTIAL (status: {ctx.status}). Results it did not record: {gone}. Every "
                           "figure below comes from this run directory only; what is missing is marked missing.",
                           css="warning"))
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
    if ctx.partial:
        text.append(f"This run is partial: {len(ctx.missing)} of the expected results are missing and marked so.")
    return Section(dom_id="abstract", title="Abstract", blocks=(para(" ".join(text)),))


def introduction(ctx: RunContext) -> Section:
    return Section(dom_id="introduction", title="Introduction", blocks=(
        para("Chat models are trained to decline harmful requests. Whether that behaviour is implemented by a small, "
             "identifiable mechanism matters for auditing it and for knowing how easily it can be removed. Following "
             "the circuits programme (activation patching, attribution patching, ablation) and the finding that "
             "refusal is mediated by a single residual-stream direction (Arditi et al., 2024), this report tests "
             f"three hypotheses on {ctx.model_name}, each decided by a pre-registered bar on a confidence interval:"),
        bullets([cell(Span(text=r.claim, strong=True, href="#" + r.anchor), f": {r.title}.")
                 for r in ctx.claims if r.claim.startswith("H")]),
        para("A hypothesis is SUPPORTED only when its interval clears the bar, REFUTED when it lies on the wrong side, "
             "and INCONCLUSIVE otherwise. A refuted hypothesis is a result, reported as such."),
    ))


def _positions_sentence(ctx: RunContext) -> str:
    heads = ctx.numbers("phase3/heads")
    where = heads.get("positions") or ctx.config.get("patch_positions")
    n = heads.get("n_pairs", ctx.config.get("patch_pairs", "n/a"))
    if where is None:  # a run from before the positions were recorded
        return (f"Exact patching uses {n} train pairs at every position, aligned from the end of the prompt "
                "(pairs of unequal token length then splice into positions that do not correspond).")
    if str(where).startswith("post-instruction"):
        return (f"Patches go only where the two prompts' positions correspond: the {where} positions, the chat "
                "template's tokens after the user's message, which are the same tokens in every prompt (the "
                f"positions Arditi et al. 2024 search). The head ranking uses {n} train pairs.")
    return (f"Patches cover every position, on pairs of equal token length under the subject's tokenizer only "
            f"(so every position corresponds); the head ranking uses {n} such train pairs.")


def _ablation_sentence(ctx: RunContext) -> str:
    where = ctx.numbers("phase3/heads").get("positions") or ctx.config.get("patch_positions")
    if where is not None and str(where).startswith("post-instruction"):
        return (f"Heads and neurons are mean-ablated where they were found: at the {where} prompt positions, each "
                "from the mean of harmless train prompts at that same position (the template's tokens are the same "
                "there), leaving system prompt, instruction and generated tokens as the model computes them. The "
                "refusal direction is removed at every position, generated ones included (Arditi et al. 2024).")
    return ("Components are replaced by their mean over harmless train prompts (or zero), at every position "
            "including generated ones; the refusal direction is removed at every position (Arditi et al. 2024).")


def _direction_sentence(ctx: RunContext) -> str:
    c, rec = ctx.config, ctx.numbers("phase5/direction")
    n_pos = c.get("direction_positions")
    recorded = rec.get("positions")
    if recorded:
        where = f"each of the {len(recorded)} post-instruction positions ({recorded[0]} to {recorded[-1]} from the end)"
    elif n_pos == 0:
        where = "every post-instruction position"
    else:
        where = f"each of the last {n_pos if n_pos is not None else 'n/a'} post-instruction positions"
    screen = c.get("direction_screen")
    screening = (f"Every candidate is first screened by its bypass score and KL on 8 val prompts per side, and "
                 f"{screen} are scored fully, the lowest bypass scores among those within twice the KL threshold "
                 "first (rank, then verify: Kramar et al. 2024). " if screen else "")
    return ("Candidates are differences in mean residual activations of harmful and harmless train prompts at "
            f"{where} and each layer (Arditi et al. 2024). {screening}On "
            f"{rec.get('n_pairs', c.get('direction_val_pairs', 'n/a'))} validation pairs, a candidate is kept if "
            f"ablating it keeps the KL on harmless prompts at most {c.get('direction_kl', 'n/a')} and adding it "
            f"induces a refusal score of at least {c.get('direction_induce', 'n/a')}; the last "
            f"{fmt.number(c.get('direction_prune'), pct=True)} of layers are excluded; among the rest the one with "
            "the lowest bypass score (refusal score of harmful prompts with the direction ablated at every layer) "
            "is chosen. When no candidate passes, no verdict rests on the direction: those lines are inconclusive.")


def methodology(ctx: RunContext) -> Section:
    c = ctx.config
    return Section(dom_id="methodology", title="Methodology", blocks=(
        para(Span(text="Metric.", strong=True), " The refusal score is the log-odds log p/(1 - p) of p, the summed "
             "probability of the subject's refusal tokens at the first generated position; the tokens are the ones "
             "the subject itself opens its refusals with (found on the train split), so the score is comparable "
             "across models and does not saturate like a probability."),
        para(Span(text="Activation patching.", strong=True), " Each harmful prompt (clean) is paired with a harmless "
             "analogue of the same form (corrupted). Denoising runs the corrupted prompt and splices in one "
             "component's activation from the clean run: does that component suffice to restore refusal? Noising "
             "runs the clean prompt with the corrupted activation: is the component necessary? The normalized effect "
             "is (patched - base) / (source - base): 0 is the unpatched base run, 1 the full source run, in either "
             f"direction. {_positions_sentence(ctx)}"),
        para(Span(text="Attribution patching (AtP).", strong=True), " A first-order estimate of every patch at once: "
             "(source activation - base activation) times the gradient of the metric at the base run, summed over "
             "the same positions as exact patching. One backward pass replaces thousands of forward passes; the top "
             "AtP heads are re-checked exactly and the agreement reported as a rank correlation."),
        para(Span(text="Ablation.", strong=True), f" {_ablation_sentence(ctx)} Each circuit ablation is paired "
             "with a control ablating as many random components of the same kind. Refusal rates before and after "
             "are compared with McNemar's test on the same prompts, and p-values are Holm-corrected across "
             "conditions. Circuit faithfulness (Wang et al. 2022; Hanna et al. 2024) uses the discovery's own "
             "intervention: the harmful prompt runs with every head and MLP neuron outside the circuit patched from "
             "its harmless analogue at the patched positions, beside random circuits of the same size and layers."),
        para(Span(text="Gradients.", strong=True), f" Integrated gradients ({c.get('ig_steps', 'n/a')} steps, "
             "from the paired harmless prompt's embeddings on pairs of equal token length, else from the "
             "template's own embeddings with the harmless message's mean embedding on the message; completeness "
             "must hold within 5%) attribute the refusal score to input tokens; component saliencies are compared "
             f"with patching effects by rank correlation (criterion: r above {c.get('gradient_r', 'n/a')})."),
        para(Span(text="Refusal direction.", strong=True), f" {_direction_sentence(ctx)}"),
        para(Span(text="Statistics.", strong=True),
             f" Intervals are {fmt.number(1 - float(c.get('alpha', 0.05)), pct=True)} "
             f"confidence intervals (bootstrap BCa with {c.get('n_bootstrap', 'n/a')} resamples unless stated); "
             f"seed {c.get('seed', 'n/a')}. Verdicts are decided on interval bounds, never on point estimates."),
    ))


def claim_evidence(ctx: RunContext) -> Section:
    children = []
    for row in ctx.claims:
        blocks: list[Block] = [para(status_sentence(row), css=f"status-{row.status}")]
        items = []
        for line in row.evidence_lines:
            parts: list[Span | str] = [Span(text=line.evidence, strong=True),
                                       f" is {STATUS_WORD.get(line.status, line.status.upper())}: {line.summary}"]
            if line.evidence_result:
                parts += [" (see ", _result_link(line.evidence_result), ")"]
            items.append(spans(*parts))
        if items:
            blocks.append(bullets(items))
        children.append(Section(dom_id=row.anchor, title=f"{row.claim}: {row.title}", blocks=tuple(blocks), level=4))
    return Section(dom_id="evidence", title="Evidence by claim", level=3, children=tuple(children))
