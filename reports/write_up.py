"""Assemble the whole write-up (a Document) from a run context, in the seed's order.

Verdicts lead; each result gets its own anchored subsection (``#result-phase3-heads``) so
the verdict table and the claims can link to the evidence, and a missing result keeps
its anchor with a "missing" note in place of its figure.
"""

from __future__ import annotations

from typing import Callable

from reports import fig_behavior, fig_evidence, fig_localization, fig_mechanism, fig_verification
from reports.context import RunContext, anchor
from reports.document import Block, Document, Section, para
from reports.sections_back import discussion, future_work, limitations, provenance
from reports.methodology import methodology
from reports.sections_front import abstract, claim_evidence, introduction, verdict_section

Builder = Callable[[RunContext], list[Block]]

# (result name, subsection title, builder) in reading order, grouped into Results subsections.
RESULT_GROUPS: tuple[tuple[str, str, str, tuple[tuple[str, str, Builder], ...]], ...] = (
    ("behaviour", "Baseline behaviour", "How often the subject refuses, and where in depth the refusal becomes "
     "readable.", (
         ("phase2/refusal_rates", "Refusal and compliance rates", fig_behavior.refusal_rates),
         ("phase2/first_token", "First-token refusal probability", fig_behavior.first_token),
         ("phase2/logit_lens", "Logit lens", fig_behavior.logit_lens),
         ("phase2/attention_entropy", "Attention entropy", fig_behavior.attention_entropy))),
    ("localization", "Localization", "Which layers, positions and heads carry the refusal decision.", (
        ("phase3/layer_patching", "Layer x component patching", fig_localization.layer_patching),
        ("phase3/heads", "Head ranking", fig_localization.heads),
        ("phase3/attention_patterns", "Attention patterns of the top heads", fig_localization.attention_patterns),
        ("phase3/neurons", "Neuron catalogue", fig_localization.neurons),
        ("h1/effect_share", "Effect share of the top components (H1)", fig_evidence.effect_share))),
    ("mechanism", "Mechanism", "The circuit, the refusal direction, and how harmful and harmless activations "
     "separate.", (
         ("phase5/circuit", "Circuit diagram", fig_mechanism.circuit),
         ("phase5/direction", "The refusal direction", fig_mechanism.direction),
         ("phase5/activation_scatter", "Activation scatter (3D)", fig_mechanism.activation_scatter))),
    ("gradients", "Gradient attribution", "Whether gradients agree with causal patching.", (
        ("phase4/gradients", "Gradients versus patching", fig_verification.gradients),)),
    ("stages", "Stages (H2)", "Whether harm is detected early, the refusal signal accumulates in the middle, and "
     "refusal is written into the output late.", (
        ("h2/keyword_attention", "Attention to harm keywords", fig_behavior.keyword_attention),
        ("h2/accumulation", "Accumulation along the refusal direction", fig_evidence.accumulation),
        ("h2/direct_effects", "Direct effects on the refusal score (execution)", fig_evidence.direct_effects))),
    ("categories", "Harm categories (H3)", "Whether the categories share one substrate.", (
        ("h3/cross_category", "Cross-category ablation matrix", fig_verification.cross_category),)),
)


def _result_section(ctx: RunContext, name: str, title: str, build: Builder) -> Section:
    try:
        blocks = tuple(build(ctx))
    except Exception as err:  # one malformed result must not hide the rest of the report
        blocks = (para(f"missing: {name} is recorded but could not be drawn ({type(err).__name__}: {err})",
                       css="missing"),)
    return Section(dom_id=anchor(name), title=title, blocks=blocks, level=4)


def results(ctx: RunContext) -> Section:
    children = [claim_evidence(ctx)]
    for key, title, intro, members in RESULT_GROUPS:
        subs = tuple(_result_section(ctx, name, sub, build) for name, sub, build in members)
        children.append(Section(dom_id=f"results-{key}", title=title, blocks=(para(intro),), level=3, children=subs))
    return Section(dom_id="results", title="Results", children=tuple(children))


def ablation_analysis(ctx: RunContext) -> Section:
    sub = _result_section(ctx, "phase4/ablation", "Ablation conditions", fig_verification.ablation)
    return Section(dom_id="ablation-analysis", title="Ablation analysis", blocks=(para(
        "Patching shows what suffices to restore refusal; ablation asks what refusal needs. Each condition removes a "
        "set of components on held-out harmful prompts and is compared with a control that removes as many random "
        "components of the same kind."),), children=(sub,))


def build_document(ctx: RunContext) -> Document:
    title = f"How {ctx.model_name} refuses: a circuit analysis ({ctx.run_dir.name})"
    sections = (verdict_section(ctx), abstract(ctx), introduction(ctx), methodology(ctx), results(ctx),
                ablation_analysis(ctx), discussion(ctx), limitations(ctx), future_work(ctx), provenance(ctx))
    return Document(title=title, run_key=ctx.run_key, sections=sections)
