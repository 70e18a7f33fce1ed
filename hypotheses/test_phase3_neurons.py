"""Phase 3.3, a catalogue of refusal neurons: a first pass at interpreting them.

Neurons are ranked by attribution patching over every MLP neuron (one backward pass),
the top ``--refusal-top-neurons`` verified by exact patching. For each: its exact effect
with a CI, its mean activation difference harmful - harmless at the last position, and
the tokens (in context) that activate it most across the train prompts (both sides).
The study's ``neuron_catalogue`` stage measures (``hypotheses.catalogue``); this test
checks it and records it.
"""

from __future__ import annotations

import numpy as np
import pytest

from hypotheses import records

pytestmark = [pytest.mark.phase3, pytest.mark.integration]


def test_neuron_catalogue(subject, study, recorder, refusal_config):
    cat = study.neuron_catalogue
    neurons = list(cat.neurons)
    assert len(neurons) == min(refusal_config.top_neurons, subject.n_layers * subject.d_mlp)
    assert len(set(neurons)) == len(neurons), "a neuron appears twice in the catalogue"
    for entry in cat.entries:
        for example in entry["top_examples"]:
            assert np.isfinite(example["activation"]), "a top activation must sit on a real token"
    records.save(recorder, cat.record())
