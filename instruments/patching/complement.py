"""Circuits in isolation: every head and MLP neuron outside a circuit patched at once.

The faithfulness intervention of Wang et al. (2022) and Hanna et al. (2024), made with
the patching that finds the circuits (the same positions and directions);
:func:`patch_complement` says what each direction measures.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from instruments import progress
from instruments.components import Component, Head, Neuron, hook_name
from instruments.handle import ModelHandle
from instruments.patching.sites import _cached_run, _check_aligned, _chunks, _encode_pairs, _evaluate, _last_positions
from instruments.patching.spec import LAST_ONLY, Metric, PatchResult, PatchSpec


def _complement_splice(act: torch.Tensor, hook: Any, *, source: torch.Tensor, keep: torch.Tensor,
                       window: slice) -> torch.Tensor:
    # every unit of this hook outside the circuit takes the source's value inside the window
    out = act.clone()
    part = out[:, window]
    out[:, window] = torch.where(keep.to(act.device), part, source.to(device=act.device, dtype=act.dtype))
    return out


@torch.no_grad()
def patch_complement(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                     circuits: Sequence[Sequence[Component]], spec: PatchSpec = PatchSpec()) -> PatchResult:
    """Each circuit in isolation: every head and MLP neuron *outside* it patched, ``metric[circuit, prompt]``.

    The faithfulness intervention of Wang et al. (2022) and Hanna et al. (2024) with the
    patching that finds circuits: run the base prompts and give every head's ``z`` and every
    neuron not in the circuit the source prompt's activation, at the patched positions
    (``spec.positions``); the circuit's own components keep the base run's values. With
    ``direction="noising"`` (base = clean) a faithful circuit keeps the clean metric by
    itself; an empty circuit, with every head and neuron from the corrupted prompt, gives
    the corrupted run wherever the embeddings agree (e.g. the post-instruction template).
    Circuits may hold only :class:`Head` and :class:`Neuron` components.
    """
    pairs = _encode_pairs(handle, clean_prompts, corrupted_prompts)
    _check_aligned(pairs, spec)
    for circuit in circuits:
        bad = [c for c in circuit if not isinstance(c, (Head, Neuron))]
        if bad:
            raise TypeError(f"a circuit here holds heads and neurons only, got {bad[0]!r}")
    window = slice(None) if spec.positions is None else slice(pairs.length - spec.positions, None)
    layers = range(handle.n_layers)
    names = [hook_name(Head(layer=L, head=0)) for L in layers] + [hook_name(Neuron(layer=L, index=0)) for L in layers]
    base_ids, base_mask = pairs.base(spec.direction)
    source_ids, source_mask = pairs.source(spec.direction)
    # only the window is ever spliced, so only the window is cached
    source_last, source_acts = _cached_run(handle, source_ids, source_mask, names, hooks=(), max_batch=spec.max_batch,
                                           positions=_last_positions(spec.positions))
    base_last, _ = _cached_run(handle, base_ids, base_mask, [], hooks=(), max_batch=spec.max_batch)
    values = torch.empty(len(circuits), pairs.n_prompts)
    label = (f"circuits in isolation, {spec.direction}: {progress.count(len(circuits), 'circuit')} × "
            f"{progress.count(pairs.n_prompts, 'pair')}")
    for g, circuit in enumerate(progress.track(circuits, label, unit="circuit", quiet=True)):
        # per hook, which units the circuit keeps: a head's flag broadcasts over its d_head
        heads = {hook_name(Head(layer=L, head=0)): torch.zeros(handle.n_heads, 1, dtype=torch.bool) for L in layers}
        neurons = {hook_name(Neuron(layer=L, index=0)): torch.zeros(handle.d_mlp, dtype=torch.bool) for L in layers}
        for c in circuit:
            if isinstance(c, Head):
                heads[hook_name(c)][c.head] = True
            else:
                neurons[hook_name(c)][c.index] = True
        keep = {name: k.to(source_acts[name].device) for name, k in (heads | neurons).items()}
        for chunk in _chunks(pairs.n_prompts, spec.max_batch):
            bound = [(name, partial(_complement_splice, source=source_acts[name][chunk], keep=k, window=window))
                     for name, k in keep.items()]
            with handle.bridge.hooks(fwd_hooks=bound):
                logits = handle.bridge(base_ids[chunk], attention_mask=base_mask[chunk], **LAST_ONLY)
            values[g, chunk] = _evaluate(metric, logits[:, -1].float())
    clean_last, corrupted_last = (source_last, base_last) if spec.direction == "denoising" else (base_last, source_last)
    return PatchResult(kind="complement", direction=spec.direction, axes=("group",),
                       coords=(tuple(range(len(circuits))),), metric=values, kl=None,
                       clean=_evaluate(metric, clean_last), corrupted=_evaluate(metric, corrupted_last),
                       positions=spec.positions)
