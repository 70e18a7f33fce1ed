"""Instruments hold only what they read (docs/performance.md, "At 8B"), and read the same numbers.

At Llama-3-8B size a forward that returns ``[batch, pos, 128256]`` logits or a cache of every
position costs gigabytes for values nobody reads. The instruments ask the bridge for the last
position's logits only (``LAST_ONLY``) and cache only the positions they read (``pos_slice``, or a
reducing hook). These tests pin that the numbers do not change, on ``tiny`` and on the planted
model: every instrument is run once as it is and once through :class:`FullBridge`, a bridge that
computes every position's logits and caches every position and slices what was asked for only
afterwards, the way the instruments read it before. Cache-derived numbers must be identical;
logit-derived ones agree to 1e-6 (a one-row unembedding is a differently shaped matrix product).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import pytest
import torch

from fixtures.planted import build_planted, random_null
from instruments import ablation, behavior, direction, gradients, metrics, patching
from instruments.components import Head, Neuron, Resid, ResidPost, hook_name
from instruments.direct import direct_effects
from instruments.patching import core as patch_core
from instruments.patching import sites as patch_sites
from instruments.patching.spec import LAST_ONLY
from instruments.positions import post_instruction_length

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

CLOSE = {"rtol": 1e-6, "atol": 1e-6}


class FullBridge:
    """The bridge, but every forward unembeds every position and every cache holds every position;
    ``logits_to_keep`` and ``pos_slice`` are applied to the full results afterwards."""

    def __init__(self, bridge: Any) -> None:
        self._bridge = bridge

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bridge, name)

    def __call__(self, *args: Any, logits_to_keep: int | None = None, **kwargs: Any) -> Any:
        out = self._bridge(*args, **kwargs)
        if logits_to_keep is None:
            return out
        if isinstance(out, tuple):
            return (out[0][:, -logits_to_keep:], *out[1:])
        return out[:, -logits_to_keep:]

    def run_with_cache(self, *args: Any, pos_slice: list[int] | None = None, logits_to_keep: int | None = None,
                       **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        out, cache = self._bridge.run_with_cache(*args, **kwargs)
        out = out if logits_to_keep is None else out[:, -logits_to_keep:]
        if pos_slice is None:
            return out, cache
        return out, {name: self._positions(name, value, pos_slice) for name, value in cache.items()}

    def _positions(self, name: str, value: torch.Tensor, positions: list[int]) -> torch.Tensor:
        # the bridge's own rule for where an activation's positions are (patterns: the queries)
        dim = self._bridge._pos_slice_dim(name) % value.dim()
        return value.index_select(dim, torch.tensor([p % value.shape[dim] for p in positions], device=value.device))


@pytest.fixture(scope="module", params=["tiny", "planted"])
def member(request):
    return random_null(0) if request.param == "tiny" else build_planted()


@pytest.fixture(scope="module")
def full(member):
    return dataclasses.replace(member.handle, bridge=FullBridge(member.handle.bridge))


@pytest.fixture(scope="module")
def pairs(member):
    train = member.dataset.split("train")[:4]
    return [p.harmful for p in train], [p.harmless for p in train]


def _metric(member):
    return partial(metrics.refusal_score, tokens=member.tokens)


def _same(got: Any, want: Any, *, exact: bool) -> None:
    if dataclasses.is_dataclass(got):
        for f in dataclasses.fields(got):
            _same(getattr(got, f.name), getattr(want, f.name), exact=exact)
    elif isinstance(got, torch.Tensor):
        if exact:
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
        else:
            torch.testing.assert_close(got, want, equal_nan=True, **CLOSE)
    elif isinstance(got, (tuple, list)) and got and isinstance(got[0], (torch.Tensor, tuple)):
        for a, b in zip(got, want, strict=True):
            _same(a, b, exact=exact)
    elif isinstance(got, dict) or hasattr(got, "items"):
        assert set(got) == set(want)
        for key in got:
            _same(got[key], want[key], exact=exact)
    else:
        assert repr(got) == repr(want)


# ----------------------------------------------------------------------------- the bridge honours what is asked

def test_last_only_unembeds_one_position_and_every_hook_still_sees_every_position(tiny):
    ids, mask = tiny.encode(["Hello there.", "What is the capital of France today?"])
    seen = {}

    def look(act, hook):
        seen["shape"] = act.shape
        return act

    with tiny.bridge.hooks(fwd_hooks=[(hook_name(ResidPost(layer=tiny.n_layers - 1)), look)]):
        one = tiny.bridge(ids, attention_mask=mask, **LAST_ONLY)
    assert one.shape == (2, 1, tiny.hf_model.config.vocab_size)
    assert seen["shape"][:2] == ids.shape  # the last block's output still covers every position
    torch.testing.assert_close(one[:, -1], tiny.bridge(ids, attention_mask=mask)[:, -1], **CLOSE)
    step, _ = tiny.bridge(ids, attention_mask=mask, return_type="logits_and_cache", **LAST_ONLY)
    assert step.shape == one.shape


def test_a_cached_run_holds_only_the_positions_asked_for(tiny):
    ids, mask = tiny.encode(["Hello there.", "What is the capital of France today?"])
    names = [hook_name(Head(layer=1, head=0)), hook_name(Neuron(layer=2, index=0))]
    _, kept = patch_sites._cached_run(tiny, ids, mask, names, hooks=(), max_batch=8, positions=(-2, -1))
    _, every = patch_sites._cached_run(tiny, ids, mask, names, hooks=(), max_batch=8)
    for name in names:
        assert torch.equal(kept[name], every[name][:, -2:])
        # a copy of the two positions, not a view that keeps every position alive
        assert kept[name].untyped_storage().nbytes() == kept[name].numel() * kept[name].element_size()


# ----------------------------------------------------------------------------- the same numbers

def test_next_token_instruments_read_the_same_logits(member, full, pairs):
    harmful, harmless = pairs
    h = member.handle
    _same(behavior.last_logits(h, harmful + harmless, batch_size=3),
          behavior.last_logits(full, harmful + harmless, batch_size=3), exact=False)
    for use_cache in (True, False):
        got = behavior.generate(h, harmful[:3], max_new_tokens=5, batch_size=2, use_cache=use_cache)
        want = behavior.generate(full, harmful[:3], max_new_tokens=5, batch_size=2, use_cache=use_cache)
        assert (got.texts, got.first_tokens) == (want.texts, want.first_tokens)
        _same(got.prompt_logits, want.prompt_logits, exact=False)
    assert list(behavior.stream_generate(h, harmful[0], max_new_tokens=5)) == \
        list(behavior.stream_generate(full, harmful[0], max_new_tokens=5))
    answers = ["Sure, here is bread.", "", "Hi"]
    _same(ablation.answer_scores(h, harmless[:3], answers, batch_size=2),
          ablation.answer_scores(full, harmless[:3], answers, batch_size=2), exact=False)


def test_gradient_instruments_read_the_same_gradients(member, full, pairs):
    harmful, harmless = pairs
    spec = gradients.GradientSpec(batch_size=2)
    for fn in (gradients.neuron_saliency, gradients.attention_gradient_flow):
        _same(fn(member.handle, harmful[:3], member.tokens, spec), fn(full, harmful[:3], member.tokens, spec),
              exact=False)
    ig = gradients.IGSpec(steps=4, batch_size=3, baseline=gradients.Baseline(prompts=tuple(harmless[:2])))
    _same(gradients.integrated_gradients(member.handle, harmful[:2], member.tokens, ig),
          gradients.integrated_gradients(full, harmful[:2], member.tokens, ig), exact=False)


def test_cache_reading_instruments_read_the_same_activations(member, full, pairs):
    harmful, harmless = pairs
    h, tokens = member.handle, member.tokens
    _same(behavior.logit_lens(h, harmful, tokens, batch_size=3), behavior.logit_lens(full, harmful, tokens,
                                                                                   batch_size=3), exact=True)
    _same(behavior.attention_entropy(h, harmful, batch_size=3), behavior.attention_entropy(full, harmful,
                                                                                         batch_size=3), exact=True)
    _same(direction.resid_at(h, harmful, positions=(-3, -1), batch_size=3),
          direction.resid_at(full, harmful, positions=(-3, -1), batch_size=3), exact=True)
    _same(direction.candidate_directions(h, harmful, harmless), direction.candidate_directions(full, harmful, harmless),
          exact=True)
    spec = patching.PatchSpec(kl=False, max_batch=3)
    got, want = direct_effects(h, harmful, harmless, _metric(member), spec), direct_effects(full, harmful, harmless,
                                                                                             _metric(member), spec)
    for g, w in zip(got, want):  # the direct paths come from cached activations, the baselines from logits
        _same(g.metric, w.metric, exact=True)
        _same((g.clean, g.corrupted), (w.clean, w.corrupted), exact=False)


def test_direction_selection_scores_the_same(member, full, pairs):
    harmful, harmless = pairs
    val = member.dataset.split("val")[:3]
    spec = direction.DirectionSpec(batch_size=3, max_rows=8, screen=3, screen_prompts=2)
    cands = direction.candidate_directions(member.handle, harmful, harmless, spec=spec)
    kw = dict(harmful_val=[p.harmful for p in val], harmless_val=[p.harmless for p in val], tokens=member.tokens,
              spec=spec)
    got, want = direction.select_direction(member.handle, cands, **kw), direction.select_direction(full, cands, **kw)
    assert (got.pos, got.layer, got.meets_thresholds) == (want.pos, want.layer, want.meets_thresholds)
    for a, b in zip(got.scores, want.scores, strict=True):
        assert (a.pos, a.layer, a.evaluated, a.rejected is None) == (b.pos, b.layer, b.evaluated, b.rejected is None)
        torch.testing.assert_close(torch.tensor([a.bypass, a.induce, a.kl]), torch.tensor([b.bypass, b.induce, b.kl]),
                                   equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["post", None])
def test_patching_reads_the_same_source(member, full, pairs, positions):
    harmful, harmless = pairs
    h, metric = member.handle, _metric(member)
    n = post_instruction_length(h) if positions == "post" else None
    spec = patching.PatchSpec(positions=n, max_batch=5)
    for direction_ in ("denoising", "noising"):
        s = dataclasses.replace(spec, direction=direction_)
        _same(patching.patch_heads(h, harmful, harmless, metric, s), patching.patch_heads(full, harmful, harmless,
                                                                                          metric, s), exact=False)
        _same(patching.patch_complement(h, harmful, harmless, metric, [[Head(layer=1, head=0)], []], s),
              patching.patch_complement(full, harmful, harmless, metric, [[Head(layer=1, head=0)], []], s),
              exact=False)


# ----------------------------------------------------------------------------- exact against the full formulas

@pytest.mark.parametrize("direction_", ["denoising", "noising"])
def test_a_windowed_source_patches_exactly_like_the_full_source(member, pairs, direction_):
    """Sources cached at the patched window only splice what the full sources spliced, bit for bit,
    including sites given from the start, sites before the window (which patch nothing) and neurons."""
    harmful, harmless = pairs
    h, metric = member.handle, _metric(member)
    n = post_instruction_length(h)
    spec = patching.PatchSpec(positions=n, max_batch=5, direction=direction_)
    every = dataclasses.replace(spec, positions=None)
    whole = patching.head_runs(h, harmful, harmless, every)
    assert torch.equal(patching.patch_heads(h, harmful, harmless, metric, spec, runs=whole).metric,
                       patching.patch_heads(h, harmful, harmless, metric, spec).metric)
    pair_ids = patch_sites._encode_pairs(h, harmful, harmless)
    length = pair_ids.length
    groups = [(patch_sites._site(Head(layer=1, head=2)),), (patch_sites._site(Neuron(layer=0, index=1)),),
              (patch_sites._site(Resid(layer=2, pos=-1)), patch_sites._site(Resid(layer=2, pos=length - 2))),
              (patch_sites._site(Resid(layer=1, pos=-(n + 2))),), (patch_sites._site(Resid(layer=1)),)]
    names = sorted({site.hook for group in groups for site in group})
    resids = [patch_core._resid_name(layer) for layer in range(1, h.n_layers)]
    kw = dict(kind="components", axes=("group",), coords=(range(len(groups)),), groups=lambda _: groups)
    for make in (every, spec):
        runs = patch_core._unpatched_runs(h, harmful, harmless, pair_ids, make, source_names=names, base_names=resids)
        result = patch_core._patch(h, harmful, harmless, metric, spec, runs=runs, **kw)
        if make is every:
            reference = result
        else:
            assert all(a.shape[1] == n for a in runs.source_acts.values())
    assert torch.equal(result.metric, reference.metric) and torch.equal(result.kl, reference.kl)


def test_runs_that_hold_a_window_refuse_another(tiny, pairs):
    harmful, harmless = pairs
    metric = partial(metrics.refusal_score, tokens=metrics.fallback_tokens(tiny.tokenizer))
    runs = patching.head_runs(tiny, harmful, harmless, patching.PatchSpec(positions=3))
    with pytest.raises(ValueError, match="last 3 positions only"):
        patching.patch_heads(tiny, harmful, harmless, metric, patching.PatchSpec(positions=2), runs=runs)


def _atp_by_autograd(handle, clean, corrupted, metric, spec):
    """AtP as one autograd.grad over every hooked activation at every position, from a full source cache."""
    layers = range(handle.n_layers)
    names = [hook_name(Head(layer=L, head=0)) for L in layers] + [hook_name(Neuron(layer=L, index=0)) for L in layers]
    pairs = patch_sites._encode_pairs(handle, clean, corrupted)
    window = slice(None) if spec.positions is None else slice(pairs.length - spec.positions, None)
    (source_ids, source_mask), (base_ids, base_mask) = pairs.source(spec.direction), pairs.base(spec.direction)
    _, source = patch_sites._cached_run(handle, source_ids, source_mask, names, hooks=(), max_batch=len(clean))
    store = {}

    def keep(act, hook, name):
        store[name] = act
        return act

    hooks = [(hook_name(Resid(layer=0)), lambda act, hook: act.detach().requires_grad_(True))]
    hooks += [(name, partial(keep, name=name)) for name in names]
    with torch.enable_grad(), handle.bridge.hooks(fwd_hooks=hooks):
        values = metric(handle.bridge(base_ids, attention_mask=base_mask, **LAST_ONLY)[:, -1].float())
        grads = torch.autograd.grad(values.sum(), [store[name] for name in names])
    scores = []
    for name, grad in zip(names, grads):
        per = ((source[name].to(grad.dtype) - store[name].detach()) * grad).float()[:, window]
        scores.append((per.sum(dim=(1, 3)) if per.ndim == 4 else per.sum(dim=1)).T)
    return torch.stack(scores[:len(layers)]), torch.stack(scores[len(layers):])


@pytest.mark.parametrize("positions", ["post", None])
@pytest.mark.parametrize("direction_", ["denoising", "noising"])
def test_atp_reduced_as_gradients_arrive_equals_the_full_gradients(member, pairs, positions, direction_):
    harmful, harmless = pairs
    h, metric = member.handle, _metric(member)
    spec = patching.PatchSpec(positions=post_instruction_length(h) if positions == "post" else None,
                              direction=direction_)
    atp = patching.attribution_patch(h, harmful, harmless, metric, spec)
    heads, neurons = _atp_by_autograd(h, harmful, harmless, metric, spec)
    torch.testing.assert_close(atp.heads, heads, **CLOSE)
    torch.testing.assert_close(atp.neurons, neurons, **CLOSE)


@pytest.mark.parametrize("positions", ["post", None])
def test_reference_activations_reduced_in_the_hook_equal_the_full_cache(member, pairs, positions):
    _, harmless = pairs
    h = member.handle
    n = post_instruction_length(h) if positions == "post" else None
    names = [hook_name(Head(layer=1, head=0)), hook_name(Neuron(layer=2, index=0)), hook_name(Resid(layer=3))]
    ref = ablation.reference_activations(h, harmless, names, positions=n, batch_size=3)
    want: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for chunk in behavior.batches(harmless, 3):
        ids, mask = h.encode(chunk)
        _, cache = h.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
        keep = mask.float()
        for name in names:
            act = cache[name].float()
            w = keep.reshape(keep.shape + (1,) * (act.dim() - 2))
            want[name].append(act[:, act.shape[1] - n:] if n is not None else
                              (act * w).sum(1) / keep.sum(1).reshape((-1,) + (1,) * (act.dim() - 2)))
    for name in names:
        assert torch.equal(ref.per_prompt[name], torch.cat(want[name]))
