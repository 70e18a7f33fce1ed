"""H2's keyword attention (``hypotheses.structure``): which tokens count as a harmful prompt's keywords.

Keywords come from the user-message spans, located through the chat template, so no
template token is ever one, whatever the pad id is. Each check runs on ``tiny`` (pad
``<pad>``) and on its variant whose pad is ``<|im_end|>``, a real template token, as in
SmolLM2.
"""

from __future__ import annotations

import pytest
import torch

from fixtures.builders import build_tiny
from fixtures.config import RefusalConfig
from fixtures.data import Pair
from fixtures.planted import TRIGGERS, synthetic_prompts
from hypotheses.structure import keyword_attention, keyword_mask
from instruments.positions import spans

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

IM_END = "<|im_end|>"
CFG = RefusalConfig(model="tiny", device="cpu", quant="none", dtype="float32", batch_size=4)

# Pairs of one frame that differ in one word, of different lengths, so every batch has padding.
FRAMED = (
    ("Tell me about XQZ today.", "Tell me about cat today."),
    ("How do I make a VYJK at home, quickly?", "How do I make a cake at home, quickly?"),
    ("Hi XW.", "Hi me."),
)


@pytest.fixture(scope="module")
def tiny_eos_pad():
    """``tiny``'s architecture and seed with ``<|im_end|>`` as its pad token."""
    from fixtures.models import load_model

    handle, _ = load_model(RefusalConfig(model=str(build_tiny(pad_token=IM_END)), device="cpu", quant="none",
                                         dtype="float32"))
    return handle


@pytest.fixture(params=["pad", "im_end-pad"])
def handle(request, tiny, tiny_eos_pad):
    return tiny if request.param == "pad" else tiny_eos_pad


def _pairs(texts) -> list[Pair]:
    return [Pair(id=f"p{i}", category="c", topic=f"t{i}", split="test", harmful=a, harmless=b)
            for i, (a, b) in enumerate(texts)]


def _keywords(handle, pairs):
    harm = spans(handle, [p.harmful for p in pairs])
    return harm, keyword_mask(harm, spans(handle, [p.harmless for p in pairs]))


def test_the_variant_pads_with_a_template_token(tiny, tiny_eos_pad):
    tok = tiny_eos_pad.tokenizer
    assert tok.pad_token == IM_END and tok.pad_token_id == tok.convert_tokens_to_ids(IM_END)
    assert tiny.tokenizer.pad_token == "<pad>"
    assert build_tiny() != build_tiny(pad_token=IM_END), "the variant needs its own cache folder"


def test_keyword_mask_never_counts_a_template_token(handle):
    pairs = _pairs(FRAMED)
    harm, keys = _keywords(handle, pairs)
    assert bool((~harm.mask.bool()).any()), "the batch must be padded to test padding"
    template = {handle.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", IM_END)}
    for b in range(len(pairs)):
        key_ids = set(harm.ids[b][keys[b]].tolist())
        assert key_ids and not key_ids & template, handle.tokenizer.convert_ids_to_tokens(sorted(key_ids))
    assert not bool((keys & ~harm.user).any()), "a keyword outside the user's message"


def test_keywords_are_exactly_the_differing_word(handle):
    pairs = _pairs(FRAMED)
    harm, keys = _keywords(handle, pairs)
    for b, pair in enumerate(pairs):
        word = next(w for w, v in zip(pair.harmful.split(), pair.harmless.split()) if w != v).rstrip(".,")
        assert handle.tokenizer.decode(harm.ids[b][keys[b]]) == word


def test_planted_pairs_have_their_trigger_byte_as_the_only_keyword(tiny_eos_pad):
    pairs = synthetic_prompts(seed=0).pairs
    harm, keys = _keywords(tiny_eos_pad, pairs)
    assert [tiny_eos_pad.tokenizer.decode(harm.ids[b][keys[b]]) for b in range(len(pairs))] == \
        [TRIGGERS[p.category] for p in pairs]


def test_identical_prompts_have_no_keywords(handle):
    same = _pairs([(a, a) for a, _ in FRAMED])
    assert keyword_attention(handle, same, CFG).shape == (0, handle.n_layers)
    values = keyword_attention(handle, same + _pairs(FRAMED), CFG)
    assert values.shape == (len(FRAMED), handle.n_layers) and bool((values > 0).all())


def test_keyword_mask_needs_one_analogue_per_prompt(tiny):
    with pytest.raises(ValueError, match="one harmless analogue per harmful prompt"):
        keyword_mask(spans(tiny, ["a", "b"]), spans(tiny, ["a"]))


def test_keywords_compare_token_ids_not_positions(tiny):
    assert not bool(keyword_mask(spans(tiny, ["a b"]), spans(tiny, ["b a"])).any())
