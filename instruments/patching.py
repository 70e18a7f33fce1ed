"""Activation patching, exact and attribution (AtP), batched over components.

Vocabulary. Every patched run executes the *base* prompts while splicing in activations
cached from the *source* prompts. ``direction="denoising"`` runs the corrupted prompts and
patches in clean activations (does this component suffice to restore the clean
behaviour?); ``"noising"`` runs the clean prompts and patches in corrupted activations
(is this component necessary for it?). Normalized effects are therefore 0 at the
unpatched base run and 1 at the full source run, in either direction.

Batching is the point of this module. TransformerLens's ``generic_activation_patch`` runs
one forward pass per component; here a sweep over G components and P prompt pairs is
G * P *patched copies* of the base prompts, chunked ``max_batch`` copies per forward
pass. One hook per hook point splices, for each copy, its own component's slice of the
cached source activation (``torch.where`` over a per-copy boolean mask: the activation the
model hands us is never edited in place). The source activations are cached once, with
one ``run_with_cache``.

Prefix skip (``PatchSpec.skip_prefix``, on by default on the CPU). A patched copy whose earliest
patched site is in layer L computes layers 0..L-1 exactly as the unpatched base run
does: nothing upstream of its first patched site differs from the base run, and every
prompt is its own row (attention mixes positions, never batch rows). So its forward can
start at layer L from the base run's residual stream ``blocks.L.hook_resid_pre``, cached
once in the base run's own ``run_with_cache`` (the run the baselines come from anyway).
Copies are grouped by their start layer and chunked within each group, so every forward
starts at one layer (a chunk mixing layers would have to start all its copies at the
lowest; the price is up to one partly filled chunk per start layer). A sweep over all
layers thus runs about half of the layer-rows of the full forwards, a late-layer sweep
almost none, a layer-0 sweep all of them. TransformerBridge's own ``start_at_layer``
still executes blocks 0..L-1, so the skip is done here: for the duration of one forward,
the HF model's layer list (``hf_model.model.layers``, a ``ModuleList`` of the bridge's
own ``BlockBridge`` modules) is replaced by a ``ModuleList`` of ``layers[L:]`` and
restored in a ``finally``. Everything else in the HF forward is untouched: the token
embedding still runs (its output is discarded), and rotary position embeddings and the
causal and padding mask are computed from the position ids and the attention mask,
independent of the layers. The first hook at ``blocks.L.hook_resid_pre`` (the hook point
at block L's input) swaps the incoming hidden states for the cached residual -- the same
place the bridge's ``start_at_layer`` injects -- and a ``Resid(layer=L)`` patch,
registered after it, then splices into the injected value. Hook points are the block
modules' own, so ``blocks.{i}...`` hooks fire on the right layers; a layer's
``layer_idx`` only addresses its slot of the KV cache, which starts empty in every
forward here. Base-run hooks (``corrupt_hooks``) whose effect is already in the cached
residual are dropped: those in blocks < L never fire, and one at
``blocks.L.hook_resid_pre`` itself is left out (the cache was taken after it). The skip
is used only where it verifiably applies: the HF model must hold the bridge's blocks as
a plain ``ModuleList`` at ``.model.layers``, and, once per model, a probe checks that a
skipped forward reproduces the full forward's logits; otherwise (or with
``corrupt_hooks`` given as name filters rather than names) every copy runs the full
forward, exactly as with ``skip_prefix=False``.

Positions. Clean and corrupted prompts are encoded in *one* left-padded batch, so all 2P
prompts share one length T and position -1 is every prompt's last token; positions are
indexed from the end (-1, -2, ..., -k). A patch goes only where the two prompts'
positions correspond. ``PatchSpec.positions=N`` patches the last N positions only: with
N = :func:`instruments.positions.post_instruction_length` these are the chat template's
post-instruction tokens, the same tokens in every prompt (the positions Arditi et al.
2024 search). ``positions=None`` patches every position, and is refused on a pair whose
prompts differ in token length: aligned from the end, its system-prompt and instruction
tokens would receive the other prompt's activations from shifted positions.

Metric. ``metric`` maps last-position logits ``[b, vocab]`` to one value per prompt
``[b]`` (e.g. ``partial(refusal_score, tokens=...)``). It is evaluated per prompt; results
keep the per-prompt values (``[*component, prompt]``) for statistics and average over
prompts for heatmaps.

Attribution patching (Nanda 2023; Kramar et al. 2024, "AtP*") replaces the G forward
passes by one backward: ``(source_act - base_act) . d metric / d act`` at the base run,
the first-order Taylor estimate of each patch's effect on the metric, for every head and
every MLP neuron at once. :func:`verify_top_k` then checks the top-ranked heads exactly.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from instruments import progress
from instruments.components import AttnOut, Component, Head, MlpOut, Neuron, Resid, hook_name, layer_of
from instruments.handle import ModelHandle
from instruments.metrics import kl_divergence, normalized_effect

Metric = Callable[[Float[torch.Tensor, "batch vocab"]], Float[torch.Tensor, "batch"]]
Hook = tuple[str, Callable]
DIRECTIONS = ("denoising", "noising")
# Every metric here reads the last position only, so HF's ``logits_to_keep`` skips the
# unembedding of all other positions: ~20% of a 135M model's FLOPs (its vocabulary is
# 49k) and a [batch, pos, vocab] logits tensor that would otherwise bound max_batch.
LAST_ONLY = {"logits_to_keep": 1}


# ----------------------------------------------------------------------------- spec

@dataclass(frozen=True, kw_only=True)
class PatchSpec:
    """How a patching sweep runs; nothing here changes *what* is measured except ``direction``.

    ``max_batch``: patched copies per forward pass (the memory knob: a pass holds the
    activations of ``max_batch`` prompts of the padded length plus the spliced source
    slices; only last-position logits are computed). ``layers``: the layers swept (None:
    all), so a fixture can stream a long sweep one layer at a time and checkpoint.
    ``kl``: also record KL(clean || patched) of the next-token distribution, per copy.
    ``corrupt_hooks``: forward hooks active in every run of the *corrupted* prompts
    (baseline, source cache, patched copies, AtP), e.g. Gaussian-noise corruption of the
    embeddings as in causal tracing; they must act the same on any batch of copies, i.e.
    must not depend on the batch size or a copy's place in the batch.
    ``skip_prefix``: start each patched copy's forward at the layer of its earliest
    patched site, from the base run's cached residual stream (see the module docstring;
    the same numbers, less compute; it holds the base run's residual entering each start
    layer, ``[prompt, pos, d_model]`` apiece). False: every copy runs all layers. None
    (the default): on for the CPU only. A CPU is compute-bound, so skipping half the
    layer-rows pays (2.0x over TransformerLens with it, ~1.1x without, on SmolLM2-135M);
    an accelerator is bound by the number of forward passes, and the skip's one chunk per
    start layer needs more of them (measured on an H100: 7.95x over TransformerLens
    without the skip, 5.98x with it; tests/test_bench_patching.py).
    ``positions``: patch only the last N positions (see "Positions" in the module
    docstring); None: every position, for pairs of equal token length only.
    ``allow_unaligned``: lift that refusal, for tests of the splicing mechanics (which hold
    on any prompts); no measurement sets it.
    """

    direction: str = "denoising"
    max_batch: int = 64
    layers: tuple[int, ...] | None = None
    kl: bool = True
    corrupt_hooks: tuple[Hook, ...] = ()
    skip_prefix: bool | None = None
    positions: int | None = None
    allow_unaligned: bool = False

    def __post_init__(self) -> None:
        if self.positions is not None and (not isinstance(self.positions, int) or self.positions < 1):
            raise ValueError(f"positions must be None (every position) or a positive int, got {self.positions!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {self.max_batch!r}")
        if self.layers is not None:
            layers = tuple(int(layer) for layer in self.layers)
            if len(set(layers)) != len(layers) or not layers:
                raise ValueError(f"layers must be distinct and non-empty, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)  # accept any sequence, store a hashable tuple
        object.__setattr__(self, "corrupt_hooks", tuple(tuple(h) for h in self.corrupt_hooks))

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = tuple(range(n_layers)) if self.layers is None else self.layers
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has {n_layers} layers")
        return layers


# ----------------------------------------------------------------------------- results

def _base_and_source(direction: str, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (corrupted, clean) if direction == "denoising" else (clean, corrupted)


@dataclass(frozen=True, kw_only=True)
class PatchResult:
    """Exact patching: the metric of every patched copy, ready for a heatmap.

    ``axes`` names the component axes (e.g. ``("layer", "head")``) and ``coords`` labels
    them (layer numbers, head numbers, positions counted from the end, neuron indices);
    the prompt axis is always last. ``clean`` and ``corrupted`` are the unpatched runs'
    per-prompt metrics. ``positions``: the patch covered the last N positions of each
    prompt (None: every position).
    """

    kind: str
    direction: str
    axes: tuple[str, ...]
    coords: tuple[tuple[int, ...], ...]
    metric: Float[torch.Tensor, "*component prompt"]
    kl: Float[torch.Tensor, "*component prompt"] | None
    clean: Float[torch.Tensor, "prompt"]
    corrupted: Float[torch.Tensor, "prompt"]
    positions: int | None = None

    @property
    def n_pairs(self) -> int:
        return int(self.clean.shape[0])

    def __post_init__(self) -> None:
        expected = tuple(len(c) for c in self.coords) + (self.clean.shape[0],)
        if tuple(self.metric.shape) != expected or len(self.axes) != len(self.coords):
            raise ValueError(f"metric shape {tuple(self.metric.shape)} does not match axes {self.axes} "
                             f"with coords of lengths {expected}")

    @property
    def base(self) -> Float[torch.Tensor, "prompt"]:
        """The unpatched run of the prompts that were patched (normalized effect 0)."""
        return _base_and_source(self.direction, self.clean, self.corrupted)[0]

    @property
    def source(self) -> Float[torch.Tensor, "prompt"]:
        """The run the patched activations came from (normalized effect 1)."""
        return _base_and_source(self.direction, self.clean, self.corrupted)[1]

    @property
    def layers(self) -> tuple[int, ...]:
        return self.coords[0] if self.axes and self.axes[0] == "layer" else ()

    @property
    def mean(self) -> Float[torch.Tensor, "*component"]:
        return self.metric.mean(-1)

    @property
    def effect(self) -> Float[torch.Tensor, "*component prompt"]:
        """Patched minus unpatched metric, per prompt (what AtP estimates)."""
        return self.metric - self.base

    @property
    def normalized(self) -> Float[torch.Tensor, "*component"]:
        """Effect of the prompt-averaged metric: 0 = unpatched base run, 1 = the source run.

        Normalized after averaging, since a pair whose clean and corrupted runs barely
        differ would otherwise divide by almost nothing.
        """
        # metrics.normalized_effect is 0 at its ``clean`` argument and 1 at ``corrupted``.
        return normalized_effect(self.mean, self.base.mean(), self.source.mean())

    @property
    def normalized_per_prompt(self) -> Float[torch.Tensor, "*component prompt"]:
        return normalized_effect(self.metric, self.base, self.source)

    # -- persistence and assembly (fixtures.sweeps checkpoints results layer by layer)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"metric": self.metric, "clean": self.clean, "corrupted": self.corrupted}
        if self.kl is not None:
            tensors["kl"] = self.kl
        for axis, coord in zip(self.axes, self.coords):
            tensors[f"coord.{axis}"] = torch.tensor(coord, dtype=torch.int64)
        return tensors

    def metadata(self) -> dict[str, str]:
        return {"kind": self.kind, "direction": self.direction, "axes": ",".join(self.axes),
                "positions": "all" if self.positions is None else str(self.positions)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "PatchResult":
        axes = tuple(a for a in metadata["axes"].split(",") if a)
        return cls(kind=metadata["kind"], direction=metadata["direction"], axes=axes,
                   coords=tuple(tuple(int(i) for i in tensors[f"coord.{a}"].tolist()) for a in axes),
                   metric=tensors["metric"], kl=tensors.get("kl"), clean=tensors["clean"],
                   corrupted=tensors["corrupted"], positions=_positions_field(metadata.get("positions", "all")))

    @classmethod
    def concat(cls, parts: Sequence["PatchResult"]) -> "PatchResult":
        """Join results over disjoint layer sets (rows sorted by layer); baselines must agree."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for part in parts:
            if part.axes[:1] != ("layer",) or (part.kind, part.direction, part.axes, part.coords[1:], part.positions) != (
                    first.kind, first.direction, first.axes, first.coords[1:], first.positions):
                raise ValueError("can only concatenate layer sweeps of one kind, direction, positions and component set")
            for name in ("clean", "corrupted"):
                if not torch.allclose(getattr(part, name), getattr(first, name), atol=1e-5, rtol=1e-5):
                    raise ValueError(f"the {name} baselines differ between parts: not the same prompts or model")
        rows = sorted(((layer, part, i) for part in parts for i, layer in enumerate(part.layers)),
                      key=lambda row: row[0])
        layers = tuple(layer for layer, _, _ in rows)
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers overlap between parts: {layers}")
        kl = None if first.kl is None else torch.stack([part.kl[i] for _, part, i in rows])
        return cls(kind=first.kind, direction=first.direction, axes=first.axes, coords=(layers, *first.coords[1:]),
                   metric=torch.stack([part.metric[i] for _, part, i in rows]), kl=kl,
                   clean=first.clean, corrupted=first.corrupted, positions=first.positions)


def _positions_field(text: str) -> int | None:
    return None if text == "all" else int(text)


@dataclass(frozen=True, kw_only=True)
class AtpResult:
    """Attribution patching: estimated metric change of patching each head / neuron, per prompt."""

    direction: str
    layers: tuple[int, ...]
    heads: Float[torch.Tensor, "layer head prompt"]
    neurons: Float[torch.Tensor, "layer neuron prompt"] | None
    clean: Float[torch.Tensor, "prompt"]
    corrupted: Float[torch.Tensor, "prompt"]
    positions: int | None = None

    @property
    def base(self) -> Float[torch.Tensor, "prompt"]:
        return _base_and_source(self.direction, self.clean, self.corrupted)[0]

    @property
    def source(self) -> Float[torch.Tensor, "prompt"]:
        return _base_and_source(self.direction, self.clean, self.corrupted)[1]

    def normalized(self, scores: Float[torch.Tensor, "*component prompt"]) -> Float[torch.Tensor, "*component"]:
        """Prompt-averaged estimates on the 0 (base) .. 1 (source) scale of :class:`PatchResult`."""
        # An estimated *change* d maps to patched = base + d: normalize that like an exact run.
        return normalized_effect(self.base.mean() + scores.mean(-1), self.base.mean(), self.source.mean())


@dataclass(frozen=True, kw_only=True)
class TopKCheck:
    """The top-k AtP heads, with their estimated and exactly patched effects (metric units)."""

    heads: tuple[Head, ...]
    atp: Float[torch.Tensor, "k prompt"]
    exact: Float[torch.Tensor, "k prompt"]
    exact_result: PatchResult

    @property
    def atp_mean(self) -> Float[torch.Tensor, "k"]:
        return self.atp.mean(-1)

    @property
    def exact_mean(self) -> Float[torch.Tensor, "k"]:
        return self.exact.mean(-1)


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


@torch.no_grad()
def _cached_run(handle: ModelHandle, ids: torch.Tensor, mask: torch.Tensor, names: Sequence[str], *,
                hooks: Sequence[Hook],
                max_batch: int) -> tuple[Float[torch.Tensor, "prompt vocab"], dict[str, torch.Tensor]]:
    """Last-position logits and the named activations of one unpatched run (chunked)."""
    lasts: list[torch.Tensor] = []
    acts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    label = f"unpatched run: {progress.count(ids.shape[0], 'prompt')}"
    for chunk in progress.track(_chunks(ids.shape[0], max_batch), label, unit="batch", quiet=True):
        with handle.bridge.hooks(fwd_hooks=list(hooks)):
            logits, cache = handle.bridge.run_with_cache(ids[chunk], attention_mask=mask[chunk],
                                                         names_filter=list(names), **LAST_ONLY)
        lasts.append(logits[:, -1].float())
        for name in names:
            acts[name].append(cache[name])
    return torch.cat(lasts), {name: torch.cat(parts) for name, parts in acts.items()}


def _splice(act: torch.Tensor, hook: Any, *, source: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    # torch.where builds a new tensor, so the activation the model passed in stays untouched
    return torch.where(select, source.to(act.dtype), act)


def _patch_hooks(source_acts: dict[str, torch.Tensor], groups: Sequence[tuple[_Site, ...]],
                 prompt_idx: torch.Tensor, positions: int | None = None) -> list[Hook]:
    """One splicing hook per hook point touched by this chunk's copies.

    Copy b patches the sites of ``groups[b]`` with prompt ``prompt_idx[b]``'s source
    activations; a copy with no site at some hook keeps its own activation there.
    ``positions=N``: nothing before the last N positions is patched.
    """
    by_hook: dict[str, list[tuple[int, _Site]]] = {}
    for copy, group in enumerate(groups):
        for site in group:
            by_hook.setdefault(site.hook, []).append((copy, site))
    hooks: list[Hook] = []
    for name, entries in by_hook.items():
        source = source_acts[name][prompt_idx]
        select = torch.zeros(source.shape, dtype=torch.bool, device=source.device)
        for copy, site in entries:
            select[site.where(copy)] = True
        if positions is not None:
            select[:, : select.shape[1] - positions] = False
        hooks.append((name, partial(_splice, source=source, select=select)))
    return hooks


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
    return resid.to(act.dtype)


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
        hooks = [] if start == 0 else [(_resid_name(start), partial(_inject,
                                                                    resid=base_acts[_resid_name(start)][prompt_idx]))]
        hooks += [*plan.base_hooks[start], *_patch_hooks(source_acts, chunk_groups, prompt_idx, spec.positions)]
        with handle.bridge.hooks(fwd_hooks=hooks), _layers_from(plan.stack, start):
            logits = handle.bridge(base_ids[prompt_idx], attention_mask=base_mask[prompt_idx], **LAST_ONLY)
        last = logits[:, -1].float()
        values[copies] = _evaluate(metric, last)
        if kls is not None:
            kls[copies] = kl_divergence(clean_last[prompt_idx], last).cpu()
    shape = (len(groups), n_prompts)
    return values.view(shape), None if kls is None else kls.view(shape)


# ----------------------------------------------------------------------------- the generic core

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
        missing = sorted({*source_names} - set(self.source_acts) | {*base_names} - set(self.base_acts))
        if missing:
            raise ValueError(f"these PatchRuns hold no activations at {missing[:4]}; make them with those hook points")


def _unpatched_runs(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], pairs: _Pairs,
                    spec: PatchSpec, *, source_names: Sequence[str], base_names: Sequence[str]) -> PatchRuns:
    # the source run's activations to splice and the base run's residuals to start from;
    # both runs give the baselines (and clean the KL reference)
    denoising = spec.direction == "denoising"
    clean_last, clean_acts = _cached_run(handle, pairs.clean_ids, pairs.clean_mask,
                                         source_names if denoising else base_names,
                                         hooks=(), max_batch=spec.max_batch)
    corrupted_last, corrupted_acts = _cached_run(handle, pairs.corrupted_ids, pairs.corrupted_mask,
                                                 base_names if denoising else source_names,
                                                 hooks=spec.corrupt_hooks, max_batch=spec.max_batch)
    return PatchRuns(clean_prompts=tuple(clean_prompts), corrupted_prompts=tuple(corrupted_prompts),
                     direction=spec.direction, corrupt_hooks=spec.corrupt_hooks, pairs=pairs, clean_last=clean_last,
                     corrupted_last=corrupted_last, clean_acts=clean_acts, corrupted_acts=corrupted_acts)


def head_runs(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str],
              spec: PatchSpec = PatchSpec()) -> PatchRuns:
    """The unpatched runs for :func:`patch_heads` calls over any of ``spec``'s layers (None: all).

    Holds every swept layer's ``z`` from the source run and the base run's residual entering
    each of them (for the prefix skip): for SmolLM2 and 12 pairs, 40 MB. A per-layer sweep
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


# ----------------------------------------------------------------------------- named variants

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


# ----------------------------------------------------------------------------- attribution patching

def _as_leaf(act: torch.Tensor, hook: Any) -> torch.Tensor:
    # The weights are frozen, so nothing in the forward pass needs grad; a leaf at the
    # first residual stream starts the graph, and every later activation is then on it.
    return act.detach().requires_grad_(True)


def _keep(act: torch.Tensor, hook: Any, *, name: str, store: dict[str, torch.Tensor]) -> torch.Tensor:
    store[name] = act  # keyed by the name we asked for: the bridge's hook.name is an alias's
    return act


def attribution_patch(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                      spec: PatchSpec = PatchSpec(), *, neurons: bool = True) -> AtpResult:
    """First-order estimate of every head's and every MLP neuron's patching effect, per prompt.

    One source forward (cached, no grad), one base forward with grad and one backward
    (each chunked by ``max_batch``). For a head the estimate sums
    ``(source_z - base_z) * d metric / d base_z`` over the patched positions (``spec.positions``,
    as in exact patching) and ``d_head``; for a neuron over those positions. Units: change of
    the metric (compare with ``PatchResult.effect``).
    """
    layers = spec.resolve_layers(handle.n_layers)
    pairs = _encode_pairs(handle, clean_prompts, corrupted_prompts)
    _check_aligned(pairs, spec)
    window = slice(None) if spec.positions is None else slice(pairs.length - spec.positions, None)
    z_names = [hook_name(Head(layer=layer, head=0)) for layer in layers]
    post_names = [hook_name(Neuron(layer=layer, index=0)) for layer in layers] if neurons else []
    names = z_names + post_names
    source_ids, source_mask = pairs.source(spec.direction)
    base_ids, base_mask = pairs.base(spec.direction)
    source_hooks, base_hooks = ((), spec.corrupt_hooks) if spec.direction == "denoising" else (spec.corrupt_hooks, ())
    source_last, source_acts = _cached_run(handle, source_ids, source_mask, names, hooks=source_hooks,
                                           max_batch=spec.max_batch)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    base_values = []
    units = "heads and neurons" if neurons else "heads"
    label = (f"AtP, {spec.direction}: {progress.count(pairs.n_prompts, 'pair')}, {units} of "
            f"{progress.count(len(layers), 'layer')}")
    for chunk in progress.track(_chunks(pairs.n_prompts, spec.max_batch), label, unit="batch", quiet=True):
        store: dict[str, torch.Tensor] = {}
        hooks = [*base_hooks, (hook_name(Resid(layer=0)), _as_leaf)]
        hooks += [(name, partial(_keep, name=name, store=store)) for name in names]
        with torch.enable_grad():
            with handle.bridge.hooks(fwd_hooks=hooks):
                logits = handle.bridge(base_ids[chunk], attention_mask=base_mask[chunk], **LAST_ONLY)
            values = metric(logits[:, -1].float())
            # prompts are independent rows, so the gradient of the sum is each prompt's own
            grads = torch.autograd.grad(values.sum(), [store[name] for name in names])
        base_values.append(_evaluate(metric, logits[:, -1].detach().float()))
        for name, grad in zip(names, grads):
            delta = source_acts[name][chunk].to(grad.dtype) - store[name].detach()
            # heads: [b, pos, head, d_head] -> [b, head]; neurons: [b, pos, d_mlp] -> [b, d_mlp]
            per = (delta * grad).float()[:, window]
            scores[name].append((per.sum(dim=(1, 3)) if per.ndim == 4 else per.sum(dim=1)).cpu())
    stacked = {name: torch.cat(parts).T for name, parts in scores.items()}  # [component, prompt]
    base_metric, source_metric = torch.cat(base_values), _evaluate(metric, source_last)
    clean, corrupted = (source_metric, base_metric) if spec.direction == "denoising" else (base_metric, source_metric)
    return AtpResult(direction=spec.direction, layers=layers,
                     heads=torch.stack([stacked[name] for name in z_names]),
                     neurons=torch.stack([stacked[name] for name in post_names]) if neurons else None,
                     clean=clean, corrupted=corrupted, positions=spec.positions)


# ----------------------------------------------------------------------------- circuits in isolation

def _complement_splice(act: torch.Tensor, hook: Any, *, source: torch.Tensor, keep: torch.Tensor,
                       window: slice) -> torch.Tensor:
    # every unit of this hook outside the circuit takes the source's value inside the window
    out = act.clone()
    part = out[:, window]
    out[:, window] = torch.where(keep, part, source.to(act.dtype))
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
    source_last, source_acts = _cached_run(handle, source_ids, source_mask, names, hooks=(), max_batch=spec.max_batch)
    source_acts = {n: a[:, window] for n, a in source_acts.items()}  # only the window is ever spliced
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


def top_heads(atp: AtpResult, k: int) -> tuple[Head, ...]:
    """The k heads with the largest |prompt-averaged AtP estimate|, largest first."""
    score = atp.heads.mean(-1).abs()
    k = min(k, score.numel())
    flat = torch.topk(score.flatten(), k).indices.tolist()
    n_heads = score.shape[1]
    return tuple(Head(layer=atp.layers[i // n_heads], head=i % n_heads) for i in flat)


def verify_top_k(handle: ModelHandle, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                 atp: AtpResult, *, k: int, spec: PatchSpec = PatchSpec()) -> TopKCheck:
    """Exactly patch the top-k AtP heads (one at a time, batched) beside their AtP estimates."""
    if spec.direction != atp.direction:
        raise ValueError(f"spec.direction {spec.direction!r} differs from the AtP run's {atp.direction!r}")
    heads = top_heads(atp, k)
    exact = patch_components(handle, clean_prompts, corrupted_prompts, metric, list(heads), spec)
    rows = [atp.heads[atp.layers.index(h.layer), h.head] for h in heads]
    return TopKCheck(heads=heads, atp=torch.stack(rows), exact=exact.effect, exact_result=exact)


def rank_agreement(atp_scores: Any, exact_scores: Any, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """Spearman rho between AtP and exact scores (flattened over components), bootstrap CI over them.

    Returns :class:`instruments.stats.Estimate` (percentile bootstrap over components, seeded).
    """
    from instruments.stats import spearman_ci  # imported here: only this function needs scipy's statistics

    def flat(x: Any) -> np.ndarray:
        return np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, dtype=float).reshape(-1)

    return spearman_ci(flat(atp_scores), flat(exact_scores), n_boot=n_boot, seed=seed, alpha=alpha)
