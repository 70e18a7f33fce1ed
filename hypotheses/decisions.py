"""From measurements to verdicts: pure functions, no model, no files.

Every bar comes from :class:`fixtures.config.RefusalConfig` (``--refusal-*``). A line of
evidence is *supported* only when its confidence interval clears the bar, *refuted* only
when the interval lies entirely on the wrong side, and *inconclusive* otherwise. When
the model shows no refusal behaviour to explain (``Behaviour.present`` is False), every
line is inconclusive: there is no mechanism to find, and claiming one would be a false
positive (the null-model tests check exactly this).

For the criteria (C*, S*) ``supported`` reads as *met* and ``refuted`` as *not met*.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fixtures.config import RefusalConfig
from hypotheses.evidence import Behaviour, Condition, Ranking
from hypotheses.structure import Accumulation, CrossCategory, LayerProfile, thirds
from hypotheses.verdicts import Status, Verdict, combine, decide
from instruments import stats
from instruments.direction import DirectionSelection

TITLES = {
    "H1": "Localized circuit: fewer than 5% of components carry more than 80% of refusal",
    "H2": "Hierarchical stages: detection early, accumulation in the middle, execution late",
    "H3": "Shared substrate: the same components serve every harm category",
    "C1": "At least 10 heads with more than 10% causal effect",
    "C2": "Ablating the circuit cuts refusal by more than 30%",
    "C3": "Reproducible: the same seed gives the same numbers, with full provenance",
    "S1": "Gradient attribution agrees with patching (rank correlation r > 0.7)",
}


def fmt(e: stats.Estimate) -> str:
    level = round(100 * (1 - e.alpha))
    return f"{e.value:.3g} [{level}% CI {e.ci_low:.3g}, {e.ci_high:.3g}]"


def bar_p_value(e: stats.Estimate, bar: float) -> float | None:
    """One-sided p-value of H0 "the effect is at most the bar", read off the CI (normal approximation).

    The decisions use the CI itself; this p-value only serves the multiplicity correction
    across a claim's lines (Holm), which a reader may want beside the per-line CIs.
    """
    from scipy.stats import norm

    if any(math.isnan(x) for x in (e.value, e.ci_low, e.ci_high)):
        return None
    se = (e.ci_high - e.ci_low) / (2 * norm.ppf(1 - e.alpha / 2))
    if se <= 0:
        return 0.0 if e.value > bar else 1.0
    return float(norm.sf((e.value - bar) / se))


def with_holm(lines: list[Verdict], alpha: float) -> list[Verdict]:
    """Add Holm-adjusted p-values across a claim's lines (those that have a p-value)."""
    from dataclasses import replace

    have = [i for i, v in enumerate(lines) if v.numbers.get("p_value") is not None]
    if not have:
        return lines
    adjusted = stats.holm([lines[i].numbers["p_value"] for i in have], alpha=alpha).p_adjusted
    out = list(lines)
    for i, p in zip(have, adjusted):
        out[i] = replace(lines[i], numbers={**lines[i].numbers, "p_holm": float(p)})
    return out


def against(e: stats.Estimate, bar: float) -> Status:
    """supported if the CI lies above the bar, refuted if below, else inconclusive."""
    if any(math.isnan(x) for x in (e.value, e.ci_low, e.ci_high)):
        return "inconclusive"
    return decide(supported_if=e.ci_low > bar, refuted_if=e.ci_high < bar)


def verdict(claim: str, evidence: str, status: Status, summary: str, *, result: str = "",
            **numbers: Any) -> Verdict:
    numbers = {"title": TITLES.get(claim, claim), "evidence_result": result, **numbers}
    return Verdict(claim=claim, status=status, summary=summary, evidence=evidence, numbers=_plain(numbers))


def _plain(x: Any) -> Any:
    """JSON-able copies of numbers (Estimates become dicts, numpy scalars floats)."""
    if isinstance(x, stats.Estimate):
        return x.to_dict()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def no_behaviour(claim: str, evidence: str, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    return verdict(claim, evidence, "inconclusive",
                   f"No refusal behaviour to explain ({b.reason(cfg.alpha)}): nothing can be localized.",
                   result="phase2/refusal_rates", gap=b.gap)


def failed_selection(sel: DirectionSelection) -> str | None:
    """Why the selected refusal direction may not be used (None: it passes every filter).

    Arditi et al. (2024) keep a candidate only if ablating it keeps the KL on harmless val
    prompts at most a threshold, adding it induces a refusal score of at least a threshold,
    and it is not read in the last layers; a line that rests on a candidate outside those
    filters would be judging a direction that does not mediate refusal.
    """
    if sel.meets_thresholds:
        return None
    spec, best = sel.spec, sel.best
    n_evaluated = sum(s.evaluated for s in sel.scores)
    return (f"no candidate refusal direction passes the selection filters (Arditi et al. 2024: KL on harmless val "
            f"prompts <= {spec.kl_threshold}, induced refusal score >= {spec.induce_threshold}, the last "
            f"{spec.prune_layer_fraction:.0%} of layers excluded; {n_evaluated} candidates scored on "
            f"{sel.n_harmful} harmful and {sel.n_harmless} harmless val prompts). The best, layer {best.layer} "
            f"position {best.pos}, has bypass score {best.bypass:.3g}, induce score {best.induce:.3g}, KL "
            f"{best.kl:.3g} ({best.rejected})")


def no_direction(claim: str, evidence: str, why: str, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """A line that needs the refusal direction, when there is none to use (``why`` says what failed)."""
    if not b.present:
        return no_behaviour(claim, evidence, b, cfg)
    return verdict(claim, evidence, "inconclusive", f"Cannot be judged without a refusal direction: {why}.",
                   result="phase5/direction", reason=why)


def overall(claim: str, lines: list[Verdict]) -> Verdict:
    """All lines must agree for a claim to be supported (an intersection-union test: no
    multiplicity correction is needed for the conjunction; lines carry Holm p-values)."""
    status = combine([v.status for v in lines])
    parts = "; ".join(f"{v.evidence}: {v.status}" for v in lines)
    return verdict(claim, "overall", status, f"{claim} is {status.upper()} ({parts}).",
                   lines={v.evidence: v.status for v in lines})


# ----------------------------------------------------------------------------- H1

def h1_patching(joint: stats.Estimate, k: int, n: int, b: Behaviour, cfg: RefusalConfig,
                positions: str = "all") -> Verdict:
    if not b.present:
        return no_behaviour("H1", "patching", b, cfg)
    return verdict("H1", "patching", against(joint, cfg.h1_share),
                   f"Patching the top {k} of {n} heads ({k / n:.1%}, chosen on train) together, at the {positions} "
                   f"positions, restores {fmt(joint)} of the refusal-score gap on test pairs (bar: > {cfg.h1_share}).",
                   result="phase3/heads", share=joint, k=k, n_components=n, bar=cfg.h1_share,
                   p_value=bar_p_value(joint, cfg.h1_share), positions=positions, n_pairs=joint.n)


def _moves(before: float, after: float) -> str:
    """The verb for a refusal rate going from ``before`` to ``after`` (an ablation can raise it)."""
    return "drops" if after < before else "raises" if after > before else "leaves"


def broke_model(claim: str, cond: Condition, cfg: RefusalConfig) -> Verdict | None:
    """An ablation that wrecks harmless behaviour too proves nothing about refusal."""
    if cond.kl_harmless is None or cond.kl_harmless <= cfg.max_kl:
        return None
    return verdict(claim, "ablation", "inconclusive",
                   f"Ablating {cond.name} ({len(cond.components)} components) "
                   f"{_moves(cond.baseline.rate, cond.ablated.rate)} the refusal rate from "
                   f"{cond.baseline.rate:.0%} to {cond.ablated.rate:.0%}, but it also breaks the model: next-token KL "
                   f"on harmless prompts {cond.kl_harmless:.3g} nats (limit {cfg.max_kl}), answer cross-entropy "
                   f"+{cond.answer_ce_increase if cond.answer_ce_increase is not None else float('nan'):.3g} nats. "
                   "The change is not specific to refusal.", result="phase4/ablation", drop=cond.relative_drop,
                   kl_harmless=cond.kl_harmless, max_kl=cfg.max_kl)


def h1_ablation(cond: Condition, n: int, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("H1", "ablation", b, cfg)
    broken = broke_model("H1", cond, cfg)
    if broken is not None:
        return broken
    k = len(cond.components)
    return verdict("H1", "ablation", against(cond.relative_drop, cfg.h1_drop),
                   f"Mean-ablating the top {k} of {n} heads {_moves(cond.baseline.rate, cond.ablated.rate)} the refusal "
                   f"rate on held-out harmful prompts from "
                   f"{cond.baseline.rate:.0%} to {cond.ablated.rate:.0%}: relative drop {fmt(cond.relative_drop)} "
                   f"(bar: > {cfg.h1_drop}; McNemar p={cond.mcnemar.p_value:.3g}; KL on harmless prompts "
                   f"{cond.kl_harmless if cond.kl_harmless is not None else float('nan'):.3g}).",
                   result="phase4/ablation", drop=cond.relative_drop, p_value=bar_p_value(cond.relative_drop, cfg.h1_drop),
                   mcnemar_p=cond.mcnemar.p_value, bar=cfg.h1_drop)


def h1_gradients(share: stats.Estimate, k: int, n: int, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("H1", "gradients", b, cfg)
    return verdict("H1", "gradients", against(share, cfg.h1_share),
                   f"The top {k} of {n} heads ({k / n:.1%}) hold {fmt(share)} of the total |gradient x activation difference| "
                   f"(AtP) attribution (bar: > {cfg.h1_share}).",
                   result="phase4/gradients", share=share, k=k, n_components=n, bar=cfg.h1_share,
                   p_value=bar_p_value(share, cfg.h1_share))


# ----------------------------------------------------------------------------- H2

def h2_attention(profile: LayerProfile, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """Detection early: keyword-focused attention peaks in the first third of layers."""
    if not b.present or profile.n < 2:
        return no_behaviour("H2", "attention", b, cfg) if not b.present else verdict(
            "H2", "attention", "inconclusive", "No pair differs in any token: keywords cannot be located.")
    early = thirds(len(profile.mean))[0]
    peak = int(np.argmax(profile.mean))
    focused = profile.ci_low[peak] > 1.0
    best_early_high = max(profile.ci_high[list(early)]) if len(early) else -np.inf
    status = decide(supported_if=focused and peak in early,
                    refuted_if=focused and peak not in early and best_early_high < profile.ci_low[peak])
    return verdict("H2", "attention", status,
                   f"Keyword-focused attention (mass on harmful keywords over their share of the prompt) peaks at "
                   f"layer {peak} of {len(profile.mean)} at {profile.mean[peak]:.3g} [{profile.ci_low[peak]:.3g}, "
                   f"{profile.ci_high[peak]:.3g}]; early layers are 0-{early[-1] if len(early) else '-'}.",
                   result="h2/keyword_attention", peak_layer=peak, early_layers=list(early),
                   profile=[float(x) for x in profile.mean])


def h2_direction(acc: Accumulation, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """Accumulation in the middle: the harmful-harmless projection rises monotonically there."""
    if not b.present:
        return no_behaviour("H2", "direction", b, cfg)
    return verdict("H2", "direction", against(acc.tau, 0.0),
                   f"Across the middle layers {acc.layers[0]}-{acc.layers[-1]}, the paired harmful-harmless projection "
                   f"onto the refusal direction has mean Kendall tau with depth {fmt(acc.tau)} "
                   f"(rising if the CI lies above 0).",
                   result="phase5/direction", tau=acc.tau, middle_layers=list(acc.layers),
                   p_value=bar_p_value(acc.tau, 0.0))


def h2_patching(depth: stats.Estimate, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """Execution late: the heads' causal effects sit in the last third."""
    if not b.present:
        return no_behaviour("H2", "patching", b, cfg)
    return verdict("H2", "patching", against(depth, 2 / 3),
                   f"The effect-weighted relative depth of the heads' patching effects is {fmt(depth)} "
                   f"(0 = first layer, 1 = last; late if above 2/3).",
                   result="phase3/heads", depth=depth, p_value=bar_p_value(depth, 2 / 3))


# ----------------------------------------------------------------------------- H3

def h3_categories(cc: CrossCategory, b: Behaviour, cfg: RefusalConfig) -> list[Verdict]:
    out = []
    for c in cc.categories:
        if not b.present:
            out.append(no_behaviour("H3", c, b, cfg))
            continue
        own, ratio = cc.shared_ratio(c, cfg)
        if not own.ci_low > 0:
            out.append(verdict("H3", c, "inconclusive",
                               f"Ablating {c}'s own top heads does not reliably reduce its refusal ({fmt(own)} of the "
                               "gap), so sharing cannot be judged.", result="h3/cross_category", own=own))
            continue
        out.append(verdict("H3", c, against(ratio, cfg.h3_ratio),
                           f"On {c} prompts, other categories' top heads remove {fmt(ratio)} as much refusal as {c}'s "
                           f"own (own: {fmt(own)} of the gap; bar: > {cfg.h3_ratio}).",
                           result="h3/cross_category", own=own, ratio=ratio, bar=cfg.h3_ratio,
                           p_value=bar_p_value(ratio, cfg.h3_ratio)))
    return out


def h3_direction(similarity: stats.Estimate, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("H3", "direction", b, cfg)
    return verdict("H3", "direction", against(similarity, cfg.h3_ratio),
                   f"Categories' harmful-minus-harmless activation directions have mean pairwise cosine "
                   f"{fmt(similarity)} (bar: > {cfg.h3_ratio}).", result="h3/cross_category",
                   similarity=similarity, bar=cfg.h3_ratio, p_value=bar_p_value(similarity, cfg.h3_ratio))


# ----------------------------------------------------------------------------- criteria

def c1_heads(ranking: Ranking, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("C1", "patching", b, cfg)
    bar, need = cfg.head_effect, cfg.min_heads
    point = int((ranking.effect > bar).sum())
    sure, maybe = int((ranking.ci_low > bar).sum()), int((ranking.ci_high > bar).sum())
    status = decide(supported_if=sure >= need, refuted_if=maybe < need)
    return verdict("C1", "patching", status,
                   f"{point} heads have a normalized patching effect above {bar:.0%} ({sure} with the whole CI above "
                   f"it, {maybe} with the CI reaching it); the criterion asks for at least {need}.",
                   result="phase3/heads", heads_point=point, heads_ci_low=sure, heads_ci_high=maybe, bar=bar,
                   required=need)


def c2_ablation(cond: Condition, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("C2", "ablation", b, cfg)
    broken = broke_model("C2", cond, cfg)
    if broken is not None:
        return broken
    return verdict("C2", "ablation", against(cond.relative_drop, cfg.ablation_drop),
                   f"Ablating the circuit ({cond.name}, {len(cond.components)} components) cuts the refusal rate from "
                   f"{cond.baseline.rate:.0%} to {cond.ablated.rate:.0%}: relative drop {fmt(cond.relative_drop)} "
                   f"(bar: > {cfg.ablation_drop}; McNemar p={cond.mcnemar.p_value:.3g}).",
                   result="phase4/ablation", drop=cond.relative_drop, mcnemar_p=cond.mcnemar.p_value,
                   p_value=bar_p_value(cond.relative_drop, cfg.ablation_drop), bar=cfg.ablation_drop)


def s1_gradients(rho: stats.Estimate, versus: str, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("S1", "gradients", b, cfg)
    return verdict("S1", "gradients", against(rho, cfg.gradient_r),
                   f"Spearman correlation of gradient attribution with {versus}: {fmt(rho)} "
                   f"(the seed's cross-validation bar: r > {cfg.gradient_r}).",
                   result="phase4/gradients", rho=rho, bar=cfg.gradient_r, p_value=bar_p_value(rho, cfg.gradient_r))
