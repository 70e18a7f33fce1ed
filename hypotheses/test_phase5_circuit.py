"""Phase 5.1, circuit reconstruction: a graph of the identified components and its faithfulness.

Nodes are the top heads (exact patching, train) and the top neurons of the catalogue,
weighted by their causal effect, plus the output ("refusal"). An edge u -> v (u upstream
of v) is weighted by how much mean-ablating u moves v's activation at the last position on
held-out harmful prompts (``hypotheses.circuit``, the study's ``circuit_graph`` stage).

Faithfulness (``Study.faithfulness``, Wang et al. 2022; Hanna et al. 2024) is the share of
the refusal score the circuit -- its heads and neurons -- keeps by itself on the test pairs,
with every other head and neuron patched from the harmless analogue at the positions the
circuit was found at, beside size-matched random circuits.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from hypotheses import records

pytestmark = [pytest.mark.phase5, pytest.mark.integration]


def test_circuit_graph_and_faithfulness(study, recorder):
    circuit = study.circuit_graph
    for pinned in circuit.pinned.values():
        # mean ablation pins the node itself to one reference value on every prompt
        torch.testing.assert_close(pinned, pinned[:1].expand(len(pinned)), atol=1e-4, rtol=1e-4)
    assert nx.is_directed_acyclic_graph(circuit.graph), \
        "edges only run downstream, so the circuit graph must be acyclic"
    faith = circuit.faithfulness
    assert faith.n_pairs == len(study.test_pairs) and faith.n_random >= 10
    assert all(np.isfinite([faith.score_harmful, faith.score_harmless, faith.score_circuit]))
    records.save(recorder, circuit.record())
