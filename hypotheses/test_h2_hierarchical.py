"""H2, hierarchical stages: detection early, accumulation in the middle, execution late.

Prediction (seed): harmfulness is *detected* by keyword-focused attention in the early
layers, the refusal signal *accumulates* along the refusal direction in the middle
layers, and refusal is *executed* by components in the late layers.

Evidence needed (layers split into thirds):
- attention: the last position's attention to the harmful prompt's keywords (tokens its
  harmless analogue lacks), over their share of the prompt, peaks in the first third and
  is significantly above 1 there;
- direction: the paired harmful-minus-harmless projection onto the refusal direction
  rises monotonically through the middle third (mean per-pair Kendall tau with depth,
  CI above 0);
- patching: the heads' causal effects sit late (effect-weighted relative depth, CI above 2/3).

Falsified by: keyword focus peaking significantly outside the early layers, a falling
projection in the middle, or effects concentrated before the last third.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.h2, pytest.mark.integration]


def test_h2_keyword_attention_profile(study, recorder):
    profile = study.keyword_profile
    assert profile.n >= 2, "too few pairs differ in any token to locate keywords"
    assert (profile.mean > 0).all(), "attention mass on keywords is a share of a distribution: it is positive"
    import torch

    numbers = {"n": profile.n, "n_pairs": profile.n, "positions": "last position, onto the user message's keywords"}
    recorder.save("h2/keyword_attention", numbers=numbers, arrays={
        "mean": torch.as_tensor(profile.mean).float(), "ci_low": torch.as_tensor(profile.ci_low).float(),
        "ci_high": torch.as_tensor(profile.ci_high).float()})


@pytest.mark.parametrize("evidence", ["attention", "direction", "patching"])
def test_h2_line_of_evidence(study, record_verdict, evidence):
    verdict = next(v for v in study.verdicts if v.claim == "H2" and v.evidence == evidence)
    record_verdict(verdict)


def test_h2_overall(study, record_verdict):
    record_verdict([v for v in study.verdicts if v.claim == "H2"][-1])
