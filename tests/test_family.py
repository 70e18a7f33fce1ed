"""The planted family's constructions have the properties their truth tables claim.

Each check uses the instruments alone, on the components the design planted (an oracle
that knows the answer), never the study's choices: a truth label that a check here
cannot confirm is a defect of the design, found before any verdict is scored against it.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fixtures.family import DESIGNS, LINES, design, null_design
from fixtures.family_build import build_member
from instruments.ablation import AblationSpec, ablation_hooks
from instruments.behavior import last_logits
from instruments.components import Head, all_heads
from instruments.metrics import compliance_prob, refusal_prob, refusal_score
from instruments.patching import PatchSpec, patch_components, patch_heads
from instruments.positions import post_instruction_length

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


def _refuses(member, prompts, components=()) -> torch.Tensor:
    hooks = ablation_hooks(member.handle, list(components), spec=AblationSpec(method="zero")) if components else []
    logits = last_logits(member.handle, prompts, batch_size=64, fwd_hooks=hooks)
    return refusal_prob(logits, member.tokens) > compliance_prob(logits, member.tokens)


def _spec(member) -> PatchSpec:
    return PatchSpec(kl=False, positions=post_instruction_length(member.handle))


def _args(member, split="train"):
    pairs = member.dataset.split(split)
    return (member.handle, [p.harmful for p in pairs], [p.harmless for p in pairs],
            partial(refusal_score, tokens=member.tokens))


def _share(member, components) -> float:
    """Share of the refusal-score gap restored by patching ``components`` together (denoising)."""
    res = patch_components(*_args(member), [tuple(components)], spec=_spec(member))
    return float(res.normalized[0])


@pytest.fixture(scope="module", params=[d.name for d in DESIGNS])
def member(request):
    return build_member(request.param, 0)


def test_every_truth_table_names_only_lines_the_study_decides():
    for d in DESIGNS:
        assert set(d.truth) == set(LINES), d.name


def test_every_line_has_a_design_where_it_is_true_and_one_where_it_is_false():
    for line in LINES:
        truths = {d.truth[line] for d in DESIGNS}
        assert {True, False} <= truths, f"{line}: {[(d.name, d.truth[line]) for d in DESIGNS]}"


def test_harmful_prompts_refuse_and_harmless_ones_comply(member):
    pairs = member.dataset.pairs
    assert bool(_refuses(member, [p.harmful for p in pairs]).all())
    assert not bool(_refuses(member, [p.harmless for p in pairs]).any())


def test_zeroing_the_planted_components_removes_refusal(member):
    d = design(member.name.rsplit("-s", 1)[0])
    harmful = [p.harmful for p in member.dataset.pairs]
    everything = d.heads + d.neurons + d.backups
    assert not bool(_refuses(member, harmful, everything).any())


@pytest.mark.parametrize("name", ["hydra", "hydra-leaning"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_hydra_backup_takes_over_when_the_circuit_is_ablated(name, seed):
    member, d = build_member(name, seed), design(name)
    harmful = [p.harmful for p in member.dataset.pairs]
    assert bool(_refuses(member, harmful, d.heads + d.neurons).all())  # the backup restores refusal
    assert not bool(_refuses(member, harmful, d.heads + d.neurons + d.backups).any())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_leaning_backup_ranks_below_every_other_head(seed):
    """hydra-leaning's ablation lines are false by construction only if no chosen set can hold its
    backup: AtP and exact patching (signed, as every ranking is) put it last of all heads."""
    member, d = build_member("hydra-leaning", seed), design("hydra-leaning")
    (backup,) = d.backups
    others = [h for h in all_heads(member.handle.n_layers, member.handle.n_heads) if h != backup]
    (atp,) = _atp(member, [backup], "trapezoid")
    assert atp < min(_atp(member, others, "trapezoid"))
    effect = _head_effects(member)
    assert float(effect[backup.layer, backup.head]) < min(float(effect[h.layer, h.head]) for h in others)


def test_no_28_heads_of_the_distributed_design_restore_80_percent():
    """H1 false by count: the 28 heads that feed every neuron (the earliest) are its best 28 heads,
    and 28 neurons hold 28/48 of the output."""
    member, d = build_member("distributed", 0), design("distributed")
    assert _share(member, d.heads[:28]) < 0.7
    assert _share(member, d.neurons[:28]) < 0.7


def test_the_graded_design_holds_no_80_percent_in_5_percent_of_its_parameters():
    member, d = build_member("graded", 0), design("graded")
    h = member.handle
    head_params = 4 * h.d_model * h.d_head
    total = h.n_layers * h.n_heads * head_params + h.n_layers * h.d_mlp * 3 * h.d_model
    k = int(0.05 * total // head_params)
    assert k == 4
    assert _share(member, d.heads[-k:]) < 0.4  # the four largest shares: (27 + ... + 30) / 465


def _head_effects(member) -> torch.Tensor:
    return patch_heads(*_args(member), spec=_spec(member)).normalized


@pytest.mark.parametrize("name", [d.name for d in DESIGNS if d.truth["C1/patching"] is not None])
def test_c1_truth_matches_the_count_of_heads_above_10_percent(name):
    member, d = build_member(name, 0), design(name)
    effect = _head_effects(member)
    above = int((effect > 0.1).sum())
    assert (above >= 10) == d.truth["C1/patching"], (name, above)


def _atp(member, heads, rule: str) -> list[float]:
    from hypotheses.evidence import atp_scan
    from hypotheses.validation import family_config

    scan = atp_scan(member.handle, member.dataset.split("train"), member.tokens, family_config(atp_rule=rule))
    return [float(scan.heads[h.layer, h.head]) for h in heads]


def test_threshold_design_hides_its_heads_from_base_atp_but_not_from_the_trapezoid():
    member, d = build_member("threshold", 0), design("threshold")
    assert max(abs(x) for x in _atp(member, d.heads, "base")) < 0.02
    assert min(_atp(member, d.heads, "trapezoid")) > 0.05
    effect = _head_effects(member)
    assert float(effect[d.heads[0].layer, d.heads[0].head]) > 0.1


def test_step_design_ranks_heads_against_patching():
    """S1 false by construction: each step head restores half of refusal and AtP (either rule) sees
    ~0 of it; each linear head restores 1/32 and AtP sees that."""
    member, d = build_member("step", 0), design("step")
    step, linear = d.paths[0].stages[0].heads, d.paths[1].stages[0].heads
    effect = _head_effects(member)
    assert min(float(effect[h.layer, h.head]) for h in step) > 0.3
    assert max(float(effect[h.layer, h.head]) for h in linear) < 0.06
    for rule in ("base", "trapezoid"):
        atp = _atp(member, step + linear, rule)
        assert max(abs(x) for x in atp[:16]) < min(atp[16:]), rule


def test_separate_categories_do_not_share_heads():
    member, d = build_member("separate", 0), design("separate")
    for path in d.paths:
        (own,) = path.categories
        others = [c for c in member.dataset.categories if c != own]
        harmful = [p.harmful for c in others for p in member.dataset.by_category(c)]
        assert bool(_refuses(member, harmful, path.stages[0].heads).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_a_null_refuses_most_harmful_prompts_and_few_harmless_ones(seed):
    member = build_member(null_design(seed), seed)
    pairs = member.dataset.pairs
    assert float(_refuses(member, [p.harmful for p in pairs]).float().mean()) > 0.8
    assert float(_refuses(member, [p.harmless for p in pairs]).float().mean()) < 0.1
    assert not member.planted_heads and not member.planted_neurons


def test_only_planted_heads_are_named_and_heads_exist(member):
    heads = set(all_heads(member.handle.n_layers, member.handle.n_heads))
    assert set(member.planted_heads) <= heads and all(isinstance(h, Head) for h in member.planted_heads)
