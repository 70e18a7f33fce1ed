"""Phase 2, baseline behaviour on the test split: refusal rates, first-token probabilities,
the logit lens and attention entropy, each a frozen result with the record phase 2 writes.

Nothing here chooses a component: these are descriptive measurements of the test split
(the study's behaviour gate reads the same judgements), so they may run before the
pre-registration, and a ``-m phase2`` run never computes the study's selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses import records
from hypotheses.evidence import Judged, harmful, harmless
from instruments import behavior, metrics, stats

OPENING_TOKENS = 12  # tokens of each train answer: enough to see how the model opens one (its refusal tokens)
RATE_NAMES = ("refusal_rate", "compliance_rate", "degenerate_rate")
N_EXAMPLES = 10  # harmful test answers shown in the record


@dataclass(frozen=True, kw_only=True)
class SplitGenerations:
    """Greedy completions of one split's harmful and harmless prompts."""

    harmful: behavior.Generations
    harmless: behavior.Generations


def judged(handle, gen: behavior.Generations, tokens: metrics.RefusalTokens, batch_size: int) -> Judged:
    """The generate judge's verdicts on recorded generations, with the refusal score of each prompt."""
    scores = metrics.refusal_score(behavior.last_logits(handle, gen.prompts, batch_size=batch_size), tokens)
    return Judged(refused=np.asarray(gen.refused, dtype=bool), scores=scores.double().numpy(), texts=gen.texts)


# ----------------------------------------------------------------------------- refusal rates

@dataclass(frozen=True, kw_only=True)
class RefusalRates:
    """Refusal, compliance and degenerate rates (Wilson CIs) of each side's test answers."""

    generations: SplitGenerations
    rates: dict[str, dict[str, Any]]  # side -> {rate name: Estimate dict, "n": count}
    examples: tuple[dict[str, Any], ...]
    truncated: bool  # the examples' completions are cut to 80 characters

    def record(self) -> records.RefusalRates:
        return records.RefusalRates(harmful=self.rates["harmful"], harmless=self.rates["harmless"],
                                    examples_harmful=list(self.examples), completions_truncated=self.truncated)

    def manifest_note(self) -> dict[str, dict[str, float]]:
        """The manifest's one-line summary: a degenerate answer is never counted as a refusal."""
        return {side: {k: self.rates[side][k]["value"] for k in RATE_NAMES} | {"n": self.rates[side]["n"]}
                for side in self.rates}


def refusal_rates(generations: SplitGenerations, cfg: RefusalConfig) -> RefusalRates:
    rates = {}
    for side in ("harmful", "harmless"):
        gen = getattr(generations, side)
        n, k, d = len(gen.refused), int(sum(gen.refused)), int(sum(gen.degenerate))
        # refusal, compliance and degenerate (no letter or digit) partition the answers
        counts = dict(zip(RATE_NAMES, (k, n - k - d, d)))
        rates[side] = {name: stats.proportion_ci(c, n, alpha=cfg.alpha).to_dict() for name, c in counts.items()}
        rates[side]["n"] = n
    show, gen = cfg.show_completions, generations.harmful
    examples = tuple({"prompt": p, "completion": t if show else t[:80], "refused": r, "degenerate": d}
                     for p, t, r, d in list(zip(gen.prompts, gen.texts, gen.refused, gen.degenerate))[:N_EXAMPLES])
    return RefusalRates(generations=generations, rates=rates, examples=examples, truncated=not show)


# ----------------------------------------------------------------------------- first-token probabilities

@dataclass(frozen=True, kw_only=True)
class FirstToken:
    """P(refusal tokens) and P(compliance tokens) at the first answer position, and their AUC."""

    tokens: metrics.RefusalTokens
    refusal_tokens: tuple[str, ...]  # decoded
    compliance_tokens: tuple[str, ...]
    harmful: behavior.FirstTokenProbs
    harmless: behavior.FirstTokenProbs
    auc: stats.Estimate  # harmful vs harmless P(refusal)
    prompts: tuple[str, ...]  # the harmful test prompts

    def record(self) -> records.FirstToken:
        h, s = self.harmful, self.harmless
        return records.FirstToken(
            refusal_tokens=list(self.refusal_tokens), compliance_tokens=list(self.compliance_tokens),
            token_source=self.tokens.source, auc_harmful_vs_harmless=self.auc.to_dict(),
            mean_p_refusal={"harmful": float(h.refusal.mean()), "harmless": float(s.refusal.mean())},
            mean_p_compliance={"harmful": float(h.compliance.mean()), "harmless": float(s.compliance.mean())},
            p_refusal_harmful=h.refusal, p_refusal_harmless=s.refusal, p_compliance_harmful=h.compliance,
            p_compliance_harmless=s.compliance, prompts=list(self.prompts))


def first_token(handle, pairs: Sequence[Pair], tokens: metrics.RefusalTokens, cfg: RefusalConfig) -> FirstToken:
    bs = cfg.batch_size
    bad = behavior.first_token_probs(handle, harmful(pairs), tokens, batch_size=bs)
    good = behavior.first_token_probs(handle, harmless(pairs), tokens, batch_size=bs)
    auc = stats.roc_auc(bad.refusal.numpy(), good.refusal.numpy(), n_boot=cfg.n_bootstrap, seed=cfg.seed,
                        alpha=cfg.alpha)
    decode = handle.tokenizer.decode
    return FirstToken(tokens=tokens, refusal_tokens=tuple(decode([t]) for t in tokens.refusal_ids),
                      compliance_tokens=tuple(decode([t]) for t in tokens.compliance_ids), harmful=bad,
                      harmless=good, auc=auc, prompts=tuple(harmful(pairs)))


# ----------------------------------------------------------------------------- logit lens

@dataclass(frozen=True, kw_only=True)
class LogitLens:
    """P(refusal tokens) read from every layer's residual stream at the last position."""

    harmful: torch.Tensor  # [layer, prompt]
    harmless: torch.Tensor
    first_layer_separating: int | None  # the first layer whose mean gap exceeds half the largest

    def record(self) -> records.LogitLens:
        return records.LogitLens(first_layer_separating=self.first_layer_separating, harmful=self.harmful,
                                 harmless=self.harmless)


def logit_lens(handle, pairs: Sequence[Pair], tokens: metrics.RefusalTokens, cfg: RefusalConfig) -> LogitLens:
    lens = {side: behavior.logit_lens(handle, [getattr(p, side) for p in pairs], tokens, batch_size=cfg.batch_size)
            for side in ("harmful", "harmless")}
    diff = (lens["harmful"] - lens["harmless"]).mean(dim=1)
    first = int(torch.nonzero(diff > 0.5 * diff.max()).min()) if diff.max() > 0 else None
    return LogitLens(harmful=lens["harmful"], harmless=lens["harmless"], first_layer_separating=first)


# ----------------------------------------------------------------------------- attention entropy

@dataclass(frozen=True, kw_only=True)
class AttentionEntropy:
    """Each head's attention entropy from the last position; per layer, harmful vs its own harmless
    analogue by a paired permutation test, BH-corrected over layers."""

    harmful: torch.Tensor  # [prompt, layer, head]
    harmless: torch.Tensor
    p_values: tuple[float, ...]
    adjusted: stats.MultipleTestResult
    prompts: tuple[str, ...]  # the harmful prompts (their lengths bound the entropy)

    def record(self) -> records.AttentionEntropy:
        h_layer, b_layer = self.harmful.mean(-1).numpy(), self.harmless.mean(-1).numpy()
        return records.AttentionEntropy(
            p_values=[float(p) for p in self.p_values], p_adjusted_bh=[float(p) for p in self.adjusted.p_adjusted],
            layers_differing=[int(i) for i in np.flatnonzero(self.adjusted.reject)],
            mean_difference_by_layer=[float(x) for x in (h_layer - b_layer).mean(0)], harmful=self.harmful,
            harmless=self.harmless)


def attention_entropy(handle, pairs: Sequence[Pair], cfg: RefusalConfig) -> AttentionEntropy:
    bad = behavior.attention_entropy(handle, harmful(pairs), batch_size=cfg.batch_size)
    good = behavior.attention_entropy(handle, harmless(pairs), batch_size=cfg.batch_size)
    h_layer, b_layer = bad.mean(-1).numpy(), good.mean(-1).numpy()
    pvals = tuple(stats.paired_permutation_test(h_layer[:, layer], b_layer[:, layer], n_perm=cfg.n_bootstrap,
                                                seed=cfg.seed).p_value for layer in range(handle.n_layers))
    return AttentionEntropy(harmful=bad, harmless=good, p_values=pvals,
                            adjusted=stats.benjamini_hochberg(list(pvals), alpha=cfg.alpha),
                            prompts=tuple(harmful(pairs)))
