"""Phase 4 and H3 in the report: ablation conditions, gradients vs patching, cross-category ablation."""

from __future__ import annotations

import math
from typing import Any, Mapping

import plotly.graph_objects as go
from markupsafe import Markup
from plotly.subplots import make_subplots

from hypotheses import claims as claim_table
from reports import fmt
from reports.attention_view import token_strip
from reports.context import RunContext
from reports.document import Block, Figure, missing, para, spans, table
from reports.plots import HARMFUL, HARMLESS, NEUTRAL, esc, est_errors, finite_list, layout, to_div, to_numpy


def _absent(ctx: RunContext, name: str) -> list[Block] | None:
    return [missing(name, ctx.unreadable.get(name))] if ctx.get(name) is None else None


def _what_is_ablated(c: Mapping[str, Any]) -> str:
    """``10 components, each replaced, position by position, by ...``: the condition's size and how it is ablated."""
    n = c.get("n_components")
    size = f"{n} component{'' if n == 1 else 's'}" if isinstance(n, int) else "components not counted"
    if not c.get("method"):
        return f"{size}; method not recorded"
    return f"{size}, {'' if n == 1 else 'each '}{c['method']}"


def _condition_sentence(c: Mapping[str, Any], controls: Mapping[str, Mapping[str, Any]]) -> str:
    text = (f"Ablating {c.get('label') or c.get('name')} ({_what_is_ablated(c)}) moved the refusal rate on harmful "
            "test prompts from "
            f"{fmt.estimate(c.get('refusal_rate_baseline'), pct=True)} to "
            f"{fmt.estimate(c.get('refusal_rate_ablated'), pct=True)}: a relative drop of "
            f"{fmt.estimate(c.get('relative_drop'), pct=True)} (McNemar {fmt.p_value(c.get('mcnemar_p'))}, "
            f"Holm-adjusted {fmt.p_value(c.get('p_holm'))}). Degenerate answers (no letter or digit; not refusals): "
            f"{fmt.estimate(c.get('degenerate_rate_baseline'), pct=True)} before, "
            f"{fmt.estimate(c.get('degenerate_rate_ablated'), pct=True)} after.")
    control = controls.get(str(c.get("name")))
    if control is not None:
        text += (f" Its control, {control.get('label') or control.get('name')}, dropped it by "
                 f"{fmt.estimate(control.get('relative_drop'), pct=True)} (Holm {fmt.p_value(control.get('p_holm'))}).")
    return text


def ablation(ctx: RunContext) -> list[Block]:
    name = "phase4/ablation"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    nums = ctx.numbers(name)
    conditions = list(nums.get("conditions") or [])
    if not conditions:
        return [missing(name, "no ablation conditions recorded")]
    controls = {str(c.get("control_of")): c for c in conditions if c.get("kind") == "control" and c.get("control_of")}
    blocks: list[Block] = [para(_condition_sentence(c, controls)) for c in conditions if c.get("kind") == "circuit"]
    labels = [esc(c.get("label") or c.get("name")) for c in conditions]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=["refusal rate, before and after", "relative drop"])
    for key, title, color in (("refusal_rate_baseline", "baseline", NEUTRAL), ("refusal_rate_ablated", "ablated", HARMFUL)):
        vals, plus, minus = est_errors([c.get(key) for c in conditions])
        fig.add_trace(go.Bar(x=labels, y=vals, name=title, marker={"color": color},
                             error_y={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}),
                      row=1, col=1)
    vals, plus, minus = est_errors([c.get("relative_drop") for c in conditions])
    fig.add_trace(go.Bar(x=labels, y=vals, name="relative drop", showlegend=False,
                         marker={"color": [HARMLESS if c.get("kind") == "circuit" else "#aab7b8" for c in conditions]},
                         error_y={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}),
                  row=1, col=2)
    bar = claim_table.claim("C2").bar_of("ablation", ctx.config)
    fig.add_hline(y=bar, line={"dash": "dash", "color": "#888"}, row=1, col=2)
    fig.update_yaxes(title_text="refusal rate", range=[0, 1.05], row=1, col=1)
    layout(fig, title=f"Ablation on {nums.get('n_prompts', 'n/a')} {nums.get('split', 'test')} prompts", height=460,
           barmode="group")
    blocks.append(Figure(dom_id="fig-ablation", title="Ablation conditions", html=to_div(fig, "fig-ablation"), source=fig,
                         caption=spans("Left: refusal rate with 95% CI before and after each ablation. Right: the "
                                       "relative drop with its CI (blue: circuits, grey: controls that ablate matched "
                                       "random components); dashed: the C2 bar"
                                       f" ({fmt.share(bar)}).")))
    rows = [(str(c.get("label") or c.get("name")), str(c.get("kind", "")), fmt.number(c.get("n_components")),
             str(c.get("method") or "n/a"), fmt.estimate(c.get("refusal_rate_baseline"), pct=True),
             fmt.estimate(c.get("refusal_rate_ablated"), pct=True),
             fmt.estimate(c.get("degenerate_rate_baseline"), pct=True),
             fmt.estimate(c.get("degenerate_rate_ablated"), pct=True), fmt.estimate(c.get("relative_drop"), pct=True),
             fmt.p_value(c.get("mcnemar_p")), fmt.p_value(c.get("p_holm")), fmt.number(c.get("kl_harmless")),
             fmt.number(c.get("answer_ce_increase"))) for c in conditions]
    blocks.append(table(("condition", "kind", "components", "method", "refusal rate (baseline)", "refusal rate (ablated)",
                         "degenerate rate (baseline)", "degenerate rate (ablated)", "relative drop", "McNemar p",
                         "Holm p", "KL on harmless", "answer CE increase"), rows,
                        css="wide", dom_id="table-ablation"))
    return blocks


_IG_BASELINES = {"paired": "of equal token length with the harmless prompt's embeddings at every position",
                 "blurred": "of unequal length with the template kept and each message token replaced by the mean "
                            "embedding of the harmless message"}


def _ig_sentence(nums: Mapping[str, Any]) -> str:
    """Which IG baseline was used and how complete the attributions are (the max error alone when that is all the
    record holds)."""
    ig = nums.get("ig")
    if not isinstance(ig, Mapping):
        return ("Integrated gradients completeness error (max relative): "
                f"{fmt.number(nums.get('ig_completeness_error'))} (baseline not recorded).")
    base, err = ig.get("baseline") or {}, ig.get("completeness_error") or {}
    if base.get("kind") == "paired":
        kinds = ", ".join(f"{n} pair{'' if n == 1 else 's'} {_IG_BASELINES.get(k, k)}"
                          for k, n in (base.get("counts") or {}).items())
        against = f"each harmful prompt against its harmless twin as the baseline: {kinds}"
    else:
        against = f"against the {base.get('kind', 'unrecorded')} baseline"
    within = {True: "within", False: "outside"}.get(err.get("within_bar"), "against")
    return (f"Integrated gradients ({fmt.number(nums.get('ig_steps'))} steps, "
            f"{fmt.number(ig.get('n_pairs'))} train pairs), {against}. Completeness error "
            "(|sum of attributions - (f(input) - f(baseline))| / |f(input) - f(baseline)|): "
            f"max {fmt.number(err.get('max'))}, median {fmt.number(err.get('median'))}, {within} the bar of "
            f"{fmt.number(err.get('bar'))} (Sundararajan et al. 2017).")


def _ig_header(e: Mapping[str, Any]) -> Markup:
    against = Markup(', against "{h}"').format(h=e["harmless"]) if e.get("harmless") else ""
    return Markup('{p}<br><small>baseline: {k}{a}; completeness error {c}</small>').format(
        p=e.get("prompt", ""), k=e.get("baseline", "not recorded"), a=against,
        c=fmt.number(e.get("completeness_error")))


def gradients(ctx: RunContext) -> list[Block]:
    name = "phase4/gradients"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums = rec.numbers
    corr = list(nums.get("correlations") or [])
    bar = nums.get("gradient_r_bar", claim_table.claim("S1").bar_of("gradients", ctx.config))
    blocks: list[Block] = [para(
        _ig_sentence(nums) + " "
        + " ".join(f"{c.get('name')} versus {c.get('versus')}: r = {fmt.estimate(c.get('estimate'))}." for c in corr)
        + f" The criterion asks for r above {fmt.number(bar)}: {'met' if nums.get('met') else 'not met'}.")]
    keys = {c.get("name"): c.get("key") for c in corr if c.get("key")}

    def key(name: Any) -> str | None:  # a correlation's points are the arrays "scatter.<its key>.x" and ".y"
        k = keys.get(name)
        return k if f"scatter.{k}.x" in rec.arrays and f"scatter.{k}.y" in rec.arrays else None

    names = [c.get("name") for c in corr if key(c.get("name")) is not None]
    if names:
        cols = min(len(names), 3)
        rows = math.ceil(len(names) / cols)
        by_name = {c.get("name"): c for c in corr}
        titles = [f"{esc(n)}: r = {fmt.estimate(by_name[n].get('estimate'), digits=2)}" for n in names]
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
        for i, n in enumerate(names):
            x, y = to_numpy(rec.arrays[f"scatter.{key(n)}.x"]), to_numpy(rec.arrays[f"scatter.{key(n)}.y"])
            fig.add_trace(go.Scatter(x=finite_list(x), y=finite_list(y), mode="markers", name=esc(n),
                                     marker={"size": 5, "color": HARMFUL, "opacity": 0.6}, showlegend=False),
                          row=i // cols + 1, col=i % cols + 1)
            fig.update_xaxes(title_text="gradient attribution", row=i // cols + 1, col=i % cols + 1)
            fig.update_yaxes(title_text=esc(by_name[n].get("versus") or "patching"), row=i // cols + 1,
                             col=i % cols + 1)
        layout(fig, title="Gradient attribution versus patching", height=380 * rows)
        blocks.append(Figure(dom_id="fig-gradients", title="Gradient vs patching", html=to_div(fig, "fig-gradients"),
                             source=fig,
                             caption=spans("Each point is one component; r is the rank correlation with its CI.")))
    else:
        blocks.append(missing(name, "no gradient-vs-patching scatter arrays"))
    examples = list(nums.get("ig_examples") or [])[:4]
    if examples:
        strips = Markup("").join(Markup('<div class="ig-example"><div class="ig-prompt">{p}</div>{s}</div>').format(
            p=_ig_header(e), s=token_strip(e.get("tokens") or [], e.get("attributions") or [])) for e in examples)
        blocks.append(Figure(dom_id="fig-ig-examples", title="Integrated gradients on input tokens", kind="html",
                             html=strips, caption=spans("Red: the token raises the refusal score; blue: lowers it.")))
    return blocks


def cross_category(ctx: RunContext) -> list[Block]:
    name = "h3/cross_category"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    cats = [esc(c) for c in rec.numbers.get("categories") or []]
    panels = [(k, t) for k, t in (("matrix", "relative drop of refusal score"), ("overlap", "top-head overlap (Jaccard)"),
                                  ("activation_correlation", "activation correlation")) if k in rec.arrays]
    if not panels:
        return [missing(name, "no matrices recorded")]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.12)
    for i, (key, _) in enumerate(panels, start=1):
        z = to_numpy(rec.arrays[key])
        labels = cats if len(cats) == z.shape[0] else [str(j) for j in range(z.shape[0])]
        fig.add_trace(go.Heatmap(z=finite_list(z), x=labels, y=labels, colorscale="Viridis", showscale=i == 1,
                                 text=[[fmt.number(v, digits=2) for v in row] for row in z.tolist()],
                                 texttemplate="%{text}",
                                 hovertemplate="ablate %{y} → measure %{x}: %{z:.3f}<extra></extra>"), row=1, col=i)
    layout(fig, title="H3: cross-category ablation", height=480)
    return [para("Rows: the harm category whose top heads are ablated; columns: the category whose prompts are "
                 "measured. A shared substrate shows as off-diagonal cells as large as the diagonal."),
            Figure(dom_id="fig-cross-category", title="Cross-category ablation matrix",
                   html=to_div(fig, "fig-cross-category"), source=fig,
                   caption=spans("The H3 verdict above rests on the first matrix."))]
