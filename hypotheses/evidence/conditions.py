"""Refusal on the harmful test prompts with components ablated (a condition), beside the baseline,
and the ablation's capability side effects on harmless prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float

from fixtures.config import RefusalConfig
from hypotheses.evidence.refusal import Hook, Judged, judge
from hypotheses.evidence.bootstrap import boot_estimate, boot_index
from hypotheses.evidence.prompts import window
from instruments import behavior, stats
from instruments.ablation import AblationSpec, ReferenceActivations, ablation_hooks
from instruments.components import Component
from instruments.metrics import RefusalTokens


@dataclass(frozen=True, kw_only=True)
class Condition:
    """Refusal on the harmful test prompts with a set of components ablated, vs the baseline."""

    name: str
    kind: str  # "circuit" or "control"
    control_of: str | None
    components: tuple[Component, ...]
    baseline: Judged
    ablated: Judged
    relative_drop: stats.Estimate  # 1 - rate_ablated / rate_baseline, paired bootstrap
    mcnemar: stats.McNemarResult
    kl_harmless: float | None = None
    answer_ce_increase: float | None = None
    method: str = "mean"
    positions: int | None = None  # the last N prompt positions were ablated (None: every position)

    @property
    def degenerate_rate_baseline(self) -> float:
        return self.baseline.degenerate_rate

    @property
    def degenerate_rate_ablated(self) -> float:
        """Share of answers the ablation left with no letter or digit: a broken model's, not refusals."""
        return self.ablated.degenerate_rate


def relative_drop(before: np.ndarray, after: np.ndarray, cfg: RefusalConfig, salt: int = 3) -> stats.Estimate:
    """1 - P(refused | ablated) / P(refused | baseline) on the same prompts, with a paired bootstrap CI."""
    before, after = before.astype(np.float64), after.astype(np.float64)
    value = 1.0 - after.mean() / before.mean() if before.mean() > 0 else float("nan")
    idx = boot_index(before.size, cfg, salt)
    with np.errstate(all="ignore"):
        boot = 1.0 - after[idx].mean(-1) / before[idx].mean(-1)
    return boot_estimate(value, boot, cfg, before.size)


@dataclass(frozen=True, kw_only=True)
class HarmlessReference:
    """The clean model on harmless prompts, computed once and compared with every ablation."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]  # the clean model's own answers ("" when not available)
    logits: Float[torch.Tensor, "prompt vocab"]
    answer_ce: Float[torch.Tensor, "prompt"] | None


def harmless_reference(handle, prompts: Sequence[str], answers: Sequence[str], cfg: RefusalConfig) -> HarmlessReference:
    """With answers, both the logits and the cross-entropy come from one pass over prompt + answer,
    as they do under every ablation compared with them (:func:`ablate_condition`)."""
    from instruments.ablation import answer_scores

    if not answers:
        return HarmlessReference(prompts=tuple(prompts), answers=(), answer_ce=None,
                                 logits=behavior.last_logits(handle, prompts, batch_size=cfg.batch_size))
    scores = answer_scores(handle, prompts, answers, batch_size=cfg.batch_size)
    return HarmlessReference(prompts=tuple(prompts), answers=tuple(answers), logits=scores.prompt_logits,
                             answer_ce=scores.cross_entropy)


def side_effects(handle, hooks: Sequence[Hook], harmless: HarmlessReference,
                 cfg: RefusalConfig) -> tuple[float, float | None]:
    """(next-token KL(clean || ablated), rise in the clean answers' cross-entropy) on harmless prompts."""
    from instruments.ablation import answer_scores
    from instruments.metrics import kl_divergence

    ce = None
    if harmless.answer_ce is not None:  # one pass gives both the next-token logits and the answers' CE
        after = answer_scores(handle, harmless.prompts, harmless.answers, batch_size=cfg.batch_size, fwd_hooks=hooks)
        under = after.prompt_logits
        ce = float((after.cross_entropy - harmless.answer_ce).nanmean())
    else:
        under = behavior.last_logits(handle, harmless.prompts, batch_size=cfg.batch_size, fwd_hooks=hooks)
    return float(kl_divergence(harmless.logits, under).mean()), ce


def ablation_spec(handle, cfg: RefusalConfig, components: Sequence[Component], *,
                  method: str = "mean") -> AblationSpec:
    """The study's ablation: components where the study patches them (the intervention that
    found them, Hanna et al. 2024), each position from its own reference position; a
    direction removed at every position, generated ones included (Arditi et al. 2024)."""
    from instruments.components import Direction

    everywhere = any(isinstance(c, Direction) for c in components)
    return AblationSpec(method=method, batch_size=cfg.batch_size,
                        positions=None if everywhere else window(handle, cfg))


def ablate_condition(handle, prompts: Sequence[str], tokens: RefusalTokens, cfg: RefusalConfig, *,
                     name: str, components: Sequence[Component], baseline: Judged,
                     reference: Sequence[str] | ReferenceActivations,
                     kind: str = "circuit", control_of: str | None = None, method: str = "mean",
                     harmless: HarmlessReference | None = None) -> Condition:
    """Ablate ``components`` (mean: means over harmless TRAIN ``reference`` prompts) and judge refusal.

    A refusal direction is ablated with ``method="zero"``: its projection is removed
    everywhere (Arditi et al.), rather than set to its harmless mean. With ``harmless`` the
    capability side effects are measured too: KL(clean || ablated) of the next token after
    each harmless prompt, and (when it has answers) the rise in cross-entropy of the clean
    model's own answers.
    """
    spec = ablation_spec(handle, cfg, components, method=method)
    hooks = ablation_hooks(handle, list(components), spec=spec, reference=reference if method != "zero" else None)
    ablated = judge(handle, prompts, tokens, cfg, hooks=hooks)
    kl, ce = side_effects(handle, hooks, harmless, cfg) if harmless is not None else (None, None)
    return Condition(name=name, kind=kind, control_of=control_of, components=tuple(components), baseline=baseline,
                     ablated=ablated, relative_drop=relative_drop(baseline.refused, ablated.refused, cfg),
                     mcnemar=stats.mcnemar(baseline.refused, ablated.refused, alpha=cfg.alpha,
                                           n_boot=cfg.n_bootstrap, seed=cfg.seed),
                     kl_harmless=kl, answer_ce_increase=ce, method=method, positions=spec.positions)
