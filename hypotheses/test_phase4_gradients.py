"""Phase 4.2, gradient attribution and its agreement with patching.

Integrated gradients from the refusal score to the input tokens, each harmful prompt against
its paired harmless prompt (completeness asserted within the method's bar), gradient x
attention pattern per head, and gradient x activation per MLP neuron, each rank-correlated
(Spearman, bootstrap CI) with the patching effects of the same components. The seed's
cross-validation bar (r > 0.7) is decided in test_criteria (S1). The study's
``gradient_attribution`` stage measures (``hypotheses.attribution``).
"""

from __future__ import annotations

import math

import pytest
import torch

from hypotheses import records

pytestmark = [pytest.mark.phase4, pytest.mark.integration]


def test_gradient_attribution(study, recorder):
    grads = study.gradient_attribution
    ig, flow, sal = grads.ig, grads.flow, grads.saliency
    assert torch.isfinite(ig.attributions).all(), "integrated gradients produced non-finite attributions"
    # Identity: z = A V is linear in the pattern, so sum dM/dA * A over (query, key) equals
    # sum dM/dz * z: the attention-gradient flow and the head gradient x activation must agree.
    scale = float(flow.scores.abs().max()) + 1e-12
    torch.testing.assert_close(flow.scores, sal.head_grad_x_act, rtol=1e-3, atol=1e-3 * scale)
    records.save(recorder, grads.record())
    # Asserted after saving, so that a failing run's record shows the errors in the report.
    completeness = ig.completeness_summary()
    per_pair = [(kind, round(err, 4)) for kind, err in zip(ig.baselines, completeness["per_prompt"])]
    assert math.isfinite(completeness["max"]), "f(x) == f(x') for every IG pair: nothing to attribute"
    assert completeness["within_bar"], (
        f"integrated gradients are not complete: relative error max {completeness['max']:.3g}, median "
        f"{completeness['median']:.3g} > {completeness['bar']:.0%} (Sundararajan et al. 2017) at {ig.steps} "
        f"steps; per pair {per_pair}. Raise --refusal-ig-steps")
