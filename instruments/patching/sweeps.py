"""The named exact sweeps, each a variant of the generic core (:mod:`instruments.patching.core`).

A variant is data for the core: the result's kind, its component axes and coordinates,
and the groups of sites of its patched copies, in the row-major order of the coordinates.
Every query head (also at each of the last positions), the residual stream entering each
layer at each of the last positions, each layer's attention and MLP output, and MLP
neurons.
"""

from __future__ import annotations

from typing import Sequence

from instruments.components import AttnOut, Head, MlpOut, Neuron, Resid, hook_name
from instruments.handle import ModelHandle
from instruments.patching.core import PatchRuns, _patch
from instruments.patching.sites import _Pairs, _positions, _Site, _site
from instruments.patching.spec import Metric, PatchResult, PatchSpec


def patch_heads(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                spec: PatchSpec = PatchSpec(), *, runs: PatchRuns | None = None) -> PatchResult:
    """Every query head's ``z`` at all positions: ``metric[layer, head, prompt]``.

    ``runs``: the unpatched runs from :func:`head_runs` on the same prompts and spec (for a
    sweep split into several calls); by default this call makes its own.
    """
    layers, heads = spec.resolve_layers(handle.n_layers), range(handle.n_heads)
    return _patch(handle, clean_prompts, corrupted_prompts, metric, spec, kind="heads", axes=("layer", "head"),
                  coords=(layers, heads),
                  groups=lambda pairs: [(_site(Head(layer=layer, head=h)),) for layer in layers for h in heads],
                  runs=runs)


def patch_heads_by_pos(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str],
                       metric: Metric, spec: PatchSpec = PatchSpec(), *, n_positions: int = 8) -> PatchResult:
    """Every head at each of the last ``n_positions`` tokens: ``metric[layer, pos, head, prompt]``.

    ``pos`` coordinates run -n_positions .. -1 (from the end of the left-padded prompts).
    """
    layers, heads = spec.resolve_layers(handle.n_layers), range(handle.n_heads)

    def groups(pairs: _Pairs) -> list[tuple[_Site, ...]]:
        return [(_Site(hook=hook_name(Head(layer=layer, head=h)), pos=pos, index=h),)
                for layer in layers for pos in _positions(n_positions, pairs.length) for h in heads]

    return _patch(handle, clean_prompts, corrupted_prompts, metric, spec, kind="heads_by_pos",
                  axes=("layer", "pos", "head"), coords=(layers, range(-n_positions, 0), heads), groups=groups)


def patch_resid(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                spec: PatchSpec = PatchSpec(), *, n_positions: int = 8) -> PatchResult:
    """The residual stream entering each layer at each of the last tokens: ``metric[layer, pos, prompt]``."""
    layers = spec.resolve_layers(handle.n_layers)

    def groups(pairs: _Pairs) -> list[tuple[_Site, ...]]:
        return [(_site(Resid(layer=layer, pos=pos)),)
                for layer in layers for pos in _positions(n_positions, pairs.length)]

    return _patch(handle, clean_prompts, corrupted_prompts, metric, spec, kind="resid", axes=("layer", "pos"),
                  coords=(layers, range(-n_positions, 0)), groups=groups)


def _patch_block_out(handle: ModelHandle, clean_prompts, corrupted_prompts, metric, spec: PatchSpec, *, cls: type,
                     kind: str) -> PatchResult:
    layers = spec.resolve_layers(handle.n_layers)
    return _patch(handle, clean_prompts, corrupted_prompts, metric, spec, kind=kind, axes=("layer",),
                  coords=(layers,), groups=lambda pairs: [(_site(cls(layer=layer)),) for layer in layers])


def patch_attn_out(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                   spec: PatchSpec = PatchSpec()) -> PatchResult:
    """Each layer's attention output at all positions: ``metric[layer, prompt]``."""
    return _patch_block_out(handle, clean_prompts, corrupted_prompts, metric, spec, cls=AttnOut, kind="attn_out")


def patch_mlp_out(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                  spec: PatchSpec = PatchSpec()) -> PatchResult:
    """Each layer's MLP output at all positions: ``metric[layer, prompt]``."""
    return _patch_block_out(handle, clean_prompts, corrupted_prompts, metric, spec, cls=MlpOut, kind="mlp_out")


def patch_neurons(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                  spec: PatchSpec = PatchSpec(), *, neurons: Sequence[int] | None = None) -> PatchResult:
    """MLP neurons (``mlp.hook_post``) at all positions: ``metric[layer, neuron, prompt]``.

    All ``d_mlp`` neurons of every layer exactly is n_layers * d_mlp * P copies (1.4M
    forward rows for SmolLM2 and 30 pairs): pass a subset in ``neurons`` (the same indices
    in each layer), e.g. the AtP top neurons, or use :func:`attribution_patch`.
    """
    layers = spec.resolve_layers(handle.n_layers)
    indices = tuple(range(handle.d_mlp)) if neurons is None else tuple(int(n) for n in neurons)
    if not indices or any(not 0 <= n < handle.d_mlp for n in indices):
        raise ValueError(f"neurons must be a non-empty subset of 0..{handle.d_mlp - 1}")
    return _patch(handle, clean_prompts, corrupted_prompts, metric, spec, kind="neurons", axes=("layer", "neuron"),
                  coords=(layers, indices),
                  groups=lambda pairs: [(_site(Neuron(layer=layer, index=n)),) for layer in layers for n in indices])
