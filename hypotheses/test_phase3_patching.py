"""Phase 3, causal localization: which layers, components and heads carry refusal.

Protocol. Clean = a harmful prompt, corrupted = its harmless analogue of the same form.
*Denoising* runs the harmless prompt and patches in the harmful run's activation (does
this component suffice to bring refusal back?); *noising* runs the harmful prompt and
patches in the harmless one (is it necessary?). The metric is the refusal score (log-odds
of the model's own refusal tokens at the last position); effects are normalized so that 0
is the unpatched run and 1 the source run. Components are chosen on TRAIN pairs.

The study's stages measure (``hypotheses.layer_patching``, ``hypotheses.heads``); the
assertions check identities of the instruments; the findings are recorded, not asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypotheses import records
from hypotheses.layer_patching import DIRECTIONS, N_POSITIONS
from instruments.direction import post_instruction_ids

pytestmark = [pytest.mark.phase3, pytest.mark.integration]


def test_layer_component_patching(subject, study, recorder):
    """3.1: residual stream x position, attention and MLP outputs x layer, both directions, with KL."""
    sweeps = study.layer_patching
    for direction in DIRECTIONS:
        for kind, res in sweeps.results[direction].items():
            assert torch.isfinite(res.metric).all(), f"{kind} {direction}: non-finite patched metric"
            assert (res.kl >= -1e-5).all(), f"{kind} {direction}: KL must be non-negative"
    den, noi = sweeps.results["denoising"]["resid"], sweeps.results["noising"]["resid"]
    # The two directions run the same two prompt sets: their unpatched baselines must swap exactly.
    torch.testing.assert_close(den.clean, noi.clean)
    torch.testing.assert_close(den.corrupted, noi.corrupted)
    # Identity: at layer 0 the residual stream is the token embedding, and the chat template's
    # closing tokens are the same in both prompts, so patching them there changes nothing.
    k = min(len(post_instruction_ids(subject)), N_POSITIONS)
    for direction, res in ((d, sweeps.results[d]["resid"]) for d in DIRECTIONS):
        torch.testing.assert_close(res.metric[0, -k:], res.base.expand(k, -1), atol=1e-4, rtol=0,
                                   msg=lambda m: f"{direction}: layer-0 template positions must have no effect: {m}")
    records.save(recorder, sweeps.record())


def test_head_ranking(subject, study, recorder):
    """3.2: every head ranked by exact patching (denoising and noising), cross-checked by AtP."""
    heads = study.head_ranking
    exact, ranking = heads.exact, heads.ranking
    assert exact.metric.shape[:2] == (subject.n_layers, subject.n_heads)
    assert heads.noising.metric.shape[:2] == (subject.n_layers, subject.n_heads)
    assert np.all(np.diff(ranking.effect) <= 1e-12), "ranking must be sorted by effect"
    finite = np.isfinite(ranking.ci_low) & np.isfinite(ranking.ci_high)
    assert np.all(ranking.ci_low[finite] <= ranking.effect[finite] + 1e-9)
    assert np.all(ranking.effect[finite] <= ranking.ci_high[finite] + 1e-9)
    records.save(recorder, heads.record())


def test_top_head_attention_patterns(study, recorder):
    """3.2: what the top heads attend to, on one harmful test prompt and its harmless analogue."""
    patterns = study.attention_patterns
    for pattern in (p for side in patterns.patterns.values() for p in side.values()):
        # each query's attention is a distribution over keys
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[0]), atol=1e-4, rtol=0)
    records.save(recorder, patterns.record())
