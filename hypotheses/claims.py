"""The claims the suite decides, and their lines of evidence: the one table everything reads.

The study (which lines it computes), the hypothesis tests (which lines they record), the
decisions (titles), the pre-registration and the report (titles, order, bars) all read
:data:`CLAIMS`; a bar is always read from the run's configuration, never spelled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

Config = Mapping[str, Any]  # RefusalConfig.to_dict(), or a run manifest's "config"


def _get(cfg: Config | Any, name: str, default: Any) -> Any:
    return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


@dataclass(frozen=True, kw_only=True)
class Line:
    """One line of evidence: what is computed, the bar it is held to, and where it is recorded."""

    evidence: str  # the line's name in verdicts ("patching", "ablation", a harm category for H3, ...)
    statistic: str  # what the line's estimate is, in words
    bar: Callable[[Any], float] | None  # the bar from the config (None: the line has no numeric bar)
    side: str = "above"  # supported when the estimate is above the bar ("above") or below it ("below")
    result: str = ""  # the recorded result the line rests on
    control: str = ""  # the control the estimate is compared with ("" when none)
    per_category: bool = False  # one line per harm category (H3)


@dataclass(frozen=True, kw_only=True)
class Claim:
    id: str
    kind: str  # "hypothesis", "criterion" or "stretch"
    title: Callable[[Any], str]
    lines: tuple[Line, ...]
    correction: str = "holm"  # across the claim's lines: "holm" or "none"
    combined: bool = True  # an "overall" line combines the claim's lines
    in_study: bool = True  # decided by the study (C3 is decided by its own test, on the run itself)

    def bar_of(self, evidence: str, cfg: Any) -> float | None:
        line = self.line(evidence)
        return None if line is None or line.bar is None else float(line.bar(cfg))

    def line(self, evidence: str) -> Line | None:
        if evidence in ("", "overall"):  # the combined verdict is no line of its own (not a harm category)
            return None
        for ln in self.lines:
            if ln.evidence == evidence:
                return ln
        return next((ln for ln in self.lines if ln.per_category), None)

    def evidence(self, categories: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The claim's line names, a per-category line expanded into one per category."""
        out: list[str] = []
        for ln in self.lines:
            out += list(categories) if ln.per_category else [ln.evidence]
        return tuple(out)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if abs(100 * x - round(100 * x)) < 1e-9 else f"{100 * x:g}%"


CLAIMS: tuple[Claim, ...] = (
    Claim(id="H1", kind="hypothesis",
          title=lambda c: (f"Refusal is carried by a localized circuit: fewer than {_pct(_get(c, 'h1_fraction', .05))} "
                           f"of the components (attention heads + MLP neurons) carry more than "
                           f"{_pct(_get(c, 'h1_share', .8))} of the refusal effect, and ablating them cuts refusal "
                           f"by more than {_pct(_get(c, 'h1_drop', .6))}"),
          lines=(
              Line(evidence="patching", statistic="share of the refusal-score gap restored on test pairs by patching "
                   "the top fraction of heads + neurons (by count, chosen by AtP on train) together",
                   bar=lambda c: _get(c, "h1_share", .8), result="h1/effect_share"),
              Line(evidence="parameters", statistic="share of the refusal-score gap restored on test pairs by the top "
                   "heads + neurons that hold the fraction of their parameters", bar=lambda c: _get(c, "h1_share", .8),
                   result="h1/effect_share"),
              Line(evidence="ablation", statistic="relative drop of the refusal rate on test harmful prompts when the "
                   "top fraction of heads + neurons is mean-ablated, minus the drop of a size- and layer-matched "
                   "random set", bar=lambda c: _get(c, "h1_drop", .6), result="phase4/ablation",
                   control="matched random heads + neurons"),
              Line(evidence="gradients", statistic="share of the test pairs' |AtP| attribution (heads + neurons) held "
                   "by the components chosen on train", bar=lambda c: _get(c, "h1_share", .8),
                   result="phase4/gradients"),
          )),
    Claim(id="H2", kind="hypothesis",
          title=lambda c: "Hierarchical stages: detection early, accumulation in the middle, execution late",
          lines=(
              Line(evidence="attention", statistic="keyword attention of harmful prompts over the matched tokens of "
                   "their harmless analogues, early layers minus later layers, on test pairs (peak chosen on val)",
                   bar=lambda c: 0.0, result="h2/keyword_attention", control="harmless analogues' matched tokens"),
              Line(evidence="direction", statistic="slope of the norm-normalized harmful - harmless projection onto "
                   "the refusal direction in the middle third minus the larger of the early and late thirds' slopes",
                   bar=lambda c: 0.0, result="h2/accumulation", control="random directions"),
              Line(evidence="patching", statistic="effect-weighted relative depth of attention and MLP outputs' "
                   "direct effects on the refusal score (their path to the logits alone) on test pairs",
                   bar=lambda c: 2 / 3, result="h2/direct_effects"),
          )),
    Claim(id="H3", kind="hypothesis",
          title=lambda c: "Shared substrate: the same components serve every harm category",
          lines=(
              Line(evidence="category", per_category=True, statistic="other categories' top heads' ablation effect "
                   "over the category's own heads', on the category's val + test prompts",
                   bar=lambda c: _get(c, "h3_ratio", .8), result="h3/cross_category"),
              Line(evidence="direction", statistic="mean pairwise cosine of categories' harmful - harmless activation "
                   "directions", bar=lambda c: _get(c, "h3_ratio", .8), result="h3/cross_category"),
          )),
    Claim(id="C1", kind="criterion", combined=False, correction="holm over the verified heads",
          title=lambda c: (f"At least {_get(c, 'min_heads', 10)} heads have a normalized causal effect above "
                           f"{_pct(_get(c, 'head_effect', .1))}"),
          lines=(Line(evidence="patching", statistic="heads nominated on train (AtP's top heads and the exact sweep's) "
                      "whose exact effect on test pairs clears the bar after Holm's correction over the candidates",
                      bar=lambda c: _get(c, "min_heads", 10), result="phase3/heads"),)),
    Claim(id="C2", kind="criterion", combined=False, correction="none",
          title=lambda c: f"Ablating the circuit cuts the refusal rate by more than {_pct(_get(c, 'ablation_drop', .3))}",
          lines=(Line(evidence="ablation", statistic="relative drop of the refusal rate on test harmful prompts with "
                      "the circuit (top heads + neurons) mean-ablated, minus a matched random set's",
                      bar=lambda c: _get(c, "ablation_drop", .3), result="phase4/ablation",
                      control="matched random heads + neurons"),)),
    Claim(id="C3", kind="criterion", combined=False, correction="none", in_study=False,
          title=lambda c: "Reproducible: the same seed gives the same numbers, with full provenance",
          lines=(Line(evidence="reproducibility", statistic="a rerun is bit-identical and provenance is complete",
                      bar=None, result="manifest"),)),
    Claim(id="S1", kind="stretch", combined=False, correction="none",
          title=lambda c: f"Gradient attribution agrees with patching (rank correlation r > {_get(c, 'gradient_r', .7)})",
          lines=(Line(evidence="gradients", statistic="Spearman correlation of AtP on train with exact patching on "
                      "test pairs, over the candidate heads (nominated by AtP and by the exact sweep)", bar=lambda c: _get(c, "gradient_r", .7),
                      result="phase4/gradients"),)),
)

BY_ID: dict[str, Claim] = {c.id: c for c in CLAIMS}
CLAIM_ORDER: tuple[str, ...] = tuple(c.id for c in CLAIMS)


def claim(claim_id: str) -> Claim:
    try:
        return BY_ID[claim_id]
    except KeyError:
        raise KeyError(f"unknown claim {claim_id!r}; the claims are {', '.join(CLAIM_ORDER)}") from None


def title(claim_id: str, cfg: Any) -> str:
    """The claim in words with this run's bars filled in (an unknown id is its own title)."""
    return BY_ID[claim_id].title(cfg) if claim_id in BY_ID else claim_id
