"""Phase 4, verification: zero, mean and resample ablation of heads, neurons, layers and directions.

The modules, in reading order:

- :mod:`~instruments.ablation.hooks`: what an ablation writes where, the reference
  activations it writes from, and the hooks that do it;
- :mod:`~instruments.ablation.effect`: what an ablation does to refusal and to capability.

Nothing in this package modifies or exports model weights.
"""

from instruments.ablation.effect import (AblationEffect, AnswerScores, ablation_effect, answer_cross_entropy,
                                         answer_scores)
from instruments.ablation.hooks import (METHODS, AblationError, AblationSpec, Edit, Hook, ReferenceActivations,
                                        ablated, ablation_hooks, direction_sites, hook_points, reference_activations,
                                        resample_rows)

__all__ = ["METHODS", "AblationEffect", "AblationError", "AblationSpec", "AnswerScores", "Edit", "Hook",
           "ReferenceActivations", "ablated", "ablation_effect", "ablation_hooks", "answer_cross_entropy",
           "answer_scores", "direction_sites", "hook_points", "reference_activations", "resample_rows"]
