"""Attribution patching (AtP): every head's and MLP neuron's patching effect from one backward pass.

Attribution patching (Nanda 2023; Kramar et al. 2024, "AtP*") replaces the G forward
passes of exact patching by one backward: ``(source_act - base_act) . d metric / d act``
at the base run, the first-order Taylor estimate of each patch's effect on the metric,
for every head and every MLP neuron at once. :func:`verify_top_k` then checks the
top-ranked heads exactly, and :func:`rank_agreement` measures how well the two rankings
agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float

from instruments import progress
from instruments.components import Head, Neuron, Resid, hook_name
from instruments.handle import ModelHandle
from instruments.metrics import normalized_effect
from instruments.patching.core import patch_components
from instruments.patching.sites import _cached_run, _check_aligned, _chunks, _encode_pairs, _evaluate, _last_positions
from instruments.patching.spec import LAST_ONLY, Metric, PatchResult, PatchSpec, _base_and_source


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


def _as_leaf(act: torch.Tensor, hook: Any, *, store: dict[str, torch.Tensor]) -> torch.Tensor:
    # The weights are frozen, so nothing in the forward pass needs grad; a leaf at the
    # first residual stream starts the graph, and every later activation is then on it.
    store["leaf"] = act.detach().requires_grad_(True)
    return store["leaf"]


def _score_on_grad(act: torch.Tensor, hook: Any, *, name: str, source: torch.Tensor, window: slice,
                   scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reduce (source - base) . gradient over the window the moment this activation's gradient arrives,
    so no layer's full ``[batch, pos, ...]`` gradient outlives the backward step that made it."""
    base = act.detach()[:, window]

    def reduce(grad: torch.Tensor) -> None:
        delta = source.to(device=grad.device, dtype=grad.dtype) - base
        per = (delta * grad[:, window]).float()
        # heads: [b, pos, head, d_head] -> [b, head]; neurons: [b, pos, d_mlp] -> [b, d_mlp]
        scores[name] = (per.sum(dim=(1, 3)) if per.ndim == 4 else per.sum(dim=1)).cpu()  # keyed by our name

    act.register_hook(reduce)
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
    # only the patched window of the source is read, so only the window is cached
    source_last, source_acts = _cached_run(handle, source_ids, source_mask, names, hooks=source_hooks,
                                           max_batch=spec.max_batch, positions=_last_positions(spec.positions))
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    base_values = []
    units = "heads and neurons" if neurons else "heads"
    label = (f"AtP, {spec.direction}: {progress.count(pairs.n_prompts, 'pair')}, {units} of "
            f"{progress.count(len(layers), 'layer')}")
    for chunk in progress.track(_chunks(pairs.n_prompts, spec.max_batch), label, unit="batch", quiet=True):
        store: dict[str, torch.Tensor] = {}
        reduced: dict[str, torch.Tensor] = {}
        hooks = [*base_hooks, (hook_name(Resid(layer=0)), partial(_as_leaf, store=store))]
        hooks += [(name, partial(_score_on_grad, name=name, source=source_acts[name][chunk], window=window,
                                 scores=reduced)) for name in names]
        with torch.enable_grad():
            with handle.bridge.hooks(fwd_hooks=hooks):
                logits = handle.bridge(base_ids[chunk], attention_mask=base_mask[chunk], **LAST_ONLY)
            values = metric(logits[:, -1].float())
            # prompts are independent rows, so the gradient of the sum is each prompt's own
            torch.autograd.grad(values.sum(), [store["leaf"]])
        missing = [name for name in names if name not in reduced]
        if missing:
            raise RuntimeError(f"no gradient reached {missing[:4]}; these hooks are not on the path to the metric")
        base_values.append(_evaluate(metric, logits[:, -1].detach().float()))
        for name in names:
            scores[name].append(reduced[name])
    stacked = {name: torch.cat(parts).T for name, parts in scores.items()}  # [component, prompt]
    base_metric, source_metric = torch.cat(base_values), _evaluate(metric, source_last)
    clean, corrupted = (source_metric, base_metric) if spec.direction == "denoising" else (base_metric, source_metric)
    return AtpResult(direction=spec.direction, layers=layers,
                     heads=torch.stack([stacked[name] for name in z_names]),
                     neurons=torch.stack([stacked[name] for name in post_names]) if neurons else None,
                     clean=clean, corrupted=corrupted, positions=spec.positions)


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
