"""H1 and H2 evidence in the report: the effect-share curve, the accumulation profile, the direct effects.

``h1/effect_share``: the share of the refusal-score gap restored on test pairs by patching the
top fraction of components together, per family and by parameter count, against H1's bar.
``h2/accumulation``: the normalized harmful - harmless projection onto the refusal direction
by layer, whose middle third must rise faster than the early and late thirds.
``h2/direct_effects``: each layer's attention and MLP output's direct effect on the refusal
score (its path to the logits alone), whose effect-weighted relative depth must lie late.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from hypotheses import claims as claim_table
from hypotheses.records_study import positions_in_words
from reports import fmt
from reports.context import RunContext
from reports.document import Block, Figure, missing, para, spans, table
from reports.plots import HARMFUL, HARMLESS, NEUTRAL, band, finite_list, layout, to_div, to_numpy

FAMILY_COLORS = {"heads": HARMFUL, "neurons": HARMLESS, "heads+neurons": NEUTRAL}
PARAMETER_COLOR = "#7d3c98"
STAGES = ("early", "middle", "late")


def _absent(ctx: RunContext, name: str) -> list[Block] | None:
    return [missing(name, ctx.unreadable.get(name))] if ctx.get(name) is None else None


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if fmt.finite(v) is None else float(v) for v in values], dtype=np.float64)


def _curve(curve: Mapping[str, Any]) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """(fractions, share, low, high) of one recorded curve, NaN where a bound is missing."""
    bounds = [fmt.bounds(e) for e in curve.get("share") or []]
    return (list(curve.get("fraction") or [])[: len(bounds)], _floats([b[0] for b in bounds]),
            _floats([b[1] for b in bounds]), _floats([b[2] for b in bounds]))


def _curves(nums: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any], str]]:
    out = [(family, curve, FAMILY_COLORS.get(family, NEUTRAL))
           for family, curve in (nums.get("families") or {}).items() if isinstance(curve, Mapping)]
    if isinstance(nums.get("parameters"), Mapping):
        out.append(("heads+neurons by parameters", nums["parameters"], PARAMETER_COLOR))
    return [(label, curve, color) for label, curve, color in out if curve.get("share")]


def _at_bar(curve: Mapping[str, Any], bar_fraction: float | None) -> int | None:
    """Index of the largest recorded fraction at or below the bar's (None: none is)."""
    fractions = [fmt.finite(f) for f in curve.get("fraction") or []]
    inside = [i for i, f in enumerate(fractions) if f is not None and bar_fraction is not None and f <= bar_fraction]
    return max(inside, key=lambda i: fractions[i]) if inside else None


def _share_sentence(label: str, curve: Mapping[str, Any], total: Any, bar_fraction: float | None) -> str:
    i = _at_bar(curve, bar_fraction)
    if i is None:
        return f"{label}: no recorded fraction lies at or below the bar's {fmt.share(bar_fraction)}."
    counts = list(curve.get("count") or [])
    count = counts[i] if i < len(counts) else "n/a"
    share = fmt.estimate(curve["share"][i], pct=True)
    if label.endswith("by parameters"):
        return (f"{label}: the top {count} components, holding {fmt.share(curve['fraction'][i])} of the "
                f"{fmt.params(total)} parameters, restore {share} of the gap.")
    return (f"{label}: the top {fmt.share(curve['fraction'][i])} ({count} of {fmt.count(total)}) restore {share} "
            "of the gap.")


def _totals(nums: Mapping[str, Any]) -> dict[str, Any]:
    t = nums.get("totals") or {}
    both = [t.get("heads"), t.get("neurons")]
    params = [t.get("parameters_heads"), t.get("parameters_neurons")]
    return {"heads": t.get("heads"), "neurons": t.get("neurons"),
            "heads+neurons": sum(both) if all(isinstance(x, int) for x in both) else None,
            "heads+neurons by parameters": sum(params) if all(isinstance(x, (int, float)) for x in params) else None}


def effect_share(ctx: RunContext) -> list[Block]:
    name = "h1/effect_share"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    nums = ctx.numbers(name)
    curves = _curves(nums)
    if not curves:
        return [missing(name, "no effect-share curve recorded")]
    bar_fraction, bar_share = fmt.finite(nums.get("bar_fraction")), fmt.finite(nums.get("bar_share"))
    fig = go.Figure()
    for label, curve, color in curves:
        x, mean, low, high = _curve(curve)
        for trace in band(go, x, mean, low, high, name=label, color=color):
            fig.add_trace(trace)
    if bar_fraction is not None and bar_share is not None:
        fig.add_vline(x=bar_fraction, line={"dash": "dash", "color": "#888"})
        fig.add_hline(y=bar_share, line={"dash": "dash", "color": "#888"})
        fig.add_trace(go.Scatter(x=[bar_fraction], y=[bar_share], mode="markers", name="H1's bar",
                                 marker={"symbol": "cross-thin", "size": 16, "line": {"width": 2, "color": "#333"}}))
    positive = all((fmt.finite(f) or 0) > 0 for _, c, _ in curves for f in c.get("fraction") or [])
    layout(fig, title="Share of the refusal-score gap restored by the top components", height=460,
           xaxis={"title": "fraction of components (of parameters, for the parameter curve)",
                  "type": "log" if positive else "linear"},
           yaxis={"title": "share of the gap restored"})
    totals = _totals(nums)
    text = " ".join(_share_sentence(label, curve, totals.get(label), bar_fraction) for label, curve, _ in curves)
    caption = (f"On {fmt.number(nums.get('n_pairs'))} test pairs at {positions_in_words(nums.get('positions'))}"
               f", the top components by the train ranking are patched together from the harmful prompt "
               f"into its harmless analogue. Bands: 95% CI. Cross-hair: H1's bar, more than {fmt.share(bar_share)} "
               f"of the gap from at most {fmt.share(bar_fraction)} of the components.")
    return [para(f"At the bar's fraction of {fmt.share(bar_fraction)}: {text}"),
            Figure(dom_id="fig-effect-share", title="Effect share (H1)", html=to_div(fig, "fig-effect-share"),
                   source=fig, caption=spans(caption))]


def _stage_rows(nums: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    layers, slopes = nums.get("layers") or {}, nums.get("slopes") or {}
    return [(stage, ", ".join(map(str, layers.get(stage) or [])) or "n/a", fmt.estimate(slopes.get(stage)))
            for stage in STAGES if stage in layers or stage in slopes]


def _accumulation_sentence(nums: Mapping[str, Any]) -> str:
    text = (f"The harmful - harmless projection onto the refusal direction (read at layer "
            f"{nums.get('layer', 'n/a')}, position {nums.get('position', 'n/a')}), normalized by the residual norm, "
            f"over {fmt.number(nums.get('n_pairs'))} test pairs. The middle third's slope minus the larger of the "
            f"early and late thirds' slopes: {fmt.estimate(nums.get('statistic'))}.")
    random = nums.get("random")
    if random:
        text += (f" The same statistic for {len(random)} random directions: median "
                 f"{fmt.number(float(np.nanmedian(_floats(random))))}; {fmt.p_value(nums.get('p_random'))} that a "
                 "random direction does as well.")
    return text


def accumulation(ctx: RunContext) -> list[Block]:
    name = "h2/accumulation"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums = rec.numbers
    blocks: list[Block] = [para(_accumulation_sentence(nums))]
    rows = _stage_rows(nums)
    if rows:
        blocks.append(table(("third", "layers", "slope per layer"), rows, dom_id="table-accumulation"))
    if not {"mean", "ci_low", "ci_high"} <= set(rec.arrays):
        return blocks + [missing(name, "arrays mean/ci_low/ci_high absent")]
    mean, low, high = (to_numpy(rec.arrays[k]) for k in ("mean", "ci_low", "ci_high"))
    fig = go.Figure(band(go, range(mean.shape[0]), mean, low, high, name="harmful - harmless", color=HARMFUL))
    for stage, color in zip(STAGES, ("#fdebd0", "#d6eaf8", "#e8daef")):
        layers = [int(x) for x in (nums.get("layers") or {}).get(stage) or []]
        if layers:
            fig.add_vrect(x0=min(layers) - 0.5, x1=max(layers) + 0.5, fillcolor=color, opacity=0.5, line_width=0,
                          layer="below", annotation_text=stage, annotation_position="top left")
    layout(fig, title="Accumulation: normalized projection onto the refusal direction by layer",
           xaxis={"title": "layer"}, yaxis={"title": "harmful - harmless projection / residual norm"})
    caption = ("Band: the recorded 95% CI over test pairs; shaded: the early, middle and late thirds whose slopes "
               "the H2 direction line compares.")
    blocks.append(Figure(dom_id="fig-accumulation", title="Accumulation (H2)", html=to_div(fig, "fig-accumulation"),
                         source=fig, caption=spans(caption)))
    return blocks


def as_fraction(x: float | None) -> str:
    """A bar that is a simple fraction in its own words (``2/3``), any other as a number."""
    if x is None:
        return "n/a"
    near = Fraction(x).limit_denominator(12)
    return f"{near.numerator}/{near.denominator}" if near.denominator > 1 and abs(float(near) - x) < 1e-9 \
        else fmt.number(x)


def _largest(values: np.ndarray) -> str:
    """``layer 5 (0.41)``: where a block's direct effect is largest."""
    if not np.isfinite(values).any():
        return "n/a"
    i = int(np.nanargmax(values))
    return f"layer {i} ({fmt.number(float(values[i]))})"


def _direct_sentence(nums: Mapping[str, Any], bar: float | None) -> str:
    base, source = ("the harmless analogue", "the harmful prompt") if nums.get("direction") != "noising" \
        else ("the harmful prompt", "the harmless analogue")
    return (f"Each layer's attention and MLP output's direct effect on the {nums.get('metric') or 'refusal score'}: "
            f"{source}'s block output minus {base}'s, added at the {nums.get('positions') or 'last position'} to "
            f"{base}'s final residual stream and read through the final norm and unembedding alone "
            f"({nums.get('direction') or 'recorded direction'}, {fmt.number(nums.get('n_pairs'))} test pairs; "
            f"0 = {base}'s score, 1 = {source}'s: the whole gap). The effect-weighted relative depth (0 = first "
            f"layer, 1 = last; each layer weighted by its attention and MLP outputs' direct effects, clipped at 0) "
            f"is {fmt.estimate(nums.get('depth'))}; H2's patching line needs it above {as_fraction(bar)}.")


def direct_effects(ctx: RunContext) -> list[Block]:
    name = "h2/direct_effects"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums = rec.numbers
    bar = fmt.finite(claim_table.claim("H2").bar_of("patching", ctx.config))
    blocks: list[Block] = [para(_direct_sentence(nums, bar))]
    if not {"attn_out", "mlp_out"} <= set(rec.arrays):
        return blocks + [missing(name, "arrays attn_out/mlp_out absent")]
    attn, mlp = to_numpy(rec.arrays["attn_out"]), to_numpy(rec.arrays["mlp_out"])
    n_layers = max(attn.shape[0], mlp.shape[0])
    blocks.append(para(f"Largest direct effect: attention at {_largest(attn)}, MLP at {_largest(mlp)}."))
    fig = go.Figure()
    for label, values, color in (("attention output", attn, HARMFUL), ("MLP output", mlp, HARMLESS)):
        fig.add_trace(go.Bar(x=list(range(values.shape[0])), y=finite_list(values), name=label,
                             marker={"color": color}, opacity=0.85))
    span = max(1, n_layers - 1)  # relative depth d sits at layer d * (n_layers - 1)
    if bar is not None:
        fig.add_vrect(x0=bar * span, x1=n_layers - 0.5, fillcolor="#e8daef", opacity=0.5, line_width=0, layer="below",
                      annotation_text=f"late: relative depth > {as_fraction(bar)}", annotation_position="top left")
    value, low, high = fmt.bounds(nums.get("depth"))
    if low is not None and high is not None:
        fig.add_vrect(x0=low * span, x1=high * span, fillcolor=NEUTRAL, opacity=0.2, line_width=0, layer="below")
    if value is not None:
        fig.add_vline(x=value * span, line={"dash": "dash", "color": "#333"},
                      annotation_text=f"depth {fmt.number(value)}", annotation_position="bottom right")
    layout(fig, title="Direct effects on the refusal score by layer (normalized)", barmode="group",
           xaxis={"title": "layer"}, yaxis={"title": "direct effect (0 = base, 1 = the whole gap)"})
    caption = (f"Bars: the normalized direct effect of the score averaged over {fmt.number(nums.get('n_pairs'))} test "
               f"pairs. Dashed line "
               f"and grey band: the effect-weighted relative depth {fmt.estimate(nums.get('depth'))} and its CI (a "
               f"relative depth d sits at layer {span}d); shaded: the late layers, relative depth above H2's bar of "
               f"{as_fraction(bar)}.")
    blocks.append(Figure(dom_id="fig-direct-effects", title="Direct effects (H2)",
                         html=to_div(fig, "fig-direct-effects"), source=fig, caption=spans(caption)))
    return blocks
