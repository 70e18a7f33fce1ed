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
from hypotheses.evidence import (HarmlessReference, atp_scan, boot_estimate, boot_index, harmful, harmless, percentile,
                                 side_effects, top_heads_of)
from instruments import behavior, progress, stats
from instruments.ablation import AblationSpec, ReferenceActivations, ablation_hooks
from instruments.components import Head, Pattern, hook_name
from instruments.metrics import RefusalTokens, refusal_score
from instruments.patching import LAST_ONLY, PatchResult
from instruments.positions import Spans, spans


def thirds(n_layers: int) -> tuple[range, range, range]:
    """Early, middle and late layers: the seed's three stages."""
    a, b = round(n_layers / 3), round(2 * n_layers / 3)
    return range(0, a), range(a, b), range(b, n_layers)


# ----------------------------------------------------------------------------- H2: detection early

@torch.no_grad()
def keyword_attention(handle, pairs: Sequence[Pair], cfg: RefusalConfig, *,
                      side: str = "harmful") -> Float[np.ndarray, "prompt layer"]:
    """How strongly the last position attends to a prompt's *keywords*, per layer.

    Keywords are the tokens of the prompt's user message that its analogue's message lacks
    (:func:`keyword_mask`; the pairs share their form, so what differs is the content).
    ``side="harmful"`` scores the harmful prompts' keywords; ``side="harmless"`` scores the
    harmless analogues' own matched tokens, the control (a model that attends to whatever
    word differs scores the same on both sides). The score is the attention mass from the
    last position onto them (the most keyword-focused head of the layer), divided by the
    share of the prompt's real tokens they make up: 1 = no focus. A prompt with no such
    token is a row of NaN, so both sides keep the same rows (a contrast drops the pair).
    """
    names = [hook_name(Pattern(layer=layer)) for layer in range(handle.n_layers)]
    rows = []
    for chunk in behavior.batches(list(pairs), cfg.batch_size):
        harm, benign = spans(handle, harmful(chunk)), spans(handle, harmless(chunk))
        keys_harmful, keys_harmless = keyword_mask(harm, benign), keyword_mask(benign, harm)
        own, keys = (harm, keys_harmful) if side == "harmful" else (benign, keys_harmless)
        _, cache = handle.bridge.run_with_cache(own.ids, attention_mask=own.mask, names_filter=lambda n: n in names,
                                                **LAST_ONLY)  # the logits are not read
        for b in range(len(chunk)):
            key = keys[b]
            if not key.any():
                rows.append([float("nan")] * len(names))
                continue
            share = float(key.sum()) / float(own.mask[b].sum())
            rows.append([float(cache[n][b, :, -1, key].sum(-1).max()) / share for n in names])
    if not rows:
        return np.zeros((0, handle.n_layers))
    return np.asarray(rows, dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class Detection:
    """Keyword attention of harmful prompts beside the harmless control, and where it peaks.

    The peak layer is chosen on VAL pairs and tested on TEST pairs, so no layer is picked
    and confirmed on the same prompts. ``early_minus_later`` is, on test pairs, the mean
    contrast (harmful focus - harmless focus) over the early layers minus that over the
    later layers: above 0 if detection happens early.
    """

    harmful: LayerProfile  # test pairs
    control: LayerProfile  # the harmless analogues, test pairs
    contrast: LayerProfile  # harmful - control, test pairs
    contrast_val: LayerProfile  # the same on val pairs (chooses the peak)
    peak_layer: int  # argmax of the val contrast
    at_peak: stats.Estimate  # the test contrast at the val peak
    control_at_peak: stats.Estimate  # the control alone there
    early_minus_later: stats.Estimate
    early: tuple[int, ...]


def val_contrast(harm_val: np.ndarray, control_val: np.ndarray, cfg: RefusalConfig) -> tuple[LayerProfile, int]:
    """The val pairs' contrast profile and its peak layer (the layer the test pairs then score)."""
    profile = layer_profile(harm_val - control_val, cfg, salt=14)  # a NaN side drops the pair
    return profile, (int(np.nanargmax(profile.mean)) if profile.n else 0)


def detection(harm_test: np.ndarray, control_test: np.ndarray, harm_val: np.ndarray, control_val: np.ndarray,
              cfg: RefusalConfig) -> Detection:
    keep = ~np.isnan(harm_test).any(1) & ~np.isnan(control_test).any(1)
    h, c = harm_test[keep], control_test[keep]
    diff = h - c
    n_layers = harm_test.shape[1]
    early = tuple(thirds(n_layers)[0])
    later = [layer for layer in range(n_layers) if layer not in early]
    contrast_val, peak = val_contrast(harm_val, control_val, cfg)
    idx = boot_index(diff.shape[0], cfg, salt=15)

    def e_minus_l(rows: np.ndarray) -> np.ndarray:  # rows [B, P, layer] -> [B]
        return rows[..., list(early)].mean(-1).mean(-1) - rows[..., later].mean(-1).mean(-1)

    with np.errstate(all="ignore"):
        eml = boot_estimate(float(e_minus_l(diff[None])[0]) if diff.size else float("nan"),
                            e_minus_l(diff[idx]) if diff.size else np.full(cfg.n_bootstrap, np.nan), cfg,
                            diff.shape[0])
        at_peak = boot_estimate(float(diff[:, peak].mean()) if diff.size else float("nan"),
                                diff[idx][..., peak].mean(-1) if diff.size else np.full(cfg.n_bootstrap, np.nan),
                                cfg, diff.shape[0])
        control_at_peak = boot_estimate(float(c[:, peak].mean()) if c.size else float("nan"),
                                        c[idx][..., peak].mean(-1) if c.size else np.full(cfg.n_bootstrap, np.nan),
                                        cfg, c.shape[0])
    return Detection(harmful=layer_profile(h, cfg), control=layer_profile(c, cfg, salt=13),
                     contrast=layer_profile(diff, cfg, salt=16), contrast_val=contrast_val, peak_layer=peak,
                     at_peak=at_peak, control_at_peak=control_at_peak, early_minus_later=eml, early=early)


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
    values = values[~np.isnan(values).any(1)] if values.size else values
    if values.shape[0] == 0:
        nan = np.full(values.shape[1], np.nan)
        return LayerProfile(mean=nan, ci_low=nan, ci_high=nan, n=0)
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


def _slopes(y: Float[np.ndarray, "... layer"], layers: Sequence[int]) -> Float[np.ndarray, "..."]:
    """Least-squares slope of y over the given layers (per unit of layer index)."""
    x = np.asarray(layers, dtype=np.float64)
    x = x - x.mean()
    return (y[..., list(layers)] * x).sum(-1) / (x ** 2).sum()


@dataclass(frozen=True, kw_only=True)
class Accumulation:
    """Harmful minus harmless (paired) projection onto the refusal direction, normalized by the
    residual norm (a cosine: residual norms grow with depth, which an unnormalized projection
    mistakes for accumulation), by layer.

    ``statistic`` is the middle third's slope minus the larger of the early and late
    thirds' slopes: above 0 when the signal grows fastest in the middle. ``random`` holds
    the same statistic for random unit directions (the control; ``p_random`` is the share
    of them at or above the refusal direction's, +1 smoothed).
    """

    layers: tuple[int, ...]  # the middle third
    thirds: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    difference: LayerProfile  # all layers, normalized
    slopes: dict[str, stats.Estimate]
    statistic: stats.Estimate
    random: tuple[float, ...]
    p_random: float
    tau: stats.Estimate  # mean per-pair Kendall tau over the middle layers (descriptive)


def accumulation(resid_harmful: Float[torch.Tensor, "prompt layer d_model"],
                 resid_harmless: Float[torch.Tensor, "prompt layer d_model"], direction: Float[torch.Tensor, "d_model"],
                 cfg: RefusalConfig, *, n_random: int = 200) -> Accumulation:
    unit = direction.double() / direction.double().norm()
    a, b = resid_harmful.double(), resid_harmless.double()
    na, nb = a.norm(dim=-1).clamp_min(1e-12), b.norm(dim=-1).clamp_min(1e-12)

    def diff_for(u: torch.Tensor) -> np.ndarray:  # [pair, layer]
        return ((a @ u) / na - (b @ u) / nb).numpy()

    diff = diff_for(unit)
    parts = tuple(tuple(t) for t in thirds(diff.shape[1]))

    def stat(y: np.ndarray) -> np.ndarray:  # y [..., P, layer] -> [...]
        mean = y.mean(-2)
        s = [_slopes(mean, t) for t in parts]
        return s[1] - np.maximum(s[0], s[2])

    idx = boot_index(diff.shape[0], cfg, salt=17)
    boot = diff[idx]  # [B, P, layer]
    slopes = {name: boot_estimate(float(_slopes(diff.mean(0), t)), _slopes(boot.mean(1), t), cfg, diff.shape[0])
              for name, t in zip(("early", "middle", "late"), parts)}
    value = float(stat(diff))
    statistic = boot_estimate(value, stat(boot), cfg, diff.shape[0])
    g = torch.Generator().manual_seed(cfg.seed + 18)
    noise = torch.randn(n_random, unit.numel(), generator=g, dtype=torch.float64)
    rand = tuple(float(stat(diff_for(u / u.norm()))) for u in noise)
    p_random = (1 + sum(r >= value for r in rand)) / (n_random + 1)
    tau = kendall_rows(diff[:, list(parts[1])])
    tau_est = stats.bootstrap_ci(tau, n_boot=cfg.n_bootstrap, seed=cfg.seed, alpha=cfg.alpha, method="percentile") \
        if np.ptp(tau) > 0 else stats.Estimate(value=float(tau.mean()), ci_low=float(tau.mean()),
                                               ci_high=float(tau.mean()), method="constant", n=tau.size,
                                               alpha=cfg.alpha)
    return Accumulation(layers=parts[1], thirds=parts, difference=layer_profile(diff, cfg, salt=11), slopes=slopes,
                        statistic=statistic, random=rand, p_random=float(p_random), tau=tau_est)


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

# sharing is measured between categories: a prompt file with fewer usable ones leaves H3 inconclusive
H3_MIN_CATEGORIES = 2


@dataclass(frozen=True, kw_only=True)
class CrossCategory:
    """Ablate the top heads found on category A; measure refusal on category B's held-out prompts.

    ``per_prompt[a][b]`` is the share of B's harmful-harmless score gap removed on each of
    B's harmful prompts (1 = the ablation erases B's refusal signal, 0 = no effect).
    """

    categories: tuple[str, ...]
    heads: dict[str, tuple[Head, ...]]
    per_prompt: dict[str, dict[str, np.ndarray]]
    n_find: dict[str, int]  # train pairs each category's heads were chosen on
    side_effects: dict[str, tuple[float, float | None]]  # per category's heads: (KL, CE rise) on harmless prompts

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


def category_heads(handle, find: dict[str, Sequence[Pair]], tokens: RefusalTokens,
                   cfg: RefusalConfig) -> dict[str, tuple[Head, ...]]:
    """Each category's top heads by AtP on its own ``find`` (train) pairs."""
    heads: dict[str, tuple[Head, ...]] = {}
    for c in progress.track(sorted(find), "H3: AtP heads of each category", unit="category", quiet=True):
        heads[c] = top_heads_of(atp_scan(handle, find[c], tokens, cfg).heads, cfg.top_heads)
    return heads


def cross_category(handle, heads: dict[str, tuple[Head, ...]], evaluate: dict[str, Sequence[Pair]],
                   tokens: RefusalTokens, cfg: RefusalConfig, *,
                   reference: Sequence[str] | ReferenceActivations, positions: int | None,
                   harmless_ref: HarmlessReference | None = None, n_find: dict[str, int] | None = None) -> CrossCategory:
    """Mean-ablation effects of every category's ``heads`` on every ``evaluate`` set.

    The ablation is the study's (``positions``: the last N prompt positions, each from its own
    reference position), so H3 ablates the way the heads were found. With ``harmless_ref`` each
    category's ablation also has its side effects measured (the one rule of every ablation line)."""
    categories = tuple(sorted(heads))
    bs = cfg.batch_size
    # every category's prompts in one list, scored in full batches; ``where[b]`` slices b's out
    prompts = [p for b in categories for p in evaluate[b]]
    where, start = {}, 0
    for b in categories:
        where[b] = slice(start, start + len(evaluate[b]))
        start += len(evaluate[b])

    def scores(side, hooks=()) -> np.ndarray:
        logits = behavior.last_logits(handle, side(prompts), batch_size=bs, fwd_hooks=hooks)
        return refusal_score(logits, tokens).double().numpy()

    clean, benign = scores(harmful), scores(harmless)
    base = {b: clean[where[b]] for b in categories}
    gap = {b: float(clean[where[b]].mean() - benign[where[b]].mean()) for b in categories}
    per: dict[str, dict[str, np.ndarray]] = {}
    side: dict[str, tuple[float, float | None]] = {}
    for a in progress.track(categories, "H3: each category's heads ablated", unit="category", quiet=True):
        hooks = ablation_hooks(handle, list(heads[a]), spec=AblationSpec(method="mean", batch_size=bs,
                                                                         positions=positions), reference=reference)
        if harmless_ref is not None:
            side[a] = side_effects(handle, hooks, harmless_ref, cfg)
        ablated = scores(harmful, hooks)
        per[a] = {b: (base[b] - ablated[where[b]]) / gap[b] if gap[b] != 0 else np.full(len(evaluate[b]), np.nan)
                  for b in categories}
    return CrossCategory(categories=categories, heads=heads, per_prompt=per,
                         n_find=dict(n_find or {}), side_effects=side)


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
    if len(cats) < H3_MIN_CATEGORIES:
        raise ValueError(f"category similarity needs at least {H3_MIN_CATEGORIES} categories with test pairs, got "
                         f"{len(cats)}")

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
