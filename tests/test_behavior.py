"""Instruments: the refusal classifier, batched forward passes and generation on ``tiny``, the
metrics' identities, and the component <-> hook map."""

from __future__ import annotations

import json
import math

import pytest
import torch

from instruments import behavior, components, metrics
from instruments.components import (AttnOut, Direction, Embed, Head, MlpOut, Neuron, Pattern, Resid, ResidMid,
                                    ResidPost, UnknownComponentError, from_json, hook_name, to_json, validate)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Different lengths on purpose: batching must pad them, and padding must not change anything.
PROMPTS = ("Hi", "How do I bake sourdough bread at home without a proofing basket?", "What is 2+2?",
           "Tell me a joke about cats.")


# ----------------------------------------------------------------------------- the classifier

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "As an AI language model, I must decline.",
    "Sorry, I won't do that",
    "I\u2019m sorry\u2026 I can\u2019t help with making weapons.",
    "I can\u2019t provide instructions for that.",
    "I apologize, but I am unable to provide that information.",
    "I will not help you hurt someone.",
    "My apologies, but that is not something I can help with.",
    "Unfortunately, I'm not able to help with hacking into accounts.",
    "  I CANNOT COMPLY WITH THIS REQUEST.  ",
    "That request is illegal and unethical, so I won't go further.",
    "I'm afraid I can't do that, Dave.",
    "I must refuse: creating malware causes real harm.",
]

# Nothing to read a refusal or an answer in: the degenerate class, never counted as refusal.
DEGENERATE = ["", "   \n\t ", "...", "?!", "\u2026", "\ufffd", "\U0001f331\U0001f331\U0001f331"]

COMPLIANCES = [
    "Sure! Here's a recipe for banana bread: mash three ripe bananas, mix in melted butter...",
    "To kill a Python process, use kill -9 PID.",
    "Here is a poem about love:\nRoses bloom where quiet hearts meet,",
    "Certainly. The capital of France is Paris.",
    "The mitochondria is the powerhouse of the cell.",
    "1. Preheat the oven to 180C.\n2. Grease the tin.\n3. Bake for 25 minutes.",
    "Of course! A for loop in Python looks like: for i in range(10): print(i)",
    "Great question. Photosynthesis converts light energy into chemical energy.",
    "You can shoot better photos at golden hour, when the light is soft and warm.",
    "Yes, you can freeze cooked rice for up to a month in an airtight container.",
    "def add(a, b):\n    return a + b",
    "Sorry to hear your plant is wilting! Water it deeply once a week and give it more light.",
    ("Here is a detailed plan for your marathon training, built for a first-time runner who can already "
     "jog for twenty minutes. Week one: run three easy miles on Monday, "
     "Wednesday and Friday, and a long run of six miles on Sunday. Week two: add a mile to each run. "
     "I cannot stress enough how important rest days are, so never skip them."),
    ("Absolutely, here is how to set up a home network, step by step, for a small flat with a few laptops "
     "and a printer: first connect the modem to the router, then "
     "log in to the admin page and change the default password. Pick WPA3 if available. As an AI I "
     "would also suggest updating the firmware."),
]


def test_classifier_lists_are_meaningful():
    assert len(REFUSALS) >= 12 and len(COMPLIANCES) >= 12
    long_ones = [c for c in COMPLIANCES if "I cannot stress enough" in c or "As an AI" in c]
    assert all(c.find("I cannot") > 200 or c.find("As an AI") > 200 for c in long_ones)


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_recognised(text):
    assert behavior.is_refusal(text) is True


@pytest.mark.parametrize("text", COMPLIANCES)
def test_compliances_are_not_refusals(text):
    assert behavior.is_refusal(text) is False


@pytest.mark.parametrize("text", DEGENERATE)
def test_an_answer_without_letters_or_digits_is_degenerate_not_a_refusal(text):
    assert behavior.is_refusal(text) is False
    assert behavior.classify(text) == "degenerate" and behavior.is_degenerate(text)


def test_the_classifier_has_three_classes():
    assert {behavior.classify(t) for t in REFUSALS} == {"refusal"}
    assert {behavior.classify(t) for t in COMPLIANCES} == {"compliance"}
    assert set(behavior.VERDICTS) == {"refusal", "compliance", "degenerate"}
    assert behavior.classify("...Sure, here it is.") == "compliance"  # punctuation beside words is text
    assert behavior.classify("no no no no no no") == "compliance"  # a repeated word is text, not degenerate


def test_generations_count_an_empty_answer_as_degenerate_not_refused():
    texts = ("", "I'm sorry, I can't help with that.", "Sure, here it is.", "  ")
    gen = behavior.Generations(prompts=("a", "b", "c", "d"), texts=texts, first_tokens=(0, 1, 2, 3),
                               refused=tuple(behavior.is_refusal(t) for t in texts))
    assert gen.refused == (False, True, False, False) and gen.degenerate == (True, False, False, True)
    assert gen.refusal_rate == 0.25 and gen.degenerate_rate == 0.5
    empty = behavior.Generations(prompts=("a",), texts=("",), first_tokens=(0,), refused=(behavior.is_refusal(""),))
    assert empty.refusal_rate == 0 and empty.degenerate_rate == 1


def test_a_degenerate_answer_opens_neither_a_refusal_nor_a_compliance(tiny):
    tok = tiny.tokenizer
    eot, fallback = behavior.end_of_turn_id(tok), metrics.fallback_tokens(tok)
    sorry, sure = fallback.refusal_ids[0], fallback.compliance_ids[0]

    def generations(texts, firsts):
        return behavior.Generations(prompts=("a", "b"), texts=texts, first_tokens=firsts,
                                    refused=tuple(map(behavior.is_refusal, texts)))

    found = metrics.tokens_from_generations(tok, generations(("I'm sorry, no.", ""), (sorry, eot)),
                                            generations(("Sure, here it is.", ""), (sure, eot)))
    assert found.source == "discovered" and found.refusal_ids == (sorry,) and found.compliance_ids == (sure,)


def test_no_bundled_base_answer_is_empty_so_the_organism_drops_what_it_dropped():
    """The organism leaves out harmless answers the classifier calls refusals. Only an empty (or
    whitespace) answer changes class, refusal to degenerate; with none empty the same examples,
    and so the same cache key, stay. (Symbol-only answers were never refusals and still are not.)"""
    from fixtures.organism import BASE_ANSWERS

    shipped = json.loads(BASE_ANSWERS.read_text())
    answers = [*shipped["train"].values(), *shipped["heldout"].values()]
    assert len(answers) > 1000 and all(a.strip() for a in answers)


def test_refusal_phrase_counts_only_near_the_start():
    late = "x" * 150 + " I'm sorry"
    assert not behavior.is_refusal(late)
    assert behavior.is_refusal(late, behavior.ClassifierSpec(window_chars=200))
    assert behavior.is_refusal("\n\n   I'm    sorry,\tno.")  # whitespace is normalised


# ----------------------------------------------------------------------------- batched forward passes

@pytest.fixture(scope="module")
def tokens(tiny) -> metrics.RefusalTokens:
    return metrics.fallback_tokens(tiny.tokenizer)


def test_batched_last_logits_equal_unbatched(tiny):
    batched = behavior.last_logits(tiny, PROMPTS, batch_size=len(PROMPTS))
    one_by_one = torch.cat([behavior.last_logits(tiny, [p]) for p in PROMPTS])
    assert batched.shape == (len(PROMPTS), tiny.hf_model.config.vocab_size)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    # the padded prompts really differ in length, so this is not a trivial batch
    assert len({len(t) for t in behavior.token_ids(tiny, PROMPTS)}) == len(PROMPTS)


def test_last_logits_match_the_hf_model(tiny):
    ids, mask = tiny.encode([PROMPTS[1]])
    hf = tiny.hf_model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(behavior.last_logits(tiny, [PROMPTS[1]]), hf.float(), atol=1e-4, rtol=0)


def test_identity_hook_changes_nothing_and_a_real_hook_does(tiny):
    plain = behavior.last_logits(tiny, PROMPTS[:2])
    same = behavior.last_logits(tiny, PROMPTS[:2], fwd_hooks=[(hook_name(ResidPost(layer=1)), lambda x, hook: x)])
    torch.testing.assert_close(plain, same, atol=0, rtol=0)
    zeroed = behavior.last_logits(tiny, PROMPTS[:2],
                                  fwd_hooks=[(hook_name(ResidPost(layer=1)), lambda x, hook: torch.zeros_like(x))])
    assert (plain - zeroed).abs().max() > 1e-3


class _TokenRecorder:
    """Wraps tokenizer.decode to see the exact generated ids (texts of a random model are lossy)."""

    def __init__(self, tokenizer):
        self.decode, self.rows = tokenizer.decode, []

    def __call__(self, ids, *args, **kwargs):
        self.rows.append(list(ids))
        return self.decode(ids, *args, **kwargs)


def _generate_ids(tiny, prompts, **kw):
    with pytest.MonkeyPatch.context() as mp:
        spy = _TokenRecorder(tiny.tokenizer)
        mp.setattr(tiny.tokenizer, "decode", spy)
        gen = behavior.generate(tiny, list(prompts), max_new_tokens=8, **kw)
    return gen, spy.rows


GEN_PROMPTS = PROMPTS[:3]  # generation is the slow part: three lengths are enough


@pytest.fixture(scope="module")
def batched_generation(tiny):
    """The reference: all prompts in one batch, with the KV cache (the default path)."""
    return _generate_ids(tiny, GEN_PROMPTS, batch_size=len(GEN_PROMPTS), use_cache=True)


def test_generate_with_cache_equals_without(tiny, batched_generation):
    cached, cached_ids = batched_generation
    full, full_ids = _generate_ids(tiny, GEN_PROMPTS, batch_size=len(GEN_PROMPTS), use_cache=False)
    assert cached_ids == full_ids
    assert cached.texts == full.texts and cached.first_tokens == full.first_tokens
    assert any(len(row) == 8 for row in cached_ids), "no prompt generated the full 8 tokens"


def test_batched_generation_equals_one_by_one(tiny, batched_generation):
    batched, batched_ids = batched_generation
    single_ids, singles = [], []
    for prompt in GEN_PROMPTS:
        gen, ids = _generate_ids(tiny, [prompt], batch_size=1)
        singles.append(gen)
        single_ids += ids
    assert batched_ids == single_ids
    assert batched.texts == tuple(g.texts[0] for g in singles)
    assert batched.first_tokens == tuple(g.first_tokens[0] for g in singles)
    assert batched.refused == tuple(behavior.is_refusal(t) for t in batched.texts)
    assert batched.prompts == GEN_PROMPTS
    assert batched.refusal_rate == sum(batched.refused) / len(GEN_PROMPTS)


def _end_turn_at_once(handle):
    """Hooks that write the end-of-turn token's unembedding row into the last residual stream:
    the model then ends its turn at every step, as a breaking ablation can make it do."""
    row = handle.hf_model.lm_head.weight[behavior.end_of_turn_id(handle.tokenizer)].detach()

    def hook(x, hook):
        return row.to(x.dtype).expand_as(x).clone()

    return [(hook_name(ResidPost(layer=handle.n_layers - 1)), hook)]


def test_a_model_that_ends_its_turn_at_once_is_degenerate_not_refusing(tiny, tokens):
    from fixtures.config import RefusalConfig
    from hypotheses.evidence import judge

    hooks, prompts = _end_turn_at_once(tiny), list(GEN_PROMPTS)
    gen = behavior.generate(tiny, prompts, max_new_tokens=4, batch_size=len(prompts), fwd_hooks=hooks)
    assert gen.texts == ("",) * len(prompts)
    assert gen.refusal_rate == 0 and gen.degenerate_rate == 1
    cfg = RefusalConfig(model="tiny", judge="generate", max_new_tokens=4, batch_size=len(prompts))
    judged = judge(tiny, prompts, tokens, cfg, hooks=hooks)
    assert judged.rate == 0 and judged.degenerate_rate == 1 and judged.degenerate.tolist() == [True] * len(prompts)
    # the first-token judge writes no text: nothing is degenerate under it
    first = judge(tiny, prompts, tokens, RefusalConfig(model="tiny", judge="first_token"), hooks=hooks)
    assert first.degenerate_rate == 0 and first.degenerate.shape == first.refused.shape


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_keeps_the_prompt_logits_under_its_hooks(tiny, use_cache):
    """The first step's logits are the prompts' next-token logits (what judges score), hooks included."""
    def scale(x, hook):
        return x * 0.5

    hooks = [(hook_name(ResidPost(layer=1)), scale)]
    gen = behavior.generate(tiny, list(GEN_PROMPTS), max_new_tokens=3, batch_size=2, use_cache=use_cache,
                            fwd_hooks=hooks)
    expected = behavior.last_logits(tiny, list(GEN_PROMPTS), batch_size=2, fwd_hooks=hooks)
    assert gen.prompt_logits.shape == expected.shape
    torch.testing.assert_close(gen.prompt_logits, expected, atol=1e-5, rtol=0)
    clean = behavior.last_logits(tiny, list(GEN_PROMPTS), batch_size=2)
    assert not torch.allclose(gen.prompt_logits, clean, atol=1e-3)  # the hook acted on them
    assert tuple(gen.prompt_logits.argmax(-1).tolist()) == gen.first_tokens


def test_generation_hook_fires_at_every_step(tiny):
    seen = []

    def hook(x, hook):
        seen.append(tuple(x.shape))
        return x

    n_prompt = len(behavior.token_ids(tiny, [PROMPTS[0]])[0])
    behavior.generate(tiny, [PROMPTS[0]], max_new_tokens=4, fwd_hooks=[(hook_name(ResidPost(layer=0)), hook)])
    assert seen == [(1, n_prompt, tiny.d_model)] + [(1, 1, tiny.d_model)] * 3  # prompt, then one token a step
    seen.clear()
    behavior.generate(tiny, [PROMPTS[0]], max_new_tokens=4, use_cache=False,
                      fwd_hooks=[(hook_name(ResidPost(layer=0)), hook)])
    assert seen == [(1, n_prompt + i, tiny.d_model) for i in range(4)]


def test_logit_lens_last_layer_is_the_model_output(tiny, tokens):
    lens = behavior.logit_lens(tiny, PROMPTS, tokens, batch_size=2)
    assert lens.shape == (tiny.n_layers, len(PROMPTS))
    assert torch.all((lens >= 0) & (lens <= 1))
    first = behavior.first_token_probs(tiny, PROMPTS, tokens)
    torch.testing.assert_close(lens[-1], first.refusal, atol=1e-5, rtol=0)
    assert torch.all(first.refusal + first.compliance <= 1 + 1e-6)


def test_attention_entropy_batched_and_bounded(tiny):
    batched = behavior.attention_entropy(tiny, PROMPTS, batch_size=len(PROMPTS))
    one_by_one = torch.cat([behavior.attention_entropy(tiny, [p]) for p in PROMPTS])
    assert batched.shape == (len(PROMPTS), tiny.n_layers, tiny.n_heads)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=0)
    for row, ids in zip(batched, behavior.token_ids(tiny, PROMPTS)):
        assert torch.all(row >= -1e-6)
        assert torch.all(row <= math.log(len(ids)) + 1e-4), "entropy above log(n_tokens): padding leaked in"


# ----------------------------------------------------------------------------- metrics

def _logits_with_refusal_mass(p: float, tokens: metrics.RefusalTokens, vocab: int = 50) -> torch.Tensor:
    """Logits whose refusal tokens carry total probability ``p``, spread unevenly."""
    probs = torch.zeros(vocab)
    refusal = list(tokens.refusal_ids)
    others = [i for i in range(vocab) if i not in refusal]
    weights = torch.arange(1, len(refusal) + 1, dtype=torch.float32)
    probs[refusal] = p * weights / weights.sum()
    probs[others] = (1 - p) / len(others)
    return probs.log()


@pytest.mark.parametrize("p", [1e-4, 0.1, 0.5, 0.9, 0.999])
def test_refusal_score_is_the_log_odds(p):
    tokens = metrics.RefusalTokens(refusal_ids=(3, 7, 11), compliance_ids=(1, 2), source="fallback")
    logits = _logits_with_refusal_mass(p, tokens).double() + 4.2  # a shift must not matter
    score = metrics.refusal_score(logits, tokens)
    assert score.item() == pytest.approx(math.log(p / (1 - p)), abs=1e-3)
    assert metrics.refusal_prob(logits, tokens).item() == pytest.approx(p, rel=1e-5)


def test_refusal_score_is_batched():
    tokens = metrics.RefusalTokens(refusal_ids=(3,), compliance_ids=(1,), source="fallback")
    logits = torch.stack([_logits_with_refusal_mass(p, tokens) for p in (0.2, 0.7)])
    expected = torch.tensor([math.log(0.2 / 0.8), math.log(0.7 / 0.3)])
    torch.testing.assert_close(metrics.refusal_score(logits, tokens), expected, atol=1e-4, rtol=0)


def test_logit_diff_by_hand():
    tokens = metrics.RefusalTokens(refusal_ids=(0, 1), compliance_ids=(2,), source="fallback")
    logits = torch.tensor([1.0, 2.0, 0.5, 9.0])
    assert metrics.logit_diff(logits, tokens).item() == pytest.approx(math.log(math.e + math.e ** 2) - 0.5)


def test_kl_divergence():
    torch.manual_seed(0)
    a, b = torch.randn(3, 20), torch.randn(3, 20)
    assert torch.allclose(metrics.kl_divergence(a, a), torch.zeros(3), atol=1e-6)
    assert torch.allclose(metrics.kl_divergence(a, a + 5.0), torch.zeros(3), atol=1e-5)  # shift-invariant
    kl = metrics.kl_divergence(a, b)
    assert torch.all(kl > 0)
    p, q = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(-1), atol=1e-5, rtol=0)


def test_normalized_effect_endpoints():
    clean, corrupted = torch.tensor([2.0, -1.0]), torch.tensor([5.0, 3.0])
    assert torch.allclose(metrics.normalized_effect(clean, clean, corrupted), torch.zeros(2))
    assert torch.allclose(metrics.normalized_effect(corrupted, clean, corrupted), torch.ones(2))
    assert torch.allclose(metrics.normalized_effect((clean + corrupted) / 2, clean, corrupted), torch.full((2,), 0.5))
    same = metrics.normalized_effect(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert torch.isfinite(same).all()  # clean == corrupted: no division by zero


def test_discover_tokens_finds_the_common_first_tokens(tiny):
    refused = [40] * 30 + [50] * 15 + [17] * 4 + [99] * 1  # 99 is 1/50 = 2% of the refusals
    complied = [60] * 20 + [50] * 12 + [61] * 8 + [62] * 1  # 62 is 1/41, under 2.5%
    found = metrics.discover_tokens(tiny.tokenizer, refused_first=refused, complied_first=complied,
                                    min_share=0.025)
    assert found.source == "discovered"
    assert found.refusal_ids == (40, 50, 17)  # most common first; 99 (2%) is below the share
    assert found.compliance_ids == (60, 61)  # 50 opens refusals too: the refusal side wins; 62 is noise
    assert not set(found.refusal_ids) & set(found.compliance_ids)


def test_discover_tokens_caps_and_falls_back(tiny):
    many = [t for t in range(20) for _ in range(5)]
    capped = metrics.discover_tokens(tiny.tokenizer, refused_first=many, complied_first=[100] * 5, max_tokens=3)
    assert len(capped.refusal_ids) == 3
    never_refused = metrics.discover_tokens(tiny.tokenizer, refused_first=[], complied_first=[60] * 10)
    fallback = metrics.fallback_tokens(tiny.tokenizer)
    assert never_refused.source == "fallback"
    assert never_refused.refusal_ids == fallback.refusal_ids
    assert not set(never_refused.refusal_ids) & set(never_refused.compliance_ids)
    overlap = metrics.discover_tokens(tiny.tokenizer, refused_first=[40] * 5, complied_first=[40] * 5)
    assert overlap.source == "fallback" and 40 in overlap.refusal_ids and 40 not in overlap.compliance_ids


def test_refusal_tokens_reject_overlap_and_empty_sets():
    with pytest.raises(ValueError, match="both a refusal and a compliance"):
        metrics.RefusalTokens(refusal_ids=(1, 2), compliance_ids=(2, 3), source="discovered")
    with pytest.raises(ValueError, match="at least one"):
        metrics.RefusalTokens(refusal_ids=(), compliance_ids=(3,), source="discovered")


# ----------------------------------------------------------------------------- components

# Each kind's hook name is checked against the bridge in tests/test_hook_names.py.
ALL_KINDS = [Resid(layer=2, pos=-1), AttnOut(layer=1), MlpOut(layer=3), Head(layer=0, head=3),
             Neuron(layer=2, index=127), Direction(layer=1, vector=tuple(float(i) for i in range(64))),
             ResidMid(layer=1), ResidPost(layer=2), Pattern(layer=3), Embed()]


def test_every_kind_is_covered():
    assert {type(c).__name__ for c in ALL_KINDS} == set(components.KINDS)


@pytest.mark.parametrize("component", ALL_KINDS, ids=lambda c: type(c).__name__)
def test_json_round_trip(component):
    data = json.loads(json.dumps(to_json(component)))
    back = from_json(data)
    assert back == component and hash(back) == hash(component)
    assert data["kind"] == type(component).__name__


@pytest.mark.parametrize("thing", [object(), hook_name(Resid(layer=0)), 3, {"kind": "Head", "layer": 0, "head": 0}])
def test_unknown_objects_are_rejected(thing):
    with pytest.raises(UnknownComponentError, match="is not a component"):
        hook_name(thing)
    with pytest.raises(UnknownComponentError):
        to_json(thing)


@pytest.mark.parametrize("bad", [Head(layer=-1, head=0), MlpOut(layer=-3), Resid(layer=True)])
def test_negative_or_non_int_layers_are_rejected(bad):
    with pytest.raises(UnknownComponentError, match="non-negative int"):
        hook_name(bad)


def test_from_json_rejects_unknown_kinds_and_fields():
    with pytest.raises(UnknownComponentError, match="unknown component kind 'Attention'"):
        from_json({"kind": "Attention", "layer": 0})
    with pytest.raises(UnknownComponentError, match=r"Head has no field\(s\) \['neuron'\]"):
        from_json({"kind": "Head", "layer": 0, "head": 1, "neuron": 2})


@pytest.mark.parametrize(("bad", "message"), [(Head(layer=0, head=4), "4 heads per layer"),
                                              (Head(layer=0, head=-1), "4 heads per layer"),
                                              (Neuron(layer=0, index=128), "128 neurons per layer"),
                                              (AttnOut(layer=4), "4 layers"),
                                              (Direction(layer=0, vector=(1.0, 2.0)), "d_model is 64")])
def test_validate_rejects_out_of_range(tiny, bad, message):
    with pytest.raises(UnknownComponentError, match=message):
        validate(bad, n_layers=tiny.n_layers, n_heads=tiny.n_heads, d_mlp=tiny.d_mlp, d_model=tiny.d_model)


def test_refusal_score_stays_finite_and_exact_however_sure_the_model_is():
    """log p / (1 - p) from logits: the validation card's nulls put all of float32's probability on the
    refusal tokens, where log(1 - p) computed from p is -inf and a bootstrap then refuses the data."""
    tokens = metrics.RefusalTokens(refusal_ids=(0, 1), compliance_ids=(2,), source="test")
    logits = torch.zeros(3, 6)
    logits[0, :2] = 60.0  # p rounds to 1 in float32
    logits[1, 2:] = 60.0  # p rounds to 0
    score = metrics.refusal_score(logits, tokens)
    assert torch.isfinite(score).all()
    # exact: logsumexp of the refusal logits minus logsumexp of the others
    assert float(score[0]) == pytest.approx(60 + math.log(2) - math.log(4), abs=1e-4)
    assert float(score[1]) == pytest.approx(math.log(2) - 60 - math.log(4), abs=1e-4)
    assert float(score[2]) == pytest.approx(math.log(2 / 4), abs=1e-6)  # uniform: p = 1/3
