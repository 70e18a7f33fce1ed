"""The seed's success criteria, each reported as met (supported) or not met (refuted).

- C1: at least 10 heads with more than 10% causal effect: the candidates (AtP's top heads
  and the exact sweep's, chosen on train) verified by exact patching on TEST pairs, met when at least 10 clear the bar
  after Holm's correction over the candidates.
- C2: ablating the circuit (top heads + top neurons) cuts refusal on held-out harmful
  prompts by more than 30% beyond a size- and layer-matched random set (difference CI
  above the bar), with harmless behaviour intact.
- C3: reproducible code and write-up: the same seed gives bit-identical numbers on a
  rerun, and the run records its full provenance (the report is rendered from it).
- S1 (stretch, the seed's cross-validation): gradient attribution (AtP on train) agrees
  with exact patching on TEST pairs over the candidates, Spearman r > 0.7 (CI above).
"""

from __future__ import annotations

import pytest
import torch

from hypotheses import claims, decisions
from instruments import patching

pytestmark = [pytest.mark.criteria, pytest.mark.integration]


@pytest.mark.parametrize("claim", [c.id for c in claims.CLAIMS if c.kind != "hypothesis" and c.in_study])
def test_criterion(study, record_verdict, claim):
    (verdict,) = [v for v in study.verdicts if v.claim == claim]
    record_verdict(verdict)


def test_c3_reproducible(subject, study, recorder, record_verdict, refusal_tokens):
    """Rerun one measurement (AtP on two train pairs, which runs forward and backward) and compare bit for bit."""
    from hypotheses.evidence import harmful, harmless, metric_for, patch_spec

    pairs = study.train_pairs[:2]
    runs = [patching.attribution_patch(subject, harmful(pairs), harmless(pairs), metric_for(refusal_tokens),
                                       patch_spec(subject, study.cfg)) for _ in range(2)]
    identical = torch.equal(runs[0].heads, runs[1].heads) and torch.equal(runs[0].neurons, runs[1].neurons)
    record_verdict(decisions.c3_reproducibility(identical, recorder.manifest.get("provenance", {}), study.cfg))
