"""Gradient attributions of the refusal score, for comparison with patching and ablation.

Three instruments, all differentiating a scalar metric of the last position's logits
(default: :func:`instruments.metrics.refusal_score`). The modules, in reading order:

- :mod:`~instruments.gradients.backward`: the one forward and backward pass they share,
  rooted at a leaf copy of the token embeddings, and activation checkpointing;
- :mod:`~instruments.gradients.integrated`: :func:`integrated_gradients`, each input
  token's contribution relative to a baseline input (Sundararajan et al. 2017);
- :mod:`~instruments.gradients.saliency`: :func:`attention_gradient_flow` and
  :func:`neuron_saliency`, gradient x activation per head and per MLP neuron.
"""

from instruments.gradients.backward import Metric, Reducer, activation_checkpointing, refusal_metric
from instruments.gradients.integrated import (COMPLETENESS_BAR, Baseline, IGSpec, IntegratedGradients, content_mask,
                                              integrated_gradients, quadrature)
from instruments.gradients.saliency import (AttentionFlow, GradientSpec, Saliency, attention_gradient_flow,
                                            neuron_saliency)

__all__ = ["COMPLETENESS_BAR", "AttentionFlow", "Baseline", "GradientSpec", "IGSpec", "IntegratedGradients", "Metric",
           "Reducer", "Saliency", "activation_checkpointing", "attention_gradient_flow", "content_mask",
           "integrated_gradients", "neuron_saliency", "quadrature", "refusal_metric"]
