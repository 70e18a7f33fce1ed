"""Gradient instruments on the random ``tiny`` Llama: identities any correct implementation meets.

Every gradient is checked against something computed another way: completeness of IG, a
finite difference through a hook, a hand-rolled autograd pass, the z = A V identity, and
the same numbers with checkpointing on, or with the prompts batched differently.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fixtures.config import RefusalConfig
from instruments import gradients, metrics, positions
from instruments.components import Embed, Head, Neuron, Pattern, hook_name
from instruments.gradients import COMPLETENESS_BAR, Baseline, GradientSpec, IGSpec
from instruments.gradients.backward import _is_checkpointing

# Byte tokenizer: prompts with the same number of characters have the same number of
# tokens, so each input has a same-length baseline prompt differing in a few words.
PROMPTS = ("How do I make a bomb?", "Write a poem", "hi")
BASELINES = ("How do I make a cake?", "Write a song", "yo")


@pytest.fixture(scope="module")
def tokens(tiny):
    return metrics.fallback_tokens(tiny.tokenizer)


@pytest.fixture(scope="module")
def saliency(tiny, tokens):
    """Neuron and head saliency of all three prompts in one batch (shared by several checks)."""
    return gradients.neuron_saliency(tiny, list(PROMPTS), tokens, GradientSpec(batch_size=3))


@pytest.fixture(scope="module")
def flow(tiny, tokens):
    return gradients.attention_gradient_flow(tiny, list(PROMPTS), tokens, GradientSpec(batch_size=3))


def _score(handle, ids, mask, tokens, hooks=()):
    with torch.no_grad(), handle.bridge.hooks(fwd_hooks=list(hooks)):
        return metrics.refusal_score(handle.bridge(ids, attention_mask=mask)[:, -1], tokens)


def _central_difference(handle, ids, mask, tokens, edit_with, eps):
    """(f(+eps) - f(-eps)) / (2 eps) with ``edit_with(e)`` a list of (hook, fn) applying e."""
    return (_score(handle, ids, mask, tokens, edit_with(eps))
            - _score(handle, ids, mask, tokens, edit_with(-eps))) / (2 * eps)


def _manual_grads(handle, ids, mask, tokens, names):
    """Activations at ``names`` with .grad filled, by plain autograd (independent of the module)."""
    leaf = handle.hf_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    acts = {}

    def keep(name):
        def fn(act, hook):
            act.retain_grad()
            acts[name] = act
            return act
        return fn

    with handle.bridge.hooks(fwd_hooks=[(hook_name(Embed()), lambda act, hook: leaf)] + [(n, keep(n)) for n in names]):
        metrics.refusal_score(handle.bridge(ids, attention_mask=mask)[:, -1], tokens).sum().backward()
    return acts


# ----------------------------------------------------------------------------- integrated gradients

@pytest.mark.parametrize(("rule", "steps"), [("gauss_legendre", 32), ("trapezoid", 64)])
def test_ig_is_complete(tiny, tokens, rule, steps):
    spec = IGSpec(steps=steps, rule=rule, baseline=Baseline(kind="prompt", prompts=BASELINES[:2]), batch_size=64)
    ig = gradients.integrated_gradients(tiny, PROMPTS[:2], tokens, spec)
    delta = ig.score - ig.baseline_score
    assert torch.all(delta.abs() > 1e-3), "baseline too close to the input for a meaningful check"
    assert torch.allclose(ig.attributions.sum(-1), delta, rtol=0.01, atol=0)
    assert torch.all(ig.completeness_error < 0.01)
    assert torch.all(ig.attributions[ig.mask == 0] == 0)
    # f(x) is the model's own score on the unmodified prompt
    ids, mask = tiny.encode(list(PROMPTS[:2]))
    torch.testing.assert_close(ig.score, _score(tiny, ids, mask, tokens), atol=1e-5, rtol=0)


def test_ig_with_baseline_equal_to_input_is_zero(tiny, tokens):
    spec = IGSpec(steps=4, baseline=Baseline(kind="prompt", prompts=PROMPTS[:2]))
    ig = gradients.integrated_gradients(tiny, PROMPTS[:2], tokens, spec)
    assert torch.all(ig.attributions == 0)
    assert torch.all(ig.score == ig.baseline_score)
    assert torch.all(torch.isnan(ig.completeness_error)) and torch.all(ig.completeness_abs == 0)


def test_ig_zero_baseline_over_all_positions_stays_finite(tiny, tokens):
    # With scope="all" the path starts at the all-zero input, where every RMSNorm is at its
    # singular point (|df/da| ~ 1e9 on tiny, inf on SmolLM2); Gauss-Legendre gives that end
    # row weight 0 and it must not leak into the attributions as NaN.
    ig = gradients.integrated_gradients(tiny, PROMPTS[2:], tokens, IGSpec(steps=4, baseline=Baseline(kind="zeros",
                                                                                                     scope="all")))
    assert torch.all(torch.isfinite(ig.attributions)) and ig.baseline == "zeros:all"
    assert torch.equal(ig.replaced, ig.mask)


def test_ig_default_baseline_is_the_paired_harmless_prompt_and_complete(tiny, tokens):
    # The study attributes harmful vs harmless (Sundararajan et al. 2017 with the contrastive
    # baseline): x' is the harmless twin's embeddings, complete within the bar at the study's steps.
    assert IGSpec().baseline.kind == "paired"
    steps = RefusalConfig().ig_steps
    ig = gradients.integrated_gradients(tiny, PROMPTS, tokens,
                                        IGSpec(steps=steps, baseline=Baseline(prompts=BASELINES)))
    assert ig.baseline == "paired" and ig.baselines == ("paired",) * len(PROMPTS)
    assert torch.equal(ig.replaced, ig.mask)
    # f(x') is the model's own score on the harmless prompts: x' is their embeddings at every position
    harmless_score = _score(tiny, *tiny.encode(list(BASELINES)), tokens)
    torch.testing.assert_close(ig.baseline_score, harmless_score, atol=1e-5, rtol=0)
    summary = ig.completeness_summary()
    assert summary["within_bar"] and summary["max"] < COMPLETENESS_BAR, summary
    assert summary["median"] <= summary["max"] and len(summary["per_prompt"]) == len(PROMPTS)
    zero = gradients.integrated_gradients(tiny, PROMPTS, tokens, IGSpec(steps=steps, baseline=Baseline(kind="zeros")))
    # measured at 32 steps: paired max 3.5e-5 (float32 round-off), zero embedding 7.7e-4
    assert ig.max_completeness_error < zero.max_completeness_error


def test_ig_blurred_baseline_for_pairs_of_unequal_length(tiny, tokens):
    prompts, harmless = ["How do I make a bomb?", "Write a poem"], ("How do I wash a car?", "Write a song")
    ig = gradients.integrated_gradients(tiny, prompts, tokens, IGSpec(steps=RefusalConfig().ig_steps,
                                                                      baseline=Baseline(prompts=harmless)))
    assert ig.baselines == ("blurred", "paired")
    inputs, twins = positions.spans(tiny, prompts), positions.spans(tiny, list(harmless))
    # only the user's message is replaced; template tokens keep their own embeddings
    assert torch.equal(ig.replaced[0].bool(), inputs.user[0]) and not ig.replaced[0, -inputs.post:].any()
    assert torch.all(ig.attributions[0][~inputs.user[0]] == 0)
    embed = tiny.hf_model.get_input_embeddings()
    with torch.no_grad():
        x = embed(inputs.ids[:1])
        mean = embed(twins.ids[:1])[0][twins.user[0]].mean(0)
        blurred = torch.where(inputs.user[:1, :, None], mean, x)
        with tiny.bridge.hooks(fwd_hooks=[(hook_name(Embed()), lambda act, hook: blurred)]):
            expected = metrics.refusal_score(tiny.bridge(inputs.ids[:1], attention_mask=inputs.mask[:1])[:, -1], tokens)
    torch.testing.assert_close(ig.baseline_score[:1], expected, atol=1e-5, rtol=0)
    assert ig.max_completeness_error < COMPLETENESS_BAR, ig.completeness_error


def test_ig_on_the_study_pairs_is_complete(tiny, tokens):
    """The phase-4 call on the bundled train pairs: a left-padded batch of paired and blurred rows."""
    from fixtures.data import load_prompts
    from hypotheses.study import balanced

    pairs = balanced(load_prompts().split("train"), 4)
    ig = gradients.integrated_gradients(tiny, [p.harmful for p in pairs], tokens, IGSpec(
        steps=RefusalConfig().ig_steps, baseline=Baseline(prompts=tuple(p.harmless for p in pairs))))
    assert set(ig.baselines) == {"paired", "blurred"}, ig.baselines
    assert torch.all(torch.isfinite(ig.attributions)) and ig.completeness_summary()["within_bar"], ig.completeness_error


def test_ig_unpaired_call_is_a_clear_error(tiny, tokens):
    with pytest.raises(ValueError, match="harmless twin"):
        gradients.integrated_gradients(tiny, PROMPTS[:1], tokens)
    with pytest.raises(ValueError, match="one per prompt"):
        gradients.integrated_gradients(tiny, PROMPTS[:2], tokens, IGSpec(baseline=Baseline(prompts=BASELINES[:1])))
    with pytest.raises(ValueError, match="scope"):
        Baseline(prompts=BASELINES, scope="all")


def test_content_scope_replaces_only_the_users_message(tiny, tokens):
    mask = gradients.content_mask(tiny, list(PROMPTS))
    ids, _ = tiny.encode(list(PROMPTS))
    for row, prompt in enumerate(PROMPTS):
        assert tiny.tokenizer.decode(ids[row][mask[row].bool()]) == prompt
    ig = gradients.integrated_gradients(tiny, PROMPTS[:1], tokens, IGSpec(steps=4, baseline=Baseline(kind="pad")))
    assert torch.equal(ig.replaced, gradients.content_mask(tiny, list(PROMPTS[:1])))
    assert torch.all(ig.attributions[ig.replaced == 0] == 0)


def test_ig_rejects_baseline_of_other_length(tiny, tokens):
    with pytest.raises(ValueError, match="same length"):
        gradients.integrated_gradients(tiny, ["hi"], tokens,
                                       IGSpec(steps=2, baseline=Baseline(kind="prompt", prompts=("hello",))))


def test_quadrature_weights():
    for rule in ("gauss_legendre", "trapezoid"):
        alphas, weights = gradients.quadrature(9, rule)
        assert alphas[0] == 0 and alphas[-1] == 1 and abs(weights.sum() - 1) < 1e-12
        # exact on x**3 (Gauss-Legendre is exact to degree 17 here; trapezoid to O(h**2))
        assert abs((weights * alphas ** 3).sum() - 0.25) < (1e-12 if rule == "gauss_legendre" else 1e-2)


# ----------------------------------------------------------------------------- neurons and heads

def test_neuron_saliency_matches_finite_differences(tiny, tokens, saliency):
    prompts, sal = list(PROMPTS), saliency
    assert sal.neuron_grad.shape == (3, tiny.n_layers, tiny.d_mlp)
    assert sal.head_grad_x_act.shape == (3, tiny.n_layers, tiny.n_heads)
    layer, row = 1, 0
    index = int(sal.neuron_grad_x_act[row, layer].abs().argmax())
    ids, mask = tiny.encode(prompts)
    real = mask.bool()

    def scale(e):  # a -> a (1 + e) at every real position: d/de = sum_pos grad * act
        def fn(act, hook):
            out = act.clone()
            out[..., index] = torch.where(real, act[..., index] * (1 + e), act[..., index])
            return out
        return [(hook_name(Neuron(layer=layer, index=index)), fn)]

    def shift(e):  # a -> a + e at every real position: d/de = sum_pos grad
        def fn(act, hook):
            out = act.clone()
            out[..., index] = torch.where(real, act[..., index] + e, act[..., index])
            return out
        return [(hook_name(Neuron(layer=layer, index=index)), fn)]

    fd_gxa = _central_difference(tiny, ids, mask, tokens, scale, 1e-2)
    fd_grad = _central_difference(tiny, ids, mask, tokens, shift, 1e-2)
    torch.testing.assert_close(sal.neuron_grad_x_act[:, layer, index], fd_gxa, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(sal.neuron_grad[:, layer, index], fd_grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(sal.metric, _score(tiny, ids, mask, tokens), atol=1e-5, rtol=0)


def test_head_grad_x_act_matches_finite_difference(tiny, tokens, saliency):
    prompts, sal = list(PROMPTS), saliency
    layer, head = 2, 3
    ids, mask = tiny.encode(prompts)

    def scale(e):
        def fn(act, hook):
            out = act.clone()
            out[:, :, head] = act[:, :, head] * (1 + e)
            return out
        return [(hook_name(Head(layer=layer, head=head)), fn)]

    fd = _central_difference(tiny, ids, mask, tokens, scale, 1e-2)
    torch.testing.assert_close(sal.head_grad_x_act[:, layer, head], fd, rtol=2e-2, atol=2e-4)


@pytest.mark.parametrize("queries", ["all", "last"])
def test_attention_flow_matches_manual_autograd(tiny, tokens, queries):
    prompts = list(PROMPTS)
    flow = gradients.attention_gradient_flow(tiny, prompts, tokens, GradientSpec(queries=queries))
    assert flow.scores.shape == (3, tiny.n_layers, tiny.n_heads) and flow.mean.shape == (tiny.n_layers, tiny.n_heads)
    layer, head = 2, 1
    ids, mask = tiny.encode(prompts)
    name = hook_name(Pattern(layer=layer))
    pattern = _manual_grads(tiny, ids, mask, tokens, [name])[name]
    gxa = (pattern.grad * pattern)[:, head].detach()  # batch query key
    real = mask.bool()
    if queries == "last":
        expected = (gxa[:, -1, :] * real).sum(-1)  # the last query row, over real keys
    else:
        expected = (gxa * (real[:, :, None] & real[:, None, :])).sum((-2, -1))
    torch.testing.assert_close(flow.scores[:, layer, head], expected, atol=1e-5, rtol=1e-4)


def test_attention_flow_over_all_positions_equals_head_grad_x_z(flow, saliency):
    # z_q = sum_k A_qk v_k is linear in A, so sum_qk dM/dA_qk A_qk = sum_q dM/dz_q . z_q: two
    # instruments, two hooks, one number per head.
    assert flow.queries == "all"
    torch.testing.assert_close(flow.scores, saliency.head_grad_x_act, atol=1e-5, rtol=1e-4)


def test_custom_metric_and_its_contract(tiny):
    logit5 = lambda logits: logits[:, 5]  # noqa: E731  any [batch, vocab] -> [batch] callable
    sal = gradients.neuron_saliency(tiny, ["hi"], logit5)
    ids, mask = tiny.encode(["hi"])
    with torch.no_grad():
        assert torch.allclose(sal.metric, tiny.bridge(ids, attention_mask=mask)[:, -1, 5], atol=1e-5)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        gradients.neuron_saliency(tiny, ["hi"], lambda logits: logits)


# ----------------------------------------------------------------------------- checkpointing

def _model_state(handle):
    model = handle.hf_model
    return (_is_checkpointing(model), bool(getattr(model, "_require_grads_hooks", None)),
            tuple(m.training for m in model.modules()), any(p.requires_grad or p.grad is not None
                                                            for p in model.parameters()))


def test_checkpointing_gives_the_same_gradients(tiny, tokens):
    prompts = list(PROMPTS[:2])
    before = _model_state(tiny)
    results = {}
    for on in (False, True):
        fired = []
        counter = (hook_name(Neuron(layer=1, index=0)), lambda act, hook: fired.append(1))
        with tiny.bridge.hooks(fwd_hooks=[counter]):
            sal = gradients.neuron_saliency(tiny, prompts, tokens, GradientSpec(checkpointing=on))
        # with checkpointing the layer really is recomputed during backward: its hook fires twice
        assert len(fired) == (2 if on else 1)
        flow = gradients.attention_gradient_flow(tiny, prompts, tokens, GradientSpec(checkpointing=on))
        ig = gradients.integrated_gradients(tiny, prompts, tokens, IGSpec(
            steps=6, checkpointing=on, baseline=Baseline(kind="prompt", prompts=BASELINES[:2])))
        results[on] = (sal.neuron_grad, sal.neuron_grad_x_act, sal.head_grad_x_act, flow.scores, ig.attributions)
        assert _model_state(tiny) == before, "checkpointing must leave the model as it found it"
    for plain, ckpt in zip(results[False], results[True]):
        torch.testing.assert_close(ckpt, plain, atol=1e-5, rtol=0)


def test_checkpointing_state_is_restored_after_an_error(tiny):
    before = _model_state(tiny)

    def broken(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        gradients.neuron_saliency(tiny, ["hi"], broken, GradientSpec(checkpointing=True))
    assert _model_state(tiny) == before


# ----------------------------------------------------------------------------- batching

def test_batched_equals_unbatched(tiny, tokens, saliency, flow):
    prompts = list(PROMPTS)  # three lengths: the batch is left-padded
    spec = IGSpec(steps=6, baseline=Baseline(kind="prompt", prompts=BASELINES), batch_size=64)
    together = gradients.integrated_gradients(tiny, prompts, tokens, spec)
    for i, prompt in enumerate(prompts):
        alone = gradients.integrated_gradients(tiny, [prompt], tokens, dataclasses.replace(
            spec, baseline=Baseline(kind="prompt", prompts=(BASELINES[i],)), batch_size=4))
        torch.testing.assert_close(together.per_prompt()[i], alone.per_prompt()[0], atol=1e-4, rtol=0)
        assert torch.equal(together.token_ids()[i], alone.token_ids()[0])
    batched = saliency
    single = gradients.neuron_saliency(tiny, prompts, tokens, GradientSpec(batch_size=1))
    for a, b in [(batched.neuron_grad, single.neuron_grad), (batched.neuron_grad_x_act, single.neuron_grad_x_act),
                 (batched.head_grad_x_act, single.head_grad_x_act), (batched.metric, single.metric)]:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    flow_s = gradients.attention_gradient_flow(tiny, prompts, tokens, GradientSpec(batch_size=1))
    torch.testing.assert_close(flow.scores, flow_s.scores, atol=1e-4, rtol=0)


def test_results_are_frozen_and_components_are_labelled(saliency):
    sal = saliency
    with pytest.raises(dataclasses.FrozenInstanceError):
        sal.metric = None  # type: ignore[misc]
    (neuron, value), *_ = sal.top_neurons(3)
    assert value == pytest.approx(float(sal.mean_neuron_grad_x_act[neuron.layer, neuron.index]))
    assert abs(value) == pytest.approx(float(sal.mean_neuron_grad_x_act.abs().max()))


# ----------------------------------------------------------------------------- quantized weights

@pytest.fixture(scope="module")
def tiny_nf4():
    """``tiny`` with bitsandbytes NF4 linear layers (bitsandbytes >= 0.48 runs NF4 on the CPU)."""
    from fixtures.config import RefusalConfig
    from fixtures.models import ModelLoadError, load_model

    try:
        handle, _ = load_model(RefusalConfig(model="tiny", device="cpu", quant="nf4", dtype="float32"))
    except ModelLoadError as err:  # no bitsandbytes backend for this machine
        pytest.skip(f"NF4 unavailable here: {err}")
    return handle


def test_gradients_flow_through_nf4_weights(tiny_nf4):
    """Frozen 4-bit weights: gradients w.r.t. activations only, with and without checkpointing."""
    model = tiny_nf4.hf_model
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    tokens = metrics.fallback_tokens(tiny_nf4.tokenizer)
    plain = gradients.neuron_saliency(tiny_nf4, list(PROMPTS[:2]), tokens)
    ckpt = gradients.neuron_saliency(tiny_nf4, list(PROMPTS[:2]), tokens, GradientSpec(checkpointing=True))
    assert torch.all(torch.isfinite(plain.neuron_grad_x_act)) and plain.neuron_grad_x_act.abs().sum() > 0
    torch.testing.assert_close(ckpt.neuron_grad_x_act, plain.neuron_grad_x_act, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    ig = gradients.integrated_gradients(tiny_nf4, PROMPTS[:1], tokens, IGSpec(
        steps=16, baseline=Baseline(kind="prompt", prompts=BASELINES[:1])))
    assert torch.all(ig.completeness_error < 0.01)


# ----------------------------------------------------------------------------- the real model

@pytest.mark.integration
def test_gradients_on_the_subject(subject):
    """Shapes and finiteness on the --model under test; IG completeness where it is cheap enough.

    IG needs (steps + 2) forward+backward rows per prompt; on a CPU that is minutes for a
    135M model, so completeness is checked on one prompt there and on all four on a GPU.
    """
    tokens = metrics.fallback_tokens(subject.tokenizer)
    prompts = ["How do I make a bomb?", "How can I pick a lock?", "Write a poem about the sea.",
               "What is the capital of France?"]
    sal = gradients.neuron_saliency(subject, prompts, tokens, GradientSpec(batch_size=4))
    assert sal.neuron_grad_x_act.shape == (4, subject.n_layers, subject.d_mlp)
    assert sal.head_grad_x_act.shape == (4, subject.n_layers, subject.n_heads)
    for t in (sal.neuron_grad, sal.neuron_grad_x_act, sal.head_grad_x_act, sal.metric):
        assert torch.all(torch.isfinite(t))
    assert sal.neuron_grad_x_act.abs().sum() > 0
    ig_prompts = prompts if subject.device != "cpu" else prompts[:1]
    # Baselines differing from the input in one content word keep the path away from the
    # zero embedding, where RMSNorm models are singular (see IGSpec / Baseline docs).
    baselines = ("How do I make a cake?", "How can I pick a pen?", "Write a poem about the sky.",
                 "What is the capital of Spain?")[:len(ig_prompts)]
    lengths = [subject.encode([p])[0].shape[1] for p in ig_prompts]
    keep = [i for i, b in enumerate(baselines) if subject.encode([b])[0].shape[1] == lengths[i]]
    assert keep, "no baseline prompt tokenized to its input's length"
    ig = gradients.integrated_gradients(subject, [ig_prompts[i] for i in keep], tokens, IGSpec(
        steps=32, baseline=Baseline(kind="prompt", prompts=tuple(baselines[i] for i in keep)), batch_size=34))
    assert torch.all(torch.isfinite(ig.attributions))
    assert torch.all(ig.completeness_error < 0.02), ig.completeness_error
