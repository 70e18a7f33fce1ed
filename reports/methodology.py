"""The methodology section: the method this run ran, read from what it recorded.

Every sentence is generated from the run's manifest, config, results and verdict lines; a
step the run did not record (a skipped or failed stage) is left out or its numbers read n/a,
never claimed.
"""

from __future__ import annotations

from typing import Any, Mapping

from hypotheses import claims as claim_table
from hypotheses.records_study import positions_in_words
from reports import fmt, preregistration, validation_card
from reports.context import RunContext, VerdictLine
from reports.document import Block, Paragraph, Section, Span, para
from reports.fig_evidence import as_fraction


def _lines(ctx: RunContext) -> list[VerdictLine]:
    return [line for row in ctx.claims for line in row.evidence_lines]


def _named(lines: list[VerdictLine]) -> str:
    return ", ".join(f"{line.claim} {line.evidence}" for line in lines)


def _positions_sentence(ctx: RunContext) -> str:
    heads = ctx.numbers("phase3/heads")
    where = heads.get("positions") or ctx.config.get("patch_positions")
    n = heads.get("n_pairs", ctx.config.get("patch_pairs", "n/a"))
    if where is None:
        return f"Where the patches go was not recorded; the head ranking uses {n} train pairs."
    if str(where).startswith("post-instruction"):
        return (f"Patches go only where the two prompts' positions correspond: {positions_in_words(where)}, the chat "
                "template's tokens after the user's message, which are the same tokens in every prompt (the "
                f"positions Arditi et al. 2024 search). The head ranking uses {n} train pairs.")
    return (f"Patches cover every position, on pairs of equal token length under the subject's tokenizer only "
            f"(so every position corresponds); the head ranking uses {n} such train pairs.")


def _ablation_sentence(ctx: RunContext) -> str:
    where = ctx.numbers("phase3/heads").get("positions") or ctx.config.get("patch_positions")
    if where is not None and str(where).startswith("post-instruction"):
        return (f"Heads and neurons are mean-ablated where they were found: at {positions_in_words(where)}, each "
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


def _ranking(ctx: RunContext) -> Paragraph:
    heads = ctx.numbers("phase3/heads")
    return para(Span(text="Ranking (AtP*, Kramar et al. 2024).", strong=True), " Attribution patching, (source "
                "activation - base activation) times the gradient of the metric at the base run, scores every head "
                f"and MLP neuron at once on {heads.get('n_pairs_atp', 'n/a')} train pairs. The top "
                f"{heads.get('n_candidates', 'n/a')} heads by AtP are verified by exact patching on the same train "
                "pairs and ranked by their exact effect. The full exact sweep over "
                f"{heads.get('n_heads', 'n/a')} heads on {heads.get('n_pairs_sweep', 'n/a')} "
                "train pairs is descriptive only (the heat map): no verdict rests on it.")


def _scoring(ctx: RunContext) -> Paragraph | None:
    lines = [line for line in _lines(ctx) if line.numbers.get("split")]
    if not lines:
        return None
    by_split: dict[str, list[VerdictLine]] = {}
    for line in lines:
        by_split.setdefault(str(line.numbers["split"]), []).append(line)
    splits = "; ".join(f"{split}: {_named(members)}" for split, members in by_split.items())
    powers = sorted({fmt.share(line.numbers["power"]) for line in lines if line.numbers.get("power") is not None})
    power = f" ({' / '.join(powers)} power, from the line's measured standard error)" if powers else ""
    return para(Span(text="Held-out scoring.", strong=True), " Every verdict line is scored on pairs that chose "
                f"nothing (no component, direction or layer was selected on them): {splits}. Each line shows its n "
                f"and the smallest true value it would declare supported{power}.")


def _controls(ctx: RunContext) -> Paragraph | None:
    """Each line's control and the rule by which it enters the decision, as the line recorded them."""
    lines = [line for line in _lines(ctx) if isinstance(line.numbers.get("control"), Mapping)
             and line.numbers["control"].get("rule", "") != "none"]
    if not lines:
        return None
    by_rule: dict[tuple[str, str], list] = {}
    for line in lines:
        control = line.numbers["control"]
        key = (str(control.get("name") or "a control"), str(control.get("rule") or "shown beside the estimate"))
        by_rule.setdefault(key, []).append(line)
    parts = [f"{_named(members)} (against {name}): {rule}" for (name, rule), members in by_rule.items()]
    text = " Each line's control and how it enters the decision: " + "; ".join(parts) + "."
    acc = ctx.numbers("h2/accumulation")
    if acc.get("random") is not None:
        text += (f" The accumulation statistic is compared with {len(acc['random'])} random directions "
                 f"({fmt.p_value(acc.get('p_random'))} that a random direction does as well).")
    return para(Span(text="Controls decide.", strong=True), text)


def _limits(ctx: RunContext, lines: list[VerdictLine]) -> tuple[Any, Any]:
    """The side-effect limits: the config's keys, else the ones the lines recorded."""
    first = lines[0].numbers["side_effect"]
    return ctx.config.get("max_kl", first.get("max_kl")), ctx.config.get("max_ce", first.get("max_ce"))


def _side_effects(ctx: RunContext) -> Paragraph | None:
    lines = [line for line in _lines(ctx) if isinstance(line.numbers.get("side_effect"), Mapping)]
    if not lines:
        return None
    max_kl, max_ce = _limits(ctx, lines)
    over = [line for line in lines if line.numbers["side_effect"].get("ok") is False]
    return para(Span(text="Side effects.", strong=True), " One rule on every ablation line: on harmless test "
                f"prompts the mean next-token KL may rise at most {fmt.number(max_kl)} nats and the answer "
                f"cross-entropy at most {fmt.number(max_ce)} nats (config max_kl / max_ce; the 0.1 scale of Arditi "
                "et al. 2024); otherwise the line is inconclusive whatever its estimate. Lines under the rule: "
                f"{_named(lines)}; over the limit in this run: {_named(over) or 'none'}.")


def _multiplicity(ctx: RunContext) -> Paragraph | None:
    lines = [line for line in _lines(ctx) if line.numbers.get("correction") or "p_below_holm" in line.numbers]
    if not lines:
        return None
    corrections: dict[str, str] = {}
    for line in lines:
        corrections.setdefault(line.claim, str(line.numbers.get("correction") or "holm"))
    per_claim = "; ".join(f"{claim}: {how}" for claim, how in corrections.items())
    alpha = fmt.finite(ctx.config.get("alpha"))
    level = f"alpha / 2 = {fmt.number(alpha / 2)}" if alpha is not None else "alpha / 2"
    text = (" A claim is supported only when every one of its lines is (an intersection-union test, so supporting "
            "needs no correction); a line refutes only when its Holm-adjusted one-sided p-value is below "
            f"{level}, the level of its two-sided CI. Corrections across each claim's lines, as recorded: "
            f"{per_claim}.")
    h3 = [line for line in lines if line.claim == "H3" and line.evidence in _categories(ctx)]
    if h3:
        text += f" H3's {len(h3)} category lines are corrected across the categories."
    c1 = next((line for line in lines if line.claim == "C1"), None)
    if c1 is not None and c1.numbers.get("statistic"):
        text += f" C1 counts {c1.numbers['statistic']}."
    return para(Span(text="Multiplicity.", strong=True), text)


def _categories(ctx: RunContext) -> tuple[str, ...]:
    return tuple(str(c) for c in ctx.numbers("h3/cross_category").get("categories") or ())


def _h1_grain(ctx: RunContext) -> Paragraph | None:
    h1 = {line.evidence for line in _lines(ctx) if line.claim == "H1"}
    if not {"patching", "parameters"} <= h1:
        return None
    totals = ctx.numbers("h1/effect_share").get("totals") or {}
    among = ""
    if totals:
        among = (f" among {fmt.count(totals.get('heads'))} heads and {fmt.count(totals.get('neurons'))} neurons "
                 f"({fmt.params(totals.get('parameters_heads'))} and {fmt.params(totals.get('parameters_neurons'))} "
                 "parameters)")
    return para(Span(text="H1's grain.", strong=True), " H1 is decided on attention heads and MLP neurons together"
                f"{among}, both by count (the patching line: the top fraction of the components) and by parameter "
                "count (the parameters line: the top components holding that fraction of the parameters).")


def _execution(ctx: RunContext) -> Paragraph | None:
    """H2's patching line as this run measured it: direct effects, from the h2/direct_effects record."""
    rec = ctx.numbers("h2/direct_effects")
    if not rec:
        return None
    bar = claim_table.claim("H2").bar_of("patching", ctx.config)
    denoising = rec.get("direction") != "noising"
    base, source = ("harmless analogue", "harmful prompt") if denoising else ("harmful prompt", "harmless analogue")
    return para(Span(text="Direct effects (H2's execution line).", strong=True), " Execution is where refusal is "
                "written into the output, so H2's patching line measures each layer's attention and MLP output's "
                "direct effect on the refusal score, its path to the logits alone (path patching to the logits, Wang "
                "et al. 2022; direct logit attribution, Elhage et al. 2021), not its total effect, which every "
                "upstream bottleneck shares. The logits are read at the last position, so only there has a block a "
                f"direct path (recorded: {rec.get('positions') or 'n/a'}): the block's output on the {source} minus "
                f"its output on the {base} is added to the {base}'s final residual stream and read through the "
                f"model's own final norm and unembedding, every other component keeping its value on the {base}; "
                "what the block causes through later components is left out. "
                f"{'Denoising' if denoising else 'Noising'} on {fmt.number(rec.get('n_pairs'))} test pairs, metric "
                f"{rec.get('metric') or 'refusal score'}, normalized as above. The line's statistic is the "
                "effect-weighted relative depth (0 = first layer, 1 = last): each layer's attention and MLP direct "
                "effects, clipped at 0, pooled as its weight, with a bootstrap CI over the pairs; execution is late "
                f"when the CI lies above H2's bar of {as_fraction(bar)}.")


def _completeness_bar(ctx: RunContext) -> str:
    bar = ((ctx.numbers("phase4/gradients").get("ig") or {}).get("completeness_error") or {}).get("bar")
    return f"within {fmt.share(bar)}" if bar is not None else "within its recorded bar"


def methodology(ctx: RunContext) -> Section:
    c = ctx.config
    gradient_r = claim_table.claim("S1").bar_of("gradients", c)
    blocks: list[Block | None] = [
        *preregistration.blocks(ctx, heading=True),
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
        _ranking(ctx), _h1_grain(ctx), _execution(ctx),
        para(Span(text="Ablation.", strong=True), f" {_ablation_sentence(ctx)} Each circuit ablation is paired "
             "with a control ablating as many random components of the same kind. Refusal rates before and after "
             "are compared with McNemar's test on the same prompts, and p-values are Holm-corrected across "
             "conditions. Circuit faithfulness (Wang et al. 2022; Hanna et al. 2024) uses the discovery's own "
             "intervention: the harmful prompt runs with every head and MLP neuron outside the circuit patched from "
             "its harmless analogue at the patched positions, beside random circuits of the same size and layers."),
        para(Span(text="Gradients.", strong=True), f" Integrated gradients ({c.get('ig_steps', 'n/a')} steps, "
             "from the paired harmless prompt's embeddings on pairs of equal token length, else from the "
             "template's own embeddings with the harmless message's mean embedding on the message; completeness "
             f"must hold {_completeness_bar(ctx)}) attribute the refusal score to input tokens; component saliencies "
             f"are compared with patching effects by rank correlation (criterion: r above {fmt.number(gradient_r)})."),
        para(Span(text="Refusal direction.", strong=True), f" {_direction_sentence(ctx)}"),
        _scoring(ctx), _controls(ctx), _side_effects(ctx), _multiplicity(ctx),
        para(Span(text="Statistics.", strong=True),
             f" Intervals are {fmt.number(1 - float(c.get('alpha', 0.05)), pct=True)} "
             f"confidence intervals (bootstrap BCa with {c.get('n_bootstrap', 'n/a')} resamples unless stated); "
             f"seed {c.get('seed', 'n/a')}. Verdicts are decided on interval bounds, never on point estimates."),
    ]
    return Section(dom_id="methodology", title="Methodology", blocks=tuple(b for b in blocks if b is not None),
                   children=(_validation(ctx),))


def _validation(ctx: RunContext) -> Section:
    """The suite's validation card: how often its verdicts were wrong where the truth was planted."""
    provenance = ctx.manifest.get("provenance")
    version = provenance.get("code_version") if isinstance(provenance, Mapping) else None
    try:
        blocks = validation_card.blocks(ctx.validation, code_version=version)
    except Exception as err:  # a card that parses but will not format must not take the report down
        blocks = [para(f"The validation card {validation_card.shown_path(ctx.validation.path)} could not be shown "
                       f"({type(err).__name__}: {err}): run ./suite validate to write it again.", css="warning")]
    return Section(dom_id="validation-card", title="Validation card", blocks=tuple(blocks), level=3)
