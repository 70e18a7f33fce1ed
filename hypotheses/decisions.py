"""From measurements to verdicts: pure functions, no model, no files.

Every bar comes from :class:`fixtures.config.RefusalConfig` (``--refusal-*``) through the
claims table (:mod:`hypotheses.claims`). A line of evidence is scored on pairs that chose
nothing, and is *supported* only when its confidence interval clears the bar, *refuted*
only when the interval lies entirely on the wrong side *and* the refutation survives
Holm's correction across the claim's lines, and *inconclusive* otherwise. A claim is
supported only when every line is (an intersection-union test: no correction needed).
Ablation lines are held to the bar on the difference with a matched random control, and
only when the ablation leaves harmless behaviour intact (one side-effect rule). When the
model shows no refusal behaviour to explain, every line is inconclusive.

Every line records its n and its minimum detectable effect: the smallest true value it
would declare supported with 80% power at that n, from its measured standard error.

For the criteria (C*, S*) ``supported`` reads as *met* and ``refuted`` as *not met*.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from fixtures.config import RefusalConfig
from hypotheses import claims
from hypotheses.evidence import Behaviour, Condition
from hypotheses.structure import H3_MIN_CATEGORIES, Accumulation, CrossCategory, Detection
from hypotheses.verdicts import STATUSES, Status, Verdict, combine, decide
from instruments import stats
from instruments.direction import DirectionSelection

POWER = 0.8  # the power the minimum detectable effect is quoted at


def fmt(e: stats.Estimate) -> str:
    level = round(100 * (1 - e.alpha))
    return f"{e.value:.3g} [{level}% CI {e.ci_low:.3g}, {e.ci_high:.3g}]"


def _se(e: stats.Estimate) -> float | None:
    """The standard error implied by a two-sided CI (normal approximation)."""
    from scipy.stats import norm

    if any(math.isnan(x) for x in (e.value, e.ci_low, e.ci_high)):
        return None
    return (e.ci_high - e.ci_low) / (2 * norm.ppf(1 - e.alpha / 2))


def min_detectable_effect(e: stats.Estimate, bar: float, *, side: str = "above", power: float = POWER,
                          tests: int = 1) -> float | None:
    """The true value at which the line's CI would clear ``bar`` with probability ``power``, at the
    line's n and measured standard error (``tests``: a Bonferroni level for a family of tests)."""
    from scipy.stats import norm

    se = _se(e)
    if se is None:
        return None
    z = norm.ppf(1 - e.alpha / (2 * tests)) + norm.ppf(power)
    return float(bar + z * se if side == "above" else bar - z * se)


def bar_p_value(e: stats.Estimate, bar: float) -> float | None:
    """One-sided p-value of H0 "the effect is at most the bar", read off the CI (normal approximation)."""
    from scipy.stats import norm

    se = _se(e)
    if se is None:
        return None
    if se <= 0:
        return 0.0 if e.value > bar else 1.0
    return float(norm.sf((e.value - bar) / se))


def below_p_value(e: stats.Estimate, bar: float) -> float | None:
    """One-sided p-value of H0 "the effect is at least the bar" (what a refutation rejects)."""
    p = bar_p_value(e, bar)
    if p is None:
        return None
    se = _se(e)
    if se is not None and se <= 0:
        return 0.0 if e.value < bar else 1.0
    return 1.0 - p


def against(e: stats.Estimate, bar: float) -> Status:
    """supported if the CI lies above the bar, refuted if below, else inconclusive."""
    if any(math.isnan(x) for x in (e.value, e.ci_low, e.ci_high)):
        return "inconclusive"
    return decide(supported_if=e.ci_low > bar, refuted_if=e.ci_high < bar)


def verdict(claim: str, evidence: str, status: Status, summary: str, *, result: str = "",
            cfg: RefusalConfig | None = None, **numbers: Any) -> Verdict:
    numbers = {"title": claims.title(claim, cfg) if cfg is not None else claim, "evidence_result": result, **numbers}
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


def _control(name: str, rule: str, estimate: stats.Estimate | None = None,
             difference: stats.Estimate | None = None, **extra: Any) -> dict[str, Any]:
    """A line's control, and the rule by which it enters the line's decision ("none": it has none)."""
    return {"name": name, "rule": rule, "estimate": estimate, "difference": difference, **extra}


def side_effect(kl: float | None, ce: float | None, cfg: RefusalConfig) -> dict[str, Any]:
    """The one side-effect rule of every ablation line: on harmless prompts, next-token KL and the
    rise in the clean answers' cross-entropy both at most their limits (Arditi et al. 2024's 0.1 nats)."""
    ok = kl is not None and kl <= cfg.max_kl and (ce is None or ce <= cfg.max_ce)
    return {"kl_harmless": kl, "answer_ce_increase": ce, "max_kl": cfg.max_kl, "max_ce": cfg.max_ce, "ok": bool(ok)}


def _side_text(side: dict[str, Any]) -> str:
    kl, ce = side["kl_harmless"], side["answer_ce_increase"]
    kl_s = "not measured" if kl is None else f"{kl:.3g} nats"
    ce_s = "" if ce is None else f", answer cross-entropy {ce:+.3g} nats"
    return f"side effect on harmless prompts: next-token KL {kl_s}{ce_s} (limits {side['max_kl']} / {side['max_ce']})"


def measured(claim: str, evidence: str, est: stats.Estimate, cfg: RefusalConfig, summary: str, *, n: int, split: str,
             status: Status | None = None, control: dict[str, Any] | None = None,
             side: dict[str, Any] | None = None, mde_tests: int = 1, **numbers: Any) -> Verdict:
    """A line held to its bar from the claims table: status, n, power, p-values, control, side effect."""
    line = claims.claim(claim).line(evidence)
    bar = claims.claim(claim).bar_of(evidence, cfg)
    status = status or against(est, bar)
    # the summary is the decision's sentence; n, power and side effects travel in the numbers
    # (the report and the terminal summary print them beside it)
    if side is not None and not side["ok"] and status != "inconclusive":
        summary += (f" But the ablation also changes the model on harmless prompts ({_side_text(side)}), so the "
                    f"change is not specific to refusal (without that the line would be {status}).")
        status = "inconclusive"
    mde = min_detectable_effect(est, bar, tests=mde_tests)
    return verdict(claim, evidence, status, summary, result=line.result if line else "", cfg=cfg,
                   statistic=line.statistic if line else "", estimate=est, bar=bar, side="above", n=int(n),
                   split=split, min_detectable_effect=mde, power=POWER, control=control, side_effect=side,
                   p_value=bar_p_value(est, bar), p_below=below_p_value(est, bar), **numbers)


def finish(claim: str, lines: list[Verdict], cfg: RefusalConfig) -> list[Verdict]:
    """Holm's correction across a claim's lines, and it binds: a line is refuted only when its
    Holm-adjusted one-sided p-value is below alpha / 2 (the level of its two-sided CI)."""
    out = list(lines)
    for key, adj in (("p_value", "p_holm"), ("p_below", "p_below_holm")):
        have = [i for i, v in enumerate(out) if v.numbers.get(key) is not None]
        if not have:
            continue
        adjusted = stats.holm([out[i].numbers[key] for i in have], alpha=cfg.alpha).p_adjusted
        for i, p in zip(have, adjusted):
            out[i] = replace(out[i], numbers={**out[i].numbers, adj: float(p), "family_size": len(have),
                                              "correction": claims.claim(claim).correction})
    for i, v in enumerate(out):
        p = v.numbers.get("p_below_holm")
        if v.status == "refuted" and p is not None and p >= cfg.alpha / 2:
            out[i] = replace(v, status="inconclusive", summary=v.summary + (
                f" The CI lies below the bar, but not after Holm's correction across {claim}'s "
                f"{v.numbers['family_size']} lines (adjusted p = {p:.3g} >= {cfg.alpha / 2:g}), so it does not "
                "refute."))
    return out


def no_behaviour(claim: str, evidence: str, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    return verdict(claim, evidence, "inconclusive",
                   f"No refusal behaviour to explain ({b.reason(cfg.alpha)}): nothing can be localized.",
                   result="phase2/refusal_rates", cfg=cfg, gap=b.gap)


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
                   result="phase5/direction", cfg=cfg, reason=why)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def overall(claim: str, lines: list[Verdict], cfg: RefusalConfig | None = None) -> Verdict:
    """All lines must be supported for a claim to be (an intersection-union test: no multiplicity
    correction is needed for the conjunction); a line refutes only after Holm's correction (:func:`finish`)."""
    status = combine([v.status for v in lines])
    # each status once: "patching and parameters supported; gradients refuted"
    groups = {s: [v.evidence for v in lines if v.status == s] for s in STATUSES}
    parts = "; ".join(f"{_and(names)} {s}" for s, names in groups.items() if names)
    # lines decided for one shared reason (no behaviour, too few categories) carry it up once
    reasons = {v.summary for v in lines}
    why = f" The reason{' for each' if len(lines) > 1 else ''}: {lines[0].summary}" if len(reasons) == 1 else ""
    return verdict(claim, "overall", status, f"Lines of evidence: {parts}.{why}", cfg=cfg,
                   lines={v.evidence: v.status for v in lines})


# ----------------------------------------------------------------------------- H1

def h1_patching(evidence: str, share: stats.Estimate, k: int, total: int, what: str, b: Behaviour,
                cfg: RefusalConfig, *, n_train: int, positions: str = "all", control: stats.Estimate | None = None,
                difference: stats.Estimate | None = None) -> Verdict:
    """``evidence`` "patching" (the top fraction by count) or "parameters" (by parameter budget).

    Supported only when the share clears the bar *and* beats a size- and layer-matched random
    set patched the same way (the difference's CI above 0)."""
    if not b.present:
        return no_behaviour("H1", evidence, b, cfg)
    status = against(share, cfg.h1_share)
    beats = difference is None or difference.ci_low > 0
    summary = (f"Patching {what} together ({k} of {total} heads + neurons, chosen by AtP on {n_train} train "
               f"pairs), at the {positions} positions, restores {fmt(share)} of the refusal-score gap on "
               f"{share.n} test pairs (bar: > {cfg.h1_share}).")
    if control is not None and difference is not None:
        summary += f" A matched random set restores {fmt(control)}; difference {fmt(difference)}."
        if status == "supported" and not beats:
            summary += " The chosen set does not beat the random one, so the share is not credited to it."
            status = "inconclusive"
    return measured("H1", evidence, share, cfg, summary, n=share.n, split="test", status=status,
                    control=None if control is None else _control(
                        "size- and layer-matched random heads + neurons",
                        "the share must also beat it (difference CI above 0)", control, difference),
                    k=k, n_components=total, positions=positions, n_train=n_train)


def _moves(before: float, after: float) -> str:
    """The verb for a refusal rate going from ``before`` to ``after`` (an ablation can raise it)."""
    return "drops" if after < before else "raises" if after > before else "leaves"


def _ablation_line(claim: str, bar: float, cond: Condition, control: Condition, diff: stats.Estimate,
                   b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour(claim, "ablation", b, cfg)
    side = side_effect(cond.kl_harmless, cond.answer_ce_increase, cfg)
    k = len(cond.components)
    summary = (f"Mean-ablating {cond.name} ({k} components) {_moves(cond.baseline.rate, cond.ablated.rate)} the "
               f"refusal rate on held-out harmful prompts from {cond.baseline.rate:.0%} to {cond.ablated.rate:.0%} "
               f"(relative drop {fmt(cond.relative_drop)}; degenerate answers {cond.ablated.degenerate_rate:.0%}); "
               f"a size- and layer-matched random set drops it by {fmt(control.relative_drop)}. The difference, "
               f"{fmt(diff)}, is held to the bar (> {bar}).")
    return measured(claim, "ablation", diff, cfg, summary, n=diff.n, split="test", side=side,
                    control=_control(control.name, "the difference is held to the bar", control.relative_drop, diff),
                    drop=cond.relative_drop, mcnemar_p=cond.mcnemar.p_value, k=k,
                    kl_harmless=cond.kl_harmless, max_kl=cfg.max_kl)


def h1_ablation(cond: Condition, control: Condition, diff: stats.Estimate, b: Behaviour,
                cfg: RefusalConfig) -> Verdict:
    return _ablation_line("H1", cfg.h1_drop, cond, control, diff, b, cfg)


def h1_gradients(share: stats.Estimate, k: int, total: int, b: Behaviour, cfg: RefusalConfig, *,
                 control: stats.Estimate | None = None) -> Verdict:
    if not b.present:
        return no_behaviour("H1", "gradients", b, cfg)
    summary = (f"On {share.n} test pairs, the {k} of {total} heads + neurons chosen on train hold {fmt(share)} of "
               f"the total |gradient x activation difference| (AtP) attribution (bar: > {cfg.h1_share}).")
    if control is not None:
        summary += f" A matched random set holds {fmt(control)}."
    return measured("H1", "gradients", share, cfg, summary, n=share.n, split="test", k=k, n_components=total,
                    control=None if control is None else _control(
                        "size- and layer-matched random heads + neurons", "shown beside the share", control))


# ----------------------------------------------------------------------------- H2

def h2_attention(det: Detection, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """Detection early: harmful keywords draw more attention than the harmless analogues' matched
    tokens, and more so in the first third of layers than later (peak chosen on val, tested on test)."""
    if not b.present:
        return no_behaviour("H2", "attention", b, cfg)
    eml, peak = det.early_minus_later, det.peak_layer
    if det.contrast.n < 2:
        return verdict("H2", "attention", "inconclusive", "Too few pairs differ in any token: keywords cannot be "
                       "located.", result="h2/keyword_attention", cfg=cfg, n=det.contrast.n)
    early = peak in det.early
    status = decide(supported_if=early and det.at_peak.ci_low > 0 and eml.ci_low > 0, refuted_if=eml.ci_high < 0)
    return measured("H2", "attention", eml, cfg,
                    f"Keyword attention of harmful prompts over their harmless analogues' matched tokens (the "
                    f"control) peaks on val pairs at layer {peak} ({'early' if early else 'not early'}; early layers "
                    f"0-{det.early[-1]}); on {det.contrast.n} test pairs the contrast there is {fmt(det.at_peak)}, "
                    f"and early minus later layers {fmt(eml)} (detection early if above 0).",
                    n=det.contrast.n, split="test", status=status, peak_layer=peak, early_layers=list(det.early),
                    at_peak=det.at_peak, n_val=det.contrast_val.n,
                    control=_control("harmless analogues' attention to their matched tokens (at the val peak)",
                                     "the statistic is the contrast with it", det.control_at_peak, det.at_peak))


def h2_direction(acc: Accumulation, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """Accumulation in the middle: the normalized projection rises fastest in the middle third,
    more than along random directions."""
    if not b.present:
        return no_behaviour("H2", "direction", b, cfg)
    t = acc.statistic
    status = decide(supported_if=t.ci_low > 0 and acc.p_random < cfg.alpha, refuted_if=t.ci_high < 0)
    rand = np.asarray(acc.random)
    r_est = stats.Estimate(value=float(rand.mean()), ci_low=float(np.quantile(rand, cfg.alpha / 2)),
                           ci_high=float(np.quantile(rand, 1 - cfg.alpha / 2)), method=f"{rand.size} random directions",
                           n=int(rand.size), alpha=cfg.alpha)
    sl = acc.slopes
    return measured("H2", "direction", t, cfg,
                    f"The paired harmful - harmless projection onto the refusal direction, normalized by the "
                    f"residual norm, rises per layer by {sl['early'].value:.3g} (early), {sl['middle'].value:.3g} "
                    f"(middle, layers {acc.layers[0]}-{acc.layers[-1]}) and {sl['late'].value:.3g} (late); the middle "
                    f"slope minus the larger other one is {fmt(t)} (bar: > 0), and {acc.p_random:.3g} of "
                    f"{rand.size} random directions reach it (must be < {cfg.alpha}).",
                    n=t.n, split="test", status=status, slopes=dict(sl), p_random=acc.p_random,
                    middle_layers=list(acc.layers),
                    control=_control("random directions", "the statistic must beat them (p < alpha)", r_est,
                                     p=acc.p_random))


def h2_patching(depth: stats.Estimate, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """Execution late: the attention and MLP outputs' direct effects on the refusal score sit in the last third."""
    if not b.present:
        return no_behaviour("H2", "patching", b, cfg)
    return measured("H2", "patching", depth, cfg,
                    f"On {depth.n} test pairs, the effect-weighted relative depth of the attention and MLP outputs' "
                    f"direct effects on the refusal score (each block's path to the logits alone) is {fmt(depth)} "
                    f"(0 = first layer, 1 = last; late if above 2/3).",
                    n=depth.n, split="test",
                    control=_control("none: a location statistic, held to the start of the last third", "none"))


# ----------------------------------------------------------------------------- H3

def h3_categories(cc: CrossCategory, b: Behaviour, cfg: RefusalConfig) -> list[Verdict]:
    out = []
    worst_kl = max((kl for kl, _ in cc.side_effects.values()), default=None)
    ces = [ce for _, ce in cc.side_effects.values() if ce is not None]
    side = side_effect(worst_kl, max(ces) if ces else None, cfg) if cc.side_effects else None
    for c in cc.categories:
        if not b.present:
            out.append(no_behaviour("H3", c, b, cfg))
            continue
        own, ratio = cc.shared_ratio(c, cfg)
        if not own.ci_low > 0:
            out.append(verdict("H3", c, "inconclusive",
                               f"Ablating {c}'s own top heads does not reliably reduce its refusal ({fmt(own)} of the "
                               f"gap on {own.n} val + test prompts), so sharing cannot be judged.",
                               result="h3/cross_category", cfg=cfg, own=own, n=own.n, split="val + test",
                               side_effect=side))
            continue
        out.append(measured("H3", c, ratio, cfg,
                            f"On {own.n} {c} val + test prompts, other categories' top heads (each chosen on "
                            f"{min(cc.n_find.values())}+ train pairs) remove {fmt(ratio)} as much refusal as {c}'s "
                            f"own (own: {fmt(own)} of the gap; bar: > {cfg.h3_ratio}).",
                            n=own.n, split="val + test", side=side, own=own,
                            control=_control(f"{c}'s own top heads (the ratio's denominator)",
                                             "the ratio is taken over it", own)))
    return out


def h3_direction(similarity: stats.Estimate, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("H3", "direction", b, cfg)
    return measured("H3", "direction", similarity, cfg,
                    f"Categories' harmful-minus-harmless activation directions (test pairs) have mean "
                    f"pairwise cosine {fmt(similarity)} (bar: > {cfg.h3_ratio}).", n=similarity.n,
                    split="test", control=_control("none: a similarity, held to the bar", "none"))


def too_few_categories(categories: tuple[str, ...]) -> str:
    """Why H3 cannot be measured: ``categories`` are the prompt file's categories its stages can use."""
    have = f"{len(categories)}: {', '.join(categories)}" if categories else "none"
    return (f"H3 needs at least {H3_MIN_CATEGORIES} harm categories with train and test pairs (≥1 each); the prompt "
            f"file has {have}. Add pairs of a second category to the prompt file (--prompts) to test sharing.")


def one_category(categories: tuple[str, ...], b: Behaviour, cfg: RefusalConfig) -> list[Verdict]:
    """H3 on a dataset with fewer than two usable harm categories: each line inconclusive, saying why."""
    evidence = (*categories, "direction")
    if not b.present:
        return [no_behaviour("H3", e, b, cfg) for e in evidence]
    why = too_few_categories(categories)
    return [verdict("H3", e, "inconclusive", why, result="h3/cross_category", cfg=cfg, categories=list(categories),
                    reason="too few categories") for e in evidence]


# ----------------------------------------------------------------------------- criteria

def c1_heads(verified, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    """At least ``min_heads`` heads clear ``head_effect`` on test pairs, Holm-corrected over the candidates."""
    if not b.present:
        return no_behaviour("C1", "patching", b, cfg)
    bar, need, m = cfg.head_effect, cfg.min_heads, len(verified.components)
    # one-sided at alpha / 2: the level of the two-sided CIs every other line is decided on
    clears = stats.holm(list(verified.p_above), alpha=cfg.alpha / 2).reject
    sure = sum(clears)
    surely_below = sum(stats.holm(list(verified.p_below), alpha=cfg.alpha / 2).reject)
    maybe = m - surely_below
    point = int((verified.effect > bar).sum())
    status = decide(supported_if=sure >= need, refuted_if=maybe < need)
    se = float(np.nanmedian(verified.se)) if np.isfinite(verified.se).any() else float("nan")
    from scipy.stats import norm

    mde = float(bar + (norm.ppf(1 - cfg.alpha / (2 * m)) + norm.ppf(POWER)) * se) if math.isfinite(se) else None
    from instruments.components import label

    summary = (f"Of the {m} candidate heads (AtP's top heads and the exact sweep's, chosen on train), {point} have an "
               f"exact effect above {bar:.0%} on {verified.n_pairs} test pairs; {sure} clear it after Holm's "
               f"correction over the {m} candidates and {maybe} are not significantly below it; the criterion asks "
               f"for at least {need}. Heads outside the candidates were not verified.")
    return verdict("C1", "patching", status, summary, result="phase3/heads", cfg=cfg,
                   statistic=claims.claim("C1").line("patching").statistic, heads_point=point, heads_ci_low=sure,
                   heads_ci_high=maybe, bar=bar, required=need, n=verified.n_pairs, split="test",
                   n_candidates=m, min_detectable_effect=mde, power=POWER, correction="holm over the candidates",
                   control=_control("none: each head's effect is held to the bar, Holm over the candidates", "none"),
                   heads_clearing=[label(h) for h, r in zip(verified.components, clears) if r])


def c2_ablation(cond: Condition, control: Condition, diff: stats.Estimate, b: Behaviour,
                cfg: RefusalConfig) -> Verdict:
    return _ablation_line("C2", cfg.ablation_drop, cond, control, diff, b, cfg)


def c3_reproducibility(identical: bool, provenance: dict[str, Any], cfg: RefusalConfig) -> Verdict:
    """Met when a rerun is bit-identical and the provenance names versions, commit, time and machine."""
    missing = [k for k in ("versions", "git_commit", "utc_time", "machine") if not provenance.get(k)]
    status = "supported" if identical and not missing else "refuted"
    return verdict("C3", "reproducibility", status,
                   f"A rerun of attribution patching gave {'bit-identical' if identical else 'DIFFERENT'} numbers; "
                   f"provenance recorded: {'complete' if not missing else 'missing ' + ', '.join(missing)} "
                   f"(seed {cfg.seed}, commit {provenance.get('git_commit') or 'unknown'}).", result="manifest",
                   cfg=cfg, identical=identical, missing_provenance=missing)


def s1_gradients(rho: stats.Estimate, n_pairs: int, b: Behaviour, cfg: RefusalConfig) -> Verdict:
    if not b.present:
        return no_behaviour("S1", "gradients", b, cfg)
    return measured("S1", "gradients", rho, cfg,
                    f"Spearman correlation of the heads' AtP attribution on train pairs with their exact patching "
                    f"effect on {n_pairs} test pairs, over the {rho.n} candidates (nominated by AtP and by the exact "
                    f"sweep): {fmt(rho)} (the seed's "
                    f"cross-validation bar: r > {cfg.gradient_r}).", n=rho.n, split="test", n_pairs=n_pairs,
                    control=_control("none: an agreement between two instruments, held to the bar", "none"))
