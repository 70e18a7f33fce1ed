"""Zero, mean and resample ablation of heads, neurons, layers and directions, as forward hooks.

An ablation replaces what a component contributes with a value that carries no
information about the current input: zero, the mean over a reference prompt set, or the
value from a different (seeded) reference prompt. Where it writes is ``AblationSpec.positions``:

* ``positions=N`` (position-aware): only the prompt's last N positions - with N the
  post-instruction length (:func:`instruments.positions.post_instruction_length`), the
  chat template's tokens after the user message - and each from the reference's value at
  the *same* position counted from the end, where every reference prompt has the same
  token. System prompt, instruction and generated tokens keep what the model computes.
  This is the intervention the study's patching uses to find components, so a circuit is
  verified with the intervention that found it (Hanna et al. 2024, "Have faith in
  faithfulness"); one mean pooled over every position would write a value far off the
  distribution of most positions.
* ``positions=None``: one value per component written at every position, generated
  ones included (zero ablation, or a mean pooled over all non-pad reference tokens);
  what removing a direction everywhere needs (Arditi et al. 2024).

Where the prompt ends in a forward pass is declared by the code that runs it
(:func:`instruments.positions.prompt_end`: generation declares no prompt position in its
KV-cached steps, answer scoring the end of each prompt before its answer); a forward
over bare prompts needs no declaration. A resample takes one reference prompt's own
values (with N=1: its last-position activation, verbatim).

Hooks are grouped by hook point, so one hook per point edits all components living
there; it clones the activation first, since the same tensor may be read elsewhere (the
residual stream is shared by the cache and later blocks). Hooks are attached only by
:func:`ablated` or by the ``fwd_hooks`` argument of :mod:`instruments.behavior`.

This module never modifies or exports model weights.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.behavior import batches
from instruments.components import AttnOut, Component, Direction, Head, MlpOut, Neuron, Resid, hook_name, validate
from instruments.handle import ModelHandle
from instruments.patching.spec import LAST_ONLY
from instruments.positions import current_prompt_end

Hook = tuple[str, Callable[[torch.Tensor, Any], torch.Tensor]]
# An edit receives the hook's (already cloned) activation and returns the edited one.
Edit = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("zero", "mean", "resample")


class AblationError(ValueError):
    """An ablation was asked for something it cannot do; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class AblationSpec:
    """How to ablate.

    ``direction_layers``: a :class:`Direction` is removed from the residual stream at every
    layer ("all", Arditi et al.) or only where it enters ``Direction.layer`` ("single").
    ``seed`` fixes which reference prompt each batch row receives when resampling.
    ``positions``: the last N prompt positions, each from its own reference position (see
    the module docstring), or None: every position, one value.
    """

    method: Literal["zero", "mean", "resample"] = "zero"
    positions: int | None = None
    seed: int = 0
    direction_layers: Literal["all", "single"] = "all"
    batch_size: int = 16
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AblationError(f"unknown ablation method {self.method!r}; use one of {METHODS}")
        if self.positions is not None and (not isinstance(self.positions, int) or self.positions < 1):
            raise AblationError(f"positions must be None (every position) or a positive int, got {self.positions!r}")
        if self.direction_layers not in ("all", "single"):
            raise AblationError("direction_layers must be 'all' or 'single'")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise AblationError("batch_size and max_new_tokens must be >= 1")


# ----------------------------------------------------------------------------- where components live

def direction_sites(n_layers: int, *, layer: int | None = None) -> tuple[str, ...]:
    """Hook points where a direction is projected out.

    Complete ablation (``layer=None``) edits every *write* into the residual stream: the
    stream entering layer 0 (= the embedding) and each attention and MLP output. By
    induction the stream is then orthogonal to r at every layer and position: resid_pre,
    resid_mid, resid_post and the final norm's input, exactly as with orthogonalized
    weights. resid_pre of every later layer is projected too (Arditi et al.'s definition);
    for zero ablation that is redundant, for mean ablation it is consistent (means add up).
    ``hook_resid_mid`` is deliberately not an edit site: in the bridge it is the input of
    the second norm (``ln2.hook_in``), so editing it changes what the MLP reads but not the
    residual carried on to the next layer.

    ``layer=L``: only the stream entering block L (later writes may re-introduce r).
    """
    if layer is not None:
        return (hook_name(Resid(layer=layer)),)
    sites: list[str] = []
    for L in range(n_layers):
        sites += [hook_name(Resid(layer=L)), hook_name(AttnOut(layer=L)), hook_name(MlpOut(layer=L))]
    return tuple(sites)


def _sites(component: Component, n_layers: int, spec: AblationSpec) -> tuple[str, ...]:
    if isinstance(component, Direction):
        return direction_sites(n_layers, layer=component.layer if spec.direction_layers == "single" else None)
    return (hook_name(component),)


def _index(component: Component) -> tuple[int, ...]:
    """Index of the component within its hook's activation, after the (batch, pos) axes."""
    if isinstance(component, Head):
        return (component.head,)
    if isinstance(component, Neuron):
        return (component.index,)
    return ()


def _check(handle: ModelHandle, components: Sequence[Component]) -> tuple[Component, ...]:
    out = tuple(components)
    for c in out:
        if isinstance(c, Resid):
            raise AblationError(f"{c!r}: ablating the whole residual stream erases the input; ablate a "
                                "Direction in it, or an AttnOut/MlpOut/Head/Neuron that writes to it")
        validate(c, n_layers=handle.n_layers, n_heads=handle.n_heads, d_mlp=handle.d_mlp, d_model=handle.d_model)
    return out


def hook_points(handle: ModelHandle, components: Sequence[Component], *, spec: AblationSpec) -> tuple[str, ...]:
    """Every hook point the ablation of ``components`` edits, in a stable order."""
    names = [n for c in _check(handle, components) for n in _sites(c, handle.n_layers, spec)]
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------- reference statistics

@dataclass(frozen=True, kw_only=True)
class ReferenceActivations:
    """Activations of each reference prompt at the hooks an ablation edits, on the clean model.

    ``positions=None``: ``per_prompt[name]`` is [prompt, *activation], the mean over the
    prompt's non-pad positions, and ``counts`` how many there were. ``positions=N``:
    [prompt, N, *activation], the prompt's own activation at each of its last N positions.
    """

    prompts: tuple[str, ...]
    positions: int | None
    per_prompt: Mapping[str, Float[torch.Tensor, "prompt ..."]]
    counts: Float[torch.Tensor, "prompt"]

    def mean(self, name: str) -> Float[torch.Tensor, "..."]:
        """Mean over prompts: per position (``positions=N``: [N, *act]), or pooled over all
        (prompt, position) tokens (None: longer prompts weigh more)."""
        acts = self.per_prompt[name]
        if self.positions is not None:
            return acts.mean(0)
        w = self.counts.reshape((-1,) + (1,) * (acts.dim() - 1)).to(acts.device)
        return (acts * w).sum(0) / w.sum()


def _reduced(act: torch.Tensor, hook: Any, *, name: str, keep: torch.Tensor, positions: int | None,
             parts: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    # reduced as the hook sees it, so no hook point's full [batch, pos, ...] activation is kept
    a = act.detach().float()
    if positions is not None:  # left padding: the last N positions are real tokens
        parts[name].append(a[:, a.shape[1] - positions:].clone())
        return act
    w = keep.to(a.device)
    parts[name].append((a * w.reshape(w.shape + (1,) * (a.dim() - 2))).sum(1)
                       / w.sum(1).reshape((-1,) + (1,) * (a.dim() - 2)))
    return act


@torch.no_grad()
def reference_activations(handle: ModelHandle, prompts: Sequence[str], names: Sequence[str], *,
                          positions: int | None = None, batch_size: int = 16) -> ReferenceActivations:
    """Reference activations at ``names`` on the clean model (float32, on the model's device):
    per-prompt means over non-pad positions, or (``positions=N``) each of the last N positions."""
    if not prompts:
        raise AblationError("mean/resample ablation needs at least one reference prompt")
    names = list(dict.fromkeys(names))
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    counts: list[torch.Tensor] = []
    label = (f"reference activations at {progress.count(len(names), 'hook point')}: "
            f"{progress.count(len(prompts), 'prompt')}")
    for chunk in progress.track(list(batches(list(prompts), batch_size)), label, unit="batch", quiet=True):
        ids, mask = handle.encode(chunk)
        if positions is not None and int(mask.sum(1).min()) < positions:
            raise AblationError(f"a reference prompt has fewer than positions={positions} tokens")
        keep = mask.float()
        counts.append(keep.sum(1) if positions is None else torch.full((ids.shape[0],), float(positions)))
        hooks = [(n, partial(_reduced, name=n, keep=keep, positions=positions, parts=parts)) for n in names]
        with handle.bridge.hooks(fwd_hooks=hooks):
            handle.bridge(ids, attention_mask=mask, **LAST_ONLY)
    count = torch.cat(counts)
    per_prompt = {n: torch.cat(parts[n]) for n in names}
    return ReferenceActivations(prompts=tuple(prompts), positions=positions,
                                per_prompt=MappingProxyType(per_prompt), counts=count)


def resample_rows(batch: int, n_reference: int, seed: int) -> torch.Tensor:
    """Which reference prompt each batch row receives: depends only on (batch, n, seed).

    Re-drawn identically on every hook call, so a row keeps its reference prompt across the
    steps of a KV-cached generation, and all components of a row come from the same prompt
    (a coherent resample, not a mixture).
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n_reference, (batch,), generator=gen)


# ----------------------------------------------------------------------------- edits

def _replacement(component: Component, name: str, spec: AblationSpec,
                 ref: ReferenceActivations | None) -> Callable[[int], torch.Tensor | float]:
    """value(batch) for the component's slice: broadcastable to [batch, pos, *slice], where
    pos is every position (``positions=None``) or the N positions of the window."""
    comp = _index(component)
    if spec.method == "zero":
        return lambda batch: 0.0
    assert ref is not None
    window = () if spec.positions is None else (slice(None),)
    if spec.method == "mean":
        mean = ref.mean(name)[window + comp]  # [*slice] or [N, *slice]
        return lambda batch: mean
    table = ref.per_prompt[name][(slice(None),) + window + comp]  # [n_ref, *slice] or [n_ref, N, *slice]
    rows = (lambda batch: table[resample_rows(batch, table.shape[0], spec.seed).to(table.device)])
    return rows if spec.positions is not None else (lambda batch: rows(batch).unsqueeze(1))


def _window(act: torch.Tensor, positions: int | None) -> tuple[Any, ...] | None:
    """Index of the edited (batch, pos) cells: every position, the prompt's last N, or None (none here)."""
    if positions is None:
        return (slice(None), slice(None))
    end = current_prompt_end(act.shape[1])
    ends = torch.as_tensor(end, device=act.device).reshape(-1).expand(act.shape[0])
    if bool((ends <= 0).all()):  # a KV-cached generation step: no prompt position in this forward
        return None
    cols = ends[:, None] - positions + torch.arange(positions, device=act.device)[None]
    if bool((cols < 0).any()) or bool((cols >= act.shape[1]).any()):
        raise AblationError(f"a prompt has fewer than positions={positions} tokens in this forward pass")
    return (torch.arange(act.shape[0], device=act.device)[:, None], cols)


def _slice_edit(component: Component, value: Callable[[int], torch.Tensor | float], positions: int | None) -> Edit:
    comp = _index(component)

    def edit(act: torch.Tensor) -> torch.Tensor:
        where = _window(act, positions)
        if where is None:
            return act
        v = value(act.shape[0])
        act[where + comp] = v if isinstance(v, float) else v.to(device=act.device, dtype=act.dtype)
        return act

    return edit


def _direction_edit(component: Direction, name: str, spec: AblationSpec,
                    ref: ReferenceActivations | None) -> Edit:
    """Set the activation's coordinate along unit r to 0, its reference mean, or a resample."""
    r = component.tensor()
    r = r / r.norm()
    if spec.method == "zero":
        target: Callable[[int], torch.Tensor | float] = lambda batch: 0.0
    elif spec.method == "mean":
        mean = ref.mean(name)  # type: ignore[union-attr]
        mean_coord = mean @ r.to(mean.device)  # [] or [N]
        target = lambda batch: mean_coord
    else:
        coords = ref.per_prompt[name] @ r.to(ref.per_prompt[name].device)  # type: ignore[union-attr]
        picked = lambda batch: coords[resample_rows(batch, coords.shape[0], spec.seed).to(coords.device)]
        target = picked if spec.positions is not None else (lambda batch: picked(batch)[:, None])

    def edit(act: torch.Tensor) -> torch.Tensor:
        where = _window(act, spec.positions)
        if where is None:
            return act
        unit = r.to(device=act.device, dtype=act.dtype)
        t = target(act.shape[0])
        t = t if isinstance(t, float) else t.to(device=act.device, dtype=act.dtype)
        cells = act[where]  # [batch, pos or N, d_model]
        act[where] = cells + (t - cells @ unit)[..., None] * unit
        return act

    return edit


def _grouped_hook(edits: Sequence[Edit]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        out = activation.clone()
        for edit in edits:
            out = edit(out)
        return out

    return hook


def _reference_for(handle: ModelHandle, components: tuple[Component, ...], spec: AblationSpec,
                   reference: Sequence[str] | ReferenceActivations | None) -> ReferenceActivations | None:
    if spec.method == "zero" or not components:
        return None
    names = hook_points(handle, components, spec=spec)
    if reference is None:
        raise AblationError(f"{spec.method} ablation needs reference=... (harmless TRAIN prompts, or their "
                            "ReferenceActivations), never the prompts under evaluation")
    if isinstance(reference, ReferenceActivations):
        missing = [n for n in names if n not in reference.per_prompt]
        if missing:
            raise AblationError(f"reference activations lack hook(s) {missing}; compute them with "
                                "reference_activations(handle, prompts, hook_points(...))")
        if reference.positions != spec.positions:
            raise AblationError(f"reference activations were taken over positions={reference.positions}, the "
                                f"spec asks for {spec.positions}")
        return reference
    if isinstance(reference, str):
        raise AblationError("reference takes a sequence of prompts, not one string")
    return reference_activations(handle, reference, names, positions=spec.positions,
                                 batch_size=spec.batch_size)


def ablation_hooks(handle: ModelHandle, components: Sequence[Component], *, spec: AblationSpec = AblationSpec(),
                   reference: Sequence[str] | ReferenceActivations | None = None) -> list[Hook]:
    """The fwd_hooks (one per hook point) that ablate ``components``; attach them via a context.

    Statistics for mean/resample are computed here, on the model as it is now: call this
    outside any other intervention so they are clean.
    """
    comps = _check(handle, components)
    ref = _reference_for(handle, comps, spec, reference)
    edits: dict[str, list[Edit]] = defaultdict(list)
    for c in comps:
        for name in _sites(c, handle.n_layers, spec):
            if isinstance(c, Direction):
                edits[name].append(_direction_edit(c, name, spec, ref))
            else:
                edits[name].append(_slice_edit(c, _replacement(c, name, spec, ref), spec.positions))
    return [(name, _grouped_hook(group)) for name, group in edits.items()]


@contextmanager
def ablated(handle: ModelHandle, components: Sequence[Component], *, spec: AblationSpec = AblationSpec(),
            reference: Sequence[str] | ReferenceActivations | None = None) -> Iterator[list[Hook]]:
    """Run forward passes and :func:`behavior.generate` under the ablation for the block.

    The bridge's context removes exactly the hooks it added on exit (also on error), so
    hooks attached by an enclosing context survive and nothing leaks out.
    """
    hooks = ablation_hooks(handle, components, spec=spec, reference=reference)
    with handle.bridge.hooks(fwd_hooks=hooks):
        yield hooks
