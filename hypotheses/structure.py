"""Measurements of *where* and *across what* refusal is computed (H2 stages, H3 categories).

Pure functions over a model and prompts, like ``hypotheses.evidence``; the decisions live
in ``hypotheses.decisions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses.evidence import atp_scan, boot_estimate, boot_index, harmful, harmless, percentile
from instruments import behavior, stats
from instruments.ablation import AblationSpec, ReferenceActivations, ablation_hooks
from instruments.components import Head, Pattern, hook_name
from instruments.metrics import RefusalTokens, refusal_score
from instruments.patching import PatchResult
from instruments.positions import Spans, spans


def thirds(n_layers: int) -> tuple[range, range, range]:
    """Early, middle and late layers: the seed's three stages."""
    a, b = round(n_layers / 3), round(2 * n_layers / 3)
    return range(0, a), range(a, b), range(b, n_layers)


# ----------------------------------------------------------------------------- H2: detection early

@torch.no_grad()
def keyword_attention(handle, pairs: Sequence[Pair], cfg: RefusalConfig) -> Float[np.ndarray, "prompt layer"]:
    """How strongly the last position attends to a harmful prompt's *keywords*, per layer.

    Keywords are the tokens of the harmful prompt's user message that its harmless
    analogue's message lacks (:func:`keyword_mask`; the pairs share their form, so what
    differs is the harmful content). The score is the attention mass from the last
    position onto them (the most keyword-focused head of the layer), divided by the share
    of the prompt's real tokens they make up: 1 = no focus. Prompts whose pair differs in
    no token are left out.
    """
    names = [hook_name(Pattern(layer=layer)) for layer in range(handle.n_layers)]
    rows = []
    for chunk in behavior.batches(list(pairs), cfg.batch_size):
        harm, benign = spans(handle, harmful(chunk)), spans(handle, harmless(chunk))
        keys = keyword_mask(harm, benign)
        _, cache = handle.bridge.run_with_cache(harm.ids, attention_mask=harm.mask, names_filter=lambda n: n in names)
        for b in range(len(chunk)):
            key = keys[b]
            if not key.any():
                continue
            share = float(key.sum()) / float(harm.mask[b].sum())
            rows.append([float(cache[n][b, :, -1, key].sum(-1).max()) / share for n in names])
    if not rows:
        return np.zeros((0, handle.n_layers))
    return np.asarray(rows, dtype=np.float64)


def keyword_mask(harmful_spans: Spans, harmless_spans: Spans) -> Bool[torch.Tensor, "batch pos"]:
    """Per pair, the harmful prompt's user-message tokens whose ids its harmless analogue's message lacks.

    Both sides come from the user-message spans (located through the chat template), so
    template tokens and padding never count, whatever the pad id is.
    """
    if harmful_spans.ids.shape[0] != harmless_spans.ids.shape[0]:
        raise ValueError(f"{harmful_spans.ids.shape[0]} harmful and {harmless_spans.ids.shape[0]} harmless prompts: "
                         "keywords need one harmless analogue per harmful prompt")
    keys = torch.zeros_like(harmful_spans.user)
    for b in range(harmful_spans.ids.shape[0]):
        other = harmless_spans.ids[b][harmless_spans.user[b]].to(harmful_spans.ids.device)
        keys[b] = harmful_spans.user[b] & ~torch.isin(harmful_spans.ids[b], other)
    return keys


@dataclass(frozen=True, kw_only=True)
class LayerProfile:
    """A per-layer quantity with bootstrap CIs over prompts."""

    mean: Float[np.ndarray, "layer"]
    ci_low: Float[np.ndarray, "layer"]
    ci_high: Float[np.ndarray, "layer"]
    n: int


def layer_profile(values: Float[np.ndarray, "prompt layer"], cfg: RefusalConfig, salt: int = 10) -> LayerProfile:
    idx = boot_index(values.shape[0], cfg, salt)
    boot = values[idx].mean(1).T  # [layer, B]
    lo, hi = percentile(boot, cfg.alpha)
    return LayerProfile(mean=values.mean(0), ci_low=lo, ci_high=hi, n=values.shape[0])


# ----------------------------------------------------------------------------- H2: accumulation in the middle

def kendall_rows(y: Float[np.ndarray, "prompt layer"]) -> Float[np.ndarray, "prompt"]:
    """Kendall's tau of each row against the layer index (1 = strictly rising)."""
    n = y.shape[1]
    i, j = np.triu_indices(n, k=1)
    signs = np.sign(y[:, j] - y[:, i])  # j > i always: a rise counts +1
    return signs.sum(1) / len(i)


@dataclass(frozen=True, kw_only=True)
class Accumulation:
    """Projection of harmful minus harmless (paired) onto the refusal direction, by layer."""

    layers: tuple[int, ...]  # the middle third
    difference: LayerProfile  # all layers
    tau: stats.Estimate  # mean per-pair Kendall tau over the middle layers


def accumulation(proj_harmful: Float[torch.Tensor, "layer prompt"], proj_harmless: Float[torch.Tensor, "layer prompt"],
                 cfg: RefusalConfig) -> Accumulation:
    diff = (proj_harmful - proj_harmless).T.double().numpy()  # [pair, layer]
    middle = thirds(diff.shape[1])[1]
    tau = kendall_rows(diff[:, list(middle)])
    est = stats.bootstrap_ci(tau, n_boot=cfg.n_bootstrap, seed=cfg.seed, alpha=cfg.alpha, method="percentile") \
        if np.ptp(tau) > 0 else stats.Estimate(value=float(tau.mean()), ci_low=float(tau.mean()),
                                               ci_high=float(tau.mean()), method="constant", n=tau.size,
                                               alpha=cfg.alpha)
    return Accumulation(layers=tuple(middle), difference=layer_profile(diff, cfg, salt=11), tau=est)


# ----------------------------------------------------------------------------- H2: execution late

def effect_depth(results: PatchResult | Sequence[PatchResult], cfg: RefusalConfig,
                 n_layers: int | None = None) -> stats.Estimate:
    """Effect-weighted mean relative depth (0 = first layer, 1 = last) of components' positive effects.

    ``results`` are layer sweeps over the same prompts (e.g. attention and MLP outputs per
    layer, or every head); their components are pooled per layer. Per bootstrap resample
    of prompts: each component's normalized effect, clipped at 0, summed per layer, and the
    depth averaged with those weights. Late execution means a depth near 1.
    """
    parts = [results] if isinstance(results, PatchResult) else list(results)
    first = parts[0]
    n_layers = n_layers or (max(first.layers) + 1)
    metric = np.concatenate([p.metric.reshape(len(p.layers), -1, p.metric.shape[-1]).double().numpy()
                             for p in parts], axis=1)  # [layer, component, prompt]
    base, source = first.base.double().numpy(), first.source.double().numpy()
    depth = np.asarray(first.layers, dtype=np.float64) / max(1, n_layers - 1)

    def stat(idx: np.ndarray) -> np.ndarray:  # idx [B, P] -> [B]
        b, s = base[idx].mean(-1), source[idx].mean(-1)
        eff = (metric[:, :, idx].mean(-1) - b) / (s - b)  # [layer, head, B]
        w = np.clip(eff, 0, None).sum(1)  # [layer, B]
        return (w * depth[:, None]).sum(0) / w.sum(0)

    value = float(stat(np.arange(base.size)[None])[0])
    with np.errstate(all="ignore"):
        boot = stat(boot_index(base.size, cfg, salt=12))
    return boot_estimate(value, boot, cfg, base.size)


# ----------------------------------------------------------------------------- H3: across harm categories

@dataclass(frozen=True, kw_only=True)
class CrossCategory:
    """Ablate the top heads found on category A; measure refusal on category B's held-out prompts.

    ``per_prompt[a][b]`` is the share of B's harmful-harmless score gap removed on each of
    B's harmful prompts (1 = the ablation erases B's refusal signal, 0 = no effect).
    """

    categories: tuple[str, ...]
    heads: dict[str, tuple[Head, ...]]
    per_prompt: dict[str, dict[str, np.ndarray]]

    @property
    def matrix(self) -> Float[np.ndarray, "a b"]:
        return np.array([[self.per_prompt[a][b].mean() for b in self.categories] for a in self.categories])

    @property
    def overlap(self) -> Float[np.ndarray, "a b"]:
        sets = [set(self.heads[c]) for c in self.categories]
        return np.array([[len(x & y) / max(1, len(x | y)) for y in sets] for x in sets])

    def shared_ratio(self, b: str, cfg: RefusalConfig) -> tuple[stats.Estimate, stats.Estimate]:
        """(own effect, mean other-category effect / own effect) on category b, bootstrap over b's prompts."""
        own = self.per_prompt[b][b]
        others = np.stack([self.per_prompt[a][b] for a in self.categories if a != b])  # [A-1, P]
        idx = boot_index(own.size, cfg, salt=20 + self.categories.index(b))
        with np.errstate(all="ignore"):
            ratio_boot = others[:, idx].mean(-1).mean(0) / own[idx].mean(-1)
            own_boot = own[idx].mean(-1)
        value = float(others.mean() / own.mean()) if own.mean() != 0 else float("nan")
        return boot_estimate(own.mean(), own_boot, cfg, own.size), boot_estimate(value, ratio_boot, cfg, own.size)


def cross_category(handle, find: dict[str, Sequence[Pair]], evaluate: dict[str, Sequence[Pair]],
                   tokens: RefusalTokens, cfg: RefusalConfig, *,
                   reference: Sequence[str] | ReferenceActivations, positions: int | None) -> CrossCategory:
    """Top heads per category by AtP on its ``find`` pairs; mean-ablation effects on every ``evaluate`` set.

    The ablation is the study's (``positions``: the last N prompt positions, each from its own
    reference position), so H3 ablates the way the heads were found."""
    categories = tuple(sorted(find))
    heads: dict[str, tuple[Head, ...]] = {}
    for c in categories:
        scan = atp_scan(handle, find[c], tokens, cfg)
        flat = scan.heads.reshape(-1)
        top = torch.topk(flat, min(cfg.top_heads, flat.numel())).indices.tolist()
        heads[c] = tuple(Head(layer=i // handle.n_heads, head=i % handle.n_heads) for i in top)
    bs = cfg.batch_size
    base, gap = {}, {}
    for b in categories:
        base[b] = refusal_score(behavior.last_logits(handle, harmful(evaluate[b]), batch_size=bs), tokens).double().numpy()
        benign = refusal_score(behavior.last_logits(handle, harmless(evaluate[b]), batch_size=bs), tokens).double()
        gap[b] = float(base[b].mean() - benign.mean())
    per: dict[str, dict[str, np.ndarray]] = {}
    for a in categories:
        hooks = ablation_hooks(handle, list(heads[a]), spec=AblationSpec(method="mean", batch_size=bs,
                                                                         positions=positions), reference=reference)
        per[a] = {}
        for b in categories:
            ablated = refusal_score(behavior.last_logits(handle, harmful(evaluate[b]), batch_size=bs,
                                                         fwd_hooks=hooks), tokens).double().numpy()
            per[a][b] = (base[b] - ablated) / gap[b] if gap[b] != 0 else np.full_like(ablated, np.nan)
    return CrossCategory(categories=categories, heads=heads, per_prompt=per)


@torch.no_grad()
def category_directions(handle, find: dict[str, Sequence[Pair]], *, layer: int,
                        batch_size: int) -> dict[str, Float[torch.Tensor, "pair d_model"]]:
    """Per pair, harmful minus harmless residual (last position, entering ``layer``), by category."""
    from instruments.direction import resid_at

    out = {}
    for c, pairs in sorted(find.items()):
        a = resid_at(handle, harmful(pairs), positions=(-1,), batch_size=batch_size, layers=(layer,))[:, 0, 0]
        b = resid_at(handle, harmless(pairs), positions=(-1,), batch_size=batch_size, layers=(layer,))[:, 0, 0]
        out[c] = (a - b).double()
    return out


def category_similarity(diffs: dict[str, torch.Tensor], cfg: RefusalConfig) -> tuple[np.ndarray, stats.Estimate]:
    """Cosine similarity of categories' mean difference vectors, and the mean off-diagonal with a CI.

    The bootstrap resamples pairs within each category (stratified), so it reflects how
    well each category's direction is pinned down by its own prompts.
    """
    cats = sorted(diffs)
    if len(cats) < 2:
        raise ValueError("category similarity needs at least two categories")

    def cos_matrix(means: list[torch.Tensor]) -> np.ndarray:
        m = torch.stack(means)
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (m @ m.T).numpy()

    full = cos_matrix([diffs[c].mean(0) for c in cats])
    off = ~np.eye(len(cats), dtype=bool)
    rng = np.random.default_rng(cfg.seed + 30)
    boot = []
    for _ in range(cfg.n_bootstrap):
        means = [diffs[c][torch.from_numpy(rng.integers(0, diffs[c].shape[0], diffs[c].shape[0]))].mean(0)
                 for c in cats]
        boot.append(cos_matrix(means)[off].mean())
    return full, boot_estimate(full[off].mean(), np.asarray(boot), cfg, sum(d.shape[0] for d in diffs.values()),
                               method="stratified bootstrap-percentile")


# ----------------------------------------------------------------------------- concentration (H1, gradients)

def top_share(scores: Float[np.ndarray, "prompt component"], k: int, cfg: RefusalConfig) -> stats.Estimate:
    """Share of the total |prompt-mean attribution| held by the k largest components, with a CI."""
    def stat(idx: np.ndarray) -> np.ndarray:
        mean = np.abs(scores[idx].mean(1))  # [B, component]
        part = -np.sort(-mean, axis=1)[:, :k].sum(1)
        return part / mean.sum(1)

    value = float(stat(np.arange(scores.shape[0])[None])[0])
    with np.errstate(all="ignore"):
        boot = stat(boot_index(scores.shape[0], cfg, salt=40))
    return boot_estimate(value, boot, cfg, scores.shape[0])

