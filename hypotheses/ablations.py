"""Phase 4.1, ablation on the held-out test split, against matched random controls.

Each circuit condition (the top heads; heads + neurons, what C2 is decided on; H1's
components; the refusal direction) stands beside a random control of the same size and
layers. Reported per condition: refusal rate with a Wilson CI, the relative drop with a
paired bootstrap CI, McNemar's p against the baseline (Holm-corrected over all conditions),
capability side effects on harmless test prompts, and a circuit's drop beyond its control's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fixtures.config import RefusalConfig
from hypotheses import records
from hypotheses.decisions import side_effect
from hypotheses.evidence import Condition, positions_label
from hypotheses.localization import drop_difference
from hypotheses.records_study import positions_in_words
from instruments import stats
from instruments.components import Direction, label, to_json

N_LISTED = 200  # components listed per condition in the record


def random_direction(direction: Direction, d_model: int, seed: int) -> Direction:
    """A random unit direction at the refusal direction's layer (its control)."""
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal(d_model))
    return Direction(layer=direction.layer, vector=tuple((noise / noise.norm()).tolist()))


def method_text(method: str, positions: int | None) -> str:
    """How a condition's components are ablated, as words that follow "each" (the report's sentence)."""
    if method == "zero":
        return "projected out at every layer and position"
    return ("replaced, position by position, by its mean over harmless train prompts at "
            f"{positions_in_words(positions_label(positions))}")


def row(c: Condition, alpha: float) -> dict[str, Any]:
    """One condition's record row, before its Holm p-value and side-effect verdict."""
    n = int(c.baseline.refused.size)
    return {"name": c.name, "label": c.name, "kind": c.kind, "control_of": c.control_of,
            "n_components": len(c.components), "components": [label(x) for x in c.components[:N_LISTED]],
            "method": method_text(c.method, c.positions), "positions": positions_label(c.positions), "n_pairs": n,
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


@dataclass(frozen=True, kw_only=True)
class AblationStudy:
    """Every condition, in the record's order, with Holm's correction over their McNemar p-values."""

    conditions: tuple[Condition, ...]
    holm: stats.MultipleTestResult
    direction: Direction  # the refusal direction
    judge: str
    cfg: RefusalConfig
    prompts: tuple[str, ...]  # the harmful test prompts

    def record(self) -> records.Ablation:
        rows = [row(c, self.cfg.alpha) | {"p_holm": float(p),
                                          "side_effect": side_effect(c.kl_harmless, c.answer_ce_increase, self.cfg)}
                for c, p in zip(self.conditions, self.holm.p_adjusted)]
        for r, c in zip(rows, self.conditions):
            control = next((x for x in self.conditions if x.control_of == c.name), None)
            if control is not None:  # the circuit's drop beyond its matched control's: what the verdicts decide on
                r["difference_vs_control"] = drop_difference(c, control, self.cfg).to_dict()
        return records.Ablation(conditions=rows, n_prompts=int(self.conditions[0].baseline.refused.size),
                                split="test", judge=self.judge,
                                direction=to_json(self.direction) | {"vector": "omitted"}, prompts=list(self.prompts))


def ablation_study(conditions: Sequence[Condition], direction: Direction, prompts: Sequence[str],
                   cfg: RefusalConfig) -> AblationStudy:
    holm = stats.holm([c.mcnemar.p_value for c in conditions], alpha=cfg.alpha)
    return AblationStudy(conditions=tuple(conditions), holm=holm, direction=direction, judge=cfg.judge, cfg=cfg,
                         prompts=tuple(prompts))
