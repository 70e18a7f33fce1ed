"""What a patching sweep is asked to do and what it returns: :class:`PatchSpec` and :class:`PatchResult`.

Vocabulary. Every patched run executes the *base* prompts while splicing in activations
cached from the *source* prompts. ``direction="denoising"`` runs the corrupted prompts and
patches in clean activations (does this component suffice to restore the clean
behaviour?); ``"noising"`` runs the clean prompts and patches in corrupted activations
(is this component necessary for it?). Normalized effects are therefore 0 at the
unpatched base run and 1 at the full source run, in either direction.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float

from instruments.metrics import normalized_effect

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
    patched site, from the base run's cached residual stream (see :mod:`instruments.patching.prefix`;
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
