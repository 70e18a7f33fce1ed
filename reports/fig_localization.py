"""Phase 3 in the report: layer x component patching, head ranking, attention patterns, neurons."""

from __future__ import annotations

from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hypotheses.records_study import positions_in_words
from reports import fmt
from reports.attention_view import pattern_grid, pattern_svg
from reports.context import RunContext
from reports.document import Block, Figure, Span, missing, para, spans, table
from reports.plots import DIVERGING, HARMFUL, HARMLESS, NEUTRAL, esc, est_errors, finite_list, layout, to_div, to_numpy

DIRECTIONS = ("denoising", "noising")


def _row_est(row: dict[str, Any], value_key: str) -> dict[str, Any]:
    """A ranking or catalogue row's estimate: its ``value_key`` with the row's ``ci_low``/``ci_high``."""
    return {"value": row.get(value_key), "ci_low": row.get("ci_low"), "ci_high": row.get("ci_high")}


def _absent(ctx: RunContext, name: str) -> list[Block] | None:
    return [missing(name, ctx.unreadable.get(name))] if ctx.get(name) is None else None


def layer_patching(ctx: RunContext) -> list[Block]:
    name = "phase3/layer_patching"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums, arrays = rec.numbers, rec.arrays
    positions = list(nums.get("positions") or [])
    labels = list(nums.get("position_labels") or [])
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.16, horizontal_spacing=0.08,
                        subplot_titles=[f"residual stream, {d}" for d in DIRECTIONS]
                        + [f"attention / MLP output, {d}" for d in DIRECTIONS])
    found = []
    for col, direction in enumerate(DIRECTIONS, start=1):
        resid = arrays.get(f"resid.{direction}")
        if resid is not None:
            z = to_numpy(resid)  # [layer, pos]
            xs = [f"{p} {esc(labels[i])}" if i < len(labels) else str(p)
                  for i, p in enumerate(positions or range(-z.shape[1], 0))]
            fig.add_trace(go.Heatmap(z=finite_list(z), x=xs, y=list(range(z.shape[0])), colorscale=DIVERGING,
                                     zmid=0, coloraxis=None, showscale=col == 1, colorbar={"len": 0.45, "y": 0.78},
                                     hovertemplate="layer %{y}, pos %{x}: %{z:.3f}<extra></extra>"), row=1, col=col)
            fig.update_yaxes(title_text="layer", row=1, col=col)
            found.append(f"resid.{direction}")
        for kind, color in (("attn_out", HARMFUL), ("mlp_out", HARMLESS)):
            arr = arrays.get(f"{kind}.{direction}")
            if arr is None:
                continue
            y = to_numpy(arr)
            fig.add_trace(go.Bar(x=list(range(y.shape[0])), y=finite_list(y), name=f"{kind} ({direction})",
                                 marker={"color": color}, opacity=0.85), row=2, col=col)
            fig.update_xaxes(title_text="layer", row=2, col=col)
            found.append(f"{kind}.{direction}")
    if not found:
        return [missing(name, "no patching arrays in the result")]
    layout(fig, title="Activation patching by layer and component (normalized effect)", height=720,
           barmode="group")
    lacking = [f"{k}.{d}" for k in ("resid", "attn_out", "mlp_out") for d in DIRECTIONS if f"{k}.{d}" not in found]
    blocks_at = nums.get("block_positions")
    text = (f"Patching over {nums.get('n_pairs', 'n/a')} train pairs, metric: {nums.get('metric', 'refusal score')}. "
            "0 is the unpatched base run, 1 the source run."
            + (f" Attention and MLP outputs are patched at {positions_in_words(blocks_at)}." if blocks_at else ""))
    blocks: list[Block] = [para(text)]
    if lacking:
        blocks.append(missing(name, f"arrays {', '.join(lacking)} absent"))
    blocks.append(Figure(dom_id="fig-layer-patching", title="Layer x component patching",
                         html=to_div(fig, "fig-layer-patching"), source=fig,
                         caption=spans("Top: the residual stream at each of the last positions (x: offset from the "
                                       "end and the first test pair's token there). Bottom: each layer's attention "
                                       "and MLP output. Left: denoising (clean into corrupted: sufficiency); right: "
                                       "noising (corrupted into clean: necessity).")))
    return blocks


def heads(ctx: RunContext) -> list[Block]:
    name = "phase3/heads"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums, arrays = rec.numbers, rec.arrays
    ranking: list[dict[str, Any]] = list(nums.get("ranking") or [])
    blocks: list[Block] = []
    bar = fmt.finite(ctx.config.get("head_effect", nums.get("bar")))  # C1's per-head bar, as this run set it
    if ranking:
        top = ranking[0]
        lows = [fmt.bounds(_row_est(r, "effect"))[1] for r in ranking]
        clear = (f"Among the top {len(ranking)} heads, "
                 f"{sum(1 for low in lows if low is not None and low > bar)} have a CI lower bound above "
                 f"{fmt.share(bar)}. " if bar is not None else "")
        blocks.append(para(
            f"The strongest head is {top.get('label')} with normalized denoising effect "
            f"{fmt.estimate(_row_est(top, 'effect'))}. {clear}"
            f"AtP versus exact patching, Spearman rank correlation: {fmt.estimate(nums.get('atp_vs_exact_spearman'))} "
            f"({nums.get('n_heads', 'n/a')} heads, {nums.get('n_pairs', 'n/a')} pairs)."))
        vals, plus, minus = est_errors([_row_est(r, "effect") for r in ranking])
        labels = [esc(r.get("label", "?")) for r in ranking]
        fig = go.Figure([
            go.Bar(x=labels, y=vals, name="exact (denoising)", marker={"color": HARMFUL},
                   error_y={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}),
            go.Scatter(x=labels, y=[r.get("atp") for r in ranking], mode="markers", name="AtP estimate",
                       marker={"color": NEUTRAL, "symbol": "diamond", "size": 8})])
        if bar is not None:
            fig.add_hline(y=bar, line={"dash": "dash", "color": "#888"})
        layout(fig, title="Head ranking: normalized effect with 95% CI over prompts", height=420,
               yaxis={"title": "normalized effect"})
        blocks.append(Figure(dom_id="fig-head-ranking", title="Head ranking", html=to_div(fig, "fig-head-ranking"),
                             source=fig,
                             caption=spans(f"Dashed: the criterion's {fmt.share(bar)} bar." if bar is not None
                                           else "No per-head bar was recorded.")))
    else:
        blocks.append(missing(name, "no head ranking recorded"))
    panels = [(k, t) for k, t in (("exact.denoising", "exact, denoising"), ("exact.noising", "exact, noising"),
                                  ("atp.denoising", "AtP, denoising")) if k in arrays]
    if panels:
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.06)
        for i, (key, _) in enumerate(panels, start=1):
            z = to_numpy(arrays[key])
            fig.add_trace(go.Heatmap(z=finite_list(z), colorscale=DIVERGING, zmid=0, showscale=i == len(panels),
                                     hovertemplate="L%{y}H%{x}: %{z:.3f}<extra></extra>"), row=1, col=i)
            fig.update_xaxes(title_text="head", row=1, col=i)
        fig.update_yaxes(title_text="layer", row=1, col=1)
        layout(fig, title="Heads: layers x heads", height=max(360, 14 * to_numpy(arrays[panels[0][0]]).shape[0] + 120))
        blocks.append(Figure(dom_id="fig-head-heatmap", title="Head heatmap", html=to_div(fig, "fig-head-heatmap"),
                             source=fig,
                             caption=spans("Normalized effect of patching each head's output at "
                                           f"{positions_in_words(ctx.numbers(name).get('positions'))} "
                                           f"(n = {nums.get('n_pairs_sweep', 'n/a')} train "
                                           "pairs; descriptive: the verdicts rest on the verified candidates).")))
    else:
        blocks.append(missing(name, "head arrays absent"))
    return blocks


def attention_patterns(ctx: RunContext) -> list[Block]:
    name = "phase3/attention_patterns"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    tokens = rec.numbers.get("tokens") or {}
    prompts = rec.numbers.get("prompts") or {}
    items = []
    for head in rec.numbers.get("heads") or []:
        views = []
        for side, color in (("harmful", HARMFUL), ("harmless", HARMLESS)):
            arr = rec.arrays.get(f"{side}.{head}")
            views.append(pattern_svg(to_numpy(arr), tokens.get(side) or [], title=f"{head} on the {side} prompt",
                                     color=color) if arr is not None else pattern_svg(np.zeros((0, 0)), [], title=""))
        items.append((str(head), views[0], views[1]))
    if not items:
        return [missing(name, "no heads recorded")]
    return [para("Attention of the top heads on one harmful prompt and its harmless analogue: ",
                 Span(text=str(prompts.get("harmful", "")), code=True), " / ",
                 Span(text=str(prompts.get("harmless", "")), code=True), "."),
            Figure(dom_id="fig-attention-patterns", title="Attention patterns of the top heads", kind="svg",
                   html=pattern_grid(items),
                   caption=spans("Rows: query tokens; columns: key tokens (last positions only). Hover a cell "
                                 "for its weight."))]


def neurons(ctx: RunContext) -> list[Block]:
    name = "phase3/neurons"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    catalogue = list(ctx.numbers(name).get("catalogue") or [])[:100]
    if not catalogue:
        return [missing(name, "empty catalogue")]
    rows = []
    for n in catalogue:
        examples: list[Span] = []
        for ex in list(n.get("top_examples") or [])[:3]:
            if examples:
                examples.append(Span(text=" · "))
            examples += [Span(text=str(ex.get("token", "")), code=True),
                         Span(text=f" in “{ex.get('context', '')}” ({ex.get('side', '?')}, "
                                   f"{fmt.number(ex.get('activation'))})")]
        exact = fmt.estimate(_row_est(n, "exact"))
        rows.append((str(n.get("rank", "")), str(n.get("label", "")), fmt.number(n.get("atp")), exact,
                     fmt.number(n.get("activation_diff")), tuple(examples) or spans("n/a")))
    return [para(f"The top {len(rows)} MLP neurons by attribution on the train pairs, with exact patching effects "
                 "and the tokens that activate them most (in context)."),
            table(("rank", "neuron", "AtP", "exact effect", "activation diff.", "top-activating tokens in context"),
                  rows, css="catalogue", dom_id="table-neurons")]


def localization_blocks(ctx: RunContext) -> list[Block]:
    return [*layer_patching(ctx), *heads(ctx), *attention_patterns(ctx)]
