"""Each claim's verdicts from the study's stages: the decision rules (``hypotheses.decisions``)
applied to what the study measured, one list of lines per claim, then its overall verdict.

:class:`VerdictLines` is mixed into :class:`hypotheses.study.Study`, whose ``verdicts`` stage
calls these methods (or :meth:`gated_verdicts` when there is no refusal behaviour to explain).
"""

from __future__ import annotations

from hypotheses import claims
from hypotheses import decisions as d
from hypotheses import evidence as ev
from hypotheses import localization as loc
from hypotheses.verdicts import Verdict


class VerdictLines:
    """The verdict lines of H1, H2, H3 and the criteria; the host provides the study's stages."""

    def h1_verdicts(self) -> list[Verdict]:
        b, f, cfg = self.behaviour, self.cfg.h1_fraction, self.cfg
        share, total, n_train = self.effect_share, self.pooled.total, len(self.train_pairs)
        where = ev.positions_label(self.window)
        lines = [d.h1_patching("patching", share.at("heads+neurons", f), len(self.h1_set), total,
                               f"the top {f:.0%} of heads + neurons by count", b, cfg, n_train=n_train, positions=where,
                               control=share.controls["heads+neurons"], difference=share.differences["heads+neurons"]),
                 d.h1_patching("parameters", share.at("parameters", f), len(self.h1_parameter_set), total,
                               f"the top heads + neurons within {f:.0%} of their parameters", b, cfg,
                               n_train=n_train, positions=where, control=share.controls["parameters"],
                               difference=share.differences["parameters"]),
                 d.h1_ablation(self.h1_ablation, self.h1_control,
                               loc.drop_difference(self.h1_ablation, self.h1_control, cfg), b, cfg),
                 d.h1_gradients(self.gradient_share, len(self.h1_set), total, b, cfg,
                                control=self.gradient_share_control)]
        lines = d.finish("H1", lines, cfg)
        return lines + [d.overall("H1", lines, cfg)]

    def h2_verdicts(self) -> list[Verdict]:
        b = self.behaviour
        unusable = self.direction_unusable
        direction = (d.no_direction("H2", "direction", unusable, b, self.cfg) if unusable
                     else d.h2_direction(self.accumulation, b, self.cfg))
        lines = [d.h2_attention(self.detection, b, self.cfg), direction, d.h2_patching(self.depth, b, self.cfg)]
        lines = d.finish("H2", lines, self.cfg)
        return lines + [d.overall("H2", lines, self.cfg)]

    def h3_verdicts(self) -> list[Verdict]:
        b = self.behaviour
        if len(self.category_heads) < 2:
            lines = d.one_category(tuple(self.category_heads), b, self.cfg)
            return lines + [d.overall("H3", lines, self.cfg)]
        lines = d.h3_categories(self.cross_category, b, self.cfg)
        unusable = self.direction_unusable
        lines.append(d.no_direction("H3", "direction", unusable, b, self.cfg) if unusable
                     else d.h3_direction(self.category_similarity[1], b, self.cfg))
        lines = d.finish("H3", lines, self.cfg)
        return lines + [d.overall("H3", lines, self.cfg)]

    def criteria_verdicts(self) -> list[Verdict]:
        b, cfg = self.behaviour, self.cfg
        return [d.c1_heads(self.verified, b, cfg),
                d.c2_ablation(self.circuit_ablation, self.circuit_control,
                              loc.drop_difference(self.circuit_ablation, self.circuit_control, cfg), b, cfg),
                d.s1_gradients(self.gradient_vs_patching, self.verified.n_pairs, b, cfg)]

    def gated_verdicts(self) -> list[Verdict]:
        """Every line of the claims table as inconclusive, measuring nothing: no refusal to explain."""
        b, out = self.behaviour, []
        for claim in claims.CLAIMS:
            if not claim.in_study:
                continue
            group = [d.no_behaviour(claim.id, e, b, self.cfg) for e in claim.evidence(self.data.categories)]
            out += group + ([d.overall(claim.id, group, self.cfg)] if claim.combined else [])
        return out
