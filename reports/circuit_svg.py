"""The circuit diagram (phase5/circuit) as inline SVG.

The graph is rebuilt with networkx from the recorded nodes and edges. With Graphviz
installed (``dot`` on PATH) it is laid out by ``dot -Tsvg``, from DOT written by the phase's
own writer (hypotheses/circuit_dot.py, escaped labels) from the recorded nodes and edges: the
recorded ``dot`` text is not trusted as markup. Without it,
a pure-Python layered layout puts each node in its layer's column, which is what a
reader of a transformer circuit expects anyway: information flows left to right.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any, Mapping, Sequence

import networkx as nx
from markupsafe import Markup

from hypotheses import circuit_dot

KIND_COLORS = {"Head": "#f5b7b1", "Neuron": "#aed6f1", "MlpOut": "#a9dfbf", "AttnOut": "#f9e79f",
               "Resid": "#d7dbdd", "Direction": "#d2b4de"}
DEFAULT_COLOR = "#e5e8e8"
COL_W, ROW_H, BOX_W, BOX_H, PAD = 120, 38, 92, 26, 30


def build_graph(nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]]) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(str(n["id"]), label=str(n.get("label", n["id"])), kind=str(n.get("kind", "")),
                   layer=n.get("layer"), weight=n.get("weight"))
    for e in edges:
        s, t = str(e["source"]), str(e["target"])
        for end in (s, t):  # an edge to an unlisted node still draws, with the id as its label
            if end not in g:
                g.add_node(end, label=end, kind="", layer=None, weight=None)
        g.add_edge(s, t, weight=float(e.get("weight") or 0.0))
    return g


def columns(g: nx.DiGraph) -> dict[str, int]:
    """Column of each node: its layer; unlayered sources go first, unlayered sinks last."""
    layered = [d["layer"] for _, d in g.nodes(data=True) if isinstance(d.get("layer"), int)]
    lo, hi = (min(layered), max(layered)) if layered else (0, 0)
    col: dict[str, int] = {}
    for node, data in g.nodes(data=True):
        if isinstance(data.get("layer"), int):
            col[node] = data["layer"] - lo + 1
    order = list(nx.topological_sort(g)) if nx.is_directed_acyclic_graph(g) else list(g.nodes)
    for node in order:
        if node in col:
            continue
        preds = [col[p] for p in g.predecessors(node) if p in col]
        if not preds and g.in_degree(node) == 0:
            col[node] = 0
        elif g.out_degree(node) == 0:
            col[node] = hi - lo + 2
        else:
            col[node] = max(preds, default=0) + 1
    return col


def _python_svg(g: nx.DiGraph) -> Markup:
    col = columns(g)
    by_col: dict[int, list[str]] = {}
    for node in g.nodes:
        by_col.setdefault(col[node], []).append(node)
    pos: dict[str, tuple[float, float]] = {}
    n_rows = max((len(v) for v in by_col.values()), default=1)
    used = sorted(by_col)
    for ci, c in enumerate(used):
        members = sorted(by_col[c], key=lambda n: -abs(float(g.nodes[n].get("weight") or 0.0)))
        offset = (n_rows - len(members)) * ROW_H / 2  # centre short columns
        for ri, node in enumerate(members):
            pos[node] = (PAD + ci * COL_W, PAD + 20 + offset + ri * ROW_H)
    width = PAD * 2 + max(len(used) - 1, 0) * COL_W + BOX_W
    height = PAD * 2 + 20 + n_rows * ROW_H
    wmax = max((abs(d["weight"]) for _, _, d in g.edges(data=True)), default=1.0) or 1.0
    out = [Markup('<svg xmlns="http://www.w3.org/2000/svg" class="circuit" role="img" width="{w}" height="{h}" '
                  'viewBox="0 0 {w} {h}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
                  'markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/>'
                  '</marker></defs>').format(w=width, h=height)]
    for ci, c in enumerate(used):
        layers = {g.nodes[n].get("layer") for n in by_col[c]}
        name = f"L{layers.pop()}" if len(layers) == 1 and isinstance(next(iter(layers), None), int) else ""
        out.append(Markup('<text class="circuit-col" x="{x}" y="{y}">{t}</text>').format(
            x=PAD + ci * COL_W + BOX_W / 2, y=PAD, t=name))
    for s, t, d in g.edges(data=True):
        (x1, y1), (x2, y2) = pos[s], pos[t]
        x1, y1, x2, y2 = x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2
        bend = max(40.0, abs(x2 - x1) / 2)
        colour = "#c0392b" if d["weight"] >= 0 else "#2471a3"
        out.append(Markup('<path class="circuit-edge" d="M{x1:.1f},{y1:.1f} C{c1:.1f},{y1:.1f} {c2:.1f},{y2:.1f} '
                          '{x2:.1f},{y2:.1f}" stroke="{col}" stroke-width="{sw:.2f}" fill="none" '
                          'marker-end="url(#arrow)" opacity="0.75"><title>{s} → {t}: {w:.3g}</title></path>').format(
            x1=x1, y1=y1, x2=x2, y2=y2, c1=x1 + bend, c2=x2 - bend, col=colour,
            sw=0.8 + 3.5 * abs(d["weight"]) / wmax, s=g.nodes[s]["label"], t=g.nodes[t]["label"], w=d["weight"]))
    for node, (x, y) in pos.items():
        data = g.nodes[node]
        weight = data.get("weight")
        tip = f"{data['label']} ({data.get('kind') or 'node'})" + (f", weight {weight:.3g}" if isinstance(
            weight, (int, float)) else "")
        out.append(Markup('<g class="circuit-node"><rect x="{x}" y="{y}" width="{bw}" height="{bh}" rx="5" '
                          'fill="{fill}" stroke="#555"/><text x="{tx}" y="{ty}" text-anchor="middle">{label}</text>'
                          '<title>{tip}</title></g>').format(
            x=x, y=y, bw=BOX_W, bh=BOX_H, fill=KIND_COLORS.get(data.get("kind"), DEFAULT_COLOR),
            tx=x + BOX_W / 2, ty=y + BOX_H / 2 + 4, label=data["label"][:14], tip=tip))
    out.append(Markup("</svg>"))
    return Markup("").join(out)


# the recorded DOT's writer, styled for the page: filled by kind, weights left to the tooltips
REPORT_STYLE = {"name": "circuit", "weights": False, "fill": KIND_COLORS, "default_fill": DEFAULT_COLOR}


def dot_source(g: nx.DiGraph) -> str:
    return circuit_dot.dot(g, **REPORT_STYLE)


def _graphviz_svg(g: nx.DiGraph, dot: str) -> Markup | None:
    try:
        out = subprocess.run([dot, "-Tsvg"], input=dot_source(g), capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    start = out.find("<svg")
    if start < 0:
        return None
    # Graphviz output carries only what dot_source wrote (escaped ids and labels); drop any link
    # attributes anyway so nothing in the report points off the page.
    svg = re.sub(r'\s(?:xlink:)?href="[^"#][^"]*"', "", out[start:])
    return Markup(svg.replace("<svg", '<svg class="circuit"', 1))


def circuit_svg(nodes: Sequence[Mapping[str, Any]], edges: Sequence[Mapping[str, Any]], *,
                use_graphviz: bool | None = None) -> tuple[Markup, str]:
    """The diagram and which layout drew it ("graphviz" or "python")."""
    g = build_graph(nodes, edges)
    dot = shutil.which("dot") if use_graphviz in (None, True) else None
    if dot:
        svg = _graphviz_svg(g, dot)
        if svg is not None:
            return svg, "graphviz"
    return _python_svg(g), "python"
