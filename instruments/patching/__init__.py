"""Activation patching, exact and attribution (AtP), batched over components.

Denoising runs the corrupted prompts with clean activations patched in (does a component
suffice to restore the clean behaviour?); noising runs the clean prompts with corrupted
ones (is it necessary for it?). The modules, in reading order:

- :mod:`~instruments.patching.spec`: how a sweep runs (:class:`PatchSpec`) and what it
  returns (:class:`PatchResult`), with the conventions for directions, positions and metrics;
- :mod:`~instruments.patching.sites`: where a patch goes, the encoded pairs, the cached
  unpatched runs and the splice;
- :mod:`~instruments.patching.prefix`: the prefix skip, each patched copy starting at its
  first patched layer;
- :mod:`~instruments.patching.core`: the generic core every exact sweep runs through;
- :mod:`~instruments.patching.sweeps`: the named sweeps, variants of the core;
- :mod:`~instruments.patching.attribution`: attribution patching and its exact check;
- :mod:`~instruments.patching.complement`: circuits in isolation.
"""

from instruments.patching.attribution import (AtpResult, TopKCheck, attribution_patch, rank_agreement, top_heads,
                                              verify_top_k)
from instruments.patching.complement import patch_complement
from instruments.patching.core import PatchRuns, head_runs, patch_components
from instruments.patching.sites import UnalignedPairsError
from instruments.patching.spec import DIRECTIONS, LAST_ONLY, Hook, Metric, PatchResult, PatchSpec
from instruments.patching.sweeps import (patch_attn_out, patch_heads, patch_heads_by_pos, patch_mlp_out, patch_neurons,
                                         patch_resid)

__all__ = ["DIRECTIONS", "LAST_ONLY", "AtpResult", "Hook", "Metric", "PatchResult", "PatchRuns", "PatchSpec",
           "TopKCheck", "UnalignedPairsError", "attribution_patch", "head_runs", "patch_attn_out", "patch_components",
           "patch_complement", "patch_heads", "patch_heads_by_pos", "patch_mlp_out", "patch_neurons", "patch_resid",
           "rank_agreement", "top_heads", "verify_top_k"]
