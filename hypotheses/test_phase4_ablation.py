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
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypotheses.decisions import side_effect
from hypotheses.evidence import Condition, harmful, positions_label
from hypotheses.localization import drop_difference
from instruments import stats
from instruments.components import Direction, label, to_json

pytestmark = [pytest.mark.phase4, pytest.mark.integration]


def _row(c: Condition, alpha: float) -> dict:
    n = int(c.baseline.refused.size)
    return {"name": c.name, "label": c.name, "kind": c.kind, "control_of": c.control_of,
            "n_components": len(c.components), "components": [label(x) for x in c.components[:200]],
            "method": "projection removed at every layer and position" if c.method == "zero" else
                      f"mean of harmless train prompts, per position ({positions_label(c.positions)} positions)",
            "positions": positions_label(c.positions), "n_pairs": n,
            "refusal_rate_baseline": stats.proportion_ci(int(c.baseline.refused.sum()), n, alpha).to_dict(),
            "refusal_rate_ablated": stats.proportion_ci(int(c.ablated.refused.sum()), n, alpha).to_dict(),
            # answers with no letter or digit: a broken model, counted apart from refusal and compliance
            "degenerate_rate_baseline": stats.proportion_ci(int(c.baseline.degenerate.sum()), n, alpha).to_dict(),
            "degenerate_rate_ablated": stats.proportion_ci(int(c.ablated.degenerate.sum()), n, alpha).to_dict(),
            "relative_drop": c.relative_drop.to_dict(), "mcnemar_p": c.mcnemar.p_value,
            "mcnemar_table": [list(r) for r in c.mcnemar.table],
            "refusal_score_baseline": float(np.mean(c.baseline.scores)),
            "refusal_score_ablated": float(np.mean(c.ablated.scores)),
            "kl_harmless": c.kl_harmless, "answer_ce_increase": c.answer_ce_increase}


@pytest.fixture(scope="module")
def conditions(subject, study) -> list[Condition]:
    """Each circuit condition beside its size- and layer-matched random control (the study's, drawn
    before anything was scored); those the verdicts rest on are the study's own stages."""
    cfg = study.cfg
    heads = study.ranking.top(cfg.top_heads)
    direction = study.refusal_direction
    rng = np.random.default_rng(cfg.seed)
    noise = torch.from_numpy(rng.standard_normal(subject.d_model))
    random_direction = Direction(layer=direction.layer, vector=tuple((noise / noise.norm()).tolist()))
    top_heads = study.ablate(f"top {len(heads)} heads", heads)
    # the neurons alone are left out for the CPU budget: the circuit row holds them with the heads
    return [top_heads,
            study.ablate(f"random {len(heads)} heads", study.controls["heads"], kind="control",
                         control_of=top_heads.name),
            study.circuit_ablation, study.circuit_control,  # what C2 is decided on
            study.h1_ablation, study.h1_control,  # what H1's ablation line is decided on
            study.direction_ablation,  # shared with phase 5.2's bypass test
            study.ablate("random direction", (random_direction,), kind="control", control_of="refusal direction",
                         method="zero")]


def test_ablation_study(conditions, recorder, refusal_config, study):
    alpha = refusal_config.alpha
    for c in conditions:
        assert c.ablated.refused.shape == c.baseline.refused.shape
        b, cc = c.mcnemar.table[0][1], c.mcnemar.table[1][0]
        # McNemar's discordant cells are exactly the prompts whose verdict flipped
        assert b == int((c.baseline.refused & ~c.ablated.refused).sum())
        assert cc == int((~c.baseline.refused & c.ablated.refused).sum())
        assert c.kl_harmless is not None and c.kl_harmless >= -1e-6
    holm = stats.holm([c.mcnemar.p_value for c in conditions], alpha=alpha)
    rows = [_row(c, alpha) | {"p_holm": float(p),
                              "side_effect": side_effect(c.kl_harmless, c.answer_ce_increase, study.cfg)}
            for c, p in zip(conditions, holm.p_adjusted)]
    for row, c in zip(rows, conditions):
        control = next((x for x in conditions if x.control_of == c.name), None)
        if control is not None:  # the circuit's drop beyond its matched control's: what the verdicts decide on
            row["difference_vs_control"] = drop_difference(c, control, study.cfg).to_dict()
    recorder.save("phase4/ablation", numbers={
        "conditions": rows, "n_prompts": int(conditions[0].baseline.refused.size), "split": "test",
        "judge": study.cfg.judge, "direction": to_json(study.refusal_direction) | {"vector": "omitted"}},
        prompts=harmful(study.data.test))
