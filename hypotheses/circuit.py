"""Phase 5.1, circuit reconstruction: a graph of the identified components and its faithfulness.

Nodes are the top heads (exact patching, train) and the top neurons of the catalogue,
weighted by their causal effect, plus the output ("refusal"). An edge u -> v (u upstream
of v) is weighted by how much mean-ablating u (the study's ablation: its positions, each
from its own reference position) moves v's activation at the last position on held-out
harmful prompts (relative change): a direct causal dependency between components,
measured with one forward pass per upstream node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import torch

from fixtures.config import RefusalConfig
from hypotheses import circuit_dot, records
from hypotheses.evidence import Faithfulness, Ranking, ablation_spec, positions_label
from hypotheses.records_study import positions_in_words
from instruments import behavior
from instruments.ablation import ReferenceActivations, ablation_hooks
from instruments.components import Component, Head, Neuron, hook_name, label
from instruments.patching import LAST_ONLY

N_NEURONS = 10  # the catalogue's top neurons in the graph
N_PROMPTS = 12  # harmful test prompts the edges are measured on


def _site(c: Component) -> tuple[str, int]:
    return hook_name(c), (c.head if isinstance(c, Head) else c.index)


@torch.no_grad()
def activations(handle, prompts: Sequence[str], nodes: Sequence[Component], hooks, batch_size: int) -> torch.Tensor:
    """Last-position activation of each node (a head: the norm of its z), [prompt, node]."""
    names = {_site(n)[0] for n in nodes}
    out = []
    for chunk in behavior.batches(prompts, batch_size):
        ids, mask = handle.encode(chunk)
        with handle.bridge.hooks(fwd_hooks=list(hooks)):
            _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names,
                                                    **LAST_ONLY)  # the logits are not read
        cols = []
        for n in nodes:
            name, i = _site(n)
            act = cache[name][:, -1, i]
            # on the CPU before stacking: under a --device-map the layers' caches sit on different devices
            cols.append((act.norm(dim=-1) if isinstance(n, Head) else act).float().cpu())
        out.append(torch.stack(cols, 1))
    return torch.cat(out)


def upstream(u: Component, v: Component) -> bool:
    order = lambda c: (c.layer, 0 if isinstance(c, Head) else 1)  # noqa: E731 - attention runs before the MLP
    return order(u) < order(v)


@dataclass(frozen=True, kw_only=True)
class CircuitGraph:
    """The circuit's graph, the activations its edges were measured from, and its faithfulness."""

    graph: nx.DiGraph
    nodes: tuple[Component, ...]
    # per ablated node (index into nodes): its own last-position activation on each prompt, under its ablation
    pinned: dict[int, torch.Tensor]
    faithfulness: Faithfulness
    prompts: tuple[str, ...]  # every harmful test prompt (the edges use the first N_PROMPTS)

    def record(self) -> records.Circuit:
        graph, faith = self.graph, self.faithfulness
        data = nx.node_link_data(graph, edges="edges")
        where = positions_label(faith.positions)
        return records.Circuit(
            nodes=[{"id": n, **a} for n, a in graph.nodes(data=True)],
            edges=[{"source": u, "target": v, **a} for u, v, a in graph.edges(data=True)],
            faithfulness=faith.value.to_dict(), faithfulness_random=faith.random.to_dict(),
            faithfulness_vs_random=faith.difference.to_dict(), n_random=faith.n_random,
            refusal_score={"harmful": faith.score_harmful, "circuit_only": faith.score_circuit,
                           "harmless": faith.score_harmless},
            positions=where, n_pairs=faith.n_pairs, n_heads=sum(isinstance(c, Head) for c in faith.circuit),
            n_neurons=sum(isinstance(c, Neuron) for c in faith.circuit), dot=circuit_dot.dot(graph),
            node_link=json.loads(json.dumps(data)),
            intervention="every head and MLP neuron outside the circuit patched from the harmless analogue at "
                         f"{positions_in_words(where)}, on the harmful test prompts",
            prompts=list(self.prompts))


def circuit_graph(handle, ranking: Ranking, neurons: Ranking, prompts: Sequence[str],
                  reference: ReferenceActivations, faithfulness: Faithfulness, cfg: RefusalConfig) -> CircuitGraph:
    """The top ``cfg.top_heads`` heads and the top N_NEURONS neurons, edges measured on the first N_PROMPTS
    of ``prompts`` (harmful test prompts)."""
    heads = list(ranking.top(cfg.top_heads))
    nodes = heads + [n for n in neurons.top(N_NEURONS) if isinstance(n, Neuron)]
    effect = {c: float(e) for c, e in zip(ranking.components, ranking.effect)}
    effect.update({c: float(e) for c, e in zip(neurons.components, neurons.effect)})
    measured = list(prompts)[:N_PROMPTS]
    bs, spec = cfg.batch_size, ablation_spec(handle, cfg, nodes)
    clean = activations(handle, measured, nodes, (), bs)
    graph = nx.DiGraph()
    for c in nodes:
        graph.add_node(label(c), label=label(c), kind=type(c).__name__, layer=c.layer, weight=effect[c])
    graph.add_node("refusal", label="refusal", kind="output", layer=handle.n_layers, weight=1.0)
    pinned = {}
    for i, u in enumerate(nodes):
        graph.add_edge(label(u), "refusal", weight=max(0.0, effect[u]), kind="effect")
        downstream = [j for j, v in enumerate(nodes) if upstream(u, v)]
        if not downstream:
            continue
        hooks = ablation_hooks(handle, [u], spec=spec, reference=reference)
        ablated = activations(handle, measured, nodes, hooks, bs)
        pinned[i] = ablated[:, i]
        rel = ((ablated - clean).abs().mean(0) / clean.abs().mean(0).clamp_min(1e-6)).tolist()
        for j in downstream:
            graph.add_edge(label(u), label(nodes[j]), weight=float(rel[j]), kind="ablation")
    return CircuitGraph(graph=graph, nodes=tuple(nodes), pinned=pinned, faithfulness=faithfulness,
                        prompts=tuple(prompts))
