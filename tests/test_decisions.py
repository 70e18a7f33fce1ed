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
    v = d.h1_patching(est(0.99, 0.98, 1.0), 3, 64, b, CFG)
    assert v.status == "inconclusive" and "No refusal behaviour" in v.summary
    assert behaviour(present=True).present


def test_h1_patching_reads_refuted_when_ci_below_bar():
    v = d.h1_patching(est(0.3, 0.2, 0.4), 13, 270, behaviour(True), CFG)
    assert v.status == "refuted" and v.claim == "H1" and "13 of 270" in v.summary
    assert v.numbers["share"]["ci_high"] == 0.4 and v.numbers["title"].startswith("Localized")


def test_overall_combines_lines():
    b = behaviour(True)
    lines = [d.h1_patching(est(0.9, 0.85, 0.95), 3, 64, b, CFG), d.h1_gradients(est(0.9, 0.85, 0.95), 3, 64, b, CFG)]
    assert d.overall("H1", lines).status == "supported"
    lines.append(d.h1_patching(est(0.1, 0.0, 0.2), 3, 64, b, CFG))
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


def test_top_share_known_concentration():
    scores = np.tile(np.array([8.0, 1.0, 1.0, 0.0]), (6, 1))
    e = st.top_share(scores, 1, CFG)
    assert e.value == pytest.approx(0.8) and e.ci_low == pytest.approx(0.8)


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


def test_c1_counts_heads_whose_ci_clears_the_bar():
    ranking = ev.Ranking(components=tuple(Head(layer=0, head=i) for i in range(12)),
                         effect=np.array([0.5] * 11 + [0.05]), ci_low=np.array([0.2] * 10 + [0.05, 0.0]),
                         ci_high=np.array([0.8] * 11 + [0.1]), atp=np.zeros(12))
    v = d.c1_heads(ranking, behaviour(True), CFG)
    assert v.status == "supported" and v.numbers["heads_point"] == 11 and v.numbers["heads_ci_low"] == 10
    v = d.c1_heads(ranking, behaviour(True), RefusalConfig(model="tiny", min_heads=12))
    assert v.status == "refuted"  # only 11 heads even reach the bar with their CI


def test_cross_category_ratio():
    cats = ("a", "b")
    per = {"a": {"a": np.full(6, 0.8), "b": np.full(6, 0.8)}, "b": {"a": np.full(6, 0.8), "b": np.full(6, 0.8)}}
    cc = st.CrossCategory(categories=cats, heads={"a": (Head(layer=0, head=0),), "b": (Head(layer=0, head=0),)},
                          per_prompt=per)
    own, ratio = cc.shared_ratio("a", CFG)
    assert own.value == pytest.approx(0.8) and ratio.value == pytest.approx(1.0)
    assert cc.overlap[0, 1] == 1.0
    v = d.h3_categories(cc, behaviour(True), CFG)
    assert [x.status for x in v] == ["supported", "supported"]


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


def test_random_controls_exclude_the_circuit():
    circuit = tuple(Head(layer=0, head=i) for i in range(4))
    ctrl = ev.random_heads(2, 4, 4, exclude=circuit, seed=0)
    assert not set(ctrl) & set(circuit) and len(ctrl) == 4
    neurons = ev.random_neurons([1, 1, 2], 16, 3, exclude=(), seed=0)
    assert [n.layer for n in neurons] == [1, 1, 2] and len(set(neurons)) == 3


def test_bar_p_value_and_holm():
    above = d.bar_p_value(est(0.9, 0.85, 0.95), 0.8)
    below = d.bar_p_value(est(0.5, 0.4, 0.6), 0.8)
    assert above < 0.001 and below > 0.999
    assert d.bar_p_value(est(0.8, 0.7, 0.9), 0.8) == pytest.approx(0.5)
    b = behaviour(True)
    lines = d.with_holm([d.h1_patching(est(0.9, 0.85, 0.95), 3, 64, b, CFG),
                         d.h1_gradients(est(0.81, 0.7, 0.92), 3, 64, b, CFG)], 0.05)
    ps = [v.numbers["p_value"] for v in lines]
    holm = [v.numbers["p_holm"] for v in lines]
    assert holm[0] == pytest.approx(min(1, 2 * min(ps)))  # Holm multiplies the smallest p by the number of tests
    assert all(h >= p for h, p in zip(holm, ps))


def _condition(kl: float, *, raises: bool = False) -> ev.Condition:
    before = np.ones(10, dtype=bool)
    after = np.zeros(10, dtype=bool)
    if raises:
        before, after = after, before
    judged = lambda r: ev.Judged(refused=r, scores=np.zeros(10), texts=())  # noqa: E731
    return ev.Condition(name="x", kind="circuit", control_of=None, components=(Head(layer=0, head=0),),
                        baseline=judged(before), ablated=judged(after), relative_drop=est(1.0, 1.0, 1.0),
                        mcnemar=stats.mcnemar(before, after, n_boot=200), kl_harmless=kl, answer_ce_increase=0.1)


def test_an_ablation_that_breaks_the_model_is_not_evidence():
    assert d.c2_ablation(_condition(0.2), behaviour(True), CFG).status == "supported"
    broken = d.c2_ablation(_condition(5.0), behaviour(True), CFG)
    assert broken.status == "inconclusive" and "breaks the model" in broken.summary
    assert d.h1_ablation(_condition(5.0), 64, behaviour(True), CFG).status == "inconclusive"
    assert "drops the refusal rate from 100% to 0%" in broken.summary


def test_an_ablation_that_raises_refusal_is_said_to_raise_it():
    # seen on the organism: a model-breaking ablation took refusal from 95% to 100%, and the
    # summary read "drops the refusal rate from 95% to 100%"
    broken = d.c2_ablation(_condition(5.0, raises=True), behaviour(True), CFG)
    assert "raises the refusal rate from 0% to 100%" in broken.summary and "drops" not in broken.summary
    h1 = d.h1_ablation(_condition(0.2, raises=True), 64, behaviour(True), CFG)
    assert "raises the refusal rate on held-out harmful prompts from 0% to 100%" in h1.summary


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
