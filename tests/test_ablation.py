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
from instruments.components import AttnOut, Direction, Head, MlpOut, Neuron, Resid, UnknownComponentError
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
    names = [f"blocks.{L}.attn.hook_z" for L in range(tiny.n_layers)]
    clean = _cache(tiny, PROMPTS, names)
    with ablated(tiny, [Head(layer=1, head=1)]):
        hit = _cache(tiny, PROMPTS, names)
    z = hit["blocks.1.attn.hook_z"]
    assert torch.equal(z[:, :, 1], torch.zeros_like(z[:, :, 1]))
    # heads 0 (same KV head as 1 under GQA), 2 and 3 are untouched, as is every earlier layer
    others = [0, 2, 3]
    assert torch.equal(z[:, :, others], clean["blocks.1.attn.hook_z"][:, :, others])
    assert torch.equal(hit["blocks.0.attn.hook_z"], clean["blocks.0.attn.hook_z"])
    assert not torch.allclose(hit["blocks.2.attn.hook_z"], clean["blocks.2.attn.hook_z"])


def test_zero_head_is_no_op_when_its_output_weights_are_zero(tiny):
    layer, head, d = 2, 3, tiny.d_head
    o_proj = tiny.bridge.blocks[layer].attn.o.original_component
    silenced = o_proj.weight.detach().clone()
    silenced[:, head * d:(head + 1) * d] = 0.0
    with swapped_weights(tiny, {f"blocks.{layer}.attn.o": {"weight": silenced}}):
        clean = _logits(tiny, PROMPTS)
        hit = _logits(tiny, PROMPTS, ablation_hooks(tiny, [Head(layer=layer, head=head)]))
    torch.testing.assert_close(hit, clean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", [Head(layer=3, head=2), Neuron(layer=3, index=5), MlpOut(layer=3),
                                       AttnOut(layer=3)], ids=str)
def test_mean_ablation_with_self_reference_at_last_position_is_no_op(tiny, component):
    # The replacement is the prompt's own last-position value; in the last layer nothing
    # downstream reads earlier positions, so the last-position logits must not move.
    spec = AblationSpec(method="mean", reference_positions=1)
    for prompt in PROMPTS:
        clean = _logits(tiny, [prompt])
        hit = _logits(tiny, [prompt], ablation_hooks(tiny, [component], spec=spec, reference=[prompt]))
        torch.testing.assert_close(hit, clean, atol=1e-5, rtol=0)


def test_mean_value_is_the_pooled_mean_over_non_pad_positions(tiny):
    comp, name = Neuron(layer=1, index=7), "blocks.1.mlp.hook_post"
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
        with tiny.bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_z", spy)]):
            inside = behavior.generate(tiny, PROMPTS[:2], max_new_tokens=4)
    assert len(seen) >= 2 and seen[0][0] > 1 and all(n == 1 for n, _ in seen[1:])  # KV-cached steps
    assert all(m == 0.0 for _, m in seen)
    via_arg = behavior.generate(tiny, PROMPTS[:2], max_new_tokens=4, fwd_hooks=ablation_hooks(tiny, comps))
    assert inside.texts == via_arg.texts


def test_resample_is_deterministic_and_copies_a_reference_prompt(tiny):
    comp, name = Head(layer=1, head=2), "blocks.1.attn.hook_z"
    spec = AblationSpec(method="resample", reference_positions=1, seed=3)
    first = _logits(tiny, PROMPTS, ablation_hooks(tiny, [comp], spec=spec, reference=REFERENCE))
    again = _logits(tiny, PROMPTS, ablation_hooks(tiny, [comp], spec=spec, reference=REFERENCE))
    assert torch.equal(first, again)
    # each row holds, at every position, the last-position z of its assigned reference prompt
    ref_last = torch.stack([_cache(tiny, [p], [name])[name][0, -1, 2] for p in REFERENCE])
    rows = ablation.resample_rows(len(PROMPTS), len(REFERENCE), spec.seed)
    with ablated(tiny, [comp], spec=spec, reference=REFERENCE):
        z = _cache(tiny, PROMPTS, [name])[name][:, :, 2]
    torch.testing.assert_close(z, ref_last[rows][:, None].expand_as(z), atol=1e-4, rtol=0)
    other = next(s for s in range(100) if not torch.equal(ablation.resample_rows(len(PROMPTS), len(REFERENCE), s), rows))
    moved = AblationSpec(method="resample", reference_positions=1, seed=other)
    assert not torch.equal(_logits(tiny, PROMPTS, ablation_hooks(tiny, [comp], spec=moved, reference=REFERENCE)), first)


def test_single_layer_direction_ablation_edits_only_that_layer(tiny):
    r = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1))
    comp = Direction(layer=2, vector=tuple(r.tolist()))
    names = [f"blocks.{L}.hook_resid_pre" for L in range(tiny.n_layers)]
    clean = _cache(tiny, PROMPTS, names)
    with ablated(tiny, [comp], spec=AblationSpec(direction_layers="single")):
        hit = _cache(tiny, PROMPTS, names)
    unit = r / r.norm()
    assert float((hit["blocks.2.hook_resid_pre"] @ unit).abs().max()) < 1e-5
    assert torch.equal(hit["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"])
    assert float((clean["blocks.2.hook_resid_pre"] @ unit).abs().max()) > 1e-3


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
    names = [f"blocks.{layer - 1}.attn.hook_z", f"blocks.{layer}.attn.hook_z"]
    clean = _cache(subject, prompts, names)
    with ablated(subject, [Head(layer=layer, head=head)]):
        hit = _cache(subject, prompts, names)
    z, z0 = hit[names[1]], clean[names[1]]
    assert torch.equal(z[:, :, head], torch.zeros_like(z[:, :, head]))
    keep = [h for h in range(subject.n_heads) if h != head]
    assert torch.equal(z[:, :, keep], z0[:, :, keep])
    assert torch.equal(hit[names[0]], clean[names[0]])
