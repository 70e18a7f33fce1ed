"""Phase 4.1, ablation on the held-out test split, against matched random controls.

Components come from TRAIN pairs (heads, neurons) and TRAIN + VAL (the direction); the
refusal rate is measured on TEST harmful prompts, never on the prompts that chose them.
Heads and neurons are mean-ablated (their mean over harmless train prompts); the refusal
direction is projected out of the residual stream at every layer. Each condition has a
random control of the same size and layers (one random head or neuron in each chosen
component's layer; a random unit direction at the same layer). Reported per condition: refusal rate with a
Wilson CI, the relative drop with a paired bootstrap CI, McNemar's p against the
baseline (Holm-corrected over all conditions), and capability side effects on harmless
test prompts (next-token KL and the rise in cross-entropy of the model's own answers).
The study's ``ablation_study`` stage measures (``hypotheses.ablations``).
"""

from __future__ import annotations

import pytest

from hypotheses import records

pytestmark = [pytest.mark.phase4, pytest.mark.integration]


def test_ablation_study(study, recorder):
    ablation = study.ablation_study
    for c in ablation.conditions:
        assert c.ablated.refused.shape == c.baseline.refused.shape
        b, cc = c.mcnemar.table[0][1], c.mcnemar.table[1][0]
        # McNemar's discordant cells are exactly the prompts whose verdict flipped
        assert b == int((c.baseline.refused & ~c.ablated.refused).sum())
        assert cc == int((~c.baseline.refused & c.ablated.refused).sum())
        assert c.kl_harmless is not None and c.kl_harmless >= -1e-6
    records.save(recorder, ablation.record())
