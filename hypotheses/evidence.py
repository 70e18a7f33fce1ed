"""Measurements the hypotheses are decided on: pure functions over a model and prompts.

Each function runs instruments on a handle and returns a frozen result; nothing here
writes files (fixtures record) and nothing decides (``hypotheses.decisions`` does).
Components are always *chosen* on train (or val) prompts and *evaluated* on test prompts.

Two ways to say that a prompt was refused (``RefusalConfig.judge``): ``generate`` runs
greedy generation and the refusal classifier (what a user sees); ``first_token`` asks
whether P(refusal tokens) > P(compliance tokens) at the last position, for models that
cannot write text (the planted and null models of the self-validation tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from instruments import behavior, stats
from instruments.ablation import AblationSpec, ReferenceActivations, ablation_hooks
from instruments.components import Component, Head, Neuron
from instruments.metrics import RefusalTokens, compliance_prob, refusal_prob, refusal_score
from instruments.patching import (PatchResult, PatchRuns, PatchSpec, attribution_patch, patch_components,
                                 patch_heads)

Hook = tuple[str, object]


def metric_for(tokens: RefusalTokens):
    """The refusal score (log-odds of the refusal tokens at the last position) as a patching metric."""
    return partial(refusal_score, tokens=tokens)


def harmful(pairs: Sequence[Pair]) -> list[str]:
    return [p.harmful for p in pairs]


def harmless(pairs: Sequence[Pair]) -> list[str]:
    return [p.harmless for p in pairs]


# ----------------------------------------------------------------------------- refusal, as judged

@dataclass(frozen=True, kw_only=True)
class Judged:
    """Refusal of each prompt under one condition: flags, scores and (generate judge) the texts.

    A degenerate answer (no letter or digit: :func:`instruments.behavior.is_degenerate`) is
    neither refused nor complied with; its flags and rate stand beside the refusal ones.
    """

    refused: Bool[np.ndarray, "prompt"]
    scores: Float[np.ndarray, "prompt"]
    texts: tuple[str, ...]

    @property
    def rate(self) -> float:
        return float(self.refused.mean()) if self.refused.size else float("nan")

    @property
    def degenerate(self) -> Bool[np.ndarray, "prompt"]:
        # the first_token judge writes no text (texts is empty): under it nothing is degenerate
        if not self.texts:
            return np.zeros(self.refused.shape, dtype=bool)
        return np.array([behavior.is_degenerate(t) for t in self.texts], dtype=bool)

    @property
    def degenerate_rate(self) -> float:
        return float(self.degenerate.mean()) if self.refused.size else float("nan")


def judge(handle, prompts: Sequence[str], tokens: RefusalTokens, cfg: RefusalConfig, *,
          hooks: Sequence[Hook] = ()) -> Judged:
    """Which prompts the model refuses (under ``hooks``), by the configured judge.

    The scores come from the generation's first step when it generates (the same forward
    pass over the prompts; a separate one cost 8 s per 40 prompts on 2 cores).
    """
    if cfg.judge == "first_token":
        logits = behavior.last_logits(handle, prompts, batch_size=cfg.batch_size, fwd_hooks=hooks)
        refused = (refusal_prob(logits, tokens) > compliance_prob(logits, tokens)).numpy()
        # no text, so no answer is degenerate: every prompt is refused or complied with
        return Judged(refused=refused, scores=refusal_score(logits, tokens).numpy().astype(np.float64), texts=())
    gen = behavior.generate(handle, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                            fwd_hooks=hooks)
    scores = refusal_score(gen.prompt_logits, tokens).numpy().astype(np.float64)
    return Judged(refused=np.asarray(gen.refused, dtype=bool), scores=scores, texts=gen.texts)


# ----------------------------------------------------------------------------- the behaviour to explain

@dataclass(frozen=True, kw_only=True)
class Behaviour:
    """Does the model treat harmful and harmless test prompts differently at all?

    Without a significant gap there is no mechanism to localize: every hypothesis is then
    inconclusive (the null-model tests rest on this gate).
    """

    score_harmful: Float[np.ndarray, "prompt"]
    score_harmless: Float[np.ndarray, "prompt"]
    gap: stats.Estimate  # mean paired score difference harmful - harmless, with its CI
    p_value: float  # paired permutation test
    refused_harmful: Judged
    refused_harmless: Judged

    alpha: float = 0.05

    @property
    def refusal_test(self) -> stats.McNemarResult:
        """Harmful vs harmless refusal on the same pairs (McNemar: the pairs are matched)."""
        return stats.mcnemar(self.refused_harmless.refused, self.refused_harmful.refused, alpha=self.alpha,
                             n_boot=200)

    @property
    def present(self) -> bool:
        """Refusal behaviour worth explaining: the score gap is positive (CI and permutation test)
        *and* harmful prompts are refused significantly more often than their analogues."""
        more = self.refused_harmful.refused.sum() > self.refused_harmless.refused.sum()
        return bool(self.gap.ci_low > 0 and self.p_value < self.alpha and more
                    and self.refusal_test.p_value < self.alpha)

    def reason(self, alpha: float) -> str:
        return (f"refusal score gap harmful - harmless {self.gap.value:.3g} "
                f"[{self.gap.ci_low:.3g}, {self.gap.ci_high:.3g}], permutation p={self.p_value:.3g}; "
                f"refused: {int(self.refused_harmful.refused.sum())}/{self.refused_harmful.refused.size} harmful vs "
                f"{int(self.refused_harmless.refused.sum())}/{self.refused_harmless.refused.size} harmless test "
                f"prompts, McNemar p={self.refusal_test.p_value:.3g}")


def behaviour(handle, test: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig, *,
              judged: tuple[Judged, Judged] | None = None) -> Behaviour:
    """The test split's refusal gap; ``judged`` reuses (harmful, harmless) judgements already made."""
    bad, good = judged or (judge(handle, harmful(test), tokens, cfg), judge(handle, harmless(test), tokens, cfg))
    diff = bad.scores - good.scores
    gap = stats.bootstrap_ci(diff, n_boot=cfg.n_bootstrap, seed=cfg.seed, alpha=cfg.alpha, method="percentile")
    perm = stats.paired_permutation_test(bad.scores, good.scores, n_perm=max(cfg.n_bootstrap, 1000), seed=cfg.seed)
    return Behaviour(score_harmful=bad.scores, score_harmless=good.scores, gap=gap, p_value=float(perm.p_value),
                     refused_harmful=bad, refused_harmless=good, alpha=cfg.alpha)


# ----------------------------------------------------------------------------- bootstrap helpers

def boot_index(n: int, cfg: RefusalConfig, salt: int = 0) -> np.ndarray:
    """Bootstrap resamples of n items, [B, n]: one seeded draw shared by all components."""
    return np.random.default_rng(cfg.seed + salt).integers(0, n, size=(cfg.n_bootstrap, n))


def percentile(boot: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI over the last axis, ignoring non-finite replicates (an empty gap in a resample)."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row yields NaN bounds: inconclusive
        lo, hi = np.nanquantile(np.where(np.isfinite(boot), boot, np.nan), [alpha / 2, 1 - alpha / 2], axis=-1)
    return lo, hi


def boot_estimate(value: float, boot: np.ndarray, cfg: RefusalConfig, n: int,
                  method: str = "bootstrap-percentile") -> stats.Estimate:
    """A point value with the percentile CI of its bootstrap replicates.

    The interval is widened to contain the point itself (a percentile interval of a biased
    statistic can miss it), so a decision never rests on an interval that excludes its own
    estimate. Undefined values and bounds stay NaN, which the decisions read as inconclusive.
    """
    lo, hi = (float(x[0]) for x in percentile(np.asarray(boot, dtype=np.float64)[None], cfg.alpha))
    value = float(value)
    if not math.isnan(value):
        lo = lo if math.isnan(lo) else min(lo, value)
        hi = hi if math.isnan(hi) else max(hi, value)
    else:
        lo = hi = float("nan")
    return stats.Estimate(value=value, ci_low=lo, ci_high=hi, method=f"{method} (B={np.size(boot)})", n=int(n),
                          alpha=cfg.alpha)


def normalized_with_ci(metric: np.ndarray, base: np.ndarray, source: np.ndarray,
                       cfg: RefusalConfig, salt: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized effect (0 = base, 1 = source) of each component row, with a bootstrap CI over prompts.

    ``metric`` is [component, prompt]; normalization happens after averaging the resampled
    prompts, as in :attr:`PatchResult.normalized`.
    """
    metric, base, source = (np.asarray(x, dtype=np.float64) for x in (metric, base, source))
    value = (metric.mean(-1) - base.mean()) / (source.mean() - base.mean())
    idx = boot_index(base.size, cfg, salt)
    b, s = base[idx].mean(-1), source[idx].mean(-1)  # [B]
    with np.errstate(all="ignore"):
        boot = (metric[:, idx].mean(-1) - b) / (s - b)  # [component, B]
    lo, hi = percentile(boot, cfg.alpha)
    return value, lo, hi


# ----------------------------------------------------------------------------- heads and neurons

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


def window(handle, cfg: RefusalConfig) -> int | None:
    """Where the study patches and mean-ablates: the last N (post-instruction) positions, or None (all).

    The post-instruction tokens are the same in every prompt, so a patch there splices like
    into like whatever the pair's lengths (Arditi et al. 2024 search the same positions).
    """
    from instruments.positions import post_instruction_length

    return post_instruction_length(handle) if cfg.patch_positions == "post-instruction" else None


def positions_label(positions: int | None) -> str:
    """How a record names the positions a sweep used."""
    return "all" if positions is None else f"post-instruction (last {positions})"


def aligned(handle, pairs: Sequence[Pair], cfg: RefusalConfig) -> tuple[Pair, ...]:
    """The pairs the configured positions correspond on: all of them for post-instruction
    patching; for every-position patching only those of equal token length."""
    if window(handle, cfg) is not None:
        return tuple(pairs)
    from instruments.positions import same_length

    keep = same_length(handle, harmful(pairs), harmless(pairs))
    return tuple(p for p, k in zip(pairs, keep.tolist()) if k)


def patch_spec(handle, cfg: RefusalConfig, *, direction: str = "denoising", layers: tuple[int, ...] | None = None,
               kl: bool = False) -> PatchSpec:
    return PatchSpec(direction=direction, max_batch=cfg.max_batch, layers=layers, kl=kl,
                     positions=window(handle, cfg))


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


# ----------------------------------------------------------------------------- ablation

@dataclass(frozen=True, kw_only=True)
class Condition:
    """Refusal on the harmful test prompts with a set of components ablated, vs the baseline."""

    name: str
    kind: str  # "circuit" or "control"
    control_of: str | None
    components: tuple[Component, ...]
    baseline: Judged
    ablated: Judged
    relative_drop: stats.Estimate  # 1 - rate_ablated / rate_baseline, paired bootstrap
    mcnemar: stats.McNemarResult
    kl_harmless: float | None = None
    answer_ce_increase: float | None = None
    method: str = "mean"
    positions: int | None = None  # the last N prompt positions were ablated (None: every position)

    @property
    def degenerate_rate_baseline(self) -> float:
        return self.baseline.degenerate_rate

    @property
    def degenerate_rate_ablated(self) -> float:
        """Share of answers the ablation left with no letter or digit: a broken model's, not refusals."""
        return self.ablated.degenerate_rate


def relative_drop(before: np.ndarray, after: np.ndarray, cfg: RefusalConfig, salt: int = 3) -> stats.Estimate:
    """1 - P(refused | ablated) / P(refused | baseline) on the same prompts, with a paired bootstrap CI."""
    before, after = before.astype(np.float64), after.astype(np.float64)
    value = 1.0 - after.mean() / before.mean() if before.mean() > 0 else float("nan")
    idx = boot_index(before.size, cfg, salt)
    with np.errstate(all="ignore"):
        boot = 1.0 - after[idx].mean(-1) / before[idx].mean(-1)
    return boot_estimate(value, boot, cfg, before.size)


@dataclass(frozen=True, kw_only=True)
class HarmlessReference:
    """The clean model on harmless prompts, computed once and compared with every ablation."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]  # the clean model's own answers ("" when not available)
    logits: Float[torch.Tensor, "prompt vocab"]
    answer_ce: Float[torch.Tensor, "prompt"] | None


def harmless_reference(handle, prompts: Sequence[str], answers: Sequence[str], cfg: RefusalConfig) -> HarmlessReference:
    """With answers, both the logits and the cross-entropy come from one pass over prompt + answer,
    as they do under every ablation compared with them (:func:`ablate_condition`)."""
    from instruments.ablation import answer_scores

    if not answers:
        return HarmlessReference(prompts=tuple(prompts), answers=(), answer_ce=None,
                                 logits=behavior.last_logits(handle, prompts, batch_size=cfg.batch_size))
    scores = answer_scores(handle, prompts, answers, batch_size=cfg.batch_size)
    return HarmlessReference(prompts=tuple(prompts), answers=tuple(answers), logits=scores.prompt_logits,
                             answer_ce=scores.cross_entropy)


def side_effects(handle, hooks: Sequence[Hook], harmless: HarmlessReference,
                 cfg: RefusalConfig) -> tuple[float, float | None]:
    """(next-token KL(clean || ablated), rise in the clean answers' cross-entropy) on harmless prompts."""
    from instruments.ablation import answer_scores
    from instruments.metrics import kl_divergence

    ce = None
    if harmless.answer_ce is not None:  # one pass gives both the next-token logits and the answers' CE
        after = answer_scores(handle, harmless.prompts, harmless.answers, batch_size=cfg.batch_size, fwd_hooks=hooks)
        under = after.prompt_logits
        ce = float((after.cross_entropy - harmless.answer_ce).nanmean())
    else:
        under = behavior.last_logits(handle, harmless.prompts, batch_size=cfg.batch_size, fwd_hooks=hooks)
    return float(kl_divergence(harmless.logits, under).mean()), ce


def ablation_spec(handle, cfg: RefusalConfig, components: Sequence[Component], *,
                  method: str = "mean") -> AblationSpec:
    """The study's ablation: components where the study patches them (the intervention that
    found them, Hanna et al. 2024), each position from its own reference position; a
    direction removed at every position, generated ones included (Arditi et al. 2024)."""
    from instruments.components import Direction

    everywhere = any(isinstance(c, Direction) for c in components)
    return AblationSpec(method=method, batch_size=cfg.batch_size,
                        positions=None if everywhere else window(handle, cfg))


def ablate_condition(handle, prompts: Sequence[str], tokens: RefusalTokens, cfg: RefusalConfig, *,
                     name: str, components: Sequence[Component], baseline: Judged,
                     reference: Sequence[str] | ReferenceActivations,
                     kind: str = "circuit", control_of: str | None = None, method: str = "mean",
                     harmless: HarmlessReference | None = None) -> Condition:
    """Ablate ``components`` (mean: means over harmless TRAIN ``reference`` prompts) and judge refusal.

    A refusal direction is ablated with ``method="zero"``: its projection is removed
    everywhere (Arditi et al.), rather than set to its harmless mean. With ``harmless`` the
    capability side effects are measured too: KL(clean || ablated) of the next token after
    each harmless prompt, and (when it has answers) the rise in cross-entropy of the clean
    model's own answers.
    """
    spec = ablation_spec(handle, cfg, components, method=method)
    hooks = ablation_hooks(handle, list(components), spec=spec, reference=reference if method != "zero" else None)
    ablated = judge(handle, prompts, tokens, cfg, hooks=hooks)
    kl, ce = side_effects(handle, hooks, harmless, cfg) if harmless is not None else (None, None)
    return Condition(name=name, kind=kind, control_of=control_of, components=tuple(components), baseline=baseline,
                     ablated=ablated, relative_drop=relative_drop(baseline.refused, ablated.refused, cfg),
                     mcnemar=stats.mcnemar(baseline.refused, ablated.refused, alpha=cfg.alpha,
                                           n_boot=cfg.n_bootstrap, seed=cfg.seed),
                     kl_harmless=kl, answer_ce_increase=ce, method=method, positions=spec.positions)


# ----------------------------------------------------------------------------- circuit faithfulness

@dataclass(frozen=True, kw_only=True)
class Faithfulness:
    """How much of the refusal score a circuit keeps by itself, beside size-matched random circuits.

    F = (m(circuit alone) - m(harmless)) / (m(harmful) - m(harmless)) on held-out pairs: the
    harmful prompt runs with every head and neuron outside the circuit patched from its
    harmless analogue at the study's positions, the intervention that found the circuit
    (Wang et al. 2022; Hanna et al. 2024). 1 = the circuit alone keeps all of refusal, 0 =
    no more than the harmless run. ``random`` is the mean F of ``n_random`` random circuits
    with the same number of heads and neurons in the same layers; ``difference`` is
    F - mean random F, with a paired bootstrap over prompts.
    """

    circuit: tuple[Component, ...]
    value: stats.Estimate
    random: stats.Estimate
    difference: stats.Estimate
    n_random: int
    positions: int | None
    n_pairs: int
    score_harmful: float
    score_harmless: float
    score_circuit: float


def matched_random_circuit(handle, circuit: Sequence[Component], *, seed: int) -> tuple[Component, ...]:
    """Random heads and neurons, one per circuit component and in its layer, none in the circuit."""
    rng = np.random.default_rng(seed)
    taken = set(circuit)
    out: list[Component] = []
    for c in circuit:
        for _ in range(1000):
            pick: Component = (Head(layer=c.layer, head=int(rng.integers(handle.n_heads))) if isinstance(c, Head)
                               else Neuron(layer=c.layer, index=int(rng.integers(handle.d_mlp))))
            if pick not in taken:
                break
        else:  # the circuit holds (nearly) all of this layer: the nearest layer with a free one of its kind
            pick = _nearest_free(handle, c, taken, rng)
        taken.add(pick)
        out.append(pick)
    return tuple(out)


def _nearest_free(handle, c: Component, taken: set, rng: np.random.Generator) -> Component:
    size = handle.n_heads if isinstance(c, Head) else handle.d_mlp
    make = (lambda layer, i: Head(layer=layer, head=i)) if isinstance(c, Head) else (
        lambda layer, i: Neuron(layer=layer, index=i))
    for layer in sorted(range(handle.n_layers), key=lambda x: (abs(x - c.layer), x)):
        free = [make(layer, i) for i in range(size) if make(layer, i) not in taken]
        if free:
            return free[int(rng.integers(len(free)))]
    raise ValueError(f"no {type(c).__name__.lower()} is left outside the circuit to draw a matched random one from")


def faithfulness(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig,
                 circuit: Sequence[Component], *, n_random: int = 20) -> Faithfulness:
    from instruments.patching import patch_complement

    circuit = tuple(c for c in circuit if isinstance(c, (Head, Neuron)))
    randoms = [matched_random_circuit(handle, circuit, seed=cfg.seed + 100 + i) for i in range(n_random)]
    res = patch_complement(handle, harmful(pairs), harmless(pairs), metric_for(tokens), [circuit, *randoms],
                           patch_spec(handle, cfg, direction="noising"))
    metric = res.metric.double().numpy()  # [1 + n_random, prompt]
    clean, corrupted = res.clean.double().numpy(), res.corrupted.double().numpy()

    def f(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:  # rows [g, P], idx [B, P] -> [g, B]
        lo, hi = corrupted[idx].mean(-1), clean[idx].mean(-1)
        return (rows[:, idx].mean(-1) - lo) / (hi - lo)

    full = np.arange(clean.size)[None]
    idx = boot_index(clean.size, cfg, salt=50)
    with np.errstate(all="ignore"):
        point, boot = f(metric, full)[:, 0], f(metric, idx)
    own = boot_estimate(point[0], boot[0], cfg, clean.size)
    rand = boot_estimate(point[1:].mean(), boot[1:].mean(0), cfg, clean.size)
    diff = boot_estimate(point[0] - point[1:].mean(), boot[0] - boot[1:].mean(0), cfg, clean.size)
    return Faithfulness(circuit=circuit, value=own, random=rand, difference=diff, n_random=n_random,
                        positions=res.positions, n_pairs=res.n_pairs, score_harmful=float(clean.mean()),
                        score_harmless=float(corrupted.mean()), score_circuit=float(metric[0].mean()))
