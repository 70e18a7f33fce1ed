"""Gradient x activation per component, all layers in one backward pass per batch.

* :func:`attention_gradient_flow` -- gradient x attention pattern per head.
* :func:`neuron_saliency` -- gradient and gradient x activation per MLP neuron (and per
  head's ``z``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.behavior import batches
from instruments.components import Head, Neuron, Pattern, hook_name
from instruments.gradients.backward import Metric, Reducer, _as_metric, _backward, _check_prompts, _masked
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens


@dataclass(frozen=True, kw_only=True)
class GradientSpec:
    """Batching and memory options of :func:`attention_gradient_flow` and :func:`neuron_saliency`.

    ``queries`` (attention flow only): ``all`` sums gradient x pattern over every real
    (query, key) pair -- the first-order effect of the whole head's attention, at every
    position, on the metric; ``last`` keeps only the last query row -- what the final
    position reads directly, which misses heads that act earlier in the sequence.
    """

    batch_size: int = 8
    checkpointing: bool = False
    queries: Literal["all", "last"] = "all"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.queries not in ("all", "last"):
            raise ValueError("batch_size must be >= 1 and queries 'all' or 'last'")


def _pattern_reducer(queries: str) -> Reducer:
    def reduce(pattern: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        gxa = grad.float() * pattern.float()  # batch head query key
        if queries == "last":
            return _masked(gxa[:, :, -1, :], keep[:, None, :]).sum(-1)
        pair = keep[:, None, :, None] & keep[:, None, None, :]
        return _masked(gxa, pair).sum((-2, -1))
    return reduce


def _neuron_reducer(act: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # [batch, 2, d_mlp]: sums over positions of dM/da and of dM/da * a
    g = _masked(grad.float(), keep[..., None])
    return torch.stack([g.sum(1), (g * act.float()).sum(1)], dim=1)


def _head_reducer(z: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # z: batch pos head d_head -> batch head
    return _masked(grad.float() * z.float(), keep[..., None, None]).sum((1, 3))


def _per_batch(handle: ModelHandle, prompts: Sequence[str], metric: Metric, watch: Mapping[str, Reducer],
               spec: GradientSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    values, reduced = [], {name: [] for name in watch}
    label = f"gradients at {progress.count(len(watch), 'hook point')}: {progress.count(len(prompts), 'prompt')}"
    for chunk in progress.track(list(batches(prompts, spec.batch_size)), label, unit="batch", quiet=True):
        ids, mask = handle.encode(chunk)
        out = _backward(handle, ids, mask, metric, watch=watch, checkpointing=spec.checkpointing)
        values.append(out.values.cpu())
        for name in watch:
            reduced[name].append(out.reduced[name].cpu())
    return torch.cat(values), {n: torch.cat(parts) for n, parts in reduced.items()}  # reducers put batch first


@dataclass(frozen=True, kw_only=True, eq=False)
class AttentionFlow:
    """sum over (query, key) of dM/dA * A for every head: [prompt, layer, head]."""

    scores: Float[torch.Tensor, "prompt layer head"]
    metric: Float[torch.Tensor, "prompt"]
    queries: str

    @property
    def mean(self) -> Float[torch.Tensor, "layer head"]:
        return self.scores.mean(0)

    def top_heads(self, k: int = 10) -> tuple[tuple[Head, float], ...]:
        """Heads by |mean score|, largest first."""
        return _top(self.mean, k, lambda layer, i: Head(layer=layer, head=i))


def attention_gradient_flow(handle: ModelHandle, prompts: Sequence[str], metric: Metric | RefusalTokens,
                            spec: GradientSpec = GradientSpec()) -> AttentionFlow:
    """Gradient x attention pattern of every head, one backward pass per batch.

    dM/dA * A summed over positions is the first-order change of the metric when a head's
    attention weights are scaled towards zero, the gradient analogue of ablating its pattern.
    """
    _check_prompts(prompts)
    names = [hook_name(Pattern(layer=layer)) for layer in range(handle.n_layers)]
    values, reduced = _per_batch(handle, prompts, _as_metric(metric),
                                 {n: _pattern_reducer(spec.queries) for n in names}, spec)
    return AttentionFlow(scores=torch.stack([reduced[n] for n in names], dim=1), metric=values, queries=spec.queries)


@dataclass(frozen=True, kw_only=True, eq=False)
class Saliency:
    """Gradients of the metric per MLP neuron (``mlp.hook_post``) and per head (``attn.hook_z``).

    All sums run over a prompt's real positions: ``neuron_grad`` is the metric's derivative
    when the neuron's activation is shifted by the same amount everywhere;
    ``neuron_grad_x_act`` (and ``head_grad_x_act``) is the first-order estimate of the
    metric's change when the activation is scaled up by a fraction, i.e. minus the
    attribution-patching estimate of zero-ablating it.
    """

    neuron_grad: Float[torch.Tensor, "prompt layer d_mlp"]
    neuron_grad_x_act: Float[torch.Tensor, "prompt layer d_mlp"]
    head_grad_x_act: Float[torch.Tensor, "prompt layer head"]
    metric: Float[torch.Tensor, "prompt"]

    @property
    def mean_neuron_grad_x_act(self) -> Float[torch.Tensor, "layer d_mlp"]:
        return self.neuron_grad_x_act.mean(0)

    @property
    def mean_head_grad_x_act(self) -> Float[torch.Tensor, "layer head"]:
        return self.head_grad_x_act.mean(0)

    def top_neurons(self, k: int = 20) -> tuple[tuple[Neuron, float], ...]:
        return _top(self.mean_neuron_grad_x_act, k, lambda layer, i: Neuron(layer=layer, index=i))

    def top_heads(self, k: int = 10) -> tuple[tuple[Head, float], ...]:
        return _top(self.mean_head_grad_x_act, k, lambda layer, i: Head(layer=layer, head=i))


def neuron_saliency(handle: ModelHandle, prompts: Sequence[str], metric: Metric | RefusalTokens,
                    spec: GradientSpec = GradientSpec()) -> Saliency:
    """Every neuron's and head's gradient (x activation), all layers, one backward pass per batch."""
    _check_prompts(prompts)
    post = [hook_name(Neuron(layer=layer, index=0)) for layer in range(handle.n_layers)]
    z = [hook_name(Head(layer=layer, head=0)) for layer in range(handle.n_layers)]
    watch: dict[str, Reducer] = {**{n: _neuron_reducer for n in post}, **{n: _head_reducer for n in z}}
    values, reduced = _per_batch(handle, prompts, _as_metric(metric), watch, spec)
    neurons = torch.stack([reduced[n] for n in post], dim=1)  # prompt layer 2 d_mlp
    return Saliency(neuron_grad=neurons[:, :, 0], neuron_grad_x_act=neurons[:, :, 1],
                    head_grad_x_act=torch.stack([reduced[n] for n in z], dim=1), metric=values)


def _top(scores: torch.Tensor, k: int, make: Callable[[int, int], Any]) -> tuple[tuple[Any, float], ...]:
    flat = scores.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True)[:k]
    width = scores.shape[1]
    return tuple((make(int(i) // width, int(i) % width), float(flat[i])) for i in order)
