"""The model parts that instruments measure, and the one map from a part to its hook.

Components are frozen, keyword-only dataclasses so they can be dict keys, recorded as
JSON and read back unchanged. This module is the only place that spells TransformerBridge
names: :func:`hook_name` maps a component to its hook, :func:`writer_name` to the module
whose weights write it into the residual stream, and :func:`layer_of` reads a block index
back out of a name; anything they do not know is rejected rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Union


@dataclass(frozen=True, kw_only=True)
class Resid:
    """The residual stream entering block ``layer``, at token ``pos`` (None: all positions)."""

    layer: int
    pos: int | None = None


@dataclass(frozen=True, kw_only=True)
class AttnOut:
    """The attention block's output added to the residual stream at ``layer``."""

    layer: int


@dataclass(frozen=True, kw_only=True)
class MlpOut:
    """The MLP block's output added to the residual stream at ``layer``."""

    layer: int


@dataclass(frozen=True, kw_only=True)
class Head:
    """One query head's output ``z`` (before W_O). With GQA several heads share a KV head."""

    layer: int
    head: int


@dataclass(frozen=True, kw_only=True)
class Neuron:
    """One MLP hidden unit: the SwiGLU product act(gate) * up, before the down projection."""

    layer: int
    index: int


@dataclass(frozen=True, kw_only=True)
class Direction:
    """A direction in the residual stream entering ``layer`` (stored as a tuple: hashable)."""

    layer: int
    vector: tuple[float, ...]

    def tensor(self, *, device: Any = "cpu", dtype: Any = None):
        import torch

        return torch.tensor(self.vector, device=device, dtype=dtype or torch.float32)


@dataclass(frozen=True, kw_only=True)
class ResidMid:
    """The residual stream between block ``layer``'s attention and its MLP."""

    layer: int


@dataclass(frozen=True, kw_only=True)
class ResidPost:
    """The residual stream leaving block ``layer``."""

    layer: int


@dataclass(frozen=True, kw_only=True)
class Pattern:
    """Block ``layer``'s attention pattern, ``[batch, head, query, key]`` (read, not patched)."""

    layer: int


@dataclass(frozen=True, kw_only=True)
class Embed:
    """The token embeddings entering block 0 (one per model: no layer)."""


Component = Union[Resid, AttnOut, MlpOut, Head, Neuron, Direction]
Site = Union[Component, ResidMid, ResidPost, Pattern, Embed]
KINDS: dict[str, type] = {cls.__name__: cls for cls in (Resid, AttnOut, MlpOut, Head, Neuron, Direction, ResidMid,
                                                         ResidPost, Pattern, Embed)}

# Where each kind lives, and which axis of that hook's activation it indexes (None: all of it).
_HOOKS: dict[type, str] = {
    Resid: "blocks.{layer}.hook_resid_pre",
    AttnOut: "blocks.{layer}.hook_attn_out",
    MlpOut: "blocks.{layer}.hook_mlp_out",
    Head: "blocks.{layer}.attn.hook_z",
    Neuron: "blocks.{layer}.mlp.hook_post",
    Direction: "blocks.{layer}.hook_resid_pre",
    ResidMid: "blocks.{layer}.hook_resid_mid",
    ResidPost: "blocks.{layer}.hook_resid_post",
    Pattern: "blocks.{layer}.attn.hook_pattern",
    Embed: "hook_embed",
}


class UnknownComponentError(TypeError):
    pass


def hook_name(component: Any) -> str:
    """Canonical hook name of ``component``; rejects anything that is not a known component."""
    template = _HOOKS.get(type(component))
    if template is None:
        raise UnknownComponentError(f"{component!r} is not a component; expected one of {', '.join(KINDS)}")
    if isinstance(component, Embed):
        return template
    layer = component.layer
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise UnknownComponentError(f"{component!r}: layer must be a non-negative int")
    return template.format(layer=layer)


# The bridge modules whose weights write each kind into the residual stream (weight orthogonalization edits these).
_WRITERS: dict[type, str] = {
    Embed: "embed",
    AttnOut: "blocks.{layer}.attn.o",
    MlpOut: "blocks.{layer}.mlp.out",
}
WRITER_KINDS: tuple[type, ...] = tuple(_WRITERS)

# Every block-local hook name and module path starts with the block's index.
_BLOCK_PREFIX = re.compile(r"blocks\.(\d+)\.")


def writer_name(component: Any) -> str:
    """Module path of the weights that write ``component`` into the residual stream."""
    template = _WRITERS.get(type(component))
    if template is None:
        raise UnknownComponentError(f"{component!r} does not write into the residual stream; expected one of "
                                    f"{', '.join(cls.__name__ for cls in WRITER_KINDS)}")
    hook_name(component)  # rejects a bad layer
    return template if isinstance(component, Embed) else template.format(layer=component.layer)


def layer_of(name: str) -> int | None:
    """The block a hook name or module path belongs to (None: outside every block, e.g. the embedding)."""
    match = _BLOCK_PREFIX.match(name)
    return int(match.group(1)) if match else None


def validate(component: Any, *, n_layers: int, n_heads: int, d_mlp: int, d_model: int) -> None:
    """Check that ``component`` exists in a model of this shape."""
    hook_name(component)
    if isinstance(component, Embed):
        return
    if component.layer >= n_layers:
        raise UnknownComponentError(f"{component!r}: the model has {n_layers} layers")
    if isinstance(component, Head) and not 0 <= component.head < n_heads:
        raise UnknownComponentError(f"{component!r}: the model has {n_heads} heads per layer")
    if isinstance(component, Neuron) and not 0 <= component.index < d_mlp:
        raise UnknownComponentError(f"{component!r}: the model has {d_mlp} neurons per layer")
    if isinstance(component, Direction) and len(component.vector) != d_model:
        raise UnknownComponentError(f"Direction at layer {component.layer}: vector has {len(component.vector)} "
                                    f"entries, d_model is {d_model}")


def to_json(component: Component) -> dict[str, Any]:
    hook_name(component)
    out: dict[str, Any] = {"kind": type(component).__name__}
    for f in fields(component):
        value = getattr(component, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_json(data: dict[str, Any]) -> Component:
    kind = data.get("kind")
    cls = KINDS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise UnknownComponentError(f"unknown component kind {kind!r}; expected one of {', '.join(KINDS)}")
    names = {f.name for f in fields(cls)}
    extra = set(data) - names - {"kind"}
    if extra:
        raise UnknownComponentError(f"{kind} has no field(s) {sorted(extra)}")
    values = {k: (tuple(float(x) for x in v) if k == "vector" else v) for k, v in data.items() if k != "kind"}
    return cls(**values)


def label(component: Component) -> str:
    """Short human label, e.g. ``L12H3`` or ``L5N1021``."""
    if isinstance(component, Head):
        return f"L{component.layer}H{component.head}"
    if isinstance(component, Neuron):
        return f"L{component.layer}N{component.index}"
    if isinstance(component, Resid):
        return f"resid L{component.layer}" + ("" if component.pos is None else f" pos{component.pos}")
    if isinstance(component, AttnOut):
        return f"attn L{component.layer}"
    if isinstance(component, MlpOut):
        return f"mlp L{component.layer}"
    if isinstance(component, Direction):
        return f"dir L{component.layer}"
    if isinstance(component, Embed):
        return "embed"
    return f"{type(component).__name__} L{component.layer}"


def all_heads(n_layers: int, n_heads: int) -> list[Head]:
    return [Head(layer=layer, head=head) for layer in range(n_layers) for head in range(n_heads)]
