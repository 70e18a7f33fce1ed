"""Interventions along a direction, all temporary: directional ablation, activation addition
(steering) and weight orthogonalization.

Directional ablation projects the direction out of every residual write, by hooks;
activation addition adds a vector to one layer's ``resid_pre``, by hooks. The equivalent
weight orthogonalization makes in-memory copies of the residual writers' weights with the
direction projected out, swapped in by a context manager that restores and verifies the
originals.

SAFETY: this module deliberately offers no way to persist a model with refusal removed:
nothing here writes weights to disk, exports them or hands back a modified model outside
a context. Tests assert that no such function exists and that weights are restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

import torch

from instruments.ablation import AblationSpec, Hook, ablation_hooks
from instruments.components import AttnOut, Direction, Embed, MlpOut, Resid, hook_name, writer_name
from instruments.direction.candidates import DirectionError, _unit
from instruments.handle import ModelHandle


# ----------------------------------------------------------------------------- hook interventions

def directional_ablation_hooks(handle: ModelHandle, direction: Direction | torch.Tensor, *,
                               layer: int | None = None) -> list[Hook]:
    """Hooks projecting the direction out of every residual write (``layer``: only resid_pre of it)."""
    unit = _unit(direction)
    comp = Direction(layer=0 if layer is None else layer, vector=tuple(unit.tolist()))
    spec = AblationSpec(method="zero", direction_layers="all" if layer is None else "single")
    return ablation_hooks(handle, [comp], spec=spec)


@contextmanager
def directionally_ablated(handle: ModelHandle, direction: Direction | torch.Tensor, *,
                          layer: int | None = None) -> Iterator[None]:
    with handle.bridge.hooks(fwd_hooks=directional_ablation_hooks(handle, direction, layer=layer)):
        yield


def steering_hooks(handle: ModelHandle, vector: Direction | torch.Tensor, *, layer: int,
                   coefficient: float = 1.0) -> list[Hook]:
    """Activation addition: resid_pre[layer] += coefficient * vector at every position.

    ``vector`` is used as given (not normalized), so a mean-difference candidate with
    coefficient 1 moves harmless activations by the harmful-harmless separation; a negative
    coefficient subtracts it. Position-independent, so it holds through generation.
    """
    if not 0 <= layer < handle.n_layers:
        raise DirectionError(f"layer {layer} is outside 0..{handle.n_layers - 1}")
    v = vector.tensor() if isinstance(vector, Direction) else vector.detach().float()
    if v.shape != (handle.d_model,):
        raise DirectionError(f"steering vector has shape {tuple(v.shape)}, expected ({handle.d_model},)")
    shift = coefficient * v

    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        return activation + shift.to(device=activation.device, dtype=activation.dtype)

    return [(hook_name(Resid(layer=layer)), hook)]


@contextmanager
def steered(handle: ModelHandle, vector: Direction | torch.Tensor, *, layer: int,
            coefficient: float = 1.0) -> Iterator[None]:
    with handle.bridge.hooks(fwd_hooks=steering_hooks(handle, vector, layer=layer, coefficient=coefficient)):
        yield


# ----------------------------------------------------------------------------- weight orthogonalization

class QuantizedWeightsError(RuntimeError):
    """Weight orthogonalization was asked of a quantized model."""


def _require_full_precision(handle: ModelHandle) -> None:
    if handle.quant != "none":
        raise QuantizedWeightsError(
            f"this model is quantized ({handle.quant}): bitsandbytes weights are packed integer blocks that "
            "cannot be orthogonalized in place. Use hook-based ablation instead: "
            "direction.directionally_ablated(handle, direction) or ablation.ablated(handle, [Direction(...)])")


class OffloadedWeightsError(RuntimeError):
    """Weight orthogonalization was asked of a model whose weights are offloaded (``--device-map`` with disk)."""


def _require_resident(modules: Mapping[str, torch.nn.Module]) -> None:
    # accelerate keeps an offloaded module's weights elsewhere and writes them back in before every
    # forward, over any swapped-in copy: the edit would silently not take
    offloaded = [name for name, module in modules.items() if any(p.is_meta for p in module.parameters())]
    if offloaded:
        raise OffloadedWeightsError(
            f"{len(offloaded)} residual writers ({offloaded[0]}, ...) are offloaded by a --device-map, so their "
            "weights cannot be swapped. Use hook-based ablation instead: direction.directionally_ablated(handle, "
            "direction), or load without disk placements")


def _writers(handle: ModelHandle) -> dict[str, torch.nn.Module]:
    """The HF modules that write into the residual stream: embedding, attention out, MLP down.

    Only the embedding of a tied model is replaced, not the unembedding that shares its
    weight: orthogonalizing W_U too would change the logits (the final RMSNorm's gain
    re-introduces r), and the result would no longer equal directional ablation.
    """
    bridge = handle.bridge
    mods: dict[str, torch.nn.Module] = {writer_name(Embed()): bridge.embed.original_component}
    for layer in range(handle.n_layers):
        block = bridge.blocks[layer]
        mods[writer_name(AttnOut(layer=layer))] = block.attn.o.original_component
        mods[writer_name(MlpOut(layer=layer))] = block.mlp.out.original_component
    return mods


def _writer_span(n_layers: int) -> str:
    """The residual writers' names in short: the embedding, then the first and last of each per-layer kind."""
    last = n_layers - 1
    spans = [f"{writer_name(kind(layer=0))} .. {writer_name(kind(layer=last))}" for kind in (AttnOut, MlpOut)]
    return ", ".join([writer_name(Embed()), *spans])


@dataclass(frozen=True, kw_only=True)
class OrthogonalizedWeights:
    """In-memory orthogonalized copies: ``replacements[module][param]``; originals are untouched."""

    direction: Direction
    replacements: Mapping[str, Mapping[str, torch.Tensor]]


@torch.no_grad()
def orthogonalized_weights(handle: ModelHandle, direction: Direction | torch.Tensor) -> OrthogonalizedWeights:
    """W' = W - r r^T W for every residual write (bias too), so no module can write along r.

    The embedding stores written vectors as rows ([vocab, d_model]), linear layers as columns
    of ``weight`` ([d_model, d_in]); both are projected along their d_model axis, in float32.
    """
    _require_full_precision(handle)
    r = _unit(direction)
    out: dict[str, Mapping[str, torch.Tensor]] = {}
    writers = _writers(handle)
    _require_resident(writers)
    for name, module in writers.items():
        params: dict[str, torch.Tensor] = {}
        w = module.weight
        unit = r.to(w.device)
        if isinstance(module, torch.nn.Embedding):
            wf = w.float()
            params["weight"] = (wf - (wf @ unit)[:, None] * unit[None, :]).to(w.dtype)
        else:
            wf = w.float()
            params["weight"] = (wf - unit[:, None] * (unit @ wf)[None, :]).to(w.dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bf = bias.float()
            params["bias"] = (bf - (bf @ unit) * unit).to(bias.dtype)
        out[name] = MappingProxyType(params)
    return OrthogonalizedWeights(direction=Direction(layer=0, vector=tuple(r.tolist())),
                                 replacements=MappingProxyType(out))


@contextmanager
def swapped_weights(handle: ModelHandle, replacements: Mapping[str, Mapping[str, torch.Tensor]]) -> Iterator[None]:
    """Swap in replacement parameters of the residual writers for the block, then restore them.

    The original Parameter objects are put back (not copied into), and on exit each is
    checked to be the same object with an unchanged version counter, i.e. never edited in
    place; a failed check raises rather than leave a silently modified model behind.
    """
    _require_full_precision(handle)
    modules = _writers(handle)
    _require_resident(modules)
    unknown = set(replacements) - set(modules)
    if unknown:
        raise DirectionError(f"no residual writer named {sorted(unknown)}; known: {_writer_span(handle.n_layers)}")
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter, int]] = []
    try:
        for name, params in replacements.items():
            module = modules[name]
            for pname, new in params.items():
                old = getattr(module, pname)
                if new.shape != old.shape:
                    raise DirectionError(f"{name}.{pname}: replacement shape {tuple(new.shape)} != "
                                         f"{tuple(old.shape)}")
                saved.append((module, pname, old, old._version))
                setattr(module, pname, torch.nn.Parameter(new.to(old.device, old.dtype), requires_grad=False))
        yield
    finally:
        for module, pname, old, _ in reversed(saved):
            setattr(module, pname, old)
        broken = [pname for module, pname, old, version in saved
                  if getattr(module, pname) is not old or old._version != version]
        if broken:
            raise RuntimeError(f"original weights were not restored intact ({broken}); reload the model")


@contextmanager
def orthogonalized(handle: ModelHandle, direction: Direction | torch.Tensor) -> Iterator[OrthogonalizedWeights]:
    """Run with the direction orthogonalized out of the weights; the originals return on exit."""
    weights = orthogonalized_weights(handle, direction)
    with swapped_weights(handle, weights.replacements):
        yield weights
