"""Direct effects: what each attention and MLP output adds to the metric through the unembedding alone.

Path patching to the logits (Wang et al. 2022; direct logit attribution, Elhage et al.
2021): a block's (source - base) output at the last position is added to the base run's
final residual there and read through the model's own final norm and unembedding; every
other component keeps its base value. The metric's change is the block's *direct* effect.
What a block causes through later components (its indirect effect) is left out, so a
detector whose feature later blocks turn into refusal has none: the direct effect sits
where the output is written, the stage the seed calls execution.

Only the last position has a direct path to the metric (the logits are read there), so
``spec.positions`` does not apply.
"""

from __future__ import annotations

from typing import Sequence

import torch

from instruments import progress
from instruments.components import AttnOut, MlpOut, ResidPost, hook_name
from instruments.handle import ModelHandle
from instruments.patching.sites import _cached_run, _encode_pairs, _evaluate
from instruments.patching.spec import Metric, PatchResult, PatchSpec, _base_and_source

BLOCKS = {"attn_out": AttnOut, "mlp_out": MlpOut}


@torch.no_grad()
def direct_effects(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                   spec: PatchSpec = PatchSpec()) -> tuple[PatchResult, PatchResult]:
    """Every layer's attention and MLP output's direct effect: ``(attn_out, mlp_out)``, each ``[layer, prompt]``.

    Two unpatched forward passes and one final norm + unembedding per block; the results
    read like :func:`instruments.patching.patch_attn_out` (``metric`` is the base run plus
    that block's direct path from the source).
    """
    layers = spec.resolve_layers(handle.n_layers)
    pairs = _encode_pairs(handle, clean_prompts, corrupted_prompts)
    final = hook_name(ResidPost(layer=handle.n_layers - 1))
    names = [final] + [hook_name(cls(layer=layer)) for cls in BLOCKS.values() for layer in layers]
    # only the last position is read, so only the last position is cached
    clean_logits, clean = _cached_run(handle, pairs.clean_ids, pairs.clean_mask, names, hooks=(),
                                      max_batch=spec.max_batch, positions=(-1,))
    corrupt_logits, corrupt = _cached_run(handle, pairs.corrupted_ids, pairs.corrupted_mask, names, hooks=(),
                                          max_batch=spec.max_batch, positions=(-1,))
    clean_m, corrupt_m = _evaluate(metric, clean_logits), _evaluate(metric, corrupt_logits)
    base_acts, source_acts = ({n: _base_and_source(spec.direction, clean[n][:, -1], corrupt[n][:, -1])[i]
                               for n in names} for i in (0, 1))
    out = []
    for kind, cls in BLOCKS.items():
        rows = []
        label = (f"direct effects of {kind}: "
                 f"{progress.count(len(layers), 'layer')} × {progress.count(pairs.n_prompts, 'pair')}")
        for layer in progress.track(layers, label, unit="layer", quiet=True):
            name = hook_name(cls(layer=layer))
            # under a --device-map the block's output and the final residual may sit on different devices
            resid = base_acts[final] + (source_acts[name] - base_acts[name]).to(base_acts[final].device)
            rows.append(_evaluate(metric, handle.bridge.unembed(handle.bridge.ln_final(resid)).float()))
        out.append(PatchResult(kind=f"{kind}_direct", direction=spec.direction, axes=("layer",), coords=(layers,),
                               metric=torch.stack(rows), kl=None, clean=clean_m, corrupted=corrupt_m,
                               positions=1))
    return out[0], out[1]
