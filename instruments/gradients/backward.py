"""The backward machinery every gradient instrument runs on: one forward and one backward pass,
gradients w.r.t. the token embeddings and any watched hook point.

How gradients exist at all: the model's parameters have ``requires_grad=False`` (and may be
bitsandbytes-quantized), so the graph is rooted at a *leaf copy of the token embeddings*
that a ``hook_embed`` forward hook swaps in. Every activation downstream of it then has a
gradient; no parameter ever gets one. Token ids still go through the bridge, so position
ids derived from the left-padding mask are exactly those of every other instrument.

Why a sum over the batch is backpropagated: prompts are independent rows (left padding,
per-row attention mask), so d(sum of metrics)/d(row r's activations) is row r's gradient.

Gradients of hooked activations are reduced inside a tensor hook the moment they arrive
(e.g. summed over positions), so full ``[batch, pos, d_mlp]`` gradients for every layer are
never held at once. The hooked activations themselves are kept until then (grad x act
needs them); with ``checkpointing`` (:func:`activation_checkpointing`) everything else a
layer saves for backward is dropped.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int

from instruments.components import Embed, hook_name
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens, refusal_score
from instruments.patching.spec import LAST_ONLY

Metric = Callable[[Float[torch.Tensor, "batch vocab"]], Float[torch.Tensor, "batch"]]
# (activation, its gradient, attention mask [batch, pos] as bool) -> a reduced tensor
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def refusal_metric(tokens: RefusalTokens) -> Metric:
    """The refusal score (log-odds of the refusal tokens) as a metric of last-position logits."""
    return partial(refusal_score, tokens=tokens)


def _as_metric(metric: Metric | RefusalTokens) -> Metric:
    return refusal_metric(metric) if isinstance(metric, RefusalTokens) else metric


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise TypeError("pass a sequence of prompts, not one string")
    if len(prompts) == 0:
        raise ValueError("no prompts given")


# ----------------------------------------------------------------------------- checkpointing

def _checkpointing_layers(hf_model: Any) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _is_checkpointing(hf_model: Any) -> bool:
    # transformers >= 5.23 names it is_activation_checkpointing and warns on is_gradient_checkpointing.
    name = "is_activation_checkpointing" if hasattr(type(hf_model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(hf_model, name, False))


@contextmanager
def activation_checkpointing(hf_model: Any, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Uses the model's own ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    on older transformers), always **non-reentrant**: the reentrant variant runs the first
    forward under ``no_grad``, so the activations our hooks capture would have no graph.
    HF checkpoints a layer only when that layer is in training mode; rather than
    ``model.train()`` (which would switch on dropout everywhere) only the decoder layers'
    own ``training`` flag is set, and every flag is restored on exit, as is the input-grad
    hook that HF's enable call installs. Forward hooks inside a layer fire twice (forward
    and recompute); the instruments here use the first firing only.
    """
    if not enabled:
        yield
        return
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(hf_model).__name__} does not support gradient checkpointing; "
                         "run with checkpointing=False")
    already = _is_checkpointing(hf_model)
    had_input_hooks = bool(getattr(hf_model, "_require_grads_hooks", None))
    layers = _checkpointing_layers(hf_model)
    modes = [layer.training for layer in layers]
    try:
        if not already:
            kwargs = {"use_reentrant": False}
            if hasattr(hf_model, "activation_checkpointing_enable"):
                hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5.23
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        if not already:
            if hasattr(hf_model, "activation_checkpointing_disable"):
                hf_model.activation_checkpointing_disable()
            else:
                hf_model.gradient_checkpointing_disable()
        if not had_input_hooks and getattr(hf_model, "_require_grads_hooks", None):
            hf_model.disable_input_require_grads()


# ----------------------------------------------------------------------------- the backward pass

@torch.no_grad()
def _embed(handle: ModelHandle, ids: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
    """Token embeddings exactly as ``hook_embed`` sees them, in float32."""
    return handle.hf_model.get_input_embeddings()(ids).float()


@dataclass(frozen=True, kw_only=True, eq=False)
class _Pass:
    values: Float[torch.Tensor, "batch"]
    embed_grad: Float[torch.Tensor, "batch pos d_model"]
    reduced: Mapping[str, torch.Tensor]


def _backward(handle: ModelHandle, ids: torch.Tensor, mask: torch.Tensor, metric: Metric, *,
              embeds: torch.Tensor | None = None, watch: Mapping[str, Reducer] | None = None,
              checkpointing: bool = False) -> _Pass:
    """One forward and one backward pass; gradients w.r.t. the embeddings and watched hooks."""
    watch = dict(watch or {})
    source = _embed(handle, ids) if embeds is None else embeds
    # float32 leaf, cast in the hook: gradients accumulate in float32 even on bf16 models.
    leaf = source.detach().float().clone().requires_grad_(True)
    keep = mask.bool()
    reduced: dict[str, torch.Tensor] = {}
    captured: set[str] = set()

    def feed(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if act.shape != leaf.shape:
            raise ValueError(f"embedding shape {tuple(act.shape)} != supplied {tuple(leaf.shape)}")
        return leaf.to(device=act.device, dtype=act.dtype)

    def watcher(name: str, reduce: Reducer) -> Callable:
        def capture(act: torch.Tensor, hook: Any) -> torch.Tensor:
            # Under checkpointing the layer is recomputed in backward and this hook fires
            # again on a copy outside the graph being differentiated: keep the first only.
            if name in captured:
                return act
            captured.add(name)
            saved = act.detach()
            # the mask moves to the layer's device (several devices under a --device-map)
            mask_here = keep.to(saved.device)
            act.register_hook(lambda grad: reduced.__setitem__(name, reduce(saved, grad.detach(), mask_here)))
            return act
        return capture

    hooks = [(hook_name(Embed()), feed)] + [(name, watcher(name, fn)) for name, fn in watch.items()]
    with torch.enable_grad(), activation_checkpointing(handle.hf_model, checkpointing), \
            handle.bridge.hooks(fwd_hooks=hooks):
        # the metric reads the last position only: no [batch, pos, vocab] logits (nor their gradient)
        logits = handle.bridge(ids, attention_mask=mask, **LAST_ONLY)
        values = metric(logits[:, -1])
        if values.shape != (ids.shape[0],):
            raise ValueError(f"the metric must map [batch, vocab] to [batch]; got shape {tuple(values.shape)}")
        # Backward inside the hooks block: a checkpointed recompute must see the same hooks.
        values.sum().backward()
    missing = sorted(set(watch) - set(reduced))
    if missing:
        raise RuntimeError(f"no gradient reached {missing}; these hooks are not on the path to the metric")
    return _Pass(values=values.detach().float(), embed_grad=leaf.grad, reduced=reduced)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # where, not multiply: a padding row's value (even NaN) never leaks into a sum.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
