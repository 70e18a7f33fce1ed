"""The circuit graph as Graphviz DOT: the one writer behind phase 5.1's recorded ``dot`` and the
report's diagram (reports/circuit_svg.py), which differ only in the style arguments.

A node carries ``label``, ``kind`` (``Head``, ``Neuron``, ``output``...) and ``weight`` (None when
unknown); an edge carries ``weight``. Ids and labels are quoted and escaped, so a label cannot
break out of the source.
"""

from __future__ import annotations

from typing import Mapping

import networkx as nx

SHAPES = {"Head": "box", "Neuron": "ellipse", "output": "doublecircle"}


def quote(text: object) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _label(data: Mapping, weights: bool) -> str:
    label = str(data.get("label", ""))
    weight = data.get("weight")
    if weights and isinstance(weight, (int, float)):
        return quote(label)[:-1] + f'\\n{weight:.2f}"'  # a DOT line break between the label and its weight
    return quote(label)


def dot(graph: nx.DiGraph, *, name: str = "refusal_circuit", weights: bool = True,
        fill: Mapping[str, str] | None = None, default_fill: str = "#e5e8e8") -> str:
    """The graph as DOT, left to right: nodes shaped by kind, labelled (with their weight when ``weights``),
    filled by kind from ``fill`` when given; edge weights as pen widths."""
    style = ', style="rounded,filled"' if fill is not None else ""
    lines = [f"digraph {name} {{", f"  rankdir=LR; node [fontsize=10{style}];"]
    for node, data in graph.nodes(data=True):
        attrs = [f"label={_label(data, weights)}", f"shape={SHAPES.get(data.get('kind'), 'box')}"]
        if fill is not None:
            attrs.append(f"fillcolor={quote(fill.get(data.get('kind'), default_fill))}")
        lines.append(f"  {quote(node)} [{', '.join(attrs)}];")
    for u, v, data in graph.edges(data=True):
        width = 1 + 3 * min(1.0, abs(float(data.get("weight") or 0.0)))
        lines.append(f"  {quote(u)} -> {quote(v)} [penwidth={width:.2f}];")
    return "\n".join(lines + ["}"])
