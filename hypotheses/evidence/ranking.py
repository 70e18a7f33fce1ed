"""Heads and neurons ranked by their patching effect, with bootstrap intervals over prompts.

Exact patching of every head, attribution patching (AtP) of every head and neuron, and
exact patching of the AtP top neurons one by one, on the pairs the components are chosen on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses.evidence.bootstrap import normalized_with_ci
from hypotheses.evidence.prompts import harmful, harmless, metric_for, patch_spec
from instruments.components import Component, Head, Neuron
from instruments.metrics import RefusalTokens
from instruments.patching import PatchResult, PatchRuns, attribution_patch, patch_components, patch_heads


@dataclass(frozen=True, kw_only=True)
class Ranking:
    """Components ranked by exact normalized patching effect on train pairs, with CIs."""

    components: tuple[Component, ...]  # sorted by effect, largest first
    effect: Float[np.ndarray, "component"]
    ci_low: Float[np.ndarray, "component"]
    ci_high: Float[np.ndarray, "component"]
    atp: Float[np.ndarray, "component"]  # AtP estimate on the same normalized scale
    positions: int | None = None  # patched at the last N positions (None: every position)
    n_pairs: int = 0

    def top(self, k: int) -> tuple[Component, ...]:
        return self.components[:k]

    def above(self, bar: float) -> tuple[Component, ...]:
        return tuple(c for c, e in zip(self.components, self.effect) if e > bar)

    def rows(self, k: int) -> list[dict]:
        from instruments.components import label, to_json

        return [{"component": to_json(c), "label": label(c), "effect": float(e), "ci_low": float(lo),
                 "ci_high": float(hi), "atp": float(a)}
                for c, e, lo, hi, a in list(zip(self.components, self.effect, self.ci_low, self.ci_high,
                                                self.atp))[:k]]


def head_patching(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig, *,
                  direction: str = "denoising", layers: tuple[int, ...] | None = None,
                  runs: PatchRuns | None = None) -> PatchResult:
    """Exact patching of every head (all positions): harmful = clean, harmless = corrupted.

    ``runs`` (from :func:`head_runs` on the same pairs) lets a sweep split by layer share its
    two unpatched runs.
    """
    return patch_heads(handle, harmful(pairs), harmless(pairs), metric_for(tokens),
                       patch_spec(handle, cfg, direction=direction, layers=layers), runs=runs)


def head_runs(handle, pairs: Sequence[Pair], cfg: RefusalConfig, *, direction: str = "denoising") -> PatchRuns:
    """The unpatched runs of :func:`head_patching` on ``pairs``, for every layer."""
    from instruments.patching import head_runs as make

    return make(handle, harmful(pairs), harmless(pairs), patch_spec(handle, cfg, direction=direction))


@dataclass(frozen=True, kw_only=True)
class AtpScan:
    """Attribution patching over every head and neuron, normalized like exact patching."""

    heads: Float[torch.Tensor, "layer head"]
    neurons: Float[torch.Tensor, "layer neuron"]
    heads_per_prompt: Float[torch.Tensor, "layer head prompt"]  # raw estimated metric change
    neurons_per_prompt: Float[torch.Tensor, "layer neuron prompt"]
    n_pairs: int = 0


def top_heads_of(scores: Float[torch.Tensor, "layer head"], n: int) -> tuple[Head, ...]:
    """The n heads with the largest score (signed: a head that restores refusal scores high)."""
    flat, n_heads = scores.reshape(-1), scores.shape[1]
    top = torch.topk(flat, min(n, flat.numel())).indices.tolist()
    return tuple(Head(layer=i // n_heads, head=i % n_heads) for i in top)


def atp_scan(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig) -> AtpScan:
    """Every head's and neuron's AtP estimate of its denoising effect, per ``cfg.atp_rule``.

    ``trapezoid`` averages the linearizations at both ends of the patch: the denoising
    estimate (gradient at the harmless run) and minus the noising one (gradient at the
    harmful run) - a two-point integrated gradient (Hanna et al. 2024's EAP-IG). A unit
    that is off and flat at the harmless run (a threshold) is invisible to the base
    gradient alone; the validation card's ``threshold`` design is that case.
    """
    args = (handle, harmful(pairs), harmless(pairs), metric_for(tokens))
    atp = attribution_patch(*args, patch_spec(handle, cfg, direction="denoising"), neurons=True)
    heads, neurons = atp.heads, atp.neurons
    if cfg.atp_rule == "trapezoid":
        back = attribution_patch(*args, patch_spec(handle, cfg, direction="noising"), neurons=True)
        heads, neurons = (heads - back.heads) / 2, (neurons - back.neurons) / 2
    return AtpScan(heads=atp.normalized(heads), neurons=atp.normalized(neurons), heads_per_prompt=heads,
                   neurons_per_prompt=neurons, n_pairs=len(pairs))


def verify(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig,
           components: Sequence[Component], atp: np.ndarray, salt: int = 4) -> Ranking:
    """Exact patching of each component alone on ``pairs``, ranked by its normalized effect, with CIs."""
    res = patch_components(handle, harmful(pairs), harmless(pairs), metric_for(tokens), list(components),
                           patch_spec(handle, cfg))
    value, lo, hi = normalized_with_ci(res.metric.double().numpy(), res.base.double().numpy(),
                                       res.source.double().numpy(), cfg, salt=salt)
    order = np.argsort(-value, kind="stable")
    return Ranking(components=tuple(components[i] for i in order), effect=value[order], ci_low=lo[order],
                   ci_high=hi[order], atp=np.asarray(atp, dtype=np.float64)[order], positions=res.positions,
                   n_pairs=res.n_pairs)


def rank_neurons(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig, scan: AtpScan,
                 k: int | None = None) -> Ranking:
    """The AtP top-k neurons (by |estimate|), each verified by exact patching, ranked by exact effect."""
    k = cfg.top_neurons if k is None else k
    flat = scan.neurons.reshape(-1)
    d_mlp = scan.neurons.shape[1]
    top = torch.topk(flat.abs(), min(k, flat.numel())).indices.tolist()
    neurons = [Neuron(layer=i // d_mlp, index=i % d_mlp) for i in top]
    return verify(handle, pairs, tokens, cfg, neurons, flat[top].double().numpy(), salt=1)
