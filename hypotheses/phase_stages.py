"""The study's stages behind each phase's records (phases 2 to 5).

:class:`PhaseStages` is mixed into :class:`hypotheses.study.Study`: each stage calls one
pure function of a phase module and returns its frozen result, whose ``record()`` is the
typed record (``hypotheses.records``) the phase test saves. The tests only assert the
instruments' identities on these results and record them, so a run built outside pytest
(the explorer's browser test) records exactly what the phases do.

Data: phase 2 reads the test split without the pre-registration (it chooses nothing, and
a ``-m phase2`` run must not compute the selection); every later stage that reads a test
pair goes through ``test_split``, which fixes the pre-registration first.
"""

from __future__ import annotations

from hypotheses import ablations, attribution, baseline, catalogue, circuit, heads, layer_patching, steering
from hypotheses import evidence as ev
from hypotheses.stages import stage
from instruments import patching

# Stages that read test pairs, choose nothing and may run before the pre-registration: phase 2's
# baseline behaviour and the behaviour gate's judgements of it.
BASELINE_STAGES: tuple[str, ...] = ("judged_test", "refusal_rates", "first_token", "logit_lens", "attention_entropy")

# The record each phase test saves from each stage here, in phase order: a run built outside pytest
# records through this table (tests/test_explorer_browser.py), tests/test_study_discipline.py computes each.
PHASE_RECORDS: dict[str, str] = {
    "phase2/refusal_rates": "refusal_rates", "phase2/first_token": "first_token", "phase2/logit_lens": "logit_lens",
    "phase2/attention_entropy": "attention_entropy", "phase3/layer_patching": "layer_patching",
    "phase3/heads": "head_ranking", "phase3/attention_patterns": "attention_patterns",
    "phase3/neurons": "neuron_catalogue", "phase4/ablation": "ablation_study",
    "phase4/gradients": "gradient_attribution", "phase5/circuit": "circuit_graph",
    "phase5/direction": "direction_steering", "phase5/activation_scatter": "activation_scatter"}
PHASE_STAGES: tuple[str, ...] = tuple(PHASE_RECORDS.values())


class PhaseStages:
    """Phase records as study stages; the host provides handle, data, tokens, cfg and the study's stages."""

    # ------------------------------------------------------------------ phase 2 (test split, before selection)
    @stage
    def judged_test(self) -> tuple[ev.Judged, ev.Judged] | None:
        """(harmful, harmless) verdicts of the recorded test generations under the generate judge;
        None when there are none to reuse (the behaviour gate then judges the test split itself)."""
        gen = self.test_generations
        if gen is None or self.cfg.judge != "generate":
            return None
        bs = self.cfg.batch_size
        return (baseline.judged(self.handle, gen.harmful, self.tokens, bs),
                baseline.judged(self.handle, gen.harmless, self.tokens, bs))

    @stage
    def refusal_rates(self) -> baseline.RefusalRates:
        if self.test_generations is None:
            raise ValueError("the study was given no test generations (Study(test_generations=...)): refusal "
                             "rates are read off the recorded answers (the test_generations fixture makes them)")
        return baseline.refusal_rates(self.test_generations, self.cfg)

    @stage
    def first_token(self) -> baseline.FirstToken:
        return baseline.first_token(self.handle, self.data.test, self.tokens, self.cfg)

    @stage
    def logit_lens(self) -> baseline.LogitLens:
        return baseline.logit_lens(self.handle, self.data.test, self.tokens, self.cfg)

    @stage
    def attention_entropy(self) -> baseline.AttentionEntropy:
        return baseline.attention_entropy(self.handle, self.data.test, self.cfg)

    # ------------------------------------------------------------------ phase 3 (train pairs; one test pair)
    @property
    def layer_sweep_pairs(self):
        """A third of the head sweep's train pairs: every (layer, position) is one patched forward per
        pair and direction, and the head sweep carries the ranking."""
        return self.train_pairs[: max(2, self.cfg.sweep_pairs // 3)]

    @stage
    def layer_patching(self) -> layer_patching.LayerPatching:
        return layer_patching.layer_patching(self.handle, self.layer_sweep_pairs, self.tokens, self.cfg, self.window)

    @stage
    def head_ranking(self) -> heads.HeadRanking:
        """The ranking's record: the exact sweep beside AtP, and every head's necessity by noising."""
        cfg, exact = self.cfg, self.exact_heads
        agreement = patching.rank_agreement(self.atp.heads, exact.normalized, n_boot=cfg.n_bootstrap, seed=cfg.seed,
                                            alpha=cfg.alpha)
        noising = ev.head_patching(self.handle, self.layer_sweep_pairs, self.tokens, cfg, direction="noising")
        return heads.HeadRanking(exact=exact, noising=noising, ranking=self.ranking, atp=self.atp,
                                 agreement=agreement, n_candidates=len(self.candidates), verified=self.verified,
                                 bar=cfg.head_effect, train_pairs=self.train_pairs)

    @stage
    def attention_patterns(self) -> heads.AttentionPatterns:
        """The top heads on the first test pair (descriptive)."""
        return heads.attention_patterns(self.handle, self.ranking.top(heads.N_PATTERN_HEADS), self.test_split[0])

    @stage
    def neuron_catalogue(self) -> catalogue.NeuronCatalogue:
        return catalogue.neuron_catalogue(self.handle, self.neurons, self.train_pairs, self.data.train,
                                          self.cfg.batch_size)

    # ------------------------------------------------------------------ phase 4 (test split)
    @stage
    def ablation_study(self) -> ablations.AblationStudy:
        """Each circuit condition beside its size- and layer-matched random control (the study's, drawn before
        anything was scored); those the verdicts rest on are the study's own stages."""
        cfg, direction = self.cfg, self.refusal_direction
        top = self.ranking.top(cfg.top_heads)
        top_heads = self.ablate(f"top {len(top)} heads", top)
        noise = ablations.random_direction(direction, self.handle.d_model, cfg.seed)
        # the neurons alone are left out for the CPU budget: the circuit row holds them with the heads
        conditions = [top_heads,
                      self.ablate(f"random {len(top)} heads", self.controls["heads"], kind="control",
                                  control_of=top_heads.name),
                      self.circuit_ablation, self.circuit_control,  # what C2 is decided on
                      self.h1_ablation, self.h1_control,  # what H1's ablation line is decided on
                      self.direction_ablation,  # shared with phase 5.2's bypass
                      self.ablate("random direction", (noise,), kind="control", control_of="refusal direction",
                                  method="zero")]
        return ablations.ablation_study(conditions, direction, ev.harmful(self.test_split), cfg)

    @stage
    def gradient_attribution(self) -> attribution.GradientAttribution:
        return attribution.gradient_attribution(
            self.handle, self.train_pairs, self.tokens, self.cfg, flow=self.attention_flow,
            exact_heads=self.exact_heads, atp=self.atp, neurons=self.neurons, s1=self.gradient_vs_patching,
            n_candidates=len(self.candidates), n_pairs_test=self.verified.n_pairs, gradient_share=self.gradient_share,
            k_components=len(self.h1_set))

    # ------------------------------------------------------------------ phase 5 (test split)
    @stage
    def circuit_graph(self) -> circuit.CircuitGraph:
        return circuit.circuit_graph(self.handle, self.ranking, self.neurons, ev.harmful(self.test_split),
                                     self.reference, self.faithfulness, self.cfg)

    @stage
    def direction_steering(self) -> steering.Steering:
        return steering.steering(self.direction, self.direction_unusable, self.projections, self.direction_ablation,
                                 self.direction_induction, self.behaviour, self.test_split, self.cfg,
                                 self.handle.n_layers)

    @stage
    def activation_scatter(self) -> steering.ActivationScatter:
        return steering.activation_scatter(self.handle, (*self.data.val, *self.test_split), self.cfg)
