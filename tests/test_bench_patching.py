"""Benchmarks: batched exact patching beside TransformerLens's loop, and AtP beside one forward.

Run on the real model, e.g.::

    pytest tests/test_bench_patching.py --model smollm2-135m-instruct -m slow

Timings go to ``benchmark.extra_info`` (and .benchmarks/latest.json); nothing asserts on
time. What *is* asserted: both implementations give the same numbers.

TransformerLens side. ``transformer_lens.patching.get_act_patch_attn_head_out_all_pos``
does one forward of the whole corrupted batch per (layer, head), through
``model.run_with_hooks(corrupted_tokens, fwd_hooks=...)``, with no attention mask. The
bridge derives a mask by itself only from *string* inputs, so on our left-padded token
tensors TL's patched runs attend to the padding (on the tiny model this moved the metric
by 0.56 against 1e-6 with the mask). :class:`_MaskedModel` is the minimal adaptation: a
proxy whose ``run_with_hooks`` passes the batch's mask; the loop, the hook and the slice
setter are TL's own code. Both sides see the same tokens, masks and clean cache.

Cost. On an accelerator both sides sweep all layers. On the CPU one forward of 8 prompts
of SmolLM2-135M takes ~1-4 s, so the full sweep (270 TL forwards, 2160 patched copies on
our side) would take over 10 minutes per side; there both sides sweep the same
documented subset ``(0, n_layers // 2, n_layers - 1)``, which keeps the identity check
over every head of those layers.

Prefix skip. Our side starts each patched copy at the layer it patches, from the base
run's cached residual (``PatchSpec.skip_prefix``, see instruments.patching, the default on
the CPU only); it is timed with the skip and without it (``skip_prefix=False``: the same arithmetic as TL's loop,
batched), and the three results must agree. ``*_layer_rows`` count prompt-rows times
layers run (the two unpatched runs included): their ratio is the speedup the compute
alone allows. A layer-0 copy skips nothing, so on the CPU subset (0, n/2, n-1) that ratio
is about 1.8 for SmolLM2 (30 layers); for all layers about 1.9.

Measured (8 pairs, SmolLM2-135M-Instruct fp32, identical results, max abs diff 0.0). CPU,
2 cores, layers (0, 15, 29): 17.7 s ours vs 35.3 s TL, 2.0x. One H100, all 30 layers,
max_batch 64: 3.60 s ours with the skip, 2.70 s without, 21.5 s TL: 5.98x and 7.95x.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable

import pandas as pd
import pytest
import torch

from instruments import patching as P
from instruments.patching import prefix as patch_prefix, sites as patch_sites
from instruments.components import Head, hook_name
from instruments.metrics import fallback_tokens, refusal_score

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_PAIRS = 8


@pytest.fixture(scope="module")
def pairs(dataset) -> tuple[list[str], list[str]]:
    chosen = dataset.split("train")[:N_PAIRS]
    assert len(chosen) == N_PAIRS
    return [p.harmful for p in chosen], [p.harmless for p in chosen]


@pytest.fixture(scope="module")
def metric(subject):
    return partial(refusal_score, tokens=fallback_tokens(subject.tokenizer))


@pytest.fixture(scope="module")
def warm(subject, pairs):
    """One unpatched forward first, so neither side pays the first call's setup."""
    ids, mask = subject.encode(pairs[0])
    with torch.no_grad():
        subject.bridge(ids, attention_mask=mask)
    return True


def _layers(subject) -> tuple[int, ...]:
    n = subject.n_layers
    return tuple(range(n)) if subject.device != "cpu" else tuple(sorted({0, n // 2, n - 1}))


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timings[name] = time.perf_counter() - start
    return out


class _MaskedModel:
    """The bridge as TL's patching sees it, but with the batch's attention mask on every run."""

    def __init__(self, bridge, attention_mask: torch.Tensor) -> None:
        self._bridge, self._mask = bridge, attention_mask

    @property
    def cfg(self):
        return self._bridge.cfg

    @property
    def original_model(self):  # TL checks eval mode on it
        return self._bridge.original_model

    def run_with_hooks(self, tokens, fwd_hooks=(), **kwargs):
        return self._bridge.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), attention_mask=self._mask, **kwargs)


@torch.no_grad()
def _transformer_lens_heads(subject, clean, corrupted, metric, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """TL's all-positions head patching over ``layers``: ([layer, head, prompt], corrupted baseline)."""
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    n = len(clean)
    ids, mask = subject.encode(list(clean) + list(corrupted))  # the same encoding as ours: one padded length
    names = [hook_name(Head(layer=layer, head=0)) for layer in layers]
    _, clean_cache = subject.bridge.run_with_cache(ids[:n], attention_mask=mask[:n], names_filter=names)
    index_df = pd.DataFrame([(layer, h) for layer in layers for h in range(subject.n_heads)],
                            columns=["layer", "head"])
    result = get_act_patch_attn_head_out_all_pos(
        _MaskedModel(subject.bridge, mask[n:]), ids[n:], clean_cache, lambda logits: metric(logits[:, -1]),
        index_axis_names=None, index_df=index_df, reduce="none", baseline=True)
    return result.values.view(len(layers), subject.n_heads, n).float().cpu(), result.baseline.float().cpu()


def _layer_rows(subject, clean, corrupted, layers, spec) -> tuple[int, int]:
    """(forwards, prompt-rows x layers) of our head sweep, the two unpatched runs included."""
    pairs = patch_sites._encode_pairs(subject, clean, corrupted)
    groups = [(patch_sites._site(Head(layer=layer, head=h)),) for layer in layers for h in range(subject.n_heads)]
    plan = patch_prefix._plan(subject, pairs, groups, spec)
    rows = sum((chunk.stop - chunk.start) * (subject.n_layers - start) for chunk, start in plan.chunks)
    return 2 + len(plan.chunks), 2 * len(clean) * subject.n_layers + rows


def test_bench_exact_all_heads_vs_transformer_lens(benchmark, subject, pairs, metric, warm, refusal_config):
    clean, corrupted = pairs
    layers = _layers(subject)
    # the suite's memory knob (--refusal-max-batch); on a GPU larger passes are faster
    # TransformerLens's all-position sweep is the reference, so ours splices every position too
    # (the same computation on both sides; the study itself patches only where positions correspond)
    spec = P.PatchSpec(layers=layers, max_batch=refusal_config.max_batch, kl=False, skip_prefix=True,
                       allow_unaligned=True)
    full_spec = P.PatchSpec(layers=layers, max_batch=refusal_config.max_batch, kl=False, skip_prefix=False,
                            allow_unaligned=True)
    timings: dict[str, float] = {}
    # (the first call also runs the once-per-model check of the prefix skip: 1 prompt, ~2.5 forwards)
    ours = benchmark.pedantic(_timed, args=(timings, "ours", lambda: P.patch_heads(subject, clean, corrupted,
                                                                                  metric, spec)),
                              rounds=1, iterations=1)
    ours_full = _timed(timings, "ours_full_forward",
                       lambda: P.patch_heads(subject, clean, corrupted, metric, full_spec))
    theirs, tl_baseline = _timed(timings, "transformer_lens",
                                 lambda: _transformer_lens_heads(subject, clean, corrupted, metric, layers))
    forwards, rows = _layer_rows(subject, clean, corrupted, layers, spec)
    full_forwards, full_rows = _layer_rows(subject, clean, corrupted, layers, full_spec)
    tl_forwards = 2 + len(layers) * subject.n_heads
    benchmark.extra_info.update({
        "device": subject.device, "model": subject.alias, "layers": list(layers), "n_pairs": len(clean),
        "n_heads": subject.n_heads, "max_batch": spec.max_batch,
        "default_skip_prefix": subject.device == "cpu",  # PatchSpec(skip_prefix=None) on this device "torch_threads": torch.get_num_threads(),
        "ours_s": timings["ours"], "ours_full_forward_s": timings["ours_full_forward"],
        "transformer_lens_s": timings["transformer_lens"],
        "speedup_vs_transformer_lens": timings["transformer_lens"] / timings["ours"],
        "speedup_full_forward_vs_transformer_lens": timings["transformer_lens"] / timings["ours_full_forward"],
        "speedup_from_prefix_skip": timings["ours_full_forward"] / timings["ours"],
        "ours_forwards": forwards, "ours_full_forward_forwards": full_forwards,
        "transformer_lens_forwards": tl_forwards,
        "ours_layer_rows": rows, "ours_full_forward_layer_rows": full_rows,
        "transformer_lens_layer_rows": tl_forwards * len(clean) * subject.n_layers,
        "max_abs_diff": float((ours.metric - theirs).abs().max()),
        "max_abs_diff_skip_vs_full_forward": float((ours.metric - ours_full.metric).abs().max()),
    })
    assert ours.metric.shape == (len(layers), subject.n_heads, len(clean))
    torch.testing.assert_close(ours.metric, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.metric, ours_full.metric, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.corrupted, tl_baseline, atol=1e-4, rtol=0)


def test_bench_atp_all_heads_and_neurons_vs_one_forward(benchmark, subject, pairs, metric, warm):
    clean, corrupted = pairs
    ids, mask = subject.encode(list(clean) + list(corrupted))
    timings: dict[str, float] = {}

    @torch.no_grad()
    def one_forward():
        return subject.bridge(ids[:len(clean)], attention_mask=mask[:len(clean)], **P.LAST_ONLY)

    clean_logits = _timed(timings, "one_forward", one_forward)
    spec = P.PatchSpec(max_batch=len(clean), allow_unaligned=True)  # one pass, like the forward it is timed against
    atp = benchmark.pedantic(_timed, args=(timings, "atp", lambda: P.attribution_patch(subject, clean, corrupted,
                                                                                      metric, spec)),
                             rounds=1, iterations=1)
    assert atp.heads.shape == (subject.n_layers, subject.n_heads, len(clean))
    assert atp.neurons.shape == (subject.n_layers, subject.d_mlp, len(clean))
    assert torch.isfinite(atp.heads).all() and torch.isfinite(atp.neurons).all()
    torch.testing.assert_close(atp.clean, metric(clean_logits[:, -1]).float().cpu(), atol=1e-4, rtol=0)

    # how well AtP ranks the heads it puts on top (exact patching of the top 10)
    check = _timed(timings, "verify_top_10", lambda: P.verify_top_k(subject, clean, corrupted, metric, atp, k=10,
                                                                    spec=P.PatchSpec(max_batch=10 * len(clean), kl=False,
                                                                                     allow_unaligned=True)))
    agreement = P.rank_agreement(check.atp_mean, check.exact_mean, n_boot=1000, seed=0)
    benchmark.extra_info.update({
        "device": subject.device, "model": subject.alias, "n_pairs": len(clean),
        "torch_threads": torch.get_num_threads(), "atp_s": timings["atp"], "one_forward_s": timings["one_forward"],
        "atp_over_forward": timings["atp"] / timings["one_forward"], "verify_top_10_s": timings["verify_top_10"],
        "components": subject.n_layers * (subject.n_heads + subject.d_mlp),
        "top10_heads": [f"L{h.layer}H{h.head}" for h in check.heads],
        "top10_atp": check.atp_mean.tolist(), "top10_exact": check.exact_mean.tolist(),
        "top10_spearman": agreement.to_dict(),
        "top10_sign_agreement": float((check.atp_mean.sign() == check.exact_mean.sign()).float().mean()),
    })
