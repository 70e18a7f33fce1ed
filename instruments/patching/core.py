"""Exact patching's generic core: every group of sites patched into every base prompt, batched.

Batching is the point of this module. TransformerLens's ``generic_activation_patch`` runs
one forward pass per component; here a sweep over G components and P prompt pairs is
G * P *patched copies* of the base prompts, chunked ``max_batch`` copies per forward
pass (:func:`_patched_runs`, in the order and from the start layers of the prefix skip's
plan, :mod:`instruments.patching.prefix`). The two unpatched runs (:class:`PatchRuns`)
give both baselines and the activations spliced in, cached once per sweep, or once for a
sweep split into several calls (:func:`head_runs`).

:func:`_patch` is the one core every exact sweep runs through: a sweep is the result's
kind, its component axes and coordinates, and the groups of sites of its patched copies
(the named sweeps are in :mod:`instruments.patching.sweeps`); :func:`patch_components`
runs it on groups the caller names.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.components import Component, Head, hook_name
from instruments.handle import ModelHandle
from instruments.metrics import kl_divergence
from instruments.patching.prefix import _inject, _layers_from, _Plan, _plan, _resid_name
from instruments.patching.sites import (_cached_run, _check_aligned, _encode_pairs, _evaluate, _last_positions, _Pairs,
                                        _patch_hooks, _Site, _site)
from instruments.patching.spec import LAST_ONLY, Hook, Metric, PatchResult, PatchSpec


@torch.no_grad()
def _patched_runs(handle: ModelHandle, pairs: _Pairs, groups: Sequence[tuple[_Site, ...]], metric: Metric,
                  spec: PatchSpec, plan: _Plan, source_acts: dict[str, torch.Tensor], base_acts: dict[str, torch.Tensor],
                  clean_last: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The metric (and KL from clean) of every group patched into every base prompt: [group, prompt].

    Copy k is group k // P on prompt k % P; copies go through the model ``max_batch`` at a
    time, in ``plan`` order, each chunk from its start layer (``base_acts`` holds the base
    run's residual entering each start layer).
    """
    n_prompts = pairs.n_prompts
    base_ids, base_mask = pairs.base(spec.direction)
    n_copies = len(groups) * n_prompts
    values = torch.empty(n_copies)
    kls = torch.empty(n_copies) if clean_last is not None else None
    label = (f"exact patching, {spec.direction}: {progress.count(len(groups), 'patch')} × "
            f"{progress.count(n_prompts, 'pair')}")
    for chunk, start in progress.track(plan.chunks, label, unit="batch", quiet=True):
        copies = plan.order[chunk]
        prompt_idx = (copies % n_prompts).to(base_ids.device)
        chunk_groups = [groups[k // n_prompts] for k in copies.tolist()]
        # the injected residual first, then corruption hooks, so a patch at the same hook point overrides them
        resid = None if start == 0 else base_acts[_resid_name(start)]
        hooks = [] if resid is None else [(_resid_name(start),
                                           partial(_inject, resid=resid[prompt_idx.to(resid.device)]))]
        hooks += [*plan.base_hooks[start], *_patch_hooks(source_acts, chunk_groups, prompt_idx, spec.positions,
                                                         length=pairs.length)]
        with handle.bridge.hooks(fwd_hooks=hooks), _layers_from(plan.stack, start):
            logits = handle.bridge(base_ids[prompt_idx], attention_mask=base_mask[prompt_idx], **LAST_ONLY)
        last = logits[:, -1].float()
        values[copies] = _evaluate(metric, last)
        if kls is not None:
            kls[copies] = kl_divergence(clean_last[prompt_idx], last).cpu()
    shape = (len(groups), n_prompts)
    return values.view(shape), None if kls is None else kls.view(shape)


@dataclass(frozen=True, kw_only=True, eq=False)
class PatchRuns:
    """The two unpatched runs a sweep starts from: both baselines and the activations it splices.

    A sweep computes them itself; a caller that sweeps the same prompts in several calls
    (a per-layer, checkpointed head sweep) makes them once with :func:`head_runs` and
    passes them in, so each call runs only its patched copies. The numbers are the same
    either way: a forward with more cached hook points computes the same activations.
    """

    clean_prompts: tuple[str, ...]
    corrupted_prompts: tuple[str, ...]
    direction: str
    corrupt_hooks: tuple[Hook, ...]
    pairs: _Pairs
    clean_last: Float[torch.Tensor, "prompt vocab"]
    corrupted_last: Float[torch.Tensor, "prompt vocab"]
    clean_acts: dict[str, torch.Tensor]  # each [prompt, pos, ...]
    corrupted_acts: dict[str, torch.Tensor]
    # the source activations hold the last N positions, the patched ones (None: every position)
    positions: int | None = None

    @property
    def source_acts(self) -> dict[str, torch.Tensor]:
        return self.clean_acts if self.direction == "denoising" else self.corrupted_acts

    @property
    def base_acts(self) -> dict[str, torch.Tensor]:
        return self.corrupted_acts if self.direction == "denoising" else self.clean_acts

    def check(self, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], spec: PatchSpec,
              source_names: Sequence[str], base_names: Sequence[str]) -> None:
        """Refuse to serve a sweep these runs were not made for (other prompts, direction or hooks)."""
        if (tuple(clean_prompts), tuple(corrupted_prompts)) != (self.clean_prompts, self.corrupted_prompts):
            raise ValueError("these PatchRuns were made for other prompts; make them with the sweep's own prompts")
        if (spec.direction, spec.corrupt_hooks) != (self.direction, self.corrupt_hooks):
            raise ValueError(f"these PatchRuns were made for direction {self.direction!r} and other corrupt_hooks "
                             f"than the spec's ({spec.direction!r}); make them with the same PatchSpec")
        if self.positions is not None and spec.positions != self.positions:
            raise ValueError(f"these PatchRuns hold the last {self.positions} positions only, the spec patches "
                             f"positions={spec.positions}; make them with the same PatchSpec")
        missing = sorted({*source_names} - set(self.source_acts) | {*base_names} - set(self.base_acts))
        if missing:
            raise ValueError(f"these PatchRuns hold no activations at {missing[:4]}; make them with those hook points")


def _unpatched_runs(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], pairs: _Pairs,
                    spec: PatchSpec, *, source_names: Sequence[str], base_names: Sequence[str]) -> PatchRuns:
    # the source run's activations to splice (only the patched positions) and the base run's residuals
    # to start from (every position); both runs give the baselines (and clean the KL reference)
    denoising = spec.direction == "denoising"
    window = _last_positions(spec.positions)
    clean_last, clean_acts = _cached_run(handle, pairs.clean_ids, pairs.clean_mask,
                                         source_names if denoising else base_names,
                                         hooks=(), max_batch=spec.max_batch, positions=window if denoising else None)
    corrupted_last, corrupted_acts = _cached_run(handle, pairs.corrupted_ids, pairs.corrupted_mask,
                                                 base_names if denoising else source_names,
                                                 hooks=spec.corrupt_hooks, max_batch=spec.max_batch,
                                                 positions=None if denoising else window)
    return PatchRuns(clean_prompts=tuple(clean_prompts), corrupted_prompts=tuple(corrupted_prompts),
                     direction=spec.direction, corrupt_hooks=spec.corrupt_hooks, pairs=pairs, clean_last=clean_last,
                     corrupted_last=corrupted_last, clean_acts=clean_acts, corrupted_acts=corrupted_acts,
                     positions=spec.positions)


def head_runs(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str],
              spec: PatchSpec = PatchSpec()) -> PatchRuns:
    """The unpatched runs for :func:`patch_heads` calls over any of ``spec``'s layers (None: all).

    Holds every swept layer's ``z`` from the source run (at the patched positions only, with
    ``spec.positions``) and the base run's residual entering each of them (for the prefix
    skip): for SmolLM2 and 12 pairs, 40 MB at every position. A per-layer sweep
    that remakes them in every call spends a third of its compute on them on a CPU.
    """
    layers = spec.resolve_layers(handle.n_layers)
    pairs = _encode_pairs(handle, clean_prompts, corrupted_prompts)
    return _unpatched_runs(handle, clean_prompts, corrupted_prompts, pairs, spec,
                           source_names=[hook_name(Head(layer=layer, head=0)) for layer in layers],
                           base_names=[_resid_name(layer) for layer in layers if layer > 0])


def _patch(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
           spec: PatchSpec, *, kind: str, axes: tuple[str, ...], coords: Sequence[Sequence[int]],
           groups: Callable[[_Pairs], Sequence[tuple[_Site, ...]]], runs: PatchRuns | None = None) -> PatchResult:
    """Cache the source once (or take ``runs``), run every group patched into every base prompt, shape the result.

    ``groups`` is built from the encoded pairs (position-resolved sweeps need the padded
    length); its order is the row-major order of ``coords``.
    """
    pairs = runs.pairs if runs is not None else _encode_pairs(handle, clean_prompts, corrupted_prompts)
    _check_aligned(pairs, spec)
    sites = groups(pairs)
    plan = _plan(handle, pairs, sites, spec)
    names = sorted({site.hook for group in sites for site in group})
    # the base run's residual entering each layer a chunk starts at (prefix skip)
    resid_names = [_resid_name(start) for start in plan.starts]
    if runs is None:
        runs = _unpatched_runs(handle, clean_prompts, corrupted_prompts, pairs, spec, source_names=names,
                               base_names=resid_names)
    else:
        runs.check(clean_prompts, corrupted_prompts, spec, names, resid_names)
    values, kls = _patched_runs(handle, pairs, sites, metric, spec, plan, runs.source_acts, runs.base_acts,
                                runs.clean_last if spec.kl else None)
    coords = tuple(tuple(int(c) for c in coord) for coord in coords)
    shape = tuple(len(c) for c in coords) + (pairs.n_prompts,)
    return PatchResult(kind=kind, direction=spec.direction, axes=axes, coords=coords, metric=values.view(shape),
                       kl=None if kls is None else kls.view(shape), clean=_evaluate(metric, runs.clean_last),
                       corrupted=_evaluate(metric, runs.corrupted_last), positions=spec.positions)


def patch_components(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                     groups: Sequence[Component | Sequence[Component]],
                     spec: PatchSpec = PatchSpec()) -> PatchResult:
    """Patch each group of components *together* (one run per group and prompt): ``[group, prompt]``.

    A group is one component or several (e.g. a candidate circuit). ``Resid(pos=...)``
    positions index the common padded length; use negative positions (from the end).
    ``spec.layers`` does not apply: the components name their layers.
    """
    sites = tuple(tuple(_site(c) for c in ((g,) if not isinstance(g, (list, tuple)) else g)) for g in groups)
    if not sites or any(not group for group in sites):
        raise ValueError("need at least one group, and no empty group")
    return _patch(handle, clean_prompts, corrupted_prompts, metric, spec, kind="components", axes=("group",),
                  coords=(range(len(sites)),), groups=lambda pairs: sites)
