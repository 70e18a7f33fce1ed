"""Record classes of the hypotheses' own measurements (H1-H3) and of the verdicts. Field descriptions are
what reports/SCHEMA.md says about each key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypotheses.records_spec import (BOOL, EST, FLOAT, INT, STR, ListOf, MapOf, Null, Obj, Result, Scalar, array,
                                     number, optional, verdict)
from hypotheses.verdicts import STATUSES
from hypotheses.verdicts import Verdict as VerdictValue

INTS = ListOf(INT)
CURVE = Obj({"fraction": ListOf(FLOAT), "count": INTS, "share": ListOf(EST)})
THIRDS = ("early", "middle", "late")


@dataclass(frozen=True, kw_only=True)
class EffectShare(Result):
    """H1's curve: the share of the refusal-score gap restored on test pairs when the top fraction of a family
    of components, ranked on train, is patched together."""

    NAME = "h1/effect_share"
    families: dict = number(MapOf(CURVE, key="family"), "heads, neurons and heads+neurons: {fraction: [f], count: "
                            "[k], share: [estimate]}")
    parameters: dict = number(CURVE, "the same for the heads + neurons holding the top fraction of their parameters")
    n_pairs: int = number(INT, "test pairs")
    positions: str = number(STR, "the positions patched")
    totals: dict = number(Obj({"heads": INT, "neurons": INT, "parameters_heads": INT, "parameters_neurons": INT}),
                          "the model's heads, neurons and their parameters")
    bar_fraction: float = number(FLOAT, "H1's fraction bar (drawn as a cross-hair)")
    bar_share: float = number(FLOAT, "H1's share bar")
    n_pairs_atp: int = number(INT, "train pairs of the AtP ranking")
    chosen_by: str = number(STR, "how the components were ranked, in words")


@dataclass(frozen=True, kw_only=True)
class KeywordAttention(Result):
    """H2 detection: attention mass from the last position on the harmful prompt's keywords (tokens its
    harmless analogue lacks) over their share of the prompt (1 = no focus), beside the harmless analogues'
    attention onto their matched tokens (the control) and their difference (the contrast)."""

    NAME = "h2/keyword_attention"
    n: int = number(INT, "test pairs the contrast is scored on")
    n_pairs: int = number(INT, "pairs with keywords")
    n_val: int = number(INT, "val pairs the peak is chosen on")
    peak_layer_val: int = number(INT, "the peak layer of the contrast, chosen on val pairs")
    early_layers: list = number(INTS, "the first third of the layers")
    at_peak: dict = number(EST, "the contrast at the val peak, on test pairs")
    early_minus_later: dict = number(EST, "the early third's contrast minus the later layers'")
    positions: str = number(STR, "where attention is read, in words")
    mean: Any = array(("layer",), "the harmful prompts' keyword attention")
    ci_low: Any = array(("layer",), "its CI")
    ci_high: Any = array(("layer",), "its CI")
    control_mean: Any = array(("layer",), "the control's attention")
    control_ci_low: Any = array(("layer",), "its CI")
    control_ci_high: Any = array(("layer",), "its CI")
    contrast_mean: Any = array(("layer",), "harmful minus control")
    contrast_ci_low: Any = array(("layer",), "its CI")
    contrast_ci_high: Any = array(("layer",), "its CI")


@dataclass(frozen=True, kw_only=True)
class Accumulation(Result):
    """H2 accumulation: the norm-normalized harmful - harmless projection onto the refusal direction across
    layers, its slope in each third, against random directions."""

    NAME = "h2/accumulation"
    layers: dict = number(Obj({t: INTS for t in THIRDS}), "the layers of each third")
    slopes: dict = number(Obj({t: EST for t in THIRDS}), "slope per layer of the normalized projection in each third")
    statistic: dict = number(EST, "the middle slope minus the larger of the early and late slopes")
    random: list = number(ListOf(FLOAT), "the statistic along random directions")
    p_random: float = number(FLOAT, "share of random directions reaching the statistic")
    n_pairs: int = number(INT, "test pairs")
    position: int = number(INT, "where the refusal direction was read")
    layer: int = number(INT, "the refusal direction's layer")
    tau_middle: dict = number(EST, "Kendall's tau of the projection over the middle third")
    normalization: str = number(STR, "how the projection is normalized, in words")
    mean: Any = array(("layer",), "the normalized projection difference")
    ci_low: Any = array(("layer",), "its CI")
    ci_high: Any = array(("layer",), "its CI")


@dataclass(frozen=True, kw_only=True)
class DirectEffects(Result):
    """H2 execution: each attention and MLP output's direct effect on the refusal score (its (source - base)
    output added to the base run's final residual stream and read through the final norm and unembedding
    alone; Wang et al. 2022, instruments/direct.py); 0 = the base run, 1 = the whole harmful - harmless gap."""

    NAME = "h2/direct_effects"
    depth: dict = number(EST, "the effect-weighted relative depth (0 = first layer, 1 = last) of the direct effects "
                         "clipped at 0 and pooled per layer, bootstrapped over the pairs; late above 2/3")
    n_pairs: int = number(INT, "test pairs")
    direction: str = number(STR, '"denoising"')
    positions: str = number(STR, "the last position, the logits' only direct path")
    metric: str = number(STR, "the metric")
    attn_out: Any = array(("layer",), "each attention block's normalized direct effect")
    mlp_out: Any = array(("layer",), "each MLP block's normalized direct effect")


@dataclass(frozen=True, kw_only=True)
class CrossCategory(Result):
    """H3: whether the heads found on one harm category remove another's refusal."""

    NAME = "h3/cross_category"
    categories: list = number(ListOf(STR, dim="category"), "the harm categories, in the matrices' order")
    heads: dict = number(MapOf(ListOf(STR), key="category"), "each category's top heads (AtP on its train pairs)")
    similarity: dict = number(EST, "mean pairwise cosine of the categories' directions (test pairs)")
    similarity_split: str = number(STR, '"test"')
    n_eval: dict = number(MapOf(INT, key="category"), "val + test prompts each category is scored on")
    n_find: dict = number(MapOf(INT, key="category"), "train pairs each category's heads are found on")
    n_pairs: int = number(INT, "prompts scored over all categories")
    positions: str = number(STR, "the positions ablated")
    side_effects: dict = number(MapOf(Obj({"kl_harmless": Null(FLOAT), "answer_ce_increase": Null(FLOAT)}),
                                      key="category"), "each category's heads' side effects on harmless prompts")
    matrix: Any = array(("category", "category"), "[A, B]: relative drop of category B's refusal score when "
                        "category A's top heads are ablated")
    overlap: Any = array(("category", "category"), "Jaccard overlap of the categories' top heads")
    activation_correlation: Any = array(("category", "category"), "cosine of the categories' activation directions")


N = Null(FLOAT)
LINE = Obj({
    "title": optional(STR), "evidence_result": optional(STR), "statistic": optional(STR), "estimate": optional(EST),
    "bar": optional(N), "side": optional(Scalar("str", ("above", "below"))), "n": optional(INT),
    "split": optional(STR), "min_detectable_effect": optional(N), "power": optional(FLOAT),
    "control": optional(Null(Obj({"name": STR, "rule": STR, "estimate": Null(EST),
                                  "difference": Null(EST)}))),
    "side_effect": optional(Null(Obj({"kl_harmless": N, "answer_ce_increase": N, "max_kl": FLOAT, "max_ce": FLOAT,
                                      "ok": BOOL}))),
    "p_value": optional(N), "p_below": optional(N), "p_holm": optional(N), "p_below_holm": optional(N),
    "correction": optional(STR), "family_size": optional(INT), "preregistration": optional(Null(STR)),
    "lines": optional(MapOf(Scalar("str", STATUSES), key="line"))})


@dataclass(frozen=True, kw_only=True)
class VerdictRecord(Result):
    """One line of evidence on a claim, or a claim's combined verdict (``verdicts/<claim>--<evidence>``;
    ``hypotheses.verdicts.Verdict.to_dict()`` in the record's verdict). Claims and evidence names are those of
    ``hypotheses.claims.CLAIMS`` (H3 has one line per harm category), or ``overall``."""

    NAME = "verdicts/*"
    test: str = number(STR, "the test that recorded it")
    claim: str = verdict(STR, "the claim's id (H1, C2, ...)", needed=True)
    status: str = verdict(Scalar("str", STATUSES), "the verdict", needed=True)
    summary: str = verdict(STR, "one sentence with the numbers in it")
    evidence: str = verdict(STR, 'the line of evidence, or "overall"')
    numbers: dict = verdict(LINE, "what the line was decided on; any key may be absent (a line decided without "
                            "data records few; the report then leaves that part out), and other keys may follow. "
                            "title: the claim in words; evidence_result: the result the line rests on (else the claims table's); estimate: the "
                            "value held to the bar; n: pairs or prompts scored; min_detectable_effect: the smallest "
                            "true value the line would declare supported with `power` at its n; control: the "
                            "control's estimate and line minus control; p_value (H0: at or below the bar), p_below "
                            "(H0: at or above), p_holm and p_below_holm (Holm across the claim's lines); "
                            "preregistration: the sha256 it was decided under (the report warns when it is not the "
                            "manifest's); split: \"test\" or \"val + test\"; power: 0.8; lines (overall): each line's "
                            "status")

    @classmethod
    def of(cls, value: VerdictValue, *, test: str) -> "VerdictRecord":
        return cls(test=test, **value.to_dict())

    def to_verdict(self) -> VerdictValue:
        return VerdictValue(claim=self.claim, status=self.status, summary=self.summary or "",  # type: ignore[arg-type]
                            evidence=self.evidence or "", numbers=dict(self.numbers or {}))


CLASSES: tuple[type[Result], ...] = (EffectShare, KeywordAttention, Accumulation, DirectEffects, CrossCategory,
                                     VerdictRecord)
