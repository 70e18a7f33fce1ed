"""The prefix skip: each patched copy's forward starts at the layer of its earliest patched site.

``PatchSpec.skip_prefix``, on by default on the CPU. A patched copy whose earliest
patched site is in layer L computes layers 0..L-1 exactly as the unpatched base run
does: nothing upstream of its first patched site differs from the base run, and every
prompt is its own row (attention mixes positions, never batch rows). So its forward can
start at layer L from the base run's residual stream ``blocks.L.hook_resid_pre``, cached
once in the base run's own ``run_with_cache`` (the run the baselines come from anyway).
Copies are grouped by their start layer and chunked within each group, so every forward
starts at one layer (a chunk mixing layers would have to start all its copies at the
lowest; the price is up to one partly filled chunk per start layer). A sweep over all
layers thus runs about half of the layer-rows of the full forwards, a late-layer sweep
almost none, a layer-0 sweep all of them.

TransformerBridge's own ``start_at_layer`` still executes blocks 0..L-1, so the skip is
done here: for the duration of one forward, the HF model's layer list
(``hf_model.model.layers``, a ``ModuleList`` of the bridge's own ``BlockBridge`` modules)
is replaced by a ``ModuleList`` of ``layers[L:]`` and restored in a ``finally``.
Everything else in the HF forward is untouched: the token embedding still runs (its
output is discarded), and rotary position embeddings and the causal and padding mask are
computed from the position ids and the attention mask, independent of the layers. The
first hook at ``blocks.L.hook_resid_pre`` (the hook point at block L's input) swaps the
incoming hidden states for the cached residual -- the same place the bridge's
``start_at_layer`` injects -- and a ``Resid(layer=L)`` patch, registered after it, then
splices into the injected value. Hook points are the block modules' own, so
``blocks.{i}...`` hooks fire on the right layers; a layer's ``layer_idx`` only addresses
its slot of the KV cache, which starts empty in every forward here. Base-run hooks
(``corrupt_hooks``) whose effect is already in the cached residual are dropped: those in
blocks < L never fire, and one at ``blocks.L.hook_resid_pre`` itself is left out (the
cache was taken after it).

The skip is used only where it verifiably applies: the HF model must hold the bridge's
blocks as a plain ``ModuleList`` at ``.model.layers``, and, once per model, a probe
checks that a skipped forward reproduces the full forward's logits; otherwise (or with
``corrupt_hooks`` given as name filters rather than names) every copy runs the full
forward, exactly as with ``skip_prefix=False``.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

import torch

from instruments.components import Resid, hook_name, layer_of
from instruments.handle import ModelHandle
from instruments.patching.sites import _chunks, _Pairs, _Site
from instruments.patching.spec import LAST_ONLY, Hook, PatchSpec


def _resid_name(layer: int) -> str:
    return hook_name(Resid(layer=layer))


def _start_layer(group: tuple[_Site, ...]) -> int:
    """The earliest layer a group patches: its copies run the base run's layers before it."""
    layers = [site.layer for site in group]
    return 0 if any(layer is None for layer in layers) else min(layers)  # type: ignore[type-var]


def _layer_stack(handle: ModelHandle) -> Any | None:
    """The HF module whose ``layers`` ModuleList holds the bridge's blocks in order (None: no skip).

    The layer loop of e.g. ``LlamaModel.forward`` iterates ``self.layers[:num_hidden_layers]``;
    a shorter list there runs only the blocks it holds.
    """
    stack = getattr(handle.hf_model, "model", None)
    layers = getattr(stack, "layers", None)
    blocks = getattr(handle.bridge, "blocks", None)
    if type(layers) is not torch.nn.ModuleList or blocks is None:
        return None
    if len(layers) != handle.n_layers or len(blocks) != len(layers):
        return None
    if any(layer is not block for layer, block in zip(layers, blocks)):
        return None
    return stack


@contextmanager
def _layers_from(stack: Any, start: int) -> Iterator[None]:
    """Run only ``layers[start:]`` inside the block; the original ModuleList is always restored."""
    if start == 0:
        yield
        return
    full = stack.layers
    stack.layers = torch.nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        stack.layers = full


def _inject(act: torch.Tensor, hook: Any, *, resid: torch.Tensor) -> torch.Tensor:
    # The hidden states arriving at the start block are whatever the (skipped) prefix left
    # there, i.e. the token embeddings; replace them with the base run's residual.
    return resid.to(device=act.device, dtype=act.dtype)


def _hooks_after(handle: ModelHandle, hooks: Sequence[Hook], start: int) -> list[Hook] | None:
    """Base-run hooks for a forward starting at block ``start`` (None: cannot tell, do not skip).

    Hooks in blocks before ``start`` never fire there, and one at ``start``'s input hook
    point has already acted on the cached residual that is injected; the others stay.
    """
    if start == 0:
        return list(hooks)
    kept = []
    for name, fn in hooks:
        point = handle.bridge.hook_dict.get(name) if isinstance(name, str) else None
        if point is None:  # a name filter (or unknown name): which points it hits is not ours to guess
            return None
        canonical = getattr(point, "name", None) or name
        layer = layer_of(canonical)
        start_input = point is handle.bridge.hook_dict.get(_resid_name(start))
        if (layer is not None and layer < start) or start_input:
            continue
        kept.append((name, fn))
    return kept


# Per bridge: did a skipped forward reproduce the full forward (checked once per model)?
_SKIP_VERIFIED: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _skip_verified(handle: ModelHandle, stack: Any, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Once per model: one prompt, full forward against forwards skipped to a few layers.

    Guards against architectures whose layer loop uses the layer's place in the list
    (e.g. per-layer inputs indexed by position in ``enumerate(self.layers)``).
    """
    bridge = handle.bridge
    if bridge in _SKIP_VERIFIED:
        return _SKIP_VERIFIED[bridge]
    starts = sorted({1, handle.n_layers // 2, handle.n_layers - 1} - {0})
    ids, mask = ids[:1], mask[:1]
    # every position of the few start layers' residuals: the injection replaces the whole hidden state
    full, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=[_resid_name(s) for s in starts],
                                        **LAST_ONLY)
    full = full[:, -1].float()
    ok = True
    for start in starts:
        name = _resid_name(start)
        with bridge.hooks(fwd_hooks=[(name, partial(_inject, resid=cache[name]))]), _layers_from(stack, start):
            skipped = bridge(ids, attention_mask=mask, **LAST_ONLY)[:, -1].float()
        scale = float(full.abs().max()) or 1.0
        if not torch.allclose(skipped, full, rtol=1e-3, atol=1e-3 * scale):
            ok = False
            break
    if not ok:
        warnings.warn(f"{type(handle.hf_model).__name__}: a forward started at a later layer does not reproduce "
                      f"the full forward; exact patching runs every layer for this model (slower, same results)",
                      RuntimeWarning, stacklevel=3)
    _SKIP_VERIFIED[bridge] = ok
    return ok


@dataclass(frozen=True, kw_only=True)
class _Plan:
    """The copies in run order, their chunks, and the layer each chunk's forward starts at."""

    order: torch.Tensor  # copy indices (k = group * P + prompt), sorted by start layer
    chunks: tuple[tuple[slice, int], ...]  # (slice of ``order``, start layer)
    stack: Any | None  # where the layers are swapped; None when no chunk skips
    base_hooks: dict[int, list[Hook]]  # the base-run hooks of each start layer

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sorted({start for _, start in self.chunks} - {0}))


def _plan(handle: ModelHandle, pairs: _Pairs, groups: Sequence[tuple[_Site, ...]], spec: PatchSpec) -> _Plan:
    n_prompts = pairs.n_prompts
    n_copies = len(groups) * n_prompts
    base_hooks = list(spec.corrupt_hooks) if spec.direction == "denoising" else []
    full = _Plan(order=torch.arange(n_copies), chunks=tuple((c, 0) for c in _chunks(n_copies, spec.max_batch)),
                 stack=None, base_hooks={0: base_hooks})
    if not (spec.skip_prefix if spec.skip_prefix is not None else str(handle.device) == "cpu"):
        return full
    starts = torch.tensor([_start_layer(group) for group in groups]).repeat_interleave(n_prompts)
    if not bool((starts > 0).any()):
        return full
    stack = _layer_stack(handle)
    if stack is None:
        return full
    order = torch.sort(starts, stable=True).indices
    # chunked per start layer: a chunk mixing start layers would run every copy from the lowest
    layers, counts = torch.unique_consecutive(starts[order], return_counts=True)
    chunks, offset = [], 0
    for layer, count in zip(layers.tolist(), counts.tolist()):
        chunks += [(slice(offset + c.start, offset + c.stop), layer) for c in _chunks(count, spec.max_batch)]
        offset += count
    hooks = {start: _hooks_after(handle, base_hooks, start) for start in {s for _, s in chunks}}
    if any(h is None for h in hooks.values()):
        return full
    base_ids, base_mask = pairs.base(spec.direction)
    if not _skip_verified(handle, stack, base_ids, base_mask):
        return full
    return _Plan(order=order, chunks=tuple(chunks), stack=stack, base_hooks=hooks)  # type: ignore[arg-type]
