"""H1, a localized circuit, on the seed's terms: components are heads and MLP neurons.

Prediction (seed): refusal is carried by a small circuit -- fewer than 5% of the model's
parameters (specific heads and neurons) carry more than 80% of the refusal effect, and
ablating them drops refusal by more than 60%.

Lines of evidence (:data:`hypotheses.claims.CLAIMS`), each scored on TEST pairs with
components chosen by AtP on TRAIN pairs:
- patching: the top fraction of heads + neurons by count, patched together, restore more
  than the bar's share of the refusal-score gap (CI above the bar);
- parameters: the same with the top components whose weights fit in that fraction of the
  heads' and neurons' parameters;
- ablation: mean-ablating the top fraction cuts the refusal rate by more than the bar
  beyond a size- and layer-matched random set, with harmless behaviour intact;
- gradients: the chosen components hold more than the bar's share of the test pairs'
  |AtP| attribution.

The effect-share curve (share restored vs fraction of components, for heads, neurons,
both, and by parameters) is recorded beside them. Bars: --refusal-h1-fraction,
--refusal-h1-share, --refusal-h1-drop.
"""

from __future__ import annotations

import pytest

from hypotheses import claims
from hypotheses.evidence import positions_label

pytestmark = [pytest.mark.h1, pytest.mark.integration]


def test_h1_effect_share_curve(study, recorder):
    share = study.effect_share
    for fam, table in [*share.families.items(), ("parameters", share.parameters)]:
        counts = table["count"]
        assert counts == sorted(counts), f"{fam}: a larger fraction holds at least as many components"
    cfg = study.cfg
    recorder.save("h1/effect_share", numbers={
        "families": {k: {"fraction": v["fraction"], "count": v["count"], "share": [e.to_dict() for e in v["share"]]}
                     for k, v in share.families.items()},
        "parameters": {"fraction": share.parameters["fraction"], "count": share.parameters["count"],
                       "share": [e.to_dict() for e in share.parameters["share"]]},
        "n_pairs": share.n_pairs, "positions": positions_label(share.positions), "totals": share.totals,
        "bar_fraction": cfg.h1_fraction, "bar_share": cfg.h1_share, "n_pairs_atp": study.atp.n_pairs,
        "chosen_by": "AtP on train pairs (one normalized scale for heads and neurons)"})


@pytest.mark.parametrize("evidence", claims.claim("H1").evidence())
def test_h1_line_of_evidence(study, record_verdict, evidence):
    verdict = next(v for v in study.verdicts if v.claim == "H1" and v.evidence == evidence)
    record_verdict(verdict)


def test_h1_overall(study, record_verdict):
    lines = [v for v in study.verdicts if v.claim == "H1"]
    overall = lines[-1]
    assert overall.evidence == "overall" and set(overall.numbers["lines"]) == set(claims.claim("H1").evidence())
    record_verdict(overall)
