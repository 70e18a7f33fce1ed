"""Phase 5.1, circuit reconstruction: a graph of the identified components and its faithfulness.

Nodes are the top heads (exact patching, train) and the top neurons of the catalogue,
weighted by their causal effect, plus the output ("refusal"). An edge u -> v (u upstream
of v) is weighted by how much mean-ablating u moves v's activation at the last position
on held-out harmful prompts (relative change): a direct causal dependency between
components, measured with one forward pass per upstream node.

Faithfulness is the share of the refusal score the circuit keeps on its own:
F = (m(circuit) - m(none)) / (m(full) - m(none)), where m(circuit) mean-ablates every
attention head outside the circuit, and m(none) every head (MLPs intact in both, so F is
about the heads' share; the circuit's neurons enter the graph but not this ablation).
"""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
import torch

from hypotheses.evidence import boot_estimate, boot_index, harmful
from instruments import behavior
from instruments.ablation import AblationSpec, ablation_hooks
from instruments.components import Head, Neuron, all_heads, label
from instruments.metrics import refusal_score

pytestmark = [pytest.mark.phase5, pytest.mark.integration]

N_NEURONS = 10
N_PROMPTS = 12


def _site(c) -> tuple[str, int]:
    return (f"blocks.{c.layer}.attn.hook_z", c.head) if isinstance(c, Head) else \
        (f"blocks.{c.layer}.mlp.hook_post", c.index)


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


def test_circuit_graph_and_faithfulness(subject, study, recorder, refusal_tokens, refusal_config):
    cfg = study.cfg
    heads = list(study.ranking.top(cfg.top_heads))
    neurons = [n for n in study.neurons.top(N_NEURONS) if isinstance(n, Neuron)]
    nodes = heads + neurons
    effect = {c: float(e) for c, e in zip(study.ranking.components, study.ranking.effect)}
    effect.update({c: float(e) for c, e in zip(study.neurons.components, study.neurons.effect)})
    prompts = harmful(study.data.test)[:N_PROMPTS]
    bs, spec = cfg.batch_size, AblationSpec(method="mean", batch_size=cfg.batch_size)
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

    # Faithfulness: every head outside the circuit mean-ablated, vs every head ablated.
    outside = [h for h in all_heads(subject.n_layers, subject.n_heads) if h not in set(heads)]
    def score(hooks) -> np.ndarray:
        return refusal_score(behavior.last_logits(subject, harmful(study.data.test), batch_size=bs, fwd_hooks=hooks),
                             refusal_tokens).double().numpy()
    full = score(())
    only = score(ablation_hooks(subject, outside, spec=spec, reference=study.reference))
    none = score(ablation_hooks(subject, all_heads(subject.n_layers, subject.n_heads), spec=spec,
                                reference=study.reference))
    value = (only.mean() - none.mean()) / (full.mean() - none.mean())
    idx = boot_index(full.size, cfg, salt=50)
    with np.errstate(all="ignore"):
        boot = (only[idx].mean(1) - none[idx].mean(1)) / (full[idx].mean(1) - none[idx].mean(1))
    faith = boot_estimate(value, boot, cfg, full.size)
    data = nx.node_link_data(graph, edges="edges")
    recorder.save("phase5/circuit", numbers={
        "nodes": [{"id": n, **a} for n, a in graph.nodes(data=True)],
        "edges": [{"source": u, "target": v, **a} for u, v, a in graph.edges(data=True)],
        "faithfulness": faith.to_dict(), "refusal_score": {"full": float(full.mean()), "circuit_only": float(only.mean()),
                                                           "all_heads_ablated": float(none.mean())},
        "dot": _dot(graph), "node_link": json.loads(json.dumps(data)),
        "ablated_outside": f"all {len(outside)} attention heads outside the circuit, mean-ablated (MLPs intact)"},
        prompts=harmful(study.data.test))
