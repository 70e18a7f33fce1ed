"""Phase 5, mechanism: the refusal direction (Arditi et al. 2024, "Refusal in language models is
mediated by a single direction").

The modules, in reading order:

- :mod:`~instruments.direction.candidates`: candidate directions from train prompts, at
  every layer and post-instruction position, and the knobs of the search (:class:`DirectionSpec`);
- :mod:`~instruments.direction.selection`: the choice among them on validation prompts;
- :mod:`~instruments.direction.interventions`: directional ablation, steering and weight
  orthogonalization, all temporary.

SAFETY: nothing in this package writes weights to disk, exports them or hands back a
modified model outside a context; tests assert it, module by module.
"""

from instruments.direction.candidates import (CandidateDirections, DirectionError, DirectionSpec, Vector,
                                              candidate_directions, layer_projections, mean_difference,
                                              paired_first_pc, post_instruction_ids, resid_at, resid_names,
                                              searched_positions)
from instruments.direction.interventions import (OffloadedWeightsError, OrthogonalizedWeights, QuantizedWeightsError,
                                                 directional_ablation_hooks, directionally_ablated, orthogonalized,
                                                 orthogonalized_weights, steered, steering_hooks, swapped_weights)
from instruments.direction.selection import (CandidateScore, DirectionSelection, RowHooks, find_refusal_direction,
                                             pruned_layers, select_direction)

__all__ = ["CandidateDirections", "CandidateScore", "DirectionError", "DirectionSelection", "DirectionSpec",
           "OffloadedWeightsError", "OrthogonalizedWeights", "QuantizedWeightsError", "RowHooks", "Vector",
           "candidate_directions", "directional_ablation_hooks", "directionally_ablated", "find_refusal_direction",
           "layer_projections", "mean_difference", "orthogonalized", "orthogonalized_weights", "paired_first_pc",
           "post_instruction_ids", "pruned_layers", "resid_at", "resid_names", "searched_positions", "select_direction",
           "steered", "steering_hooks", "swapped_weights"]
