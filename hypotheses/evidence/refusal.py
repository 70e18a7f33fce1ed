"""Refusal as judged, prompt by prompt, and the behaviour to explain: do harmful and harmless
test prompts differ at all?

Two ways to say that a prompt was refused (``RefusalConfig.judge``): ``generate`` runs
greedy generation and the refusal classifier (what a user sees); ``first_token`` asks
whether P(refusal tokens) > P(compliance tokens) at the last position, for models that
cannot write text (the planted and null models of the self-validation tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from jaxtyping import Bool, Float

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses.evidence.prompts import harmful, harmless
from instruments import behavior, stats
from instruments.metrics import RefusalTokens, compliance_prob, refusal_prob, refusal_score

Hook = tuple[str, object]


# ----------------------------------------------------------------------------- refusal, as judged

@dataclass(frozen=True, kw_only=True)
class Judged:
    """Refusal of each prompt under one condition: flags, scores and (generate judge) the texts.

    A degenerate answer (no letter or digit: :func:`instruments.behavior.is_degenerate`) is
    neither refused nor complied with; its flags and rate stand beside the refusal ones.
    """

    refused: Bool[np.ndarray, "prompt"]
    scores: Float[np.ndarray, "prompt"]
    texts: tuple[str, ...]

    @property
    def rate(self) -> float:
        return float(self.refused.mean()) if self.refused.size else float("nan")

    @property
    def degenerate(self) -> Bool[np.ndarray, "prompt"]:
        # the first_token judge writes no text (texts is empty): under it nothing is degenerate
        if not self.texts:
            return np.zeros(self.refused.shape, dtype=bool)
        return np.array([behavior.is_degenerate(t) for t in self.texts], dtype=bool)

    @property
    def degenerate_rate(self) -> float:
        return float(self.degenerate.mean()) if self.refused.size else float("nan")


def judge(handle, prompts: Sequence[str], tokens: RefusalTokens, cfg: RefusalConfig, *,
          hooks: Sequence[Hook] = ()) -> Judged:
    """Which prompts the model refuses (under ``hooks``), by the configured judge.

    The scores come from the generation's first step when it generates (the same forward
    pass over the prompts; a separate one costs 8 s per 40 prompts on 2 cores).
    """
    if cfg.judge == "first_token":
        logits = behavior.last_logits(handle, prompts, batch_size=cfg.batch_size, fwd_hooks=hooks)
        refused = (refusal_prob(logits, tokens) > compliance_prob(logits, tokens)).numpy()
        # no text, so no answer is degenerate: every prompt is refused or complied with
        return Judged(refused=refused, scores=refusal_score(logits, tokens).numpy().astype(np.float64), texts=())
    gen = behavior.generate(handle, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                            fwd_hooks=hooks)
    scores = refusal_score(gen.prompt_logits, tokens).numpy().astype(np.float64)
    return Judged(refused=np.asarray(gen.refused, dtype=bool), scores=scores, texts=gen.texts)


# ----------------------------------------------------------------------------- the behaviour to explain

@dataclass(frozen=True, kw_only=True)
class Behaviour:
    """Does the model treat harmful and harmless test prompts differently at all?

    Without a significant gap there is no mechanism to localize: every hypothesis is then
    inconclusive (the null-model tests rest on this gate).
    """

    score_harmful: Float[np.ndarray, "prompt"]
    score_harmless: Float[np.ndarray, "prompt"]
    gap: stats.Estimate  # mean paired score difference harmful - harmless, with its CI
    p_value: float  # paired permutation test
    refused_harmful: Judged
    refused_harmless: Judged

    alpha: float = 0.05

    @property
    def refusal_test(self) -> stats.McNemarResult:
        """Harmful vs harmless refusal on the same pairs (McNemar: the pairs are matched)."""
        return stats.mcnemar(self.refused_harmless.refused, self.refused_harmful.refused, alpha=self.alpha,
                             n_boot=200)

    @property
    def present(self) -> bool:
        """Refusal behaviour worth explaining: the score gap is positive (CI and permutation test)
        *and* harmful prompts are refused significantly more often than their analogues."""
        more = self.refused_harmful.refused.sum() > self.refused_harmless.refused.sum()
        return bool(self.gap.ci_low > 0 and self.p_value < self.alpha and more
                    and self.refusal_test.p_value < self.alpha)

    def reason(self, alpha: float) -> str:
        return (f"refusal score gap harmful - harmless {self.gap.value:.3g} "
                f"[{self.gap.ci_low:.3g}, {self.gap.ci_high:.3g}], permutation p={self.p_value:.3g}; "
                f"refused: {int(self.refused_harmful.refused.sum())}/{self.refused_harmful.refused.size} harmful vs "
                f"{int(self.refused_harmless.refused.sum())}/{self.refused_harmless.refused.size} harmless test "
                f"prompts, McNemar p={self.refusal_test.p_value:.3g}")


def behaviour(handle, test: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig, *,
              judged: tuple[Judged, Judged] | None = None) -> Behaviour:
    """The test split's refusal gap; ``judged`` reuses (harmful, harmless) judgements already made."""
    bad, good = judged or (judge(handle, harmful(test), tokens, cfg), judge(handle, harmless(test), tokens, cfg))
    diff = bad.scores - good.scores
    gap = stats.bootstrap_ci(diff, n_boot=cfg.n_bootstrap, seed=cfg.seed, alpha=cfg.alpha, method="percentile")
    perm = stats.paired_permutation_test(bad.scores, good.scores, n_perm=max(cfg.n_bootstrap, 1000), seed=cfg.seed)
    return Behaviour(score_harmful=bad.scores, score_harmless=good.scores, gap=gap, p_value=float(perm.p_value),
                     refused_harmful=bad, refused_harmless=good, alpha=cfg.alpha)
