"""Phase 4.2, gradient attribution and its agreement with patching.

Integrated gradients from the refusal score to the input tokens, each harmful train prompt
against its paired harmless prompt, gradient x attention pattern per head, and gradient x
activation per MLP neuron, each rank-correlated (Spearman, bootstrap CI) with the patching
effects of the same components. The seed's cross-validation bar (r > 0.7) is S1's, decided
on the study's ``gradient_vs_patching`` (AtP on train vs exact patching on test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses import records
from hypotheses.evidence import AtpScan, Ranking, harmful
from instruments import gradients, positions, stats
from instruments.components import Neuron
from instruments.metrics import RefusalTokens
from instruments.patching import PatchResult

N_IG_PROMPTS = 4


def aligned_first(handle, pairs: Sequence[Pair], n: int) -> list[Pair]:
    """The first n pairs, those of equal token length first: their baseline is the exact harmless twin.

    The blurred baseline of an unequal pair makes a rough path on SmolLM2 (one train pair left
    141%, 103%, 9% completeness error at 32, 64, 128 Gauss-Legendre steps; an equal-length
    pair 1e-4 at 32), so aligned pairs come first (in file order) and the others fill up.
    """
    same = positions.same_length(handle, [p.harmful for p in pairs], [p.harmless for p in pairs]).tolist()
    order = sorted(range(len(pairs)), key=lambda i: not same[i])
    return [pairs[i] for i in order[:n]]


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


@dataclass(frozen=True, kw_only=True)
class GradientAttribution:
    """Integrated gradients on a few train pairs, and each gradient score beside the patching score it
    should agree with."""

    ig: gradients.IntegratedGradients
    chosen: tuple[Pair, ...]  # the IG pairs
    flow: gradients.AttentionFlow
    saliency: gradients.Saliency
    correlations: tuple[dict[str, Any], ...]
    scatter: dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (gradient scores, patching scores)
    s1: stats.Estimate  # AtP on train vs exact on test, over the candidates (what S1 is decided on)
    r_bar: float  # S1's bar (--refusal-gradient-r)
    n_candidates: int
    n_pairs_test: int
    gradient_share: stats.Estimate  # share of the test pairs' |AtP| held by H1's components
    k_components: int
    tokenizer: Any = field(repr=False)  # decodes the IG prompts' tokens

    def record(self) -> records.Gradients:
        ig = self.ig
        completeness = ig.completeness_summary()
        examples = [{"prompt": pair.harmful, "harmless": pair.harmless, "baseline": kind, "completeness_error": err,
                     "tokens": [self.tokenizer.decode([t]) for t in ids.tolist()],
                     "attributions": [float(a) for a in attr]}
                    for pair, kind, err, ids, attr in zip(self.chosen, ig.baselines, completeness["per_prompt"],
                                                          ig.token_ids(), ig.per_prompt())]
        return records.Gradients(
            ig={"baseline": {"kind": ig.baseline, "per_pair": list(ig.baselines),
                             "counts": {k: ig.baselines.count(k) for k in sorted(set(ig.baselines))}},
                "completeness_error": completeness, "n_pairs": len(self.chosen)},
            ig_completeness_error=completeness["max"], ig_steps=ig.steps, ig_examples=examples,
            correlations=list(self.correlations), gradient_r_bar=self.r_bar, met=bool(self.s1.ci_low > self.r_bar),
            s1={"estimate": self.s1.to_dict(), "versus": "AtP on train pairs vs exact patching on test pairs",
                "n_candidates": self.n_candidates, "n_pairs_test": self.n_pairs_test},
            gradient_share=self.gradient_share.to_dict(), k_components=self.k_components, gradient_share_split="test",
            n_pairs_test=self.gradient_share.n, attention_flow=self.flow.mean.float(),
            scatter_x={k: x for k, (x, _) in self.scatter.items()},
            scatter_y={k: y for k, (_, y) in self.scatter.items()})


def gradient_attribution(handle, train_pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig, *,
                         flow: gradients.AttentionFlow, exact_heads: PatchResult, atp: AtpScan, neurons: Ranking,
                         s1: stats.Estimate, n_candidates: int, n_pairs_test: int, gradient_share: stats.Estimate,
                         k_components: int) -> GradientAttribution:
    chosen = aligned_first(handle, list(train_pairs), N_IG_PROMPTS)
    twins = tuple(p.harmless for p in chosen)
    # The contrastive baseline (Sundararajan et al. 2017): what in the harmful request, against
    # its harmless twin, moves the refusal score.
    ig = gradients.integrated_gradients(handle, harmful(chosen), tokens, gradients.IGSpec(
        steps=cfg.ig_steps, batch_size=cfg.batch_size, baseline=gradients.Baseline(kind="paired", prompts=twins)))
    sal = gradients.neuron_saliency(handle, harmful(train_pairs), tokens,
                                    gradients.GradientSpec(batch_size=cfg.batch_size))
    heads_exact = exact_heads.normalized.abs().reshape(-1).double().numpy()
    ranked = [n for n in neurons.components if isinstance(n, Neuron)]
    sal_x = np.abs(np.array([float(sal.mean_neuron_grad_x_act[n.layer, n.index]) for n in ranked]))
    pairs = {"atp": ("AtP (gradient x activation difference)", atp.heads.reshape(-1).double().numpy(),
                     exact_heads.normalized.reshape(-1).double().numpy(), "exact head patching"),
             "attention_flow": ("attention flow", flow.mean.abs().reshape(-1).double().numpy(), heads_exact,
                                "exact head patching (magnitudes)"),
             "head_grad_x_act": ("head gradient x activation", sal.mean_head_grad_x_act.abs().reshape(-1).double()
                                 .numpy(), heads_exact, "exact head patching (magnitudes)"),
             "neuron_grad_x_act": ("neuron gradient x activation", sal_x, np.abs(neurons.effect),
                                   "exact neuron patching (AtP top neurons, magnitudes)")}
    correlations, scatter = [], {}
    for key, (name, x, y, versus) in pairs.items():
        est = stats.spearman_ci(x, y, n_boot=cfg.n_bootstrap, seed=cfg.seed, alpha=cfg.alpha)
        correlations.append({"name": name, "key": key, "versus": versus, "estimate": est.to_dict()})
        scatter[key] = (_t(x), _t(y))
    return GradientAttribution(ig=ig, chosen=tuple(chosen), flow=flow, saliency=sal, correlations=tuple(correlations),
                               scatter=scatter, s1=s1, n_candidates=n_candidates, n_pairs_test=n_pairs_test,
                               gradient_share=gradient_share, k_components=k_components, tokenizer=handle.tokenizer,
                               r_bar=cfg.gradient_r)
