"""One study of one model: every measurement the hypotheses need, computed lazily, once.

:class:`Study` is the single code path behind both the pytest phases (which read its
stages one test at a time and record them) and the self-validation tests (which call
:func:`run_study` on planted and null models). Each stage is a ``cached_property``: the
first test that needs the head ranking computes it, later ones reuse it. No stage writes
files; a long sweep can be routed through a checkpointing ``sweeper`` that the fixture
supplies (``fixtures.sweeps.run_layer_sweep``). The stages behind the phases' records
(phases 2 to 5) are :class:`hypotheses.phase_stages.PhaseStages`, and the verdict lines
:class:`hypotheses.verdict_lines.VerdictLines`, both mixed in here.

Data discipline: components are chosen on TRAIN pairs (AtP over every head and neuron,
exact verification of the candidates, per-category heads) or TRAIN + VAL (the refusal
direction; the detection peak layer) and every line is scored on TEST pairs (or, per
category, on val + test pairs that chose nothing of that category's). Before the first
stage that scores a test pair, :attr:`Study.preregistration` fixes every line's statistic,
bar, alpha, correction, split sizes and the selected components, hashed; the fixture
writes it to ``preregistration.json`` and every verdict cites the hash.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses import decisions as d
from hypotheses import evidence as ev
from hypotheses import localization as loc
from hypotheses import structure as st
from hypotheses.baseline import SplitGenerations
from hypotheses.phase_stages import PhaseStages
from hypotheses.stages import StageClock, StudyData, Sweeper, _direct, balanced, stage  # noqa: F401 - re-exported
from hypotheses.verdict_lines import VerdictLines
from hypotheses.verdicts import Verdict, rehearsed
from instruments import gradients, stats
from instruments.ablation import ReferenceActivations, reference_activations
from instruments.components import Component, Direction, Head, Neuron, hook_name, label
from instruments.direction import DirectionSpec, find_refusal_direction
from instruments.metrics import RefusalTokens
from instruments.patching import PatchResult


# The stages that choose something (components, a direction, a layer, the reference means):
# none of them may read a test pair (tests/test_study_discipline.py runs every stage to check).
SELECTION_STAGES: tuple[str, ...] = (
    "train_pairs", "exact_heads", "atp", "candidates", "ranking", "neurons", "pooled", "h1_set", "h1_parameter_set",
    "circuit", "controls", "category_heads", "detection_val", "direction", "direction_unusable", "refusal_direction",
    "reference", "preregistration")


@dataclass(frozen=True, kw_only=True, eq=False)
class Study(PhaseStages, VerdictLines):
    handle: Any
    data: StudyData
    tokens: RefusalTokens
    cfg: RefusalConfig
    sweeper: Sweeper = field(default=_direct, repr=False)
    test_generations: SplitGenerations | None = field(default=None, repr=False)  # the test split's recorded answers
    preregister: Callable[[dict[str, Any], str], None] | None = field(default=None, repr=False)  # writes the record
    clock: StageClock = field(default_factory=StageClock, repr=False)  # not part of the results

    # ------------------------------------------------------------------ sizes
    @property
    def n_heads_total(self) -> int:
        return self.handle.n_layers * self.handle.n_heads

    @property
    def window(self) -> int | None:
        """The positions every patch and mean ablation uses: the last N (post-instruction), or None (all)."""
        return ev.window(self.handle, self.cfg)

    @property
    def fractions(self) -> tuple[float, ...]:
        """The effect-share curve's fractions of components, H1's bar among them."""
        return tuple(sorted({0.01, 0.2, self.cfg.h1_fraction}))

    # ------------------------------------------------------------------ the splits
    @stage
    def train_pairs(self) -> tuple[Pair, ...]:
        """The pairs that choose the components (AtP ranking, exact verification)."""
        return balanced(ev.aligned(self.handle, self.data.train, self.cfg), self.cfg.patch_pairs)

    @property
    def test_split(self) -> tuple[Pair, ...]:
        """Every test pair; reading it fixes the pre-registration first (nothing scored before it)."""
        self.preregistration  # noqa: B018 - the record is made before any test pair is scored
        return self.data.test

    @stage
    def test_pairs(self) -> tuple[Pair, ...]:
        """The test pairs patching is scored on (every-position patching: those of equal token length)."""
        return ev.aligned(self.handle, self.test_split, self.cfg)

    # ------------------------------------------------------------------ choosing (train, val)
    @stage
    def exact_heads(self) -> PatchResult:
        """Every head patched exactly on the first ``sweep_pairs`` train pairs: the heat map, and the heads
        it ranks first join AtP's candidates (:meth:`candidates`)."""
        pairs = self.train_pairs[: self.cfg.sweep_pairs]
        # The sweeper calls fn once per layer (checkpointed); the two unpatched runs are shared.
        runs = functools.cache(lambda: ev.head_runs(self.handle, pairs, self.cfg))

        def fn(layers):
            return ev.head_patching(self.handle, pairs, self.tokens, self.cfg, layers=layers, runs=runs())
        return self.sweeper(fn, range(self.handle.n_layers))

    @stage
    def atp(self) -> ev.AtpScan:
        return ev.atp_scan(self.handle, self.train_pairs, self.tokens, self.cfg)

    @stage
    def candidates(self) -> tuple[Head, ...]:
        """AtP's top heads, then the exact sweep's top ``min_heads`` that AtP left out.

        Both instruments nominate (on train): a head AtP misses (a unit flat at both ends of
        the patch; the validation card's ``step`` design) still reaches C1 and S1, which
        would otherwise only ever see the heads AtP chose.
        """
        atp = loc.atp_candidates(self.atp, self.cfg.head_candidates)
        swept = ev.top_heads_of(self.exact_heads.normalized, self.cfg.min_heads)
        return atp + tuple(h for h in swept if h not in atp)

    @stage
    def ranking(self) -> ev.Ranking:
        """The candidates verified by exact patching on the train pairs, ranked by exact effect (AtP*)."""
        atp = [float(self.atp.heads[h.layer, h.head]) for h in self.candidates]
        return ev.verify(self.handle, self.train_pairs, self.tokens, self.cfg, self.candidates, np.asarray(atp))

    @stage
    def neurons(self) -> ev.Ranking:
        """The AtP top neurons, verified exactly on the first ``neuron_pairs`` train pairs."""
        pairs = self.train_pairs[: max(2, self.cfg.neuron_pairs)]
        return ev.rank_neurons(self.handle, pairs, self.tokens, self.cfg, self.atp)

    @stage
    def pooled(self) -> loc.PooledRanking:
        return loc.pooled_ranking(self.handle, self.atp)

    @stage
    def h1_set(self) -> tuple[Component, ...]:
        """H1's components: the top ``h1_fraction`` of every head and neuron, by count."""
        return self.pooled.top_fraction(self.cfg.h1_fraction)

    @stage
    def h1_parameter_set(self) -> tuple[Component, ...]:
        """The top heads and neurons within ``h1_fraction`` of their parameters."""
        return self.pooled.top_parameters(self.cfg.h1_fraction)

    @stage
    def circuit(self) -> tuple[Component, ...]:
        return self.ranking.top(self.cfg.top_heads) + self.neurons.top(self.cfg.top_neurons)

    @stage
    def controls(self) -> dict[str, tuple[Component, ...]]:
        """Size- and layer-matched random sets, drawn before anything is scored."""
        seed = self.cfg.seed
        return {"h1": ev.matched_random_circuit(self.handle, self.h1_set, seed=seed + 200),
                "h1_parameters": ev.matched_random_circuit(self.handle, self.h1_parameter_set, seed=seed + 204),
                "circuit": ev.matched_random_circuit(self.handle, self.circuit, seed=seed + 201),
                "heads": ev.matched_random_circuit(self.handle, self.ranking.top(self.cfg.top_heads), seed=seed + 202)}

    @stage
    def category_heads(self) -> dict[str, tuple[Head, ...]]:
        """Each category's top heads by AtP on all its train pairs (a category without test pairs has none:
        H3's direction line compares categories on their test pairs)."""
        find = {c: ev.aligned(self.handle, self.data.category(c, "train"), self.cfg) for c in self.data.categories}
        held = {c: self.data.category(c, "test") for c in self.data.categories}
        return st.category_heads(self.handle, {c: v for c, v in find.items() if v and held[c]}, self.tokens, self.cfg)

    @stage
    def detection_val(self) -> tuple[np.ndarray, np.ndarray]:
        """Keyword attention on val pairs, harmful side and control: chooses the peak layer."""
        val = self.data.val
        return (st.keyword_attention(self.handle, val, self.cfg),
                st.keyword_attention(self.handle, val, self.cfg, side="harmless"))

    @stage
    def direction(self):
        """(candidates, selection): candidates from all train pairs at every post-instruction position
        (or the last ``direction_positions``), selection on ``direction_val_pairs`` balanced val pairs
        (Arditi et al. 2024: 32). Screening keeps the selection within minutes on a CPU."""
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

    # ------------------------------------------------------------------ the pre-registration
    @stage
    def preregistration(self) -> tuple[dict[str, Any], str]:
        """(record, sha256): every line's statistic, bar, alpha and correction, the split sizes and the
        selected components, fixed before any stage scores a test pair."""
        from fixtures.storage import stable_hash
        from hypotheses.preregistration import record

        rec = record(self)
        digest = stable_hash("preregistration", rec)
        if self.preregister is not None:
            self.preregister(rec, digest)
        return rec, digest

    # ------------------------------------------------------------------ scoring (test)
    @stage
    def reference(self) -> ReferenceActivations:
        """Mean-ablation statistics over harmless TRAIN prompts (disjoint from every evaluated prompt),
        at every head's z and every MLP's neurons, per position of the study's window, taken once."""
        names = [hook_name(Head(layer=layer, head=0)) for layer in range(self.handle.n_layers)]
        names += [hook_name(Neuron(layer=layer, index=0)) for layer in range(self.handle.n_layers)]
        return reference_activations(self.handle, ev.harmless(self.data.train), names, positions=self.window,
                                     batch_size=self.cfg.batch_size)

    @stage
    def behaviour(self) -> ev.Behaviour:
        """The gate: refusal on the test split (phase 2's judgements). It chooses nothing."""
        return ev.behaviour(self.handle, self.data.test, self.tokens, self.cfg, judged=self.judged_test)

    @stage
    def effect_share(self) -> loc.EffectShare:
        """The effect-share curve on test pairs: heads, neurons, both, and both by parameter budget."""
        controls = {"heads+neurons": self.controls["h1"], "parameters": self.controls["h1_parameters"]}
        return loc.effect_share(self.handle, self.test_pairs, self.tokens, self.cfg, self.pooled, self.fractions,
                                controls=controls, at=self.cfg.h1_fraction)

    @stage
    def test_atp(self) -> ev.AtpScan:
        return ev.atp_scan(self.handle, self.test_pairs, self.tokens, self.cfg)

    @stage
    def gradient_share(self) -> stats.Estimate:
        """Share of the test pairs' |AtP| (heads + neurons) held by H1's components, chosen on train."""
        return loc.held_share(self.test_atp, self.h1_set, self.cfg)

    @stage
    def gradient_share_control(self) -> stats.Estimate:
        """The same share held by H1's size- and layer-matched random set."""
        return loc.held_share(self.test_atp, self.controls["h1"], self.cfg)

    @stage
    def harmless_reference(self) -> ev.HarmlessReference:
        """Clean next-token logits (and answer cross-entropy) on harmless test prompts, for side effects."""
        answers = self.judged_test[1].texts if self.judged_test else ()
        return ev.harmless_reference(self.handle, ev.harmless(self.test_split), answers, self.cfg)

    def ablate(self, name: str, components: Sequence[Component], **kw: Any) -> ev.Condition:
        """Refusal on the harmful test prompts with ``components`` ablated, with capability side effects."""
        return ev.ablate_condition(self.handle, ev.harmful(self.test_split), self.tokens, self.cfg, name=name,
                                   components=components, baseline=self.behaviour.refused_harmful,
                                   reference=self.reference, harmless=self.harmless_reference, **kw)

    @stage
    def h1_ablation(self) -> ev.Condition:
        return self.ablate(f"the top {self.cfg.h1_fraction:.0%} of heads + neurons (H1)", self.h1_set)

    @stage
    def h1_control(self) -> ev.Condition:
        return self.ablate("random heads + neurons matched to H1's", self.controls["h1"], kind="control",
                           control_of=self.h1_ablation.name)

    @stage
    def circuit_ablation(self) -> ev.Condition:
        return self.ablate("heads + neurons", self.circuit)

    @stage
    def circuit_control(self) -> ev.Condition:
        return self.ablate("random heads + neurons", self.controls["circuit"], kind="control",
                           control_of="heads + neurons")

    @stage
    def verified(self) -> loc.Verified:
        """The candidates' exact effects on every test pair (C1, S1)."""
        return loc.verified_on_test(self.handle, self.test_pairs, self.tokens, self.cfg, self.candidates)

    @stage
    def gradient_vs_patching(self) -> stats.Estimate:
        """Spearman of the candidates' AtP on train with their exact effect on test."""
        grad = np.asarray([float(self.atp.heads[h.layer, h.head]) for h in self.candidates])
        return stats.spearman_ci(grad, self.verified.effect, n_boot=self.cfg.n_bootstrap, seed=self.cfg.seed,
                                 alpha=self.cfg.alpha)

    @stage
    def faithfulness(self) -> ev.Faithfulness:
        """The circuit (heads + neurons) alone on the test pairs, beside size-matched random circuits."""
        return ev.faithfulness(self.handle, self.test_pairs, self.tokens, self.cfg, self.circuit, n_random=10)

    @stage
    def attention_flow(self) -> gradients.AttentionFlow:
        spec = gradients.GradientSpec(batch_size=self.cfg.batch_size)
        return gradients.attention_gradient_flow(self.handle, ev.harmful(self.train_pairs), self.tokens, spec)

    @stage
    def keyword_profile(self) -> st.LayerProfile:
        """Keyword attention of the harmful test prompts, by layer (descriptive)."""
        return st.layer_profile(self.keyword_test[0], self.cfg)

    @stage
    def keyword_test(self) -> tuple[np.ndarray, np.ndarray]:
        return (st.keyword_attention(self.handle, self.test_split, self.cfg),
                st.keyword_attention(self.handle, self.test_split, self.cfg, side="harmless"))

    @stage
    def detection(self) -> st.Detection:
        return st.detection(*self.keyword_test, *self.detection_val, self.cfg)

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
        return ev.judge(self.handle, ev.harmless(self.test_split), self.tokens, self.cfg, hooks=hooks)

    @stage
    def residuals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """resid_pre at the direction's position, every layer: (harmful test [prompt, layer, d], harmless)."""
        from instruments.direction import resid_at

        pos, bs = (self.direction[1].pos,), self.cfg.batch_size
        return (resid_at(self.handle, ev.harmful(self.test_split), positions=pos, batch_size=bs)[:, 0],
                resid_at(self.handle, ev.harmless(self.test_split), positions=pos, batch_size=bs)[:, 0])

    @stage
    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Projection onto the refusal direction by layer: (harmful test [layer, prompt], harmless test)."""
        unit = self.refusal_direction.tensor().float()
        unit = unit / unit.norm()
        return tuple((r.float() @ unit).T for r in self.residuals)  # type: ignore[return-value]

    @stage
    def accumulation(self) -> st.Accumulation:
        return st.accumulation(*self.residuals, self.refusal_direction.tensor(), self.cfg)

    @stage
    def depth_pairs(self) -> tuple[Pair, ...]:
        return balanced(self.test_pairs, self.cfg.depth_pairs)

    @stage
    def block_direct(self) -> tuple[PatchResult, PatchResult]:
        """Attention and MLP outputs' direct effects on the refusal score, every layer (denoising, test pairs).

        Execution is where refusal is written into the output: a block's direct path to the
        logits (Wang et al. 2022), not its total effect, which every upstream bottleneck
        (a detector, an accumulator) shares in full.
        """
        from instruments.direct import direct_effects

        pairs = self.depth_pairs
        return direct_effects(self.handle, ev.harmful(pairs), ev.harmless(pairs), ev.metric_for(self.tokens),
                              ev.patch_spec(self.handle, self.cfg))

    @stage
    def depth(self) -> stats.Estimate:
        """Where the direct effects sit: attention *and* MLP outputs pooled per layer (execution may be either)."""
        return st.effect_depth(self.block_direct, self.cfg, n_layers=self.handle.n_layers)

    @stage
    def cross_category(self) -> st.CrossCategory:
        heads = self.category_heads
        self.preregistration  # noqa: B018 - val + test pairs are scored below
        evaluate = {c: self.data.category(c, "val", "test") for c in heads}
        n_find = {c: len(ev.aligned(self.handle, self.data.category(c, "train"), self.cfg)) for c in heads}
        return st.cross_category(self.handle, heads, evaluate, self.tokens, self.cfg, reference=self.reference,
                                 positions=self.window, harmless_ref=self.harmless_reference, n_find=n_find)

    @stage
    def category_similarity(self) -> tuple[np.ndarray, stats.Estimate]:
        """Categories' directions on their TEST pairs, at the refusal direction's layer (chosen on train + val)."""
        cats = self.cross_category.categories
        held = {c: tuple(p for p in self.test_split if p.category == c) for c in cats}
        diffs = st.category_directions(self.handle, {c: v for c, v in held.items() if v},
                                       layer=self.refusal_direction.layer, batch_size=self.cfg.batch_size)
        return st.category_similarity(diffs, self.cfg)

    # ------------------------------------------------------------------ verdicts (hypotheses.verdict_lines)
    @stage
    def verdicts(self) -> tuple[Verdict, ...]:
        from dataclasses import replace

        if not self.behaviour.present and not self.cfg.rehearsal:
            lines = self.gated_verdicts()
        else:  # a rehearsal computes every stage, with or without refusal to explain
            lines = self.h1_verdicts() + self.h2_verdicts() + self.h3_verdicts() + self.criteria_verdicts()
        if self.cfg.rehearsal:
            lines = [rehearsed(v) for v in lines]
        digest = self.preregistration[1]
        return tuple(replace(v, numbers={**v.numbers, "preregistration": digest}) for v in lines)

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
        out = {"verdicts": [v.to_dict() for v in self.verdicts], "head_effects": self.head_effects.tolist(),
               "localized_heads": [label(h) for h in self.localized_heads],
               "localized_neurons": [label(n) for n in self.localized_neurons],
               "preregistration": self.preregistration[1]}
        if self.behaviour.present:
            out |= {"direction": {"layer": self.direction[1].layer, "pos": self.direction[1].pos,
                                  "meets_thresholds": self.direction[1].meets_thresholds,
                                  "vector": list(self.refusal_direction.vector)},
                    "cross_category": self.cross_category.matrix.tolist() if len(self.category_heads) > 1 else []}
        return out


def run_study(handle, data: StudyData, tokens: RefusalTokens, cfg: RefusalConfig, **kw: Any) -> Study:
    """Every stage and every verdict, computed now (the self-validation tests' entry point)."""
    study = Study(handle=handle, data=data, tokens=tokens, cfg=cfg, **kw)
    study.verdicts  # noqa: B018 - forces every stage
    return study
