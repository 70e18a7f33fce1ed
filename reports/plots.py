"""Plotly helpers shared by the figure modules: one look, escaped labels, bands, inline divs.

Figures are emitted as bare ``<div>``s; plotly.js itself is inlined once in the page head
(render.py), so the report works offline. Text that comes from prompts or tokens is
HTML-escaped before it reaches Plotly, whose labels understand a subset of HTML.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np
from markupsafe import Markup

HARMFUL = "#c0392b"
HARMLESS = "#2471a3"
NEUTRAL = "#566573"
# A diverging scale centred at 0, for normalized effects that may be negative.
DIVERGING = "RdBu_r"
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "modeBarButtonsToRemove": ["sendDataToCloud"]}
Z95 = 1.959964


def esc(text: Any) -> str:
    """Escape prompt/token text for Plotly labels (which interpret a subset of HTML)."""
    return html.escape(str(text), quote=False).replace("\n", "⏎")


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float64)


def finite_list(arr: np.ndarray) -> list:
    """JSON-safe nested list: NaN and inf become None (Plotly shows gaps)."""
    out = np.where(np.isfinite(arr), arr, np.nan).astype(object)
    out[~np.isfinite(arr.astype(np.float64))] = None
    return out.tolist()


def layout(fig: Any, *, title: str, height: int = 420, **kwargs: Any) -> Any:
    fig.update_layout(template="none", title={"text": esc(title), "x": 0.01, "font": {"size": 15}},
                      height=height, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      font={"family": "system-ui, sans-serif", "size": 12},
                      legend={"orientation": "h", "y": -0.18}, **kwargs)
    return fig


def to_div(fig: Any, dom_id: str) -> Markup:
    """The figure as an empty ``<div>`` plus its spec as inline JSON, drawn on demand.

    Drawing every figure while the page loads made a full report take many seconds to open
    (each Plotly.newPlot runs synchronously during parsing), so figures are drawn by the page's
    bootstrap script (templates/figures.js) when they scroll near the viewport, before
    printing, or all at once through ``window.renderAllFigures()``.
    """
    import plotly.io as pio

    spec = pio.to_json(fig, validate=False, engine="json")
    # Inside <script> the JSON must not contain "</script>" or "<!--": escape the angle brackets
    # (and &), which only ever occur inside JSON strings, where \u escapes are equivalent.
    spec = spec.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    height = fig.layout.height or 450
    return Markup('<div id="{id}" class="plotly-lazy" style="height:{h}px"></div>'
                  '<script type="application/json" id="{id}-data">').format(id=dom_id, h=int(height)) + \
        Markup(spec) + Markup("</script>")


def mean_ci(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over ``axis`` with a 95% normal-approximation CI of the mean (for bands)."""
    values = np.asarray(values, dtype=np.float64)
    n = np.sum(np.isfinite(values), axis=axis)
    mean = np.nanmean(values, axis=axis)
    sd = np.nanstd(values, axis=axis, ddof=1) if values.shape[axis] > 1 else np.zeros_like(mean)
    half = Z95 * sd / np.sqrt(np.maximum(n, 1))
    return mean, mean - half, mean + half


def band(go: Any, x: Sequence[Any], mean: np.ndarray, low: np.ndarray, high: np.ndarray, *, name: str,
         color: str, showlegend: bool = True, row_col: dict | None = None) -> list[Any]:
    """A line with a shaded CI band (two traces: the band polygon, then the line)."""
    x = list(x)
    fill = go.Scatter(x=x + x[::-1], y=finite_list(np.concatenate([high, low[::-1]])), fill="toself", mode="lines",
                      fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip", showlegend=False,
                      name=f"{name} 95% CI")
    line = go.Scatter(x=x, y=finite_list(mean), mode="lines+markers", name=esc(name), line={"color": color},
                      showlegend=showlegend,
                      customdata=np.stack([finite_list(low), finite_list(high)], axis=-1).tolist(),
                      hovertemplate="%{x}: %{y:.3g} [95% CI %{customdata[0]:.3g}, %{customdata[1]:.3g}]"
                                    f"<extra>{esc(name)}</extra>")
    return [fill, line]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def est_errors(estimates: Sequence[dict]) -> tuple[list, list, list]:
    """Values and asymmetric error-bar lengths for a list of estimate dicts."""
    from reports.fmt import bounds

    vals, plus, minus = [], [], []
    for e in estimates:
        v, lo, hi = bounds(e)
        vals.append(v)
        plus.append(None if v is None or hi is None else max(hi - v, 0.0))
        minus.append(None if v is None or lo is None else max(v - lo, 0.0))
    return vals, plus, minus
