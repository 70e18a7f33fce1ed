"""Phase 5 in the report: the circuit diagram, the refusal direction, 3D activation scatter."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports import fmt
from reports.circuit_svg import circuit_svg
from reports.context import RunContext
from reports.document import Block, Figure, missing, para, spans, table
from reports.plots import HARMFUL, HARMLESS, band, esc, finite_list, layout, mean_ci, to_div, to_numpy

SIDES = (("harmful", HARMFUL), ("harmless", HARMLESS))


def _absent(ctx: RunContext, name: str) -> list[Block] | None:
    return [missing(name, ctx.unreadable.get(name))] if ctx.get(name) is None else None


def circuit(ctx: RunContext) -> list[Block]:
    name = "phase5/circuit"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    nums = ctx.numbers(name)
    nodes, edges = list(nums.get("nodes") or []), list(nums.get("edges") or [])
    if not nodes:
        return [missing(name, "the circuit has no nodes")]
    svg, engine = circuit_svg(nodes, edges)
    return [para(f"The reconstructed circuit has {len(nodes)} nodes and {len(edges)} edges. {_faithfulness(nums)}"),
            Figure(dom_id="fig-circuit", title="The refusal circuit", kind="svg", html=svg,
                   caption=spans(f"Columns are layers; edge width is the edge's weight (red positive, blue "
                                 f"negative). Layout: {'Graphviz dot' if engine == 'graphviz' else 'layered, by layer'}."))]


def _faithfulness(nums: Mapping[str, Any]) -> str:
    intervention = nums.get("intervention") or "the intervention not recorded"
    return (f"Faithfulness (Wang et al. 2022; Hanna et al. 2024), the share of the harmful-harmless refusal-score "
            f"gap that the circuit's {nums.get('n_heads', 'n/a')} heads and {nums.get('n_neurons', 'n/a')} neurons "
            f"keep by themselves, with {intervention} (n = {nums.get('n_pairs', 'n/a')} pairs): "
            f"{fmt.estimate(nums.get('faithfulness'))}; size-matched random circuits (same layers, "
            f"{nums.get('n_random', 'n/a')} draws): {fmt.estimate(nums.get('faithfulness_random'))}; the difference: "
            f"{fmt.estimate(nums.get('faithfulness_vs_random'))}.")


def _steering_rows(steering: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for key, what, after in (("induce", "harmless prompts, direction added", "steered"),
                             ("bypass", "harmful prompts, direction ablated", "ablated")):
        s = steering.get(key) or {}
        if s:
            degenerate = s.get("degenerate") or {}  # a record without it reads "n/a (not recorded)"
            rows.append((what, fmt.estimate(s.get("baseline"), pct=True), fmt.estimate(s.get(after), pct=True),
                         fmt.estimate(degenerate.get("baseline"), pct=True),
                         fmt.estimate(degenerate.get(after), pct=True), fmt.p_value(s.get("mcnemar_p"))))
    return rows


def direction(ctx: RunContext) -> list[Block]:
    name = "phase5/direction"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums, arrays = rec.numbers, rec.arrays
    layer = nums.get("layer")
    excluded = nums.get("excluded_layers") or []
    meets = nums.get("meets_thresholds")
    blocks: list[Block] = [para(
        f"The refusal direction was read at layer {layer}, position {nums.get('pos')} (difference in means of "
        f"harmful and harmless activations). It {'meets' if meets else 'does NOT meet'} the selection thresholds "
        f"(KL on harmless prompts at most {ctx.config.get('direction_kl', 'n/a')}, induced refusal score at least "
        f"{ctx.config.get('direction_induce', 'n/a')}); layers never chosen: "
        f"{', '.join(map(str, excluded)) if excluded else 'none'}.", css="" if meets else "warning")]
    rows = _steering_rows(nums.get("steering") or {})
    if rows:
        blocks.append(table(("intervention", "refusal rate before", "refusal rate after", "degenerate rate before",
                             "degenerate rate after", "McNemar p"), rows, dom_id="table-steering"))
    if {"projection.harmful", "projection.harmless"} <= set(arrays):
        fig = go.Figure()
        for side, color in SIDES:
            arr = to_numpy(arrays[f"projection.{side}"])  # [layer, prompt]
            mean, low, high = mean_ci(arr, axis=1)
            for trace in band(go, range(arr.shape[0]), mean, low, high, name=side, color=color):
                fig.add_trace(trace)
        if isinstance(layer, int):
            fig.add_vline(x=layer, line={"dash": "dash", "color": "#555"})
        layout(fig, title="Projection onto the refusal direction by layer", xaxis={"title": "layer"},
               yaxis={"title": "scalar projection"})
        blocks.append(Figure(dom_id="fig-direction-projection", title="Projection onto the refusal direction",
                             html=to_div(fig, "fig-direction-projection"), source=fig,
                             caption=spans("Last position of held-out prompts; bands: 95% CI of the mean; dashed: "
                                           "the layer the direction was read at.")))
    else:
        blocks.append(missing(name, "projection arrays absent"))
    grids = [(k, t) for k, t in (("scores.bypass", "bypass score (lower is better)"),
                                 ("scores.induce", "induce score (higher is better)"),
                                 ("scores.kl", "KL on harmless")) if k in arrays]
    if grids:
        fig = make_subplots(rows=len(grids), cols=1, subplot_titles=[t for _, t in grids], vertical_spacing=0.12)
        for i, (key, _) in enumerate(grids, start=1):
            z = to_numpy(arrays[key])  # [pos, layer], NaN where not evaluated
            positions = list(nums.get("positions") or range(-z.shape[0], 0))
            fig.add_trace(go.Heatmap(z=finite_list(z), y=[f"pos {p}" for p in positions[: z.shape[0]]],
                                     colorscale="Viridis", showscale=False,
                                     hovertemplate="%{y}, layer %{x}: %{z:.3g}<extra></extra>"), row=i, col=1)
        fig.update_xaxes(title_text="layer", row=len(grids), col=1)
        layout(fig, title="Candidate directions: selection scores", height=200 + 160 * len(grids))
        blocks.append(Figure(dom_id="fig-direction-scores", title="Direction selection scores",
                             html=to_div(fig, "fig-direction-scores"), source=fig,
                             caption=spans("Blank cells were not evaluated (pruned layers).")))
    return blocks


def activation_scatter(ctx: RunContext) -> list[Block]:
    name = "phase5/activation_scatter"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums = rec.numbers
    layers = [int(x) for x in nums.get("layers") or []]
    labels = np.asarray(nums.get("labels") or [])
    cats = list(nums.get("categories") or [""] * len(labels))
    prompts = list(nums.get("prompts") or [""] * len(labels))
    hover = [f"{esc(c)}<br>{esc(str(p)[:80])}" for c, p in zip(cats, prompts)]
    blocks: list[Block] = []
    for method, title in (("pca", "PCA"), ("tsne", "t-SNE")):
        present = [layer for layer in layers if f"{method}.{layer}" in rec.arrays]
        if not present:
            blocks.append(missing(name, f"no {title} arrays"))
            continue
        fig = go.Figure()
        for li, layer in enumerate(present):
            pts = to_numpy(rec.arrays[f"{method}.{layer}"])  # [point, 3]
            for side, color in SIDES:
                idx = np.flatnonzero(labels == side) if labels.size == pts.shape[0] else np.arange(pts.shape[0])
                fig.add_trace(go.Scatter3d(
                    x=finite_list(pts[idx, 0]), y=finite_list(pts[idx, 1]), z=finite_list(pts[idx, 2]),
                    mode="markers", name=f"{side}", visible=li == 0, legendgroup=side, showlegend=True,
                    marker={"size": 3, "color": color, "opacity": 0.8},
                    text=[hover[i] for i in idx] if len(hover) == pts.shape[0] else None,
                    hovertemplate="%{text}<extra></extra>"))
        buttons = [{"label": f"layer {layer}", "method": "update",
                    "args": [{"visible": [j // 2 == li for j in range(2 * len(present))]},
                             {"title.text": f"{title} of the residual stream, layer {layer}"}]}
                   for li, layer in enumerate(present)]
        layout(fig, title=f"{title} of the residual stream, layer {present[0]}", height=560,
               updatemenus=[{"buttons": buttons, "direction": "down", "x": 0.01, "y": 1.0, "xanchor": "left",
                             "yanchor": "top", "showactive": True}],
               scene={"xaxis": {"title": f"{title} 1"}, "yaxis": {"title": f"{title} 2"},
                      "zaxis": {"title": f"{title} 3"}})
        dom_id = f"fig-scatter-{method}"
        blocks.append(Figure(dom_id=dom_id, title=f"3D activation scatter ({title})", html=to_div(fig, dom_id), source=fig,
                             caption=spans("Harmful (red) and harmless (blue) prompts; pick a layer in the menu. "
                                           "Hover a point for its category and prompt.")))
    return blocks
