"""Phase 4.2, gradient attribution and its agreement with patching.

Integrated gradients from the refusal score to the input tokens (with its completeness
error), gradient x attention pattern per head, and gradient x activation per MLP neuron,
each rank-correlated (Spearman, bootstrap CI) with the patching effects of the same
components. The seed's cross-validation bar (r > 0.7) is decided in test_criteria (S1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypotheses.evidence import harmful
from instruments import gradients, stats
from instruments.components import Neuron

pytestmark = [pytest.mark.phase4, pytest.mark.integration]

N_IG_PROMPTS = 4


def test_gradient_attribution(subject, study, recorder, refusal_tokens, refusal_config):
    cfg = study.cfg
    prompts = harmful(study.train_pairs)
    ig = gradients.integrated_gradients(subject, prompts[:N_IG_PROMPTS], refusal_tokens,
                                        gradients.IGSpec(steps=cfg.ig_steps, batch_size=cfg.batch_size))
    # Completeness: attributions sum to f(x) - f(baseline) up to the quadrature error, which is
    # recorded (the report prints it next to the attributions) rather than asserted: on a
    # 30-layer model the path from the zero embedding is far from linear, and 32 steps leave
    # 10-50% (measured on the organism); --refusal-ig-steps buys accuracy with time. The
    # identity itself is asserted on `tiny` (tests/test_gradients.py).
    errors = ig.completeness_error[~ig.completeness_error.isnan()]
    relative = float(errors.abs().max()) if errors.numel() else 0.0
    assert torch.isfinite(ig.attributions).all(), "integrated gradients produced non-finite attributions"
    assert (ig.completeness_abs >= 0).all()
    examples = []
    for prompt, ids, attr in zip(prompts[:N_IG_PROMPTS], ig.token_ids(), ig.per_prompt()):
        examples.append({"prompt": prompt, "tokens": [subject.tokenizer.decode([t]) for t in ids.tolist()],
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
    main = study.gradient_vs_patching  # what S1 is decided on: AtP vs exact heads
    assert abs(main.value - correlations[0]["estimate"]["value"]) < 1e-9
    recorder.save("phase4/gradients", numbers={
        "ig_completeness_error": relative, "ig_steps": cfg.ig_steps, "ig_examples": examples,
        "correlations": correlations, "gradient_r_bar": cfg.gradient_r, "met": bool(main.ci_low > cfg.gradient_r),
        "gradient_share_top_heads": study.gradient_share.to_dict(), "k_heads": study.k_h1}, arrays=arrays)


def _t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float32))
