"""Phase 5.2, the refusal direction (Arditi et al. 2024) and how the prompts sit around it.

Candidates are harmful-minus-harmless mean differences at each post-instruction position
and layer (TRAIN pairs); the direction is selected on VAL pairs by bypass (refusal left
after ablating it), induce (refusal when adding it to harmless prompts) and KL on harmless
prompts, never from the last ``--refusal-direction-prune`` share of layers. When no candidate
passes the filters, the best one is still recorded and steered, flagged by
``meets_thresholds`` and ``unusable_reason``; no verdict uses it. Steering is
then measured on TEST prompts: adding the direction to harmless prompts should induce
refusal, ablating it from harmful prompts should remove it; each with rates, CIs and
McNemar's p against the unsteered model. The study's stages measure
(``hypotheses.steering``); these tests check the instruments and record.
"""

from __future__ import annotations

import pytest
import torch

from hypotheses import records
from instruments.positions import post_instruction_length

pytestmark = [pytest.mark.phase5, pytest.mark.integration]


def test_refusal_direction_and_steering(subject, study, recorder, refusal_config):
    steer = study.direction_steering
    sel = steer.selection
    unit = sel.direction.tensor()
    assert abs(float(unit.norm()) - 1.0) < 1e-4, "the selected direction must be a unit vector"
    assert sel.layer not in sel.excluded_layers, "the direction may not come from the pruned last layers"
    proj_h, _ = steer.projections
    assert proj_h.shape == (subject.n_layers, len(study.data.test))
    # Arditi et al. (2024) search every post-instruction position and select on 32 val prompts per side
    assert sel.n_harmful == sel.n_harmless == min(len(study.data.val), refusal_config.direction_val_pairs)
    assert len(steer.positions) == (refusal_config.direction_positions or post_instruction_length(subject))
    records.save(recorder, steer.record())


def test_activation_scatter(study, recorder):
    """PCA and t-SNE (3-D) of last-position residuals, harmful vs harmless, at several depths."""
    scatter = study.activation_scatter
    for pca in scatter.pca.values():
        # the top three principal axes are orthogonal: their coordinates are uncorrelated
        cov = (pca.T @ pca) / (pca.shape[0] - 1)
        off = cov - torch.diag(torch.diag(cov))
        assert off.abs().max() <= 1e-6 * cov.abs().max() + 1e-9
    records.save(recorder, scatter.record())
