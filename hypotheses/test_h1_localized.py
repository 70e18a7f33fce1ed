"""H1, a localized circuit.

Prediction (seed): refusal is carried by a small circuit -- fewer than 5% of the model's
components carry more than 80% of the refusal effect, and ablating them drops refusal by
more than 60%.

Evidence needed, each on held-out TEST prompts with components chosen on TRAIN pairs:
- patching: the top 5% of heads, patched *together* from the harmful into the harmless
  run, restore more than 80% of the refusal-score gap (CI above the bar);
- ablation: mean-ablating those heads cuts the refusal rate by more than 60% (CI above);
- gradients: those heads hold more than 80% of the |gradient x attention| attribution.

Falsified by: a CI entirely below the bar on a line (the effect is spread over many
components); a model with no significant refusal gap makes every line inconclusive.
Bars: --refusal-h1-fraction, --refusal-h1-share, --refusal-h1-drop.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.h1, pytest.mark.integration]


@pytest.mark.parametrize("evidence", ["patching", "ablation", "gradients"])
def test_h1_line_of_evidence(study, record_verdict, evidence):
    verdict = next(v for v in study.verdicts if v.claim == "H1" and v.evidence == evidence)
    assert verdict.claim == "H1"
    record_verdict(verdict)


def test_h1_overall(study, record_verdict):
    lines = [v for v in study.verdicts if v.claim == "H1"]
    overall = lines[-1]
    assert overall.evidence == "overall" and set(overall.numbers["lines"]) == {"patching", "ablation", "gradients"}
    record_verdict(overall)
