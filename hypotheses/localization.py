"""H1 and C1 measurements: components chosen on train pairs, scored on pairs that chose nothing.

The field's recipe (Kramar et al. 2024, AtP*): attribution patching ranks every head and
neuron on many train pairs at the cost of one forward and one backward pass; the AtP top
candidates are then verified by exact patching. The verified ranking chooses; the test
pairs score. Pure functions over a model and prompts, like ``hypotheses.evidence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses.evidence import (AtpScan, Condition, boot_estimate, boot_index, harmful, harmless, metric_for,
                                 patch_spec, top_heads_of)
from instruments import stats
from instruments.components import Component, Head, Neuron
from instruments.metrics import RefusalTokens
from instruments.patching import PatchResult, patch_components


# ----------------------------------------------------------------------------- choosing (train)

def atp_candidates(scan: AtpScan, n: int) -> tuple[Head, ...]:
    """The n heads with the largest AtP estimate (signed: a head that restores refusal scores high)."""
    return top_heads_of(scan.heads, n)


def parameters_of(handle, c: Component) -> int:
    """Weights a component owns: a query head its W_Q and W_O and its share of the grouped W_K, W_V;
    a neuron its rows of the gated MLP (gate, up, down)."""
    if isinstance(c, Head):
        group = handle.n_heads // max(1, handle.n_kv_heads)
        return 2 * handle.d_model * handle.d_head + 2 * handle.d_model * handle.d_head // group
    if isinstance(c, Neuron):
        return 3 * handle.d_model
    raise TypeError(f"no parameter count for {type(c).__name__}")


@dataclass(frozen=True, kw_only=True)
class PooledRanking:
    """Every head and neuron by AtP estimate on train (one normalized scale), largest first."""

    components: tuple[Component, ...]
    atp: Float[np.ndarray, "component"]
    parameters: Float[np.ndarray, "component"]  # weights each component owns
    n_heads: int
    n_neurons: int

    def family(self, which: str) -> "PooledRanking":
        keep = [i for i, c in enumerate(self.components)
                if which == "heads+neurons" or isinstance(c, Head if which == "heads" else Neuron)]
        return PooledRanking(components=tuple(self.components[i] for i in keep), atp=self.atp[keep],
                             parameters=self.parameters[keep], n_heads=self.n_heads if which != "neurons" else 0,
                             n_neurons=self.n_neurons if which != "heads" else 0)

    @property
    def total(self) -> int:
        return len(self.components)

    def top_fraction(self, fraction: float) -> tuple[Component, ...]:
        """The top ``fraction`` of components by count (at least one); H1's bar is strict (fewer than)."""
        k = max(1, int(np.floor(fraction * self.total - 1e-9)))
        return self.components[:k]

    def top_parameters(self, fraction: float) -> tuple[Component, ...]:
        """The top components, in rank order, whose weights stay within ``fraction`` of the family's."""
        budget = fraction * float(self.parameters.sum())
        within = np.cumsum(self.parameters) <= budget
        return self.components[:max(1, int(within.sum()))]


def pooled_ranking(handle, scan: AtpScan) -> PooledRanking:
    heads = [Head(layer=layer, head=h) for layer in range(scan.heads.shape[0]) for h in range(scan.heads.shape[1])]
    neurons = [Neuron(layer=layer, index=i) for layer in range(scan.neurons.shape[0])
               for i in range(scan.neurons.shape[1])]
    comps = heads + neurons
    atp = np.concatenate([scan.heads.reshape(-1).double().numpy(), scan.neurons.reshape(-1).double().numpy()])
    params = np.array([parameters_of(handle, heads[0])] * len(heads) + [parameters_of(handle, neurons[0])] * len(neurons),
                      dtype=np.float64)
    order = np.argsort(-atp, kind="stable")
    return PooledRanking(components=tuple(comps[i] for i in order), atp=atp[order], parameters=params[order],
                         n_heads=len(heads), n_neurons=len(neurons))


# ----------------------------------------------------------------------------- scoring (test)

@dataclass(frozen=True, kw_only=True)
class EffectShare:
    """Share of the refusal-score gap restored on test pairs by the top components of each family,
    patched together, at several fractions of the family (the effect-share curve)."""

    families: dict[str, dict[str, list]]  # family -> {"fraction", "count", "share" (Estimates)}
    parameters: dict[str, list]  # heads + neurons by parameter budget: {"fraction", "count", "share"}
    controls: dict[str, stats.Estimate]  # random matched sets patched the same way, by name
    differences: dict[str, stats.Estimate]  # the chosen set's share minus its control's (paired)
    n_pairs: int
    positions: int | None
    totals: dict[str, int]

    def at(self, family: str, fraction: float) -> stats.Estimate:
        table = self.parameters if family == "parameters" else self.families[family]
        return table["share"][table["fraction"].index(fraction)]


def joint_shares(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig,
                 groups: Sequence[Sequence[Component]], salt: int = 2
                 ) -> tuple[list[stats.Estimate], PatchResult, np.ndarray, np.ndarray]:
    """Each group patched together on ``pairs``: normalized effect with a bootstrap CI over prompts.

    Also returns (point values [group], replicates [group, B]): every group shares one
    bootstrap draw of prompts, so differences between groups are paired."""
    res = patch_components(handle, harmful(pairs), harmless(pairs), metric_for(tokens), [tuple(g) for g in groups],
                           patch_spec(handle, cfg))
    metric, base, source = (x.double().numpy() for x in (res.metric, res.base, res.source))
    idx = boot_index(base.size, cfg, salt=salt)
    b, s = base[idx].mean(-1), source[idx].mean(-1)
    with np.errstate(all="ignore"):
        boot = (metric[:, idx].mean(-1) - b) / (s - b)  # [group, B]
        value = (metric.mean(-1) - base.mean()) / (source.mean() - base.mean())
    return [boot_estimate(v, r, cfg, base.size) for v, r in zip(value, boot)], res, value, boot


def effect_share(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig, pooled: PooledRanking,
                 fractions: Sequence[float], controls: dict[str, Sequence[Component]] | None = None,
                 at: float | None = None) -> EffectShare:
    """The curve for heads, neurons and both (by count), and for both by parameter budget, in one
    sweep. Each of ``controls`` (a random set matched to "heads+neurons" or "parameters" at the
    fraction ``at``) is patched the same way, and compared with that set, paired."""
    plan: list[tuple[str, float, tuple[Component, ...]]] = []
    for fam in ("heads", "neurons", "heads+neurons"):
        ranked = pooled.family(fam)
        plan += [(fam, f, ranked.top_fraction(f)) for f in fractions]
    plan += [("parameters", f, pooled.top_parameters(f)) for f in fractions]
    controls = dict(controls or {})
    groups = [g for _, _, g in plan] + [tuple(c) for c in controls.values()]
    shares, res, value, boot = joint_shares(handle, pairs, tokens, cfg, groups)
    control_shares = dict(zip(controls, shares[len(plan):]))
    differences = {}
    for j, name in enumerate(controls, start=len(plan)):
        i = next(k for k, (fam, f, _) in enumerate(plan) if fam == name and f == at)
        differences[name] = boot_estimate(value[i] - value[j], boot[i] - boot[j], cfg, res.n_pairs)
    families: dict[str, dict[str, list]] = {}
    for (fam, f, group), share in zip(plan, shares):
        table = families.setdefault(fam, {"fraction": [], "count": [], "share": []})
        table["fraction"].append(float(f))
        table["count"].append(len(group))
        table["share"].append(share)
    params = families.pop("parameters")
    totals = {"heads": pooled.n_heads, "neurons": pooled.n_neurons,
              "parameters_heads": int(pooled.family("heads").parameters.sum()),
              "parameters_neurons": int(pooled.family("neurons").parameters.sum())}
    return EffectShare(families=families, parameters=params, controls=control_shares, differences=differences,
                       n_pairs=res.n_pairs,
                       positions=res.positions, totals=totals)


def held_share(test_scan: AtpScan, chosen: Sequence[Component], cfg: RefusalConfig) -> stats.Estimate:
    """Share of the test pairs' total |prompt-mean AtP| (heads + neurons) held by ``chosen``, a set
    fixed on train: the bootstrap resamples test prompts and never re-chooses."""
    n_heads, d_mlp = test_scan.heads_per_prompt.shape[1], test_scan.neurons_per_prompt.shape[1]
    scores = torch.cat([test_scan.heads_per_prompt.reshape(-1, test_scan.heads_per_prompt.shape[-1]),
                        test_scan.neurons_per_prompt.reshape(-1, test_scan.neurons_per_prompt.shape[-1])]).T
    scores = scores.double().numpy()  # [prompt, component]
    n_head_rows = test_scan.heads_per_prompt.shape[0] * n_heads
    cols = [c.layer * n_heads + c.head if isinstance(c, Head) else n_head_rows + c.layer * d_mlp + c.index
            for c in chosen]

    n = scores.shape[0]

    def stat(idx: np.ndarray) -> np.ndarray:  # idx [B, P] -> [B]
        # each resample's prompt-mean as counts @ scores, in chunks of resamples: a [B, P, component]
        # gather would not fit at 46k components
        out = []
        for chunk in np.array_split(idx, max(1, idx.shape[0] // 50)):
            counts = np.zeros((chunk.shape[0], n))
            np.add.at(counts, (np.arange(chunk.shape[0])[:, None], chunk), 1.0)
            mean = np.abs(counts @ scores / n)  # [b, component]
            out.append(mean[:, cols].sum(1) / mean.sum(1))
        return np.concatenate(out)

    value = float(stat(np.arange(n)[None])[0])
    with np.errstate(all="ignore"):
        boot = stat(boot_index(n, cfg, salt=41))
    return boot_estimate(value, boot, cfg, n)


def drop_difference(circuit: Condition, control: Condition, cfg: RefusalConfig, salt: int = 60) -> stats.Estimate:
    """The circuit's relative refusal drop minus its matched control's, paired over the same prompts."""
    base = circuit.baseline.refused.astype(np.float64)
    a, r = circuit.ablated.refused.astype(np.float64), control.ablated.refused.astype(np.float64)
    if base.mean() == 0:
        return boot_estimate(float("nan"), np.full(cfg.n_bootstrap, np.nan), cfg, base.size)
    value = (1 - a.mean() / base.mean()) - (1 - r.mean() / base.mean())
    idx = boot_index(base.size, cfg, salt)
    with np.errstate(all="ignore"):
        boot = (r[idx].mean(-1) - a[idx].mean(-1)) / base[idx].mean(-1)
    return boot_estimate(value, boot, cfg, base.size)


def verified_on_test(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig,
                     candidates: Sequence[Head]) -> "Verified":
    """Each candidate's exact effect on test pairs, with one-sided bootstrap p-values against the C1 bar."""
    res = patch_components(handle, harmful(pairs), harmless(pairs), metric_for(tokens), list(candidates),
                           patch_spec(handle, cfg))
    metric, base, source = (x.double().numpy() for x in (res.metric, res.base, res.source))
    value = (metric.mean(-1) - base.mean()) / (source.mean() - base.mean())
    idx = boot_index(base.size, cfg, salt=70)
    b, s = base[idx].mean(-1), source[idx].mean(-1)
    with np.errstate(all="ignore"):
        boot = (metric[:, idx].mean(-1) - b) / (s - b)  # [candidate, B]
    from scipy.stats import norm

    # one-sided p-values against the C1 bar from the bootstrap standard error (normal
    # approximation, as every other line's): a bootstrap count would floor p at 1 / (B + 1),
    # too coarse for a Holm correction over many candidates
    se = np.nanstd(np.where(np.isfinite(boot), boot, np.nan), axis=-1)
    z = (value - cfg.head_effect) / np.where(se > 0, se, np.nan)
    z = np.where(se > 0, z, np.where(value > cfg.head_effect, np.inf, -np.inf))
    p_above, p_below = norm.sf(z), norm.cdf(z)
    return Verified(components=tuple(candidates), effect=value, se=se, p_above=p_above, p_below=p_below,
                    n_pairs=res.n_pairs, positions=res.positions)


@dataclass(frozen=True, kw_only=True)
class Verified:
    """Candidate heads' exact effects on test pairs, with bootstrap SEs and one-sided p-values."""

    components: tuple[Head, ...]
    effect: Float[np.ndarray, "candidate"]
    se: Float[np.ndarray, "candidate"]
    p_above: Float[np.ndarray, "candidate"]  # H0: effect <= bar
    p_below: Float[np.ndarray, "candidate"]  # H0: effect >= bar
    n_pairs: int
    positions: int | None
