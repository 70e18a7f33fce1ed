"""Phase 5.1, circuit reconstruction: a graph of the identified components and its faithfulness.

Nodes are the top heads (exact patching, train) and the top neurons of the catalogue,
weighted by their causal effect, plus the output ("refusal"). An edge u -> v (u upstream
of v) is weighted by how much mean-ablating u (the study's ablation: its positions, each
from its own reference position) moves v's activation at the last position on held-out
harmful prompts (relative change): a direct causal dependency between components,
measured with one forward pass per upstream node.

Faithfulness (``Study.faithfulness``, Wang et al. 2022; Hanna et al. 2024) is the share of
the refusal score the circuit -- its heads and neurons -- keeps by itself on the test pairs,
with every other head and neuron patched from the harmless analogue at the positions the
circuit was found at, beside size-matched random circuits.
"""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch

from hypotheses.evidence import ablation_spec, harmful, positions_label
from instruments import behavior
from instruments.ablation import ablation_hooks
from instruments.components import Head, Neuron, hook_name, label

pytestmark = [pytest.mark.phase5, pytest.mark.integration]

N_NEURONS = 10
N_PROMPTS = 12


def _site(c) -> tuple[str, int]:
    return hook_name(c), (c.head if isinstance(c, Head) else c.index)


@torch.no_grad()
def _activations(subject, prompts, nodes, hooks, bs) -> torch.Tensor:
    """Last-position activation of each node (a head: the norm of its z), [prompt, node]."""
    names = {_site(n)[0] for n in nodes}
    out = []
    for chunk in behavior.batches(prompts, bs):
        ids, mask = subject.encode(chunk)
        with subject.bridge.hooks(fwd_hooks=list(hooks)):
            _, cache = subject.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
        cols = []
        for n in nodes:
            name, i = _site(n)
            act = cache[name][:, -1, i]
            cols.append(act.norm(dim=-1) if isinstance(n, Head) else act)
        out.append(torch.stack(cols, 1).float().cpu())
    return torch.cat(out)


def _upstream(u, v) -> bool:
    order = lambda c: (c.layer, 0 if isinstance(c, Head) else 1)  # noqa: E731 - attention runs before the MLP
    return order(u) < order(v)


def _dot(graph: nx.DiGraph) -> str:
    lines = ["digraph refusal_circuit {", "  rankdir=LR;"]
    for node, data in graph.nodes(data=True):
        shape = "box" if data["kind"] == "Head" else "ellipse" if data["kind"] == "Neuron" else "doublecircle"
        lines.append(f'  "{node}" [label="{data["label"]}\\n{data["weight"]:.2f}", shape={shape}];')
    for u, v, data in graph.edges(data=True):
        lines.append(f'  "{u}" -> "{v}" [penwidth={1 + 4 * min(1.0, data["weight"]):.2f}];')
    return "\n".join(lines + ["}"])


def test_circuit_graph_and_faithfulness(subject, study, recorder):
    cfg = study.cfg
    heads = list(study.ranking.top(cfg.top_heads))
    neurons = [n for n in study.neurons.top(N_NEURONS) if isinstance(n, Neuron)]
    nodes = heads + neurons
    effect = {c: float(e) for c, e in zip(study.ranking.components, study.ranking.effect)}
    effect.update({c: float(e) for c, e in zip(study.neurons.components, study.neurons.effect)})
    prompts = harmful(study.data.test)[:N_PROMPTS]
    bs, spec = cfg.batch_size, ablation_spec(subject, cfg, nodes)
    clean = _activations(subject, prompts, nodes, (), bs)
    graph = nx.DiGraph()
    for c in nodes:
        graph.add_node(label(c), label=label(c), kind=type(c).__name__, layer=c.layer, weight=effect[c])
    graph.add_node("refusal", label="refusal", kind="output", layer=subject.n_layers, weight=1.0)
    for i, u in enumerate(nodes):
        graph.add_edge(label(u), "refusal", weight=max(0.0, effect[u]), kind="effect")
        downstream = [j for j, v in enumerate(nodes) if _upstream(u, v)]
        if not downstream:
            continue
        hooks = ablation_hooks(subject, [u], spec=spec, reference=study.reference)
        ablated = _activations(subject, prompts, nodes, hooks, bs)
        # mean ablation pins the node itself to one reference value on every prompt
        torch.testing.assert_close(ablated[:, i], ablated[:1, i].expand(len(prompts)), atol=1e-4, rtol=1e-4)
        rel = ((ablated - clean).abs().mean(0) / clean.abs().mean(0).clamp_min(1e-6)).tolist()
        for j in downstream:
            graph.add_edge(label(u), label(nodes[j]), weight=float(rel[j]), kind="ablation")
    assert nx.is_directed_acyclic_graph(graph), "edges only run downstream, so the circuit graph must be acyclic"

    faith = study.faithfulness
    assert faith.n_pairs == len(study.test_pairs) and faith.n_random >= 10
    assert all(np.isfinite([faith.score_harmful, faith.score_harmless, faith.score_circuit]))
    data = nx.node_link_data(graph, edges="edges")
    recorder.save("phase5/circuit", numbers={
        "nodes": [{"id": n, **a} for n, a in graph.nodes(data=True)],
        "edges": [{"source": u, "target": v, **a} for u, v, a in graph.edges(data=True)],
        "faithfulness": faith.value.to_dict(), "faithfulness_random": faith.random.to_dict(),
        "faithfulness_vs_random": faith.difference.to_dict(), "n_random": faith.n_random,
        "refusal_score": {"harmful": faith.score_harmful, "circuit_only": faith.score_circuit,
                          "harmless": faith.score_harmless},
        "positions": positions_label(faith.positions), "n_pairs": faith.n_pairs,
        "n_heads": sum(isinstance(c, Head) for c in faith.circuit),
        "n_neurons": sum(isinstance(c, Neuron) for c in faith.circuit),
        "dot": _dot(graph), "node_link": json.loads(json.dumps(data)),
        "intervention": "every head and MLP neuron outside the circuit patched from the harmless analogue "
                        f"({positions_label(faith.positions)} positions), on the harmful test prompts"},
        prompts=harmful(study.data.test))
