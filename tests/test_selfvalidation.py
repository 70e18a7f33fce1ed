"""The suite validates itself: a known answer, and determinism.

Known answer. ``fixtures.planted`` hand-sets a small Llama so that three attention heads
and two MLP neurons, and nothing else, carry "harmful prompt -> refusal token". First the
construction itself is checked with the instruments alone (no study code): the
behaviour is there, zeroing the planted components removes it, zeroing everything else
leaves it, and exact head patching puts the planted heads far above the rest. Then
:func:`hypotheses.study.run_study` must recover the planted heads and neurons with
precision and recall of at least 0.9, and find H1 supported. Every check on the planted
model runs twice: with the byte tokenizer's own ``<pad>``, and with ``<|im_end|>`` as pad
(a real template token, as SmolLM2's is), so no measurement may locate tokens by the pad id.

Determinism. Two studies with the same seed give identical numbers and verdicts on the CPU.

The planted family (each hypothesis true and false, hard cases, nulls that reach the decision
rules) and the validation card are in ``test_family.py`` and ``test_validation.py``.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from fixtures.data import SPLITS
from fixtures.planted import (PLANTED_HEADS, PLANTED_NEURONS, TRIGGERS, build_planted, recovery,
                              selfvalidation_config, shuffled_labels, synthetic_prompts)
from instruments.ablation import AblationSpec, ablation_hooks
from instruments.behavior import last_logits
from instruments.components import Neuron, all_heads, label
from instruments.metrics import compliance_prob, refusal_prob, refusal_score
from instruments.patching import PatchSpec, patch_heads
from instruments.positions import token_lengths

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


# The planted model with its own pad, and with a real template token as pad (as SmolLM2's is).
@pytest.fixture(scope="module", params=["<pad>", "<|im_end|>"], ids=["pad", "im_end-pad"])
def planted(request):
    return build_planted(seed=0, pad_token=request.param)


def _scores(planted, prompts, components=()):
    """Refusal scores of ``prompts`` with ``components`` zero-ablated (none: the intact model)."""
    hooks = ablation_hooks(planted.handle, list(components), spec=AblationSpec(method="zero")) if components else []
    return refusal_score(last_logits(planted.handle, prompts, batch_size=32, fwd_hooks=hooks), planted.tokens)


def _gap(planted, components=()):
    pairs = planted.dataset.pairs
    harmful = _scores(planted, [p.harmful for p in pairs], components)
    harmless = _scores(planted, [p.harmless for p in pairs], components)
    return harmful, harmless, float((harmful - harmless).mean())


# ----------------------------------------------------------------------------- the dataset

def test_synthetic_pairs_are_contrastive_and_split_by_topic(planted):
    data = planted.dataset
    assert data.categories == tuple(TRIGGERS)
    assert {s: len(data.split(s)) for s in SPLITS} == {"train": 16, "val": 8, "test": 8}
    assert all(len(data.by_category(c)) == 8 for c in data.categories)
    ids, mask = planted.handle.encode([p.harmful for p in data.pairs] + [p.harmless for p in data.pairs])
    n = len(data.pairs)
    assert torch.equal(mask[:n], mask[n:]), "each pair must have one token length (exact patching identities)"
    for pair in data.pairs:
        trigger = TRIGGERS[pair.category]
        assert pair.harmful.count(trigger) == 1 and not any(t in pair.harmless for t in TRIGGERS.values())
        assert sum(a != b for a, b in zip(pair.harmful, pair.harmless)) == 1
    topics = {}
    for pair in data.pairs:
        assert topics.setdefault(pair.topic, pair.split) == pair.split
    assert synthetic_prompts(seed=0) == data and synthetic_prompts(seed=1) != data


def test_label_shuffle_swaps_within_pairs():
    data = synthetic_prompts(seed=0)
    shuffled = shuffled_labels(data, seed=3)
    swapped = [a.harmful == b.harmless and a.harmless == b.harmful for a, b in zip(data.pairs, shuffled.pairs)]
    kept = [a == b for a, b in zip(data.pairs, shuffled.pairs)]
    assert all(s or k for s, k in zip(swapped, kept)) and 0 < sum(swapped) < len(swapped)
    assert shuffled.sha256 != data.sha256 and shuffled_labels(data, seed=3) == shuffled
    balanced = shuffled_labels(data, seed=3, balanced=True)
    for cat in data.categories:
        for split in SPLITS:
            pairs = list(zip(data.by_category(cat, split), balanced.by_category(cat, split)))
            assert sum(a.harmful != b.harmful for a, b in pairs) == len(pairs) // 2


# ----------------------------------------------------------------------------- the construction, by instruments alone

def test_planted_model_refuses_harmful_and_complies_with_harmless(planted, record_property):
    harmful, harmless, gap = _gap(planted)
    record_property("planted_gap", gap)
    assert harmful.min() > 3 and harmless.max() < -3 and gap > 8
    pairs = planted.dataset.pairs
    for prompts, refused in (([p.harmful for p in pairs], True), ([p.harmless for p in pairs], False)):
        logits = last_logits(planted.handle, prompts, batch_size=32)
        judged = refusal_prob(logits, planted.tokens) > compliance_prob(logits, planted.tokens)
        assert bool(judged.all()) if refused else not bool(judged.any())


def test_zeroing_the_planted_components_removes_refusal(planted, record_property):
    _, _, gap = _gap(planted)
    harmful, _, gap_heads = _gap(planted, PLANTED_HEADS)
    record_property("gap_planted_heads_zeroed", gap_heads)
    assert abs(gap_heads) < 0.01 * gap and harmful.max() < -3
    harmful, _, gap_neurons = _gap(planted, PLANTED_NEURONS)
    record_property("gap_planted_neurons_zeroed", gap_neurons)
    assert abs(gap_neurons) < 0.15 * gap and harmful.max() < -3


def test_zeroing_everything_else_leaves_refusal(planted, record_property):
    h = planted.handle
    others = [x for x in all_heads(h.n_layers, h.n_heads) if x not in PLANTED_HEADS]
    others += [n for n in (Neuron(layer=layer, index=i) for layer in range(h.n_layers) for i in range(h.d_mlp))
               if n not in PLANTED_NEURONS]
    _, _, gap = _gap(planted)
    harmful, harmless, gap_others = _gap(planted, others)
    record_property("gap_all_other_components_zeroed", gap_others)
    assert abs(gap_others - gap) < 0.05 * gap and harmful.min() > 3 and harmless.max() < -3


def test_exact_head_patching_singles_out_the_planted_heads(planted, record_property):
    train = planted.dataset.split("train")
    res = patch_heads(planted.handle, [p.harmful for p in train], [p.harmless for p in train],
                      partial(refusal_score, tokens=planted.tokens), PatchSpec(kl=False))
    effect = res.normalized
    mask = torch.zeros_like(effect, dtype=torch.bool)
    for head in PLANTED_HEADS:
        mask[head.layer, head.head] = True
    record_property("planted_head_effects", [round(float(e), 4) for e in effect[mask]])
    record_property("max_other_head_effect", float(effect[~mask].abs().max()))
    assert float(effect[mask].min()) > 0.3
    assert float(effect[~mask].abs().max()) < 0.02


# ----------------------------------------------------------------------------- known answer through the study

@pytest.fixture(scope="module")
def study(planted):
    from hypotheses.study import StudyData, run_study

    return run_study(planted.handle, StudyData.from_prompt_set(planted.dataset), planted.tokens,
                     selfvalidation_config())


def test_study_recovers_the_planted_components(study, planted, record_property):
    heads = recovery(study.localized_heads, planted.planted_heads)
    neurons = recovery(study.localized_neurons, planted.planted_neurons)
    both = recovery(study.localized_heads + study.localized_neurons, planted.planted_heads + planted.planted_neurons)
    result = {"heads": heads, "neurons": neurons, "all": both,
              "localized": [label(c) for c in study.localized_heads + study.localized_neurons],
              "planted": [label(c) for c in planted.planted_heads + planted.planted_neurons]}
    record_property("known_answer_recovery", json.dumps(result))
    print("known answer:", json.dumps(result))
    for name, r in (("heads", heads), ("neurons", neurons), ("all", both)):
        assert r["precision"] >= 0.9 and r["recall"] >= 0.9, f"{name}: {result}"
    assert tuple(study.head_effects.shape) == (planted.handle.n_layers, planted.handle.n_heads)


@pytest.mark.parametrize("claim, expected", [
    ("H1", "supported"),  # three heads (3/64 = 4.7% < 5%) carry all of it
    ("H3", "supported"),  # every category goes through the same heads and neurons
    ("C1", "refuted"),  # only 3 heads exceed a 10% effect, the criterion asks for 10
])
def test_study_verdicts_on_the_known_answer(study, claim, expected, record_property):
    lines = {v.evidence: v.status for v in study.verdicts if v.claim == claim}
    record_property(f"verdict_{claim}", json.dumps(lines))
    assert study.overall(claim) == expected, lines


def test_keyword_attention_peaks_at_the_detector_layers(study, planted, record_property):
    """H2's keyword attention on the known answer: the trigger byte is each prompt's only keyword.

    A detector head puts all its last-position attention on the trigger, so its layer
    scores the largest value possible, 1 / (1 / the prompt's length): the prompt's length.
    """
    profile = study.keyword_profile
    record_property("keyword_attention_by_layer", [round(float(x), 3) for x in profile.mean])
    test = planted.dataset.split("test")
    most = float(np.mean(token_lengths(planted.handle, [p.harmful for p in test])))
    detectors = {h.layer for h in planted.planted_heads}
    assert profile.n == len(test)
    assert all(float(profile.mean[layer]) > 0.95 * most for layer in detectors), (most, profile.mean)
    assert all(abs(float(profile.mean[layer]) - 1) < 0.1 for layer in range(planted.handle.n_layers)
               if layer not in detectors)


def test_study_is_deterministic(study, planted):
    from hypotheses.study import StudyData, run_study

    again = run_study(planted.handle, StudyData.from_prompt_set(planted.dataset), planted.tokens,
                      selfvalidation_config())
    first, second = study.to_dict(), again.to_dict()
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert [v.to_dict() for v in study.verdicts] == [v.to_dict() for v in again.verdicts]


# ----------------------------------------------------------------------------- where the study intervenes

def test_study_patches_and_ablates_where_positions_correspond(study, planted):
    """Every sweep records its positions and pairs; patches and mean ablations use the
    post-instruction window (the same template tokens in every prompt), a direction is
    removed everywhere, and faithfulness uses the intervention that found the circuit."""
    from instruments.positions import post_instruction_length

    window = post_instruction_length(planted.handle)
    assert study.window == window
    assert study.ranking.positions == window and study.ranking.n_pairs == len(study.train_pairs)
    assert study.neurons.positions == window
    assert study.reference.positions == window
    assert study.circuit_ablation.positions == window and study.h1_ablation.positions == window
    assert study.direction_ablation.positions is None
    assert all(p.positions == 1 and p.kind.endswith("_direct") for p in study.block_direct)  # the logits' position
    faith = study.faithfulness
    assert faith.positions == window and faith.n_pairs == len(study.test_pairs)


def test_faithfulness_of_the_planted_circuit_beats_random_circuits(study, planted, record_property):
    """The known answer: the planted heads and neurons keep refusal by themselves; random
    circuits of the same size and layers keep almost none of it (Wang et al. 2022)."""
    faith = study.faithfulness
    record_property("faithfulness", json.dumps({"circuit": faith.value.to_dict(), "random": faith.random.to_dict(),
                                                "difference": faith.difference.to_dict()}))
    assert set(planted.planted_heads) <= set(faith.circuit)
    assert faith.value.ci_low > 0.8, faith.value
    assert faith.random.value < 0.5, faith.random
    assert faith.difference.ci_low > 0.3, faith.difference


def test_every_position_mode_uses_only_pairs_of_equal_length(planted):
    from hypotheses.study import Study, StudyData

    cfg = selfvalidation_config(patch_positions="all")
    data = StudyData.from_prompt_set(planted.dataset)
    study = Study(handle=planted.handle, data=data, tokens=planted.tokens, cfg=cfg)
    assert study.window is None and study.ranking.positions is None
    lengths = token_lengths(planted.handle, [p.harmful for p in study.train_pairs])
    assert lengths == token_lengths(planted.handle, [p.harmless for p in study.train_pairs])
