"""Plotly figures for the explorer (pure functions of numbers, so they are testable alone)."""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go

# The run's harmful/harmless averages are drawn dashed behind this prompt's solid line.
REF_STYLE = {"harmful": dict(color="#d62728", dash="dash"), "harmless": dict(color="#2ca02c", dash="dash")}


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 300) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height,
                      margin=dict(l=40, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.25))
    return fig


def layer_curves(lines: dict[str, Sequence[float]], refs: dict[str, Sequence[float]], *, title: str,
                 y: str) -> go.Figure:
    """One solid line per prompt, one dashed line per run average (``run: harmful`` ...)."""
    fig = go.Figure()
    for name, values in lines.items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=list(values), mode="lines+markers", name=name))
    for side, values in refs.items():
        fig.add_trace(go.Scatter(x=list(range(len(values))), y=list(values), mode="lines", name=f"run: {side} mean",
                                 line=REF_STYLE.get(side, {})))
    return _layout(fig, title, "layer", y)


def head_heatmap(values: Sequence[Sequence[float]], marked: Sequence[tuple[int, int]], *, title: str,
                 colorbar: str) -> go.Figure:
    """[layer, head] heatmap; the run's circuit heads are circled."""
    fig = go.Figure(go.Heatmap(z=[list(r) for r in values], colorscale="YlOrRd", colorbar=dict(title=colorbar),
                               hovertemplate="L%{y}H%{x}: %{z:.3g}<extra></extra>"))
    if marked:
        fig.add_trace(go.Scatter(x=[h for _, h in marked], y=[L for L, _ in marked], mode="markers",
                                 marker=dict(symbol="circle-open", size=14, color="#1f77b4", line=dict(width=2)),
                                 name="run's top heads", hoverinfo="skip"))
    return _layout(fig, title, "head", "layer", height=420)


def attention_heatmap(pattern: Sequence[Sequence[float]], tokens: Sequence[str], *, title: str) -> go.Figure:
    """A head's [query, key] attention pattern with token labels on both axes."""
    fig = go.Figure(go.Heatmap(z=[list(r) for r in pattern], x=list(tokens), y=list(tokens), colorscale="Blues",
                               zmin=0, zmax=1, hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-60)
    size = max(420, min(1100, 18 * len(tokens) + 160))
    return _layout(fig, title, "key (attended to)", "query", height=size)


def effect_bars(labels: Sequence[str], effects: Sequence[float], *, title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(labels), y=list(effects), marker_color="#9467bd"))
    fig.update_xaxes(type="category")
    return _layout(fig, title, "component", "normalized effect (0 = none, 1 = other prompt)")
