"""Measurements the hypotheses are decided on: pure functions over a model and prompts.

Each function runs instruments on a handle and returns a frozen result; nothing here
writes files (fixtures record) and nothing decides (``hypotheses.decisions`` does).
Components are always *chosen* on train (or val) prompts and *evaluated* on test prompts.
The modules, in reading order:

- :mod:`~hypotheses.evidence.prompts`: the pairs' two sides, the refusal metric, and the
  positions the study patches and ablates;
- :mod:`~hypotheses.evidence.bootstrap`: the seeded bootstrap the intervals come from;
- :mod:`~hypotheses.evidence.refusal`: refusal as judged, and the behaviour to explain;
- :mod:`~hypotheses.evidence.ranking`: heads and neurons ranked by exact and attribution patching;
- :mod:`~hypotheses.evidence.conditions`: refusal with components ablated, and the side effects;
- :mod:`~hypotheses.evidence.circuit_faithfulness`: what a circuit keeps by itself.
"""

from hypotheses.evidence.bootstrap import boot_estimate, boot_index, normalized_with_ci, percentile
from hypotheses.evidence.circuit_faithfulness import Faithfulness, faithfulness, forced_overlap, matched_random_circuit
from hypotheses.evidence.conditions import (Condition, HarmlessReference, ablate_condition, ablation_spec,
                                            harmless_reference, relative_drop, side_effects)
from hypotheses.evidence.prompts import aligned, harmful, harmless, metric_for, patch_spec, positions_label, window
from hypotheses.evidence.ranking import (AtpScan, Ranking, atp_scan, head_patching, head_runs, rank_neurons,
                                         top_heads_of, verify)
from hypotheses.evidence.refusal import Behaviour, Hook, Judged, behaviour, judge

__all__ = ["AtpScan", "Behaviour", "Condition", "Faithfulness", "HarmlessReference", "Hook", "Judged", "Ranking",
           "ablate_condition", "ablation_spec", "aligned", "atp_scan", "behaviour", "boot_estimate", "boot_index",
           "faithfulness", "harmful", "harmless", "harmless_reference", "head_patching", "head_runs", "judge",
           "forced_overlap", "matched_random_circuit", "metric_for", "normalized_with_ci", "patch_spec", "percentile",
           "positions_label", "rank_neurons", "relative_drop", "side_effects", "top_heads_of", "verify", "window"]
