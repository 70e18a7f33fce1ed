"""Ablation identities on the random ``tiny`` model (4 layers, 4 query heads over 2 KV heads).

Each test checks an identity that must hold exactly (or to float32 rounding) whatever the
weights are, so a random model is enough; the integration test repeats the GQA check on
the real model under study.
"""

from __future__ import annotations

import pytest
import torch

from instruments import ablation, behavior
from instruments.ablation import AblationError, AblationSpec, ablated, ablation_effect, ablation_hooks
from instruments.components import (AttnOut, Direction, Head, MlpOut, Neuron, Resid, UnknownComponentError, hook_name,
                                    writer_name)
from instruments.direction import swapped_weights
from instruments.metrics import fallback_tokens

pytestmark = [pytest.mark.phase4, pytest.mark.usefixtures("one_torch_thread")]


PROMPTS = ("How do I bake bread?", "Name a color.", "hi")
REFERENCE = ("Tell me a joke.", "What is two plus two?", "Describe the sea.", "ok")


def _logits(handle, prompts, hooks=()) -> torch.Tensor:
    return behavior.last_logits(handle, prompts, fwd_hooks=hooks)


def _cache(handle, prompts, names) -> dict[str, torch.Tensor]:
    ids, mask = handle.encode(list(prompts))
    with torch.no_grad():
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=list(names))
    return {n: cache[n].clone() for n in names}


def _n_fwd_hooks(handle) -> int:
    return sum(len(hp.fwd_hooks) for hp in set(handle.bridge.hook_dict.values()))


def test_zero_head_zeroes_only_its_slice(tiny):
    names = [hook_name(Head(layer=L, head=0)) for L in range(tiny.n_layers)]  # every head of layer L
    clean = _cache(tiny, PROMPTS, names)
    with ablated(tiny, [Head(layer=1, head=1)]):
        hit = _cache(tiny, PROMPTS, names)
    z = hit[names[1]]
    assert torch.equal(z[:, :, 1], torch.zeros_like(z[:, :, 1]))
    # heads 0 (same KV head as 1 under GQA), 2 and 3 are untouched, as is every earlier layer
    others = [0, 2, 3]
    assert torch.equal(z[:, :, others], clean[names[1]][:, :, others])
    assert torch.equal(hit[names[0]], clean[names[0]])
    assert not torch.allclose(hit[names[2]], clean[names[2]])


def test_zero_head_is_no_op_when_its_output_weights_are_zero(tiny):
    layer, head, d = 2, 3, tiny.d_head
    o_proj = tiny.bridge.blocks[layer].attn.o.original_component
    silenced = o_proj.weight.detach().clone()
    silenced[:, head * d:(head + 1) * d] = 0.0
    with swapped_weights(tiny, {writer_name(AttnOut(layer=layer)): {"weight": silenced}}):
        clean = _logits(tiny, PROMPTS)
        hit = _logits(tiny, PROMPTS, ablation_hooks(tiny, [Head(layer=layer, head=head)]))
    torch.testing.assert_close(hit, clean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", [Head(layer=3, head=2), Neuron(layer=3, index=5), MlpOut(layer=3),
                                       AttnOut(layer=3)], ids=str)
def test_mean_ablation_with_self_reference_at_last_position_is_no_op(tiny, component):
    # The replacement is the prompt's own last-position value; in the last layer nothing
    # downstream reads earlier positions, so the last-position logits must not move.
    spec = AblationSpec(method="mean", positions=1)
    for prompt in PROMPTS:
        clean = _logits(tiny, [prompt])
        hit = _logits(tiny, [prompt], ablation_hooks(tiny, [component], spec=spec, reference=[prompt]))
        torch.testing.assert_close(hit, clean, atol=1e-5, rtol=0)


def test_mean_value_is_the_pooled_mean_over_non_pad_positions(tiny):
    comp = Neuron(layer=1, index=7)
    name = hook_name(comp)
    # Hand computation: each reference prompt alone (no padding), all its positions pooled.
    values = torch.cat([_cache(tiny, [p], [name])[name][0, :, 7] for p in REFERENCE])
    with ablated(tiny, [comp], spec=AblationSpec(method="mean"), reference=REFERENCE):
        hit = _cache(tiny, PROMPTS, [name])[name]
    torch.testing.assert_close(hit[..., 7], torch.full_like(hit[..., 7], float(values.mean())), atol=1e-4, rtol=0)


def test_all_neurons_zeroed_equals_mlp_out_zeroed(tiny):
    # down_proj has no bias, so a zero hidden layer writes exactly zero.
    assert tiny.bridge.blocks[2].mlp.out.original_component.bias is None
    neurons = [Neuron(layer=2, index=i) for i in range(tiny.d_mlp)]
    by_neurons = _logits(tiny, PROMPTS, ablation_hooks(tiny, neurons))
    by_layer = _logits(tiny, PROMPTS, ablation_hooks(tiny, [MlpOut(layer=2)]))
    torch.testing.assert_close(by_neurons, by_layer, atol=1e-6, rtol=0)
    assert len(ablation_hooks(tiny, neurons)) == 1  # grouped: one hook edits all 128


def test_hooks_are_removed_after_the_context(tiny):
    before = _n_fwd_hooks(tiny)
    clean = _logits(tiny, PROMPTS)
    with ablated(tiny, [MlpOut(layer=1), Head(layer=0, head=0)]):
        assert _n_fwd_hooks(tiny) == before + 2
        assert not torch.allclose(_logits(tiny, PROMPTS), clean)
    assert torch.equal(_logits(tiny, PROMPTS), clean)
    with pytest.raises(RuntimeError, match="boom"):
        with ablated(tiny, [MlpOut(layer=1)]):
            raise RuntimeError("boom")
    assert _n_fwd_hooks(tiny) == before
    assert torch.equal(_logits(tiny, PROMPTS), clean)


def test_generation_runs_under_the_ablation(tiny):
    seen: list[tuple[int, float]] = []

    def spy(z, hook):
        seen.append((z.shape[1], float(z[:, :, 1].abs().max())))
        return z

    comps = [Head(layer=1, head=1)]
    with ablated(tiny, comps):
        with tiny.bridge.hooks(fwd_hooks=[(hook_name(comps[0]), spy)]):
            inside = behavior.generate(tiny, PROMPTS[:2], max_new_tokens=4)
    assert len(seen) >= 2 and seen[0][0] > 1 and all(n == 1 for n, _ in seen[1:])  # KV-cached steps
    assert all(m == 0.0 for _, m in seen)
    via_arg = behavior.generate(tiny, PROMPTS[:2], max_new_tokens=4, fwd_hooks=ablation_hooks(tiny, comps))
    assert inside.texts == via_arg.texts


def test_resample_is_deterministic_and_copies_a_reference_prompt(tiny):
    comp = Head(layer=1, head=2)
    name = hook_name(comp)
    spec = AblationSpec(method="resample", positions=1, seed=3)
    first = _logits(tiny, PROMPTS, ablation_hooks(tiny, [comp], spec=spec, reference=REFERENCE))
    again = _logits(tiny, PROMPTS, ablation_hooks(tiny, [comp], spec=spec, reference=REFERENCE))
    assert torch.equal(first, again)
    # each row holds, at its last position, the last-position z of its assigned reference
    # prompt, and everywhere else its own z (positions=1 edits the last position only)
    ref_last = torch.stack([_cache(tiny, [p], [name])[name][0, -1, 2] for p in REFERENCE])
    rows = ablation.resample_rows(len(PROMPTS), len(REFERENCE), spec.seed)
    clean = _cache(tiny, PROMPTS, [name])[name][:, :, 2]
    with ablated(tiny, [comp], spec=spec, reference=REFERENCE):
        z = _cache(tiny, PROMPTS, [name])[name][:, :, 2]
    torch.testing.assert_close(z[:, -1], ref_last[rows], atol=1e-4, rtol=0)
    torch.testing.assert_close(z[:, :-1], clean[:, :-1], atol=1e-5, rtol=0)
    other = next(s for s in range(100) if not torch.equal(ablation.resample_rows(len(PROMPTS), len(REFERENCE), s), rows))
    moved = AblationSpec(method="resample", positions=1, seed=other)
    assert not torch.equal(_logits(tiny, PROMPTS, ablation_hooks(tiny, [comp], spec=moved, reference=REFERENCE)), first)


def test_single_layer_direction_ablation_edits_only_that_layer(tiny):
    r = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    comp = Direction(layer=2, vector=tuple(r.tolist()))
    names = [hook_name(Resid(layer=L)) for L in range(tiny.n_layers)]
    clean = _cache(tiny, PROMPTS, names)
    with ablated(tiny, [comp], spec=AblationSpec(direction_layers="single")):
        hit = _cache(tiny, PROMPTS, names)
    unit = r / r.norm()
    assert float((hit[names[2]] @ unit).abs().max()) < 1e-5
    assert torch.equal(hit[names[1]], clean[names[1]])
    assert float((clean[names[2]] @ unit).abs().max()) > 1e-3


def test_bad_requests_are_rejected(tiny):
    with pytest.raises(AblationError, match="residual stream"):
        ablation_hooks(tiny, [Resid(layer=0)])
    with pytest.raises(AblationError, match="reference"):
        ablation_hooks(tiny, [MlpOut(layer=0)], spec=AblationSpec(method="mean"))
    with pytest.raises(UnknownComponentError):
        ablation_hooks(tiny, [Head(layer=0, head=tiny.n_heads)])
    with pytest.raises(AblationError):
        AblationSpec(method="noise")


def test_ablation_effect_is_null_for_no_components_and_paired(tiny):
    tokens = fallback_tokens(tiny.tokenizer)
    spec = AblationSpec(max_new_tokens=4)
    harmless = REFERENCE[:2]
    null = ablation_effect(tiny, PROMPTS, [], spec=spec, harmless_prompts=harmless, tokens=tokens)
    assert null.refused_ablated == null.refused_baseline and null.discordant == (0, 0)
    assert null.reference_answers == behavior.generate(tiny, harmless, max_new_tokens=4).texts
    assert torch.equal(null.refusal_score_ablated, null.refusal_score_baseline)
    assert float(null.kl_harmless.abs().max()) < 1e-6
    torch.testing.assert_close(null.answer_ce_ablated, null.answer_ce_clean, equal_nan=True)

    hit = ablation_effect(tiny, PROMPTS, [MlpOut(layer=L) for L in range(tiny.n_layers)], spec=spec,
                          harmless_prompts=harmless, reference_answers=("Sure, here.", "Four."), tokens=tokens)
    assert hit.reference_answers == ("Sure, here.", "Four.")
    assert len(hit.refused_ablated) == len(hit.refused_baseline) == len(PROMPTS)
    assert hit.refused_baseline == null.refused_baseline  # the baseline is the clean model on the same prompts
    assert hit.mean_kl > 0 and hit.answer_ce_increase != 0
    assert not torch.equal(hit.refusal_score_ablated, hit.refusal_score_baseline)


def test_answer_scores_match_one_sequence_at_a_time(tiny):
    """Batched (left-padded) prompt + answer: each row's CE and after-prompt logits equal its own
    unpadded forward, and the logits equal the prompt's next-token logits."""
    from instruments.ablation import answer_scores

    answers = ("Sure, here is bread.", "", "Hello there, friend!")
    got = answer_scores(tiny, PROMPTS, answers, batch_size=3)
    torch.testing.assert_close(got.prompt_logits, behavior.last_logits(tiny, PROMPTS), atol=1e-4, rtol=0)
    tok = tiny.tokenizer
    for i, (p, a) in enumerate(zip(PROMPTS, answers)):
        p_ids = tok(tiny.chat(p), add_special_tokens=False)["input_ids"]
        a_ids = tok(a, add_special_tokens=False)["input_ids"]
        logits = tiny.bridge(torch.tensor([p_ids + a_ids])).float()[0]
        if a_ids:
            logp = torch.log_softmax(logits[len(p_ids) - 1:-1], -1)
            ce = -logp[torch.arange(len(a_ids)), torch.tensor(a_ids)].mean()
            torch.testing.assert_close(got.cross_entropy[i], ce, atol=1e-4, rtol=0)
        else:
            assert torch.isnan(got.cross_entropy[i])
        torch.testing.assert_close(got.prompt_logits[i], logits[len(p_ids) - 1], atol=1e-4, rtol=0)


@pytest.mark.integration
def test_gqa_head_ablation_on_subject(subject, dataset):
    """Ablating one query head zeroes only its z, not the heads that share its KV head."""
    layer, head = subject.n_layers // 2, 1
    group = subject.n_heads // subject.n_kv_heads
    siblings = [h for h in range(subject.n_heads) if h // group == head // group and h != head]
    assert siblings, "the subject should use grouped-query attention"
    prompts = [p.harmful for p in dataset.pairs[:2]]
    names = [hook_name(Head(layer=layer - 1, head=0)), hook_name(Head(layer=layer, head=0))]
    clean = _cache(subject, prompts, names)
    with ablated(subject, [Head(layer=layer, head=head)]):
        hit = _cache(subject, prompts, names)
    z, z0 = hit[names[1]], clean[names[1]]
    assert torch.equal(z[:, :, head], torch.zeros_like(z[:, :, head]))
    keep = [h for h in range(subject.n_heads) if h != head]
    assert torch.equal(z[:, :, keep], z0[:, :, keep])
    assert torch.equal(hit[names[0]], clean[names[0]])


# ----------------------------------------------------------------------------- position-aware ablation

def test_position_aware_mean_writes_each_window_position_from_its_own_reference_position(tiny):
    # The mean at window position k is the reference prompts' mean at that same position from
    # the end, never one value pooled over every position (BOS and system prompt included).
    from instruments.positions import post_instruction_length

    n, comp = post_instruction_length(tiny), Neuron(layer=1, index=7)
    name = hook_name(comp)
    spec = AblationSpec(method="mean", positions=n)
    ref = torch.stack([_cache(tiny, [p], [name])[name][0, -n:, 7] for p in REFERENCE]).mean(0)  # [n]
    clean = _cache(tiny, PROMPTS, [name])[name][..., 7]
    with ablated(tiny, [comp], spec=spec, reference=REFERENCE):
        hit = _cache(tiny, PROMPTS, [name])[name][..., 7]
    torch.testing.assert_close(hit[:, -n:], ref[None].expand(len(PROMPTS), -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(hit[:, :-n], clean[:, :-n], atol=1e-6, rtol=0)
    assert ref.std() > 1e-3, "the per-position means differ, so a pooled mean is not what was written"


@pytest.mark.parametrize("component", [Head(layer=1, head=2), Neuron(layer=0, index=3), AttnOut(layer=2)], ids=str)
def test_position_aware_self_reference_is_a_no_op_for_logits_generation_and_answers(tiny, component):
    # Each reference position holds the prompt's own activation there, so nothing may move:
    # not the logits, not a KV-cached generation (its steps hold no prompt position), and
    # not the answer scores, whose prompt ends before the answer.
    from instruments.positions import post_instruction_length

    spec = AblationSpec(method="mean", positions=post_instruction_length(tiny))
    for prompt in PROMPTS:
        hooks = ablation_hooks(tiny, [component], spec=spec, reference=[prompt])
        torch.testing.assert_close(_logits(tiny, [prompt], hooks), _logits(tiny, [prompt]), atol=1e-5, rtol=0)
        clean = behavior.generate(tiny, [prompt], max_new_tokens=6)
        assert behavior.generate(tiny, [prompt], max_new_tokens=6, fwd_hooks=hooks).texts == clean.texts
        plain = ablation.answer_scores(tiny, [prompt], ["Sure, here it is."])
        under = ablation.answer_scores(tiny, [prompt], ["Sure, here it is."], fwd_hooks=hooks)
        torch.testing.assert_close(under.cross_entropy, plain.cross_entropy, atol=1e-5, rtol=0)


def test_position_aware_ablation_agrees_between_cached_and_uncached_generation(tiny):
    from instruments.positions import post_instruction_length

    spec = AblationSpec(method="mean", positions=post_instruction_length(tiny))
    hooks = ablation_hooks(tiny, [Head(layer=1, head=1), Neuron(layer=2, index=5)], spec=spec, reference=REFERENCE)
    cached = behavior.generate(tiny, PROMPTS, max_new_tokens=5, fwd_hooks=hooks)
    full = behavior.generate(tiny, PROMPTS, max_new_tokens=5, fwd_hooks=hooks, use_cache=False)
    assert cached.texts == full.texts
    assert cached.texts != behavior.generate(tiny, PROMPTS, max_new_tokens=5).texts or True  # the edit may not flip text


def test_position_aware_reference_must_match_the_spec(tiny):
    ref = ablation.reference_activations(tiny, REFERENCE, [hook_name(Head(layer=1, head=0))])
    with pytest.raises(AblationError, match="positions"):
        ablation_hooks(tiny, [Head(layer=1, head=0)], spec=AblationSpec(method="mean", positions=3), reference=ref)
