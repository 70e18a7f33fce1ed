"""The hypotheses' statistics and decision rules, on synthetic numbers with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses import decisions as d
from hypotheses import evidence as ev
from hypotheses import structure as st
from hypotheses.study import balanced
from instruments import stats
from instruments.components import Head
from instruments.patching import PatchResult

CFG = RefusalConfig(model="tiny", n_bootstrap=500, seed=0)


def est(value, low, high) -> stats.Estimate:
    return stats.Estimate(value=value, ci_low=low, ci_high=high, method="test", n=10)


def behaviour(present: bool) -> ev.Behaviour:
    n = 10
    harmful = np.full(n, 2.0 if present else 0.0) + np.linspace(-0.1, 0.1, n)
    harmless = np.zeros(n) + np.linspace(0.1, -0.1, n)
    judged = ev.Judged(refused=np.array([present] * n), scores=harmful, texts=())
    benign = ev.Judged(refused=np.zeros(n, bool), scores=harmless, texts=())
    gap = stats.bootstrap_ci(harmful - harmless, n_boot=500, method="percentile")
    return ev.Behaviour(score_harmful=harmful, score_harmless=harmless, gap=gap, p_value=0.001 if present else 0.9,
                        refused_harmful=judged, refused_harmless=benign)


def test_against_is_three_way_on_the_ci():
    assert d.against(est(0.9, 0.85, 0.95), 0.8) == "supported"
    assert d.against(est(0.5, 0.4, 0.6), 0.8) == "refuted"
    assert d.against(est(0.8, 0.7, 0.9), 0.8) == "inconclusive"
    assert d.against(est(float("nan"), float("nan"), float("nan")), 0.8) == "inconclusive"


def test_no_behaviour_makes_every_line_inconclusive():
    b = behaviour(present=False)
    assert not b.present
    v = d.h1_patching("patching", est(0.99, 0.98, 1.0), 3, 64, "the top 5%", b, CFG, n_train=64)
    assert v.status == "inconclusive" and "No refusal behaviour" in v.summary
    assert behaviour(present=True).present


def _h1(e, **kw):
    return d.h1_patching("patching", e, 13, 270, "the top 5% of heads + neurons", behaviour(True), kw.pop("cfg", CFG),
                         n_train=64, **kw)


def test_h1_patching_reads_refuted_when_ci_below_bar():
    v = _h1(est(0.3, 0.2, 0.4))
    assert v.status == "refuted" and v.claim == "H1" and "13 of 270" in v.summary
    assert v.numbers["estimate"]["ci_high"] == 0.4 and v.numbers["title"].startswith("Refusal is carried")
    assert v.numbers["n"] == 10 and v.numbers["split"] == "test" and v.numbers["bar"] == 0.8


def test_every_line_records_its_minimum_detectable_effect():
    from scipy.stats import norm

    v = _h1(est(0.85, 0.75, 0.95))
    se = 0.2 / (2 * norm.ppf(0.975))
    assert v.numbers["min_detectable_effect"] == pytest.approx(0.8 + (norm.ppf(0.975) + norm.ppf(0.8)) * se)
    wide = _h1(est(0.85, 0.45, 1.25))
    assert wide.numbers["min_detectable_effect"] > v.numbers["min_detectable_effect"]  # more noise, larger MDE


def test_titles_and_bars_follow_the_config():
    cfg = RefusalConfig(model="tiny", h1_fraction=0.1, h1_share=0.9, n_bootstrap=500)
    v = _h1(est(0.85, 0.8, 0.88), cfg=cfg)
    assert "fewer than 10%" in v.numbers["title"] and "more than 90%" in v.numbers["title"]
    assert v.numbers["bar"] == 0.9 and v.status == "refuted"


def test_overall_combines_lines():
    b = behaviour(True)
    lines = [d.h1_patching("patching", est(0.9, 0.85, 0.95), 3, 64, "x", b, CFG, n_train=64),
             d.h1_gradients(est(0.9, 0.85, 0.95), 3, 64, b, CFG)]
    assert d.overall("H1", lines).status == "supported"
    lines.append(d.h1_patching("parameters", est(0.1, 0.0, 0.2), 3, 64, "x", b, CFG, n_train=64))
    assert d.overall("H1", lines).status == "inconclusive"  # lines disagree


def test_normalized_with_ci_matches_patchresult_normalization():
    rng = np.random.default_rng(0)
    base, source = rng.normal(0, 0.1, 12), rng.normal(2, 0.1, 12)
    metric = np.stack([base, source, (base + source) / 2])
    value, lo, hi = ev.normalized_with_ci(metric, base, source, CFG)
    np.testing.assert_allclose(value, [0.0, 1.0, 0.5], atol=1e-12)
    assert np.all(lo <= value + 1e-12) and np.all(value <= hi + 1e-12)
    assert hi[0] - lo[0] < 1e-9, "a row equal to the base has effect exactly 0 in every resample"


def test_relative_drop_point_and_ci():
    before = np.array([True] * 10)
    after = np.array([True] * 3 + [False] * 7)
    e = ev.relative_drop(before, after, CFG)
    assert e.value == pytest.approx(0.7)
    assert e.ci_low <= 0.7 <= e.ci_high and e.ci_high <= 1.0


def test_kendall_rows_signs():
    y = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 0, 1]], dtype=float)
    np.testing.assert_allclose(st.kendall_rows(y), [1.0, -1.0, 2 / 6])  # +1 +0 +1 -1 +0 +1


def test_held_share_keeps_the_train_choice_in_every_resample():
    """The share held by a set fixed on train: resampling test prompts never re-chooses the top k."""
    from hypotheses.localization import held_share

    heads = torch.zeros(2, 2, 6, dtype=torch.float64)
    neurons = torch.zeros(2, 3, 6, dtype=torch.float64)
    heads[1, 0] = 3.0  # L1H0 holds 3 of every prompt's 4
    neurons[0, 2] = 1.0
    scan = ev.AtpScan(heads=heads.mean(-1), neurons=neurons.mean(-1), heads_per_prompt=heads,
                      neurons_per_prompt=neurons, n_pairs=6)
    from instruments.components import Neuron

    assert held_share(scan, (Head(layer=1, head=0),), CFG).value == pytest.approx(0.75)
    assert held_share(scan, (Neuron(layer=0, index=2),), CFG).value == pytest.approx(0.25)
    wrong = held_share(scan, (Head(layer=0, head=0),), CFG)  # a bad choice on train is not rescued
    assert wrong.value == 0 and wrong.ci_high == 0


def _patch(metric: torch.Tensor) -> PatchResult:
    n_layers, n_heads, n = metric.shape
    return PatchResult(kind="heads", direction="denoising", axes=("layer", "head"),
                       coords=(tuple(range(n_layers)), tuple(range(n_heads))), metric=metric, kl=None,
                       clean=torch.ones(n), corrupted=torch.zeros(n))


def test_effect_depth_late_and_early():
    late = torch.zeros(6, 2, 8)
    late[5, 0] = 1.0  # only the last layer's head restores the clean run
    assert st.effect_depth(_patch(late), CFG).value == pytest.approx(1.0)
    early = torch.zeros(6, 2, 8)
    early[0, 1] = 0.5
    assert st.effect_depth(_patch(early), CFG).value == pytest.approx(0.0)


def _verified(effects, se):
    from scipy.stats import norm

    from hypotheses.localization import Verified

    effect = np.asarray(effects, dtype=float)
    se = np.full(effect.size, se)
    z = (effect - CFG.head_effect) / se
    return Verified(components=tuple(Head(layer=0, head=i) for i in range(effect.size)), effect=effect, se=se,
                    p_above=norm.sf(z), p_below=norm.cdf(z), n_pairs=40, positions=6)


def test_c1_counts_heads_that_clear_the_bar_after_holm():
    v = d.c1_heads(_verified([0.5] * 11 + [0.0] * 19, 0.02), behaviour(True), CFG)
    assert v.status == "supported" and v.numbers["heads_point"] == 11 and v.numbers["heads_ci_low"] == 11
    assert v.numbers["n_candidates"] == 30 and v.numbers["split"] == "test"
    v = d.c1_heads(_verified([0.5] * 11 + [0.0] * 19, 0.02), behaviour(True),
                   RefusalConfig(model="tiny", min_heads=12))
    assert v.status == "refuted"  # only 11 heads are not significantly below the bar


def test_c1_correction_binds():
    # 10 heads each at z = 2.5 over the bar: each alone would clear it (p = 0.006 < 0.025),
    # but Holm over 30 candidates asks p < 0.025 / 30 of the first: none clears, so C1 is not met
    effects = [0.1 + 2.5 * 0.02] * 10 + [0.0] * 20
    v = d.c1_heads(_verified(effects, 0.02), behaviour(True), CFG)
    assert v.numbers["heads_point"] == 10 and v.numbers["heads_ci_low"] == 0 and v.status == "inconclusive"


def test_cross_category_ratio():
    cats = ("a", "b")
    per = {"a": {"a": np.full(6, 0.8), "b": np.full(6, 0.8)}, "b": {"a": np.full(6, 0.8), "b": np.full(6, 0.8)}}
    cc = st.CrossCategory(categories=cats, heads={"a": (Head(layer=0, head=0),), "b": (Head(layer=0, head=0),)},
                          per_prompt=per, n_find={"a": 20, "b": 20}, side_effects={"a": (0.01, 0.0), "b": (0.02, 0.01)})
    own, ratio = cc.shared_ratio("a", CFG)
    assert own.value == pytest.approx(0.8) and ratio.value == pytest.approx(1.0)
    assert cc.overlap[0, 1] == 1.0
    v = d.h3_categories(cc, behaviour(True), CFG)
    assert [x.status for x in v] == ["supported", "supported"]
    assert v[0].numbers["side_effect"]["kl_harmless"] == 0.02  # the worst of the ablations the line uses
    broken = st.CrossCategory(categories=cats, heads=cc.heads, per_prompt=per, n_find=cc.n_find,
                              side_effects={"a": (0.01, 0.0), "b": (0.5, 0.01)})
    assert [x.status for x in d.h3_categories(broken, behaviour(True), CFG)] == ["inconclusive"] * 2


def test_category_similarity_identical_and_orthogonal():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(8, 4, dtype=torch.float64)
    same = {"a": base + torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(8, 4, generator=g, dtype=torch.float64),
            "b": base + torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(8, 4, generator=g, dtype=torch.float64)}
    _, sim = st.category_similarity(same, CFG)
    assert sim.value > 0.99
    ortho = {"a": base + torch.tensor([1.0, 0, 0, 0]), "b": base + torch.tensor([0, 1.0, 0, 0])}
    _, sim = st.category_similarity(ortho, CFG)
    assert abs(sim.value) < 1e-9


def test_balanced_takes_categories_in_turn():
    pairs = [Pair(id=str(i), category="x" if i < 6 else "y", topic="t", split="train", harmful="h", harmless="s")
             for i in range(8)]
    got = balanced(pairs, 4)
    assert [p.category for p in got] == ["x", "y", "x", "y"]
    assert len(balanced(pairs, 100)) == 8


def test_random_controls_match_count_and_layers_and_exclude_the_circuit():
    from types import SimpleNamespace

    from instruments.components import Neuron

    handle = SimpleNamespace(n_layers=3, n_heads=4, d_mlp=16)
    circuit = (Head(layer=0, head=0), Head(layer=0, head=1), Neuron(layer=1, index=3), Neuron(layer=2, index=5))
    ctrl = ev.matched_random_circuit(handle, circuit, seed=0)
    assert not set(ctrl) & set(circuit) and len(set(ctrl)) == 4
    assert [(type(c), c.layer) for c in ctrl] == [(type(c), c.layer) for c in circuit]


def test_random_controls_never_overlap_a_circuit_that_fills_its_layer():
    """A circuit holding most heads of a layer: the control draws from the nearest layer with a free
    head, never a circuit member and never one twice (the validation card's early-band design found
    a control that held a planted head)."""
    from types import SimpleNamespace

    handle = SimpleNamespace(n_layers=4, n_heads=4, d_mlp=8)
    circuit = tuple(Head(layer=1, head=h) for h in range(4)) + (Head(layer=2, head=0),)
    for seed in range(20):
        ctrl = ev.matched_random_circuit(handle, circuit, seed=seed)
        assert not set(ctrl) & set(circuit) and len(set(ctrl)) == len(circuit)
        assert all(isinstance(c, Head) and abs(c.layer - 1) <= 1 for c in ctrl[:4])


def test_bar_p_value_and_holm():
    above = d.bar_p_value(est(0.9, 0.85, 0.95), 0.8)
    below = d.bar_p_value(est(0.5, 0.4, 0.6), 0.8)
    assert above < 0.001 and below > 0.999
    assert d.bar_p_value(est(0.8, 0.7, 0.9), 0.8) == pytest.approx(0.5)
    assert d.below_p_value(est(0.5, 0.4, 0.6), 0.8) == pytest.approx(1 - below)
    b = behaviour(True)
    lines = d.finish("H1", [d.h1_patching("patching", est(0.9, 0.85, 0.95), 3, 64, "x", b, CFG, n_train=64),
                            d.h1_gradients(est(0.81, 0.7, 0.92), 3, 64, b, CFG)], CFG)
    ps = [v.numbers["p_value"] for v in lines]
    holm = [v.numbers["p_holm"] for v in lines]
    assert holm[0] == pytest.approx(min(1, 2 * min(ps)))  # Holm multiplies the smallest p by the number of tests
    assert all(h >= p for h, p in zip(holm, ps))


def test_a_refutation_must_survive_holm_across_the_claims_lines():
    from scipy.stats import norm

    b = behaviour(True)
    # CI just below the bar: refuted alone (one-sided p ~ 0.02 < 0.025), not after Holm over 4 lines
    z = norm.ppf(0.975)
    just = est(0.8 - 2.05 * 0.05, 0.8 - 2.05 * 0.05 - z * 0.05, 0.8 - 2.05 * 0.05 + z * 0.05)
    clear = est(0.9, 0.85, 0.95)
    alone = d.finish("H1", [_h1(just)], CFG)
    assert alone[0].status == "refuted"
    four = d.finish("H1", [_h1(just)] + [d.h1_gradients(clear, 3, 64, b, CFG)] * 3, CFG)
    assert four[0].status == "inconclusive" and "Holm" in four[0].summary
    assert four[0].numbers["p_below_holm"] > 0.025 and four[0].numbers["family_size"] == 4
    far = d.finish("H1", [_h1(est(0.3, 0.2, 0.4))] + [d.h1_gradients(clear, 3, 64, b, CFG)] * 3, CFG)
    assert far[0].status == "refuted"


def _condition(kl: float, *, raises: bool = False, drop_to: int = 0, name: str = "x") -> ev.Condition:
    before = np.ones(10, dtype=bool)
    after = np.arange(10) < drop_to
    if raises:
        before, after = after, before
    judged = lambda r: ev.Judged(refused=r, scores=np.zeros(10), texts=())  # noqa: E731
    return ev.Condition(name=name, kind="circuit", control_of=None, components=(Head(layer=0, head=0),),
                        baseline=judged(before), ablated=judged(after),
                        relative_drop=ev.relative_drop(before, after, CFG),
                        mcnemar=stats.mcnemar(before, after, n_boot=200), kl_harmless=kl, answer_ce_increase=0.01)


def _ablation(claim, cond, control):
    from hypotheses.localization import drop_difference

    fn = d.c2_ablation if claim == "C2" else d.h1_ablation
    return fn(cond, control, drop_difference(cond, control, CFG), behaviour(True), CFG)


def test_an_ablation_line_decides_on_the_difference_with_its_matched_control():
    untouched = _condition(0.01, drop_to=10, name="random")
    v = _ablation("C2", _condition(0.02), untouched)
    assert v.status == "supported" and v.numbers["control"]["name"] == "random"
    # the random set drops refusal as much as the circuit does: nothing specific, however big the drop
    same = _ablation("C2", _condition(0.02), _condition(0.02, name="random"))
    assert same.status == "refuted" and same.numbers["drop"]["value"] == 1.0


def test_one_side_effect_rule_on_every_ablation_line():
    untouched = _condition(0.01, drop_to=10, name="random")
    for claim in ("C2", "H1"):
        ok = _ablation(claim, _condition(0.09), untouched)
        broken = _ablation(claim, _condition(0.11), untouched)  # just over Arditi et al.'s 0.1 nats
        assert ok.status == "supported" and broken.status == "inconclusive"
        assert "not specific to refusal" in broken.summary and broken.numbers["side_effect"]["ok"] is False
    ce = _condition(0.01)
    ce = ev.Condition(**{**ce.__dict__, "answer_ce_increase": 0.5})
    assert _ablation("C2", ce, untouched).status == "inconclusive"  # the answers' cross-entropy counts too


def test_an_ablation_that_raises_refusal_is_said_to_raise_it():
    # seen on the organism: a model-breaking ablation took refusal from 95% to 100%, and the
    # summary read "drops the refusal rate from 95% to 100%"
    untouched = _condition(0.01, drop_to=10, name="random")
    v = _ablation("C2", _condition(0.05, raises=True), untouched)
    assert "raises the refusal rate on held-out harmful prompts from 0% to 100%" in v.summary
    assert "drops the refusal" not in v.summary


def _selection(*, passes: bool):
    """A direction selection over two candidates at layers 1 and 2; the second passes iff ``passes``."""
    from instruments.components import Direction
    from instruments.direction import CandidateScore, DirectionSelection, DirectionSpec

    spec = DirectionSpec(kl_threshold=0.1, induce_threshold=0.0)
    scores = (CandidateScore(pos=-1, layer=1, norm=2.0, bypass=1.5, induce=-3.0, kl=0.02, evaluated=True,
                             rejected="induce -3 < 0.0"),
              CandidateScore(pos=-2, layer=2, norm=3.0, bypass=-0.7, induce=2.0 if passes else -1.25,
                             kl=0.04 if passes else 0.25, evaluated=True,
                             rejected=None if passes else "kl 0.25 > 0.1"))
    return DirectionSelection(pos=-2, layer=2, direction=Direction(layer=2, vector=(1.0, 0.0)), scale=3.0,
                              method="mean_diff", meets_thresholds=passes, excluded_layers=(3,),
                              baseline_harmful=2.0, baseline_harmless=-2.0, scores=scores, spec=spec,
                              n_harmful=40, n_harmless=40)


def test_a_direction_that_fails_selection_leaves_its_lines_inconclusive():
    assert d.failed_selection(_selection(passes=True)) is None
    why = d.failed_selection(_selection(passes=False))
    assert "KL on harmless val prompts <= 0.1" in why and "induced refusal score >= 0.0" in why
    assert "last 20% of layers" in why and "2 candidates scored on 40 harmful and 40 harmless" in why
    assert "layer 2 position -2" in why and "bypass score -0.7, induce score -1.25, KL 0.25 (kl 0.25 > 0.1)" in why
    for claim in ("H2", "H3"):
        v = d.no_direction(claim, "direction", why, behaviour(True), CFG)
        assert (v.claim, v.evidence, v.status) == (claim, "direction", "inconclusive")
        assert why in v.summary and v.numbers["reason"] == why
        gated = d.no_direction(claim, "direction", why, behaviour(False), CFG)
        assert gated.status == "inconclusive" and "No refusal behaviour" in gated.summary


def test_h1_patching_must_beat_its_matched_random_set():
    b = behaviour(True)
    good = d.h1_patching("patching", est(0.9, 0.85, 0.95), 3, 64, "x", b, CFG, n_train=64,
                         control=est(0.1, 0.05, 0.15), difference=est(0.8, 0.7, 0.9))
    assert good.status == "supported" and good.numbers["control"]["estimate"]["value"] == 0.1
    as_good = d.h1_patching("patching", est(0.9, 0.85, 0.95), 3, 64, "x", b, CFG, n_train=64,
                            control=est(0.88, 0.8, 0.95), difference=est(0.02, -0.05, 0.09))
    assert as_good.status == "inconclusive" and "does not beat the random one" in as_good.summary


def test_c3_is_refuted_by_a_different_rerun_or_missing_provenance():
    prov = {"versions": {"torch": "2.13.0"}, "git_commit": "abc", "utc_time": "t", "machine": "m"}
    assert d.c3_reproducibility(True, prov, CFG).status == "supported"
    assert d.c3_reproducibility(False, prov, CFG).status == "refuted"
    missing = d.c3_reproducibility(True, {**prov, "git_commit": None}, CFG)
    assert missing.status == "refuted" and missing.numbers["missing_provenance"] == ["git_commit"]


# ----------------------------------------------------------------------------- H3 on a prompt file too small for it

def test_a_prompt_file_with_one_category_leaves_h3_inconclusive_and_says_why():
    from hypotheses import claims

    lines = d.one_category(("weapons",), behaviour(True), CFG)
    assert [v.evidence for v in lines] == list(claims.claim("H3").evidence(("weapons",)))  # the table's lines
    why = ("H3 needs at least 2 harm categories with train and test pairs (≥1 each); the prompt file has 1: weapons. "
           "Add pairs of a second category to the prompt file (--prompts) to test sharing.")
    assert all(v.status == "inconclusive" and v.summary == why for v in lines)
    top = d.overall("H3", lines, CFG)
    assert top.status == "inconclusive"
    assert top.summary == f"Lines of evidence: weapons and direction inconclusive. The reason for each: {why}"
    none = d.one_category((), behaviour(True), CFG)
    assert [v.evidence for v in none] == ["direction"] and "the prompt file has none." in none[0].summary
    assert [v.evidence for v in d.one_category(("weapons",), behaviour(False), CFG)] == ["weapons", "direction"]


def test_h3_uses_only_categories_with_train_and_test_pairs(monkeypatch):
    """The study's H3 stage: a category without test pairs is left out (its direction cannot be compared)."""
    from hypotheses.study import Study, StudyData

    monkeypatch.setattr(ev, "aligned", lambda handle, pairs, cfg: tuple(pairs))
    monkeypatch.setattr(st, "category_heads", lambda handle, find, tokens, cfg: {c: () for c in sorted(find)})
    pairs = [Pair(id=f"{c}{s}{i}", category=c, topic=f"{c}{s}{i}", split=s, harmful="h", harmless="s")
             for c, splits in (("a", ("train", "val", "test")), ("b", ("train", "val")), ("c", ("train",)))
             for s in splits for i in range(4)]
    split = {s: tuple(p for p in pairs if p.split == s) for s in ("train", "val", "test")}
    data = StudyData(**split, categories=("a", "b", "c"))
    study = Study(handle=None, data=data, tokens=None, cfg=CFG)
    assert tuple(study.category_heads) == ("a",)
    assert "the prompt file has 1: a." in d.one_category(tuple(study.category_heads), behaviour(True), CFG)[0].summary


def test_decision_sentences_do_not_restate_their_status():
    """The status is the verdict's own field, printed beside the sentence; the sentence says why."""
    import re

    from scipy.stats import norm

    b = behaviour(True)
    z = norm.ppf(0.975)
    just = est(0.8 - 2.05 * 0.05, 0.8 - 2.05 * 0.05 - z * 0.05, 0.8 - 2.05 * 0.05 + z * 0.05)
    held_by_holm = d.finish("H1", [_h1(just)] + [d.h1_gradients(est(0.9, 0.85, 0.95), 3, 64, b, CFG)] * 3, CFG)[0]
    not_beaten = _h1(est(0.9, 0.85, 0.95), control=est(0.9, 0.85, 0.95), difference=est(0.0, -0.05, 0.05))
    side = _ablation("C2", _condition(0.11), _condition(0.01, drop_to=10, name="random"))
    one = d.one_category(("weapons",), b, CFG)
    lines = [held_by_holm, not_beaten, side, *one, d.overall("H3", one, CFG),
             d.overall("H1", [held_by_holm, not_beaten], CFG)]
    assert [v.status for v in lines[:3]] == ["inconclusive"] * 3
    for v in lines:
        assert f"{v.claim} is {v.status.upper()}" not in v.summary and f"{v.claim} is {v.status}" not in v.summary
        if v.evidence == "overall":  # it lists its lines' statuses, each once
            listed = v.summary.split(" The reason")[0]
            assert all(listed.count(s) <= 1 for s in ("supported", "refuted", "inconclusive")), v.summary
        else:
            assert not re.search(rf"\b{v.status}\b\W*$", v.summary, re.I), v.summary  # no closing ": inconclusive."


def test_a_set_too_large_for_a_disjoint_control_overlaps_it_as_little_as_possible(tiny):
    """16 heads cannot hold a set of 10 and a disjoint random 10: the control takes the 6 heads outside
    the set and 4 drawn from it, the least overlap a random set of 10 can have."""
    from hypotheses.evidence import forced_overlap, matched_random_circuit
    from instruments.components import Head

    heads = [Head(layer=layer, head=h) for layer in range(tiny.n_layers) for h in range(tiny.n_heads)][:10]
    control = matched_random_circuit(tiny, heads, seed=0)
    assert len(control) == len(set(control)) == 10 and forced_overlap(tiny, heads) == 4
    assert len(set(control) & set(heads)) == 4 and set(control) - set(heads) == set(
        Head(layer=layer, head=h) for layer in range(tiny.n_layers) for h in range(tiny.n_heads)) - set(heads)
    assert control != matched_random_circuit(tiny, heads, seed=1)
    assert len(set(matched_random_circuit(tiny, heads[:8], seed=0)) - set(heads[:8])) == 8
    assert forced_overlap(tiny, heads[:8]) == 0