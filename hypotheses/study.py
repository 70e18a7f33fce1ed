"""One study of one model: every measurement the hypotheses need, computed lazily, once.

:class:`Study` is the single code path behind both the pytest phases (which read its
stages one test at a time and record them) and the self-validation tests (which call
:func:`run_study` on planted and null models). Each stage is a ``cached_property``: the
first test that needs the head ranking computes it, later ones reuse it. No stage writes
files; a long sweep can be routed through a checkpointing ``sweeper`` that the fixture
supplies (``fixtures.sweeps.run_layer_sweep``).

Data discipline: components are chosen on TRAIN pairs (heads, neurons, per-category
heads) or TRAIN + VAL (the refusal direction: candidates on train, selection on val) and
evaluated on TEST pairs (H1 patching and ablation, H2, criteria) or, per category, on
val + test pairs that were never used to choose that category's heads (H3).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fixtures.config import RefusalConfig
from fixtures.data import Pair, PromptSet
from hypotheses import decisions as d
from hypotheses import evidence as ev
from hypotheses import structure as st
from hypotheses.verdicts import Verdict
from instruments import gradients, stats
from instruments.ablation import ReferenceActivations, reference_activations
from instruments.components import Component, Direction, Head, Neuron, hook_name, label
from instruments.direction import DirectionSpec, find_refusal_direction, layer_projections
from instruments.metrics import RefusalTokens
from instruments.patching import PatchResult


@dataclass(eq=False)
class StageClock:
    """Seconds spent in each stage, exclusive of the stages it pulled in (where the time goes)."""

    seconds: dict[str, float] = field(default_factory=dict)
    timer: Callable[[], float] = time.perf_counter
    _inner: list[float] = field(default_factory=list)  # time spent in nested stages, per open stage

    def run(self, name: str, compute: Callable[[], Any]) -> Any:
        self._inner.append(0.0)
        start = self.timer()
        try:
            return compute()
        finally:
            total = self.timer() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + total - self._inner.pop(), 3)
            if self._inner:
                self._inner[-1] += total


def stage(fn: Callable[[Any], Any]) -> cached_property:
    """A study stage: computed on first use, then cached, its compute time kept in ``study.clock``."""
    @functools.wraps(fn)
    def timed(self):
        return self.clock.run(fn.__name__, lambda: fn(self))
    return cached_property(timed)


def balanced(pairs: Sequence[Pair], n: int) -> tuple[Pair, ...]:
    """The first n pairs taking categories in turn (file order within each), so no category dominates."""
    by_cat: dict[str, list[Pair]] = {}
    for p in pairs:
        by_cat.setdefault(p.category, []).append(p)
    out: list[Pair] = []
    while len(out) < min(n, len(pairs)):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(out) < n:
                out.append(by_cat[cat].pop(0))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class StudyData:
    train: tuple[Pair, ...]
    val: tuple[Pair, ...]
    test: tuple[Pair, ...]
    categories: tuple[str, ...]

    @classmethod
    def from_prompt_set(cls, ps: PromptSet) -> "StudyData":
        from fixtures.data import require_size

        data = cls(train=ps.split("train"), val=ps.split("val"), test=ps.split("test"), categories=ps.categories)
        require_size(data.train, 4, what="train pairs for choosing components")
        require_size(data.val, 2, what="val pairs for selecting the refusal direction")
        require_size(data.test, 4, what="test pairs for evaluating the hypotheses")
        return data

    def category(self, cat: str, *splits: str) -> tuple[Pair, ...]:
        return tuple(p for s in splits for p in getattr(self, s) if p.category == cat)


Sweeper = Callable[[Callable[..., PatchResult], Sequence[int]], PatchResult]


def _direct(fn: Callable[..., PatchResult], layers: Sequence[int]) -> PatchResult:
    return fn(layers=tuple(layers))


@dataclass(frozen=True, kw_only=True, eq=False)
class Study:
    handle: Any
    data: StudyData
    tokens: RefusalTokens
    cfg: RefusalConfig
    sweeper: Sweeper = field(default=_direct, repr=False)
    judged_test: tuple[ev.Judged, ev.Judged] | None = None  # (harmful, harmless) test judgements made already
    clock: StageClock = field(default_factory=StageClock, repr=False)  # not part of the results

    # ------------------------------------------------------------------ sizes
    @property
    def n_heads_total(self) -> int:
        return self.handle.n_layers * self.handle.n_heads

    @property
    def k_h1(self) -> int:
        """How many heads H1 may use: the top h1_fraction of all heads (at least one)."""
        return max(1, math.floor(self.cfg.h1_fraction * self.n_heads_total))

    @property
    def window(self) -> int | None:
        """The positions every patch and mean ablation uses: the last N (post-instruction), or None (all)."""
        return ev.window(self.handle, self.cfg)

    @stage
    def train_pairs(self) -> tuple[Pair, ...]:
        return balanced(ev.aligned(self.handle, self.data.train, self.cfg), self.cfg.patch_pairs)

    @stage
    def test_pairs(self) -> tuple[Pair, ...]:
        """The test pairs patching is scored on (every-position patching: those of equal token length)."""
        return ev.aligned(self.handle, self.data.test, self.cfg)

    @stage
    def reference(self) -> ReferenceActivations:
        """Mean-ablation statistics over harmless TRAIN prompts (disjoint from every evaluated prompt),
        at every head's z and every MLP's neurons, per position of the study's window, taken once:
        each ablation reuses them."""
        names = [hook_name(Head(layer=layer, head=0)) for layer in range(self.handle.n_layers)]
        names += [hook_name(Neuron(layer=layer, index=0)) for layer in range(self.handle.n_layers)]
        return reference_activations(self.handle, ev.harmless(self.data.train), names, positions=self.window,
                                     batch_size=self.cfg.batch_size)

    # ------------------------------------------------------------------ stages
    @stage
    def behaviour(self) -> ev.Behaviour:
        return ev.behaviour(self.handle, self.data.test, self.tokens, self.cfg, judged=self.judged_test)

    @stage
    def exact_heads(self) -> PatchResult:
        # The sweeper calls fn once per layer (checkpointed); the two unpatched runs are made on
        # the first call that has work to do and shared by the rest (a resumed sweep whose
        # layers are all on disk makes none). Made per call, they were a third of the sweep.
        runs = functools.cache(lambda: ev.head_runs(self.handle, self.train_pairs, self.cfg))

        def fn(layers):
            return ev.head_patching(self.handle, self.train_pairs, self.tokens, self.cfg, layers=layers, runs=runs())
        return self.sweeper(fn, range(self.handle.n_layers))

    @stage
    def atp(self) -> ev.AtpScan:
        return ev.atp_scan(self.handle, self.train_pairs, self.tokens, self.cfg)

    @stage
    def ranking(self) -> ev.Ranking:
        return ev.rank_heads(self.exact_heads, self.atp.heads, self.cfg)

    @stage
    def neurons(self) -> ev.Ranking:
        """The AtP top neurons, verified exactly on half the train pairs (one patched forward per
        neuron and pair: the full set would cost as much as the head sweep)."""
        pairs = self.train_pairs[: max(2, len(self.train_pairs) // 2)]
        return ev.rank_neurons(self.handle, pairs, self.tokens, self.cfg, self.atp)

    @stage
    def h1_joint(self) -> stats.Estimate:
        return ev.joint_patch(self.handle, self.test_pairs, self.tokens, self.cfg, self.ranking.top(self.k_h1))

    @stage
    def harmless_reference(self) -> ev.HarmlessReference:
        """Clean next-token logits (and answer cross-entropy) on harmless test prompts, for side effects."""
        answers = self.judged_test[1].texts if self.judged_test else ()
        return ev.harmless_reference(self.handle, ev.harmless(self.data.test), answers, self.cfg)

    def ablate(self, name: str, components: Sequence[Component], **kw: Any) -> ev.Condition:
        """Refusal on the harmful test prompts with ``components`` ablated, with capability side effects."""
        return ev.ablate_condition(self.handle, ev.harmful(self.data.test), self.tokens, self.cfg, name=name,
                                   components=components, baseline=self.behaviour.refused_harmful,
                                   reference=self.reference, harmless=self.harmless_reference, **kw)

    @stage
    def h1_ablation(self) -> ev.Condition:
        return self.ablate(f"top {self.k_h1} heads (H1)", self.ranking.top(self.k_h1))

    @stage
    def circuit(self) -> tuple[Component, ...]:
        return self.ranking.top(self.cfg.top_heads) + self.neurons.top(self.cfg.top_neurons)

    @stage
    def circuit_ablation(self) -> ev.Condition:
        return self.ablate("heads + neurons", self.circuit)

    @stage
    def faithfulness(self) -> ev.Faithfulness:
        """The circuit (heads + neurons) alone on the test pairs, beside size-matched random circuits."""
        return ev.faithfulness(self.handle, self.test_pairs, self.tokens, self.cfg, self.circuit)

    @stage
    def attention_flow(self) -> gradients.AttentionFlow:
        spec = gradients.GradientSpec(batch_size=self.cfg.batch_size)
        return gradients.attention_gradient_flow(self.handle, ev.harmful(self.train_pairs), self.tokens, spec)

    @stage
    def gradient_share(self) -> stats.Estimate:
        """Share of the heads' total |gradient x (harmful - harmless activation)| (AtP) in the top 5%.

        The attribution of the harmful-harmless *difference*, not of each head's whole
        output: a head that writes a lot but the same thing on both prompts scores 0.
        """
        per = self.atp.heads_per_prompt  # [layer, head, prompt]
        scores = per.reshape(-1, per.shape[-1]).T.double().numpy()  # [prompt, head]
        return st.top_share(scores, self.k_h1, self.cfg)

    @stage
    def gradient_vs_patching(self) -> stats.Estimate:
        """Spearman of the gradient attribution (AtP) with the exact patching effect over all heads."""
        grad = self.atp.heads.reshape(-1).double().numpy()
        exact = self.exact_heads.normalized.reshape(-1).double().numpy()
        return stats.spearman_ci(grad, exact, n_boot=self.cfg.n_bootstrap, seed=self.cfg.seed, alpha=self.cfg.alpha)

    @stage
    def keyword_profile(self) -> st.LayerProfile:
        return st.layer_profile(st.keyword_attention(self.handle, self.data.test, self.cfg), self.cfg)

    @stage
    def direction(self):
        """(candidates, selection): candidates from all train pairs at every post-instruction position
        (or the last ``direction_positions``), selection on ``direction_val_pairs`` balanced val pairs
        (Arditi et al. 2024: 32).

        Selection screens every (position, layer) candidate by its bypass score on a few val
        prompts, then scores the ``direction_screen`` best three ways on every selection
        prompt; it is the costliest step of the study on a CPU.
        """
        from fixtures.data import require_size

        cfg = self.cfg
        require_size(self.data.val, cfg.direction_val_pairs,
                     what="val pairs for selecting the refusal direction (--refusal-direction-val-pairs)")
        spec = DirectionSpec(n_positions=cfg.direction_positions or None, kl_threshold=cfg.direction_kl,
                             induce_threshold=cfg.direction_induce, prune_layer_fraction=cfg.direction_prune,
                             batch_size=cfg.batch_size, max_rows=cfg.max_batch, screen=cfg.direction_screen or None)
        val = balanced(self.data.val, cfg.direction_val_pairs)
        return find_refusal_direction(self.handle, harmful_train=ev.harmful(self.data.train),
                                      harmless_train=ev.harmless(self.data.train), harmful_val=ev.harmful(val),
                                      harmless_val=ev.harmless(val), tokens=self.tokens, spec=spec)

    @stage
    def direction_unusable(self) -> str | None:
        """Why no verdict may rest on the refusal direction (None: it passed selection)."""
        n, need = len(self.data.val), self.cfg.direction_val_pairs
        if n < need:
            return (f"the dataset has {n} val pairs, fewer than the {need} the selection needs "
                    "(--refusal-direction-val-pairs)")
        return d.failed_selection(self.direction[1])

    @stage
    def refusal_direction(self) -> Direction:
        """The selected direction; when none passed the filters, the best failing candidate (phase 5
        records it, flagged): verdicts consult :attr:`direction_unusable` before using it."""
        return self.direction[1].direction

    @stage
    def direction_ablation(self) -> ev.Condition:
        """Refusal on harmful test prompts with the direction projected out everywhere (bypass)."""
        return self.ablate("refusal direction", (self.refusal_direction,), method="zero")

    @stage
    def direction_induction(self) -> ev.Judged:
        """Refusal on harmless test prompts with the direction (at its own length) added at its layer."""
        from instruments.direction import steering_hooks

        sel = self.direction[1]
        vector = self.refusal_direction.tensor() * sel.scale
        hooks = steering_hooks(self.handle, vector, layer=sel.layer, coefficient=1.0)
        return ev.judge(self.handle, ev.harmless(self.data.test), self.tokens, self.cfg, hooks=hooks)

    @stage
    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Projection onto the refusal direction by layer: (harmful test [layer, prompt], harmless test)."""
        bs = self.cfg.batch_size
        return (layer_projections(self.handle, ev.harmful(self.data.test), self.refusal_direction, batch_size=bs),
                layer_projections(self.handle, ev.harmless(self.data.test), self.refusal_direction, batch_size=bs))

    @stage
    def accumulation(self) -> st.Accumulation:
        return st.accumulation(*self.projections, self.cfg)

    @stage
    def block_patching(self) -> tuple[PatchResult, PatchResult]:
        """Attention and MLP outputs of every layer, patched one at a time (denoising, train pairs)."""
        from instruments.patching import patch_attn_out, patch_mlp_out

        args = (self.handle, ev.harmful(self.train_pairs), ev.harmless(self.train_pairs), ev.metric_for(self.tokens),
                ev.patch_spec(self.handle, self.cfg))
        return patch_attn_out(*args), patch_mlp_out(*args)

    @stage
    def depth(self) -> stats.Estimate:
        """Where the causal effects sit: attention *and* MLP outputs pooled per layer (execution may be either)."""
        return st.effect_depth(self.block_patching, self.cfg, n_layers=self.handle.n_layers)

    @stage
    def cross_category(self) -> st.CrossCategory:
        find = {c: self.data.category(c, "train") for c in self.data.categories}
        evaluate = {c: self.data.category(c, "val", "test") for c in self.data.categories}
        find = {c: balanced(ev.aligned(self.handle, v, self.cfg), min(8, self.cfg.patch_pairs))
                for c, v in find.items() if v and evaluate[c]}
        return st.cross_category(self.handle, find, {c: evaluate[c] for c in find}, self.tokens, self.cfg,
                                 reference=self.reference, positions=self.window)

    @stage
    def category_similarity(self) -> tuple[np.ndarray, stats.Estimate]:
        find = {c: self.data.category(c, "train") for c in self.cross_category.categories}
        diffs = st.category_directions(self.handle, find, layer=self.refusal_direction.layer,
                                       batch_size=self.cfg.batch_size)
        return st.category_similarity(diffs, self.cfg)

    # ------------------------------------------------------------------ verdicts
    def h1_verdicts(self) -> list[Verdict]:
        b, n = self.behaviour, self.n_heads_total
        lines = [d.h1_patching(self.h1_joint, self.k_h1, n, b, self.cfg, positions=ev.positions_label(self.window)),
                 d.h1_ablation(self.h1_ablation, n, b, self.cfg),
                 d.h1_gradients(self.gradient_share, self.k_h1, n, b, self.cfg)]
        lines = d.with_holm(lines, self.cfg.alpha)
        return lines + [d.overall("H1", lines)]

    def h2_verdicts(self) -> list[Verdict]:
        b = self.behaviour
        unusable = self.direction_unusable if b.present else None
        direction = (d.no_direction("H2", "direction", unusable, b, self.cfg) if unusable
                     else d.h2_direction(self.accumulation, b, self.cfg))
        lines = [d.h2_attention(self.keyword_profile, b, self.cfg), direction, d.h2_patching(self.depth, b, self.cfg)]
        lines = d.with_holm(lines, self.cfg.alpha)
        return lines + [d.overall("H2", lines)]

    def h3_verdicts(self) -> list[Verdict]:
        b = self.behaviour
        lines = d.h3_categories(self.cross_category, b, self.cfg)
        unusable = self.direction_unusable if b.present else None
        lines.append(d.no_direction("H3", "direction", unusable, b, self.cfg) if unusable
                     else d.h3_direction(self.category_similarity[1], b, self.cfg))
        lines = d.with_holm(lines, self.cfg.alpha)
        return lines + [d.overall("H3", lines)]

    def criteria_verdicts(self) -> list[Verdict]:
        b = self.behaviour
        return [d.c1_heads(self.ranking, b, self.cfg), d.c2_ablation(self.circuit_ablation, b, self.cfg),
                d.s1_gradients(self.gradient_vs_patching, "exact head patching (AtP vs exact, all heads)", b, self.cfg)]

    def gated_verdicts(self) -> list[Verdict]:
        """Every line as inconclusive, without measuring anything: the model shows no refusal to explain."""
        b = self.behaviour
        lines = {"H1": ["patching", "ablation", "gradients"], "H2": ["attention", "direction", "patching"],
                 "H3": [*self.data.categories, "direction"]}
        out: list[Verdict] = []
        for claim, evidence in lines.items():
            group = [d.no_behaviour(claim, e, b, self.cfg) for e in evidence]
            out += group + [d.overall(claim, group)]
        return out + [d.no_behaviour("C1", "patching", b, self.cfg), d.no_behaviour("C2", "ablation", b, self.cfg),
                      d.no_behaviour("S1", "gradients", b, self.cfg)]

    @stage
    def verdicts(self) -> tuple[Verdict, ...]:
        if not self.behaviour.present:
            return tuple(self.gated_verdicts())
        return tuple(self.h1_verdicts() + self.h2_verdicts() + self.h3_verdicts() + self.criteria_verdicts())

    def overall(self, claim: str) -> str:
        """The claim's overall verdict, or the combination of its lines when it has no overall line."""
        from hypotheses.verdicts import combine

        mine = [v for v in self.verdicts if v.claim == claim]
        if not mine:
            raise KeyError(f"no verdict for claim {claim!r}")
        top = [v for v in mine if v.evidence == "overall"]
        return top[0].status if top else combine([v.status for v in mine])

    # ------------------------------------------------------------------ results
    @property
    def head_effects(self) -> torch.Tensor:
        return self.exact_heads.normalized

    @property
    def localized_heads(self) -> tuple[Head, ...]:
        return tuple(h for h in self.ranking.above(self.cfg.head_effect))  # type: ignore[misc]

    @property
    def localized_neurons(self) -> tuple[Neuron, ...]:
        return tuple(n for n in self.neurons.above(self.cfg.head_effect))  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        return {"verdicts": [v.to_dict() for v in self.verdicts],
                "head_effects": self.head_effects.tolist(),
                "localized_heads": [label(h) for h in self.localized_heads],
                "localized_neurons": [label(n) for n in self.localized_neurons],
                "direction": {"layer": self.direction[1].layer, "pos": self.direction[1].pos,
                              "meets_thresholds": self.direction[1].meets_thresholds,
                              "vector": list(self.refusal_direction.vector)},
                "cross_category": self.cross_category.matrix.tolist()}


def run_study(handle, data: StudyData, tokens: RefusalTokens, cfg: RefusalConfig) -> Study:
    """Every stage and every verdict, computed now (the self-validation tests' entry point)."""
    study = Study(handle=handle, data=data, tokens=tokens, cfg=cfg)
    study.verdicts  # noqa: B018 - forces every stage
    return study
