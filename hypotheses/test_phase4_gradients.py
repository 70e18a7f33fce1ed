"""Phase 4.2, gradient attribution and its agreement with patching.

Integrated gradients from the refusal score to the input tokens, each harmful prompt against
its paired harmless prompt (completeness asserted within the method's bar), gradient x
attention pattern per head, and gradient x activation per MLP neuron, each rank-correlated
(Spearman, bootstrap CI) with the patching effects of the same components. The seed's
cross-validation bar (r > 0.7) is decided in test_criteria (S1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hypotheses.evidence import harmful
from instruments import gradients, positions, stats
from instruments.components import Neuron

pytestmark = [pytest.mark.phase4, pytest.mark.integration]

N_IG_PROMPTS = 4


def _aligned_first(handle, pairs, n):
    """The first n pairs, those of equal token length first: their baseline is the exact harmless twin.

    The blurred baseline of an unequal pair makes a rough path on SmolLM2 (one train pair left
    141%, 103%, 9% completeness error at 32, 64, 128 Gauss-Legendre steps; an equal-length
    pair 1e-4 at 32), so aligned pairs come first (in file order) and the others fill up.
    """
    same = positions.same_length(handle, [p.harmful for p in pairs], [p.harmless for p in pairs]).tolist()
    order = sorted(range(len(pairs)), key=lambda i: not same[i])
    return [pairs[i] for i in order[:n]]


def test_gradient_attribution(subject, study, recorder, refusal_tokens, refusal_config):
    cfg = study.cfg
    prompts = harmful(study.train_pairs)
    chosen = _aligned_first(subject, list(study.train_pairs), N_IG_PROMPTS)
    twins = tuple(p.harmless for p in chosen)
    # The contrastive baseline (Sundararajan et al. 2017): what in the harmful request, against
    # its harmless twin, moves the refusal score.
    ig = gradients.integrated_gradients(subject, harmful(chosen), refusal_tokens, gradients.IGSpec(
        steps=cfg.ig_steps, batch_size=cfg.batch_size, baseline=gradients.Baseline(kind="paired", prompts=twins)))
    assert torch.isfinite(ig.attributions).all(), "integrated gradients produced non-finite attributions"
    completeness = ig.completeness_summary()
    ig_record = {"baseline": {"kind": ig.baseline, "per_pair": list(ig.baselines),
                              "counts": {k: ig.baselines.count(k) for k in sorted(set(ig.baselines))}},
                 "completeness_error": completeness, "n_pairs": len(chosen)}
    examples = []
    for pair, kind, err, ids, attr in zip(chosen, ig.baselines, completeness["per_prompt"], ig.token_ids(),
                                          ig.per_prompt()):
        examples.append({"prompt": pair.harmful, "harmless": pair.harmless, "baseline": kind,
                         "completeness_error": err, "tokens": [subject.tokenizer.decode([t]) for t in ids.tolist()],
                         "attributions": [float(a) for a in attr]})

    alpha, n_boot, seed = refusal_config.alpha, refusal_config.n_bootstrap, refusal_config.seed
    flow = study.attention_flow
    heads_exact = study.exact_heads.normalized.abs().reshape(-1).double().numpy()
    heads_flow = flow.mean.abs().reshape(-1).double().numpy()
    sal = gradients.neuron_saliency(subject, prompts, refusal_tokens, gradients.GradientSpec(batch_size=cfg.batch_size))
    # Identity: z = A V is linear in the pattern, so sum dM/dA * A over (query, key) equals
    # sum dM/dz * z: the attention-gradient flow and the head gradient x activation must agree.
    scale = float(flow.scores.abs().max()) + 1e-12
    torch.testing.assert_close(flow.scores, sal.head_grad_x_act, rtol=1e-3, atol=1e-3 * scale)
    neurons = [n for n in study.neurons.components if isinstance(n, Neuron)]
    sal_x = np.abs(np.array([float(sal.mean_neuron_grad_x_act[n.layer, n.index]) for n in neurons]))
    exact_n = np.abs(study.neurons.effect)
    head_gxa = sal.mean_head_grad_x_act.abs().reshape(-1).double().numpy()
    atp = study.atp.heads.reshape(-1).double().numpy()
    exact_heads = study.exact_heads.normalized.reshape(-1).double().numpy()
    pairs = {"atp": ("AtP (gradient x activation difference)", atp, exact_heads, "exact head patching"),
             "attention_flow": ("attention flow", heads_flow, heads_exact, "exact head patching (magnitudes)"),
             "head_grad_x_act": ("head gradient x activation", head_gxa, heads_exact,
                                 "exact head patching (magnitudes)"),
             "neuron_grad_x_act": ("neuron gradient x activation", sal_x, exact_n,
                                   "exact neuron patching (AtP top neurons, magnitudes)")}
    correlations, arrays = [], {"attention_flow": flow.mean.float()}
    for key, (name, x, y, versus) in pairs.items():
        est = stats.spearman_ci(x, y, n_boot=n_boot, seed=seed, alpha=alpha)
        correlations.append({"name": name, "key": key, "versus": versus, "estimate": est.to_dict()})
        arrays[f"scatter.{key}.x"], arrays[f"scatter.{key}.y"] = _t(x), _t(y)
    main = study.gradient_vs_patching  # what S1 is decided on: AtP on train vs exact on test, the candidates
    recorder.save("phase4/gradients", numbers={
        "ig": ig_record, "ig_completeness_error": completeness["max"], "ig_steps": cfg.ig_steps,
        "ig_examples": examples,
        "correlations": correlations, "gradient_r_bar": cfg.gradient_r, "met": bool(main.ci_low > cfg.gradient_r),
        "s1": {"estimate": main.to_dict(), "versus": "AtP on train pairs vs exact patching on test pairs",
               "n_candidates": len(study.candidates), "n_pairs_test": study.verified.n_pairs},
        "gradient_share": study.gradient_share.to_dict(), "k_components": len(study.h1_set),
        "gradient_share_split": "test", "n_pairs_test": study.gradient_share.n}, arrays=arrays)
    # Asserted after saving, so that a failing run's record shows the errors in the report.
    per_pair = [(kind, round(err, 4)) for kind, err in zip(ig.baselines, completeness["per_prompt"])]
    assert math.isfinite(completeness["max"]), "f(x) == f(x') for every IG pair: nothing to attribute"
    assert completeness["within_bar"], (
        f"integrated gradients are not complete: relative error max {completeness['max']:.3g}, median "
        f"{completeness['median']:.3g} > {completeness['bar']:.0%} (Sundararajan et al. 2017) at {cfg.ig_steps} "
        f"steps; per pair {per_pair}. Raise --refusal-ig-steps")


def _t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float32))
