"""H2's keyword attention (``hypotheses.structure``): which tokens count as a harmful prompt's keywords.

Keywords come from the user-message spans, located through the chat template, so no
template token is ever one, whatever the pad id is. Each check runs on ``tiny`` (pad
``<pad>``) and on its variant whose pad is ``<|im_end|>``, a real template token, as in
SmolLM2.
"""

from __future__ import annotations

import numpy as np
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
    """A prompt with no keyword is a row of NaN, so the harmful side and its control keep the same rows."""
    same = _pairs([(a, a) for a, _ in FRAMED])
    assert np.isnan(keyword_attention(handle, same, CFG)).all()
    values = keyword_attention(handle, same + _pairs(FRAMED), CFG)
    assert values.shape == (2 * len(FRAMED), handle.n_layers)
    assert np.isnan(values[: len(FRAMED)]).all() and bool((values[len(FRAMED):] > 0).all())
    control = keyword_attention(handle, same + _pairs(FRAMED), CFG, side="harmless")
    assert control.shape == values.shape and np.isnan(control[: len(FRAMED)]).all()


def test_detection_contrasts_with_the_control_and_chooses_its_peak_on_val():
    """Known answer: focus only at layer 0 on the harmful side, none on the control."""
    from hypotheses.structure import detection

    rng = np.random.default_rng(0)
    harm = 1 + 0.05 * rng.standard_normal((12, 6))
    harm[:, 0] += 3.0
    control = 1 + 0.05 * rng.standard_normal((12, 6))
    det = detection(harm, control, harm, control, CFG)
    assert det.peak_layer == 0 and det.early == (0, 1)
    assert det.at_peak.ci_low > 2.5 and det.early_minus_later.ci_low > 0
    # the same focus on both sides (a model attending to whatever word differs): no detection
    flat = detection(harm, harm + 0.01 * rng.standard_normal(harm.shape), harm, harm, CFG)
    assert abs(flat.early_minus_later.value) < 0.05
    # focus late: the early-minus-later contrast is negative
    late = harm[:, ::-1].copy()
    assert detection(late, control, late, control, CFG).early_minus_later.ci_high < 0


def test_accumulation_is_normalized_and_beats_random_directions():
    """Residual norms that grow with depth do not make accumulation; a middle-third rise along r does."""
    from hypotheses.structure import accumulation

    g = torch.Generator().manual_seed(0)
    n, layers, dim = 16, 9, 32
    r = torch.zeros(dim)
    r[0] = 1.0
    grow = torch.linspace(1, 20, layers)[None, :, None]
    noise = lambda: torch.randn(n, layers, dim, generator=g)  # noqa: E731
    harmless = noise() * grow
    growing_only = accumulation(noise() * grow, harmless, r, CFG)
    assert growing_only.statistic.ci_low < 0 < growing_only.statistic.ci_high or growing_only.p_random > 0.05
    rise = torch.tensor([0, 0, 0, 0, 4, 8, 8, 8, 8], dtype=torch.float32)  # the middle third (3-5) rises
    harmful = noise() * grow
    harmful[:, :, 0] += rise * grow[0, :, 0]
    acc = accumulation(harmful, harmless, r, CFG)
    assert acc.statistic.ci_low > 0 and acc.p_random < 0.05
    assert acc.slopes["middle"].value > max(acc.slopes["early"].value, acc.slopes["late"].value)


def test_keyword_mask_needs_one_analogue_per_prompt(tiny):
    with pytest.raises(ValueError, match="one harmless analogue per harmful prompt"):
        keyword_mask(spans(tiny, ["a", "b"]), spans(tiny, ["a"]))


def test_keywords_compare_token_ids_not_positions(tiny):
    assert not bool(keyword_mask(spans(tiny, ["a b"]), spans(tiny, ["b a"])).any())
