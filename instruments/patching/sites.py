"""Where a patch goes and what it splices: sites, the encoded pairs, the unpatched runs, the splice.

A :class:`_Site` is one patched slice of one hook's activation; a sweep is a list of
groups of sites, one group per patched copy of the base prompts. Clean and corrupted
prompts are encoded together (:class:`_Pairs`), so they share one padded length. The
source activations are cached once (:func:`_cached_run`), and one hook per hook point
splices, for each copy, its own component's slice of them (:func:`_patch_hooks`:
``torch.where`` over a per-copy boolean mask, so the activation the model hands us is
never edited in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int

from instruments import progress
from instruments.components import AttnOut, Component, Head, MlpOut, Neuron, Resid, hook_name, layer_of
from instruments.handle import ModelHandle
from instruments.patching.spec import LAST_ONLY, Hook, Metric, PatchSpec


# ----------------------------------------------------------------------------- sites and inputs

@dataclass(frozen=True, kw_only=True)
class _Site:
    """One patched slice of one hook's activation ``[batch, pos, *rest]``.

    ``pos`` indexes the common-length position axis (negative: from the end; None: all);
    ``index`` the first axis of ``rest`` (the head of ``hook_z``, the neuron of
    ``mlp.hook_post``; None: the whole vector).
    """

    hook: str
    pos: int | None = None
    index: int | None = None

    def where(self, copy: int) -> tuple[Any, ...]:
        key: tuple[Any, ...] = (copy, slice(None) if self.pos is None else self.pos)
        return key if self.index is None else key + (self.index,)

    @property
    def layer(self) -> int | None:
        """The block this hook point belongs to (None: not inside a block)."""
        return layer_of(self.hook)


def _site(component: Component) -> _Site:
    name = hook_name(component)  # the one place that knows hook names; rejects non-components
    if isinstance(component, Resid):
        return _Site(hook=name, pos=component.pos)
    if isinstance(component, (AttnOut, MlpOut)):
        return _Site(hook=name)
    if isinstance(component, Head):
        return _Site(hook=name, index=component.head)
    if isinstance(component, Neuron):
        return _Site(hook=name, index=component.index)
    raise TypeError(f"{component!r} cannot be patched (a Direction is a subspace, not an activation)")


@dataclass(frozen=True, kw_only=True)
class _Pairs:
    """Clean and corrupted prompts encoded together, so they share one padded length."""

    clean_ids: Int[torch.Tensor, "prompt pos"]
    clean_mask: Int[torch.Tensor, "prompt pos"]
    corrupted_ids: Int[torch.Tensor, "prompt pos"]
    corrupted_mask: Int[torch.Tensor, "prompt pos"]

    @property
    def n_prompts(self) -> int:
        return self.clean_ids.shape[0]

    @property
    def length(self) -> int:
        return self.clean_ids.shape[1]

    def base(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        if direction == "denoising":
            return self.corrupted_ids, self.corrupted_mask
        return self.clean_ids, self.clean_mask

    def source(self, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
        if direction == "denoising":
            return self.clean_ids, self.clean_mask
        return self.corrupted_ids, self.corrupted_mask


class UnalignedPairsError(ValueError):
    """An every-position patch was asked for on pairs whose positions do not correspond."""


def _check_aligned(pairs: _Pairs, spec: PatchSpec) -> None:
    if spec.positions is not None:
        if spec.positions > pairs.length:
            raise ValueError(f"positions={spec.positions} exceeds the padded prompt length {pairs.length}")
        return
    if spec.allow_unaligned:
        return
    a, b = pairs.clean_mask.sum(1), pairs.corrupted_mask.sum(1)
    bad = [i for i in range(pairs.n_prompts) if int(a[i]) != int(b[i])]
    if bad:
        i = bad[0]
        raise UnalignedPairsError(
            f"{len(bad)} of {pairs.n_prompts} pairs differ in token length (pair {i}: {int(a[i])} vs {int(b[i])} "
            "tokens), so an every-position patch would splice activations into positions that do not correspond; "
            "patch the post-instruction positions (PatchSpec(positions=post_instruction_length(handle))) or use "
            "pairs of equal token length (instruments.positions.same_length)")


def _encode_pairs(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str]) -> _Pairs:
    if isinstance(clean_prompts, str) or isinstance(corrupted_prompts, str):
        raise TypeError("clean_prompts and corrupted_prompts are sequences of prompts, not strings")
    if len(clean_prompts) != len(corrupted_prompts) or not clean_prompts:
        raise ValueError(f"need equal, non-zero numbers of clean and corrupted prompts (paired), got "
                         f"{len(clean_prompts)} and {len(corrupted_prompts)}")
    n = len(clean_prompts)
    ids, mask = handle.encode(list(clean_prompts) + list(corrupted_prompts))
    return _Pairs(clean_ids=ids[:n], clean_mask=mask[:n], corrupted_ids=ids[n:], corrupted_mask=mask[n:])


def _positions(n_positions: int, length: int) -> tuple[int, ...]:
    if not 1 <= n_positions <= length:
        raise ValueError(f"n_positions must be in 1..{length} (the padded prompt length), got {n_positions}")
    return tuple(range(-n_positions, 0))  # left to right, ending at the last token


# ----------------------------------------------------------------------------- forward passes

def _chunks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _evaluate(metric: Metric, last: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(metric(last))
    if values.shape != (last.shape[0],):
        raise ValueError(f"metric must return one value per prompt, shape ({last.shape[0]},); "
                         f"got {tuple(values.shape)}")
    return values.detach().float().cpu()


def _last_positions(positions: int | None) -> tuple[int, ...] | None:
    """The last ``positions`` positions as offsets from the end (None: every position)."""
    return None if positions is None else tuple(range(-positions, 0))


@torch.no_grad()
def _cached_run(handle: ModelHandle, ids: torch.Tensor, mask: torch.Tensor, names: Sequence[str], *,
                hooks: Sequence[Hook], max_batch: int,
                positions: Sequence[int] | None = None) -> tuple[Float[torch.Tensor, "prompt vocab"],
                                                                 dict[str, torch.Tensor]]:
    """Last-position logits and the named activations of one unpatched run (chunked).

    ``positions`` (offsets from the end, e.g. :func:`_last_positions`): keep only these positions of
    each activation, ``[prompt, len(positions), ...]``, sliced as the hook caches it, so the
    full ``[prompt, pos, ...]`` activations are never held (None: every position).
    """
    lasts: list[torch.Tensor] = []
    acts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    label = f"unpatched run: {progress.count(ids.shape[0], 'prompt')}"
    # caches hold only the hook names and positions their caller reads
    kept = {} if positions is None else {"pos_slice": list(positions)}
    for chunk in progress.track(_chunks(ids.shape[0], max_batch), label, unit="batch", quiet=True):
        with handle.bridge.hooks(fwd_hooks=list(hooks)):
            logits, cache = handle.bridge.run_with_cache(ids[chunk], attention_mask=mask[chunk],
                                                         names_filter=list(names), **kept, **LAST_ONLY)
        lasts.append(logits[:, -1].float())
        for name in names:
            acts[name].append(cache[name])
    return torch.cat(lasts), {name: torch.cat(parts) for name, parts in acts.items()}


def _splice(act: torch.Tensor, hook: Any, *, source: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    # torch.where builds a new tensor, so the activation the model passed in stays untouched; the source
    # was cached where this hook point ran, which under a --device-map is not always this forward's device
    select, source = select.to(act.device), source.to(device=act.device, dtype=act.dtype)
    held = source.shape[1]
    if held == act.shape[1]:
        return torch.where(select, source, act)
    # a source of the last ``held`` positions (the patched window): the positions before it keep their values
    return torch.cat([act[:, :-held], torch.where(select, source, act[:, -held:])], dim=1)


def _in_window(site: _Site, length: int, held: int) -> _Site | None:
    """The site in a source that holds the last ``held`` of ``length`` positions (None: it lies before them)."""
    if site.pos is None or held == length:
        return site
    if not -length <= site.pos < length:
        raise IndexError(f"position {site.pos} is out of range for prompts of {length} tokens")
    pos = site.pos - length if site.pos >= 0 else site.pos
    return None if pos < -held else _Site(hook=site.hook, pos=pos, index=site.index)


def _patch_hooks(source_acts: dict[str, torch.Tensor], groups: Sequence[tuple[_Site, ...]],
                 prompt_idx: torch.Tensor, positions: int | None = None, *, length: int | None = None) -> list[Hook]:
    """One splicing hook per hook point touched by this chunk's copies.

    Copy b patches the sites of ``groups[b]`` with prompt ``prompt_idx[b]``'s source
    activations; a copy with no site at some hook keeps its own activation there.
    ``positions=N``: nothing before the last N positions is patched. A source holding
    fewer than ``length`` (the padded prompt length) positions holds the last ones.
    """
    by_hook: dict[str, list[tuple[int, _Site]]] = {}
    for copy, group in enumerate(groups):
        for site in group:
            by_hook.setdefault(site.hook, []).append((copy, site))
    hooks: list[Hook] = []
    for name, entries in by_hook.items():
        source = source_acts[name][prompt_idx.to(source_acts[name].device)]
        select = torch.zeros(source.shape, dtype=torch.bool, device=source.device)
        for copy, site in entries:
            placed = site if length is None else _in_window(site, length, source.shape[1])
            if placed is not None:
                select[placed.where(copy)] = True
        if positions is not None:
            select[:, : select.shape[1] - positions] = False
        hooks.append((name, partial(_splice, source=source, select=select)))
    return hooks
