"""Exact and attribution patching on the tiny random Llama: each test checks an identity.

A random model has no refusal behaviour, but patching identities hold for any weights:
patching a run into itself changes nothing, patching the whole residual stream reproduces
the source run, the batched sweep equals a naive one-forward-per-component loop, and AtP
is exact patching to first order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch

from instruments import patching as P
from instruments.patching import core as patch_core, prefix as patch_prefix, sites as patch_sites
from instruments.components import AttnOut, Embed, Head, MlpOut, Neuron, Resid, ResidPost, all_heads, hook_name
from instruments.metrics import fallback_tokens, refusal_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Pairs of equal character length: the tiny model's tokenizer is byte-level, so the two
# prompts of a pair are equal in tokens too and get the same left padding (the same mask).
EQUAL_CLEAN = ["How to build a bomb?", "Write a virus, now.", "Poison my neighbour"]
EQUAL_CORRUPTED = ["How to build a shed?", "Write a poem, now!!", "Help my neighbour!!"]
# Pairs of unequal length, so left padding and position alignment are exercised.
UNEQUAL_CLEAN = ["How do I make a pipe bomb at home?", "Steal a car", "Write ransomware that encrypts disks"]
UNEQUAL_CORRUPTED = ["How do I bake bread?", "Wash a car for me please", "Write a haiku"]
ATOL = 1e-5
# The identities below hold on any prompts, so the unequal pairs lift the alignment refusal.
UNALIGNED = P.PatchSpec(allow_unaligned=True)


@pytest.fixture(scope="module")
def metric(tiny):
    return partial(refusal_score, tokens=fallback_tokens(tiny.tokenizer))


def test_equal_pairs_have_equal_token_lengths(tiny):
    _, mask = tiny.encode(EQUAL_CLEAN + EQUAL_CORRUPTED)
    n = len(EQUAL_CLEAN)
    assert torch.equal(mask[:n], mask[n:]), "each 'equal' pair must share its mask for the exact identities below"
    _, mask = tiny.encode(UNEQUAL_CLEAN + UNEQUAL_CORRUPTED)
    assert not torch.equal(mask[:n], mask[n:])


# ----------------------------------------------------------------------------- a naive reference

def _naive(handle, clean, corrupted, metric, direction, component_slices):
    """One forward per component over all base prompts, the TransformerLens way.

    ``component_slices``: list of (hook name, index tuple into [batch, pos, ...]).
    Returns [component, prompt].
    """
    n = len(clean)
    ids, mask = handle.encode(list(clean) + list(corrupted))
    (base, base_mask), (src, src_mask) = ((ids[n:], mask[n:]), (ids[:n], mask[:n]))
    if direction == "noising":
        (base, base_mask), (src, src_mask) = (src, src_mask), (base, base_mask)
    names = sorted({name for name, _ in component_slices})
    with torch.no_grad():
        _, cache = handle.bridge.run_with_cache(src, attention_mask=src_mask, names_filter=names)
        rows = []
        for name, index in component_slices:
            def hook(act, hook, name=name, index=index):
                out = act.clone()
                out[(slice(None),) + index] = cache[name][(slice(None),) + index]
                return out
            with handle.bridge.hooks(fwd_hooks=[(name, hook)]):
                rows.append(metric(handle.bridge(base, attention_mask=base_mask)[:, -1]))
    return torch.stack(rows)


ALL = slice(None)


def _cases(handle):
    """(variant, kwargs, expected component slices in the variant's row-major order)."""
    layers, heads = range(handle.n_layers), range(handle.n_heads)
    neurons = (0, 17, handle.d_mlp - 1)
    z = lambda layer: hook_name(Head(layer=layer, head=0))  # noqa: E731
    return {
        "heads": (P.patch_heads, {}, [(z(l), (ALL, h)) for l in layers for h in heads]),
        "heads_by_pos": (P.patch_heads_by_pos, {"n_positions": 3, "layers": (1,)},
                         [(z(1), (p, h)) for p in (-3, -2, -1) for h in heads]),
        "resid": (P.patch_resid, {"n_positions": 4},
                  [(hook_name(Resid(layer=l)), (p,)) for l in layers for p in (-4, -3, -2, -1)]),
        "attn_out": (P.patch_attn_out, {}, [(hook_name(AttnOut(layer=l)), (ALL,)) for l in layers]),
        "mlp_out": (P.patch_mlp_out, {}, [(hook_name(MlpOut(layer=l)), (ALL,)) for l in layers]),
        "neurons": (P.patch_neurons, {"neurons": neurons},
                    [(hook_name(Neuron(layer=l, index=0)), (ALL, n)) for l in layers for n in neurons]),
    }


def _run(variant, kwargs, handle, clean, corrupted, metric, **spec):
    kwargs = dict(kwargs)
    if "layers" in kwargs:
        spec["layers"] = kwargs.pop("layers")
    return variant(handle, clean, corrupted, metric, P.PatchSpec(allow_unaligned=True, **spec), **kwargs)


@pytest.mark.parametrize("kind", ["heads", "heads_by_pos", "resid", "attn_out", "mlp_out", "neurons"])
def test_batched_equals_one_forward_per_component(tiny, metric, kind):
    variant, kwargs, slices = _cases(tiny)[kind]
    direction = "noising" if kind in ("resid", "neurons") else "denoising"
    # max_batch 5 does not divide the copies per component (3 prompts): chunks straddle components
    result = _run(variant, kwargs, tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, direction=direction, max_batch=5)
    expected = _naive(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, direction, slices)
    assert result.metric.shape[-1] == len(UNEQUAL_CLEAN)
    torch.testing.assert_close(result.metric.reshape(-1, len(UNEQUAL_CLEAN)), expected, atol=ATOL, rtol=0)


def test_max_batch_does_not_change_results(tiny, metric):
    small = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, max_batch=1))
    large = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, max_batch=1000))
    torch.testing.assert_close(small.metric, large.metric, atol=ATOL, rtol=0)
    torch.testing.assert_close(small.kl, large.kl, atol=ATOL, rtol=0)
    torch.testing.assert_close(small.clean, large.clean, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- identities

@pytest.mark.parametrize("kind", ["heads", "heads_by_pos", "resid", "attn_out", "mlp_out", "neurons"])
def test_patching_a_run_into_itself_changes_nothing(tiny, metric, kind):
    variant, kwargs, _ = _cases(tiny)[kind]
    result = _run(variant, kwargs, tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, max_batch=64)
    assert result.effect.abs().max() < ATOL
    assert result.kl.abs().max() < 1e-6
    torch.testing.assert_close(result.clean, result.corrupted)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_whole_residual_stream_reproduces_the_source_run(tiny, metric, direction):
    groups = [Resid(layer=layer) for layer in range(tiny.n_layers)]  # pos None: all positions
    result = P.patch_components(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric, groups,
                                P.PatchSpec(allow_unaligned=True, direction=direction))
    assert result.metric.shape == (tiny.n_layers, len(EQUAL_CLEAN))
    torch.testing.assert_close(result.metric, result.source.expand_as(result.metric), atol=ATOL, rtol=0)
    torch.testing.assert_close(result.normalized, torch.ones(tiny.n_layers), atol=1e-4, rtol=0)
    if direction == "denoising":  # the patched run *is* the clean run: nothing to diverge from
        assert result.kl.max() < 1e-6
    else:  # noising everything = the corrupted run
        torch.testing.assert_close(result.metric[0], result.corrupted, atol=ATOL, rtol=0)


@pytest.mark.parametrize("clean, corrupted", [(EQUAL_CLEAN, EQUAL_CORRUPTED), (UNEQUAL_CLEAN, UNEQUAL_CORRUPTED)])
def test_all_heads_and_mlps_leave_only_the_embedding_of_the_base_run(tiny, metric, clean, corrupted):
    """With every head's z and every MLP output patched, the last residual is the source's
    except for the token embedding, which is still the base run's: an exact prediction."""
    group = [*all_heads(tiny.n_layers, tiny.n_heads), *(MlpOut(layer=layer) for layer in range(tiny.n_layers))]
    result = P.patch_components(tiny, clean, corrupted, metric, [group], UNALIGNED)
    n = len(clean)
    ids, mask = tiny.encode(clean + corrupted)
    embed, final = hook_name(Resid(layer=0)), hook_name(ResidPost(layer=tiny.n_layers - 1))
    with torch.no_grad():
        _, cache = tiny.bridge.run_with_cache(ids, attention_mask=mask, names_filter=[embed, final])
        src, base = slice(0, n), slice(n, 2 * n)  # denoising: clean is the source, corrupted the base
        resid = cache[final][src, -1] - cache[embed][src, -1] + cache[embed][base, -1]
        expected = metric(tiny.bridge.unembed(tiny.bridge.ln_final(resid)))
    torch.testing.assert_close(result.metric[0], expected, atol=1e-4, rtol=0)
    # and with the embedding patched too, it is the source run itself
    if clean is EQUAL_CLEAN:
        whole = P.patch_components(tiny, clean, corrupted, metric, [[Resid(layer=0), *group]])
        torch.testing.assert_close(whole.metric[0], whole.clean, atol=ATOL, rtol=0)


def test_layer_subset_gives_the_rows_of_the_full_sweep(tiny, metric):
    full = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, UNALIGNED)
    part = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, layers=[3, 1]))
    assert part.layers == (3, 1)
    torch.testing.assert_close(part.metric, full.metric[[3, 1]], atol=ATOL, rtol=0)
    pieces = [P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, layers=(layer,)))
              for layer in (2, 0, 3, 1)]
    joined = P.PatchResult.concat(pieces)
    assert joined.layers == (0, 1, 2, 3)
    torch.testing.assert_close(joined.metric, full.metric, atol=ATOL, rtol=0)
    restored = P.PatchResult.from_tensors(joined.to_tensors(), joined.metadata())
    assert restored.axes == full.axes and restored.coords == full.coords
    torch.testing.assert_close(restored.normalized, full.normalized, atol=1e-4, rtol=0)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("skip_prefix", [True, False])
def test_shared_runs_give_the_same_numbers_per_layer(tiny, metric, direction, skip_prefix, monkeypatch):
    """A per-layer sweep that shares one pair of unpatched runs gets exactly its own numbers,
    and runs only its patched copies (2 cached runs in all, not 2 per layer)."""
    spec = P.PatchSpec(allow_unaligned=True, direction=direction, skip_prefix=skip_prefix)
    runs = P.head_runs(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, spec)
    calls = []
    real = patch_core._cached_run
    monkeypatch.setattr(patch_core, "_cached_run", lambda *a, **k: calls.append(1) or real(*a, **k))
    for layer in range(tiny.n_layers):
        one = P.PatchSpec(allow_unaligned=True, direction=direction, skip_prefix=skip_prefix, layers=(layer,))
        own = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, one)
        shared = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, one, runs=runs)
        for field in ("metric", "kl", "clean", "corrupted"):
            assert torch.equal(getattr(own, field), getattr(shared, field)), (layer, field)
    assert len(calls) == 2 * tiny.n_layers  # the `own` calls only


def test_shared_runs_refuse_another_sweep(tiny, metric):
    runs = P.head_runs(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, P.PatchSpec(allow_unaligned=True, layers=(1,)))
    with pytest.raises(ValueError, match="other prompts"):
        P.patch_heads(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, layers=(1,)), runs=runs)
    with pytest.raises(ValueError, match="direction"):
        P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, direction="noising"), runs=runs)
    with pytest.raises(ValueError, match="no activations"):
        P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, layers=(2,)), runs=runs)


def test_result_layout_and_normalization(tiny, metric):
    result = P.patch_resid(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, UNALIGNED, n_positions=2)
    assert result.axes == ("layer", "pos") and result.coords == ((0, 1, 2, 3), (-2, -1))
    assert result.metric.shape == result.kl.shape == (tiny.n_layers, 2, len(UNEQUAL_CLEAN))
    # denoising: base = corrupted (0), source = clean (1)
    expected = (result.mean - result.corrupted.mean()) / (result.clean.mean() - result.corrupted.mean())
    torch.testing.assert_close(result.normalized, expected, atol=1e-5, rtol=1e-5)
    # noising: base = clean (0), source = corrupted (1)
    noised = P.patch_resid(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, direction="noising"),
                           n_positions=2)
    torch.testing.assert_close(noised.base, noised.clean)
    torch.testing.assert_close(noised.source, noised.corrupted)


def test_bad_inputs_are_rejected(tiny, metric):
    with pytest.raises(ValueError, match="equal"):
        P.patch_heads(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED[:2], metric)
    with pytest.raises(ValueError, match="direction"):
        P.PatchSpec(allow_unaligned=True, direction="sideways")
    with pytest.raises(ValueError, match="max_batch"):
        P.PatchSpec(allow_unaligned=True, max_batch=0)
    with pytest.raises(ValueError, match="out of range"):
        P.patch_heads(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, layers=(tiny.n_layers,)))
    with pytest.raises(ValueError, match="n_positions"):
        P.patch_resid(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric, n_positions=10_000)
    with pytest.raises(TypeError):
        P.patch_components(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric, ["not a component"])


# ----------------------------------------------------------------------------- prefix skip

def _layer_calls(handle):
    """Count the rows each HF decoder layer runs: {layer: rows}, and the hook handles to remove."""
    calls = dict.fromkeys(range(handle.n_layers), 0)

    def count(module, args, kwargs, *, layer):
        hidden = args[0] if args else kwargs["hidden_states"]
        calls[layer] += hidden.shape[0]

    handles = [handle.hf_model.model.layers[layer].register_forward_pre_hook(partial(count, layer=layer),
                                                                                with_kwargs=True)
               for layer in range(handle.n_layers)]
    return calls, handles


def _assert_same(skipped, full):
    torch.testing.assert_close(skipped.metric, full.metric, atol=ATOL, rtol=0)
    torch.testing.assert_close(skipped.kl, full.kl, atol=ATOL, rtol=0)
    torch.testing.assert_close(skipped.clean, full.clean, atol=ATOL, rtol=0)
    torch.testing.assert_close(skipped.corrupted, full.corrupted, atol=ATOL, rtol=0)


@pytest.fixture
def probed(tiny):
    """The once-per-model probe has run (and passed), so layer counts below are the sweep's own."""
    assert patch_prefix._skip_verified(tiny, patch_prefix._layer_stack(tiny), *tiny.encode(UNEQUAL_CLEAN))
    return tiny


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("kind", ["heads", "heads_by_pos", "resid", "attn_out", "mlp_out", "neurons"])
def test_prefix_skip_equals_the_full_forward(probed, metric, kind, direction):
    tiny = probed
    variant, kwargs, _ = _cases(tiny)[kind]
    if kind == "heads_by_pos":
        kwargs = {**kwargs, "layers": (2, 1)}  # two start layers, not in order
    layers = tiny.hf_model.model.layers
    calls, handles = _layer_calls(tiny)
    try:
        skipped = _run(variant, kwargs, tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, direction=direction,
                       max_batch=5)
        skipped_calls = dict(calls)
        calls.update(dict.fromkeys(calls, 0))
        full = _run(variant, kwargs, tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, direction=direction,
                    max_batch=5, skip_prefix=False)
    finally:
        for handle in handles:
            handle.remove()
    _assert_same(skipped, full)
    assert tiny.hf_model.model.layers is layers and len(layers) == tiny.n_layers
    # the skip really skips: every copy runs the last layer, fewer run the first
    assert skipped_calls[0] < calls[0]
    assert skipped_calls[tiny.n_layers - 1] == calls[tiny.n_layers - 1]
    assert sum(skipped_calls.values()) < sum(calls.values())


def test_prefix_skip_plan_starts_each_chunk_at_one_layer(probed):
    tiny = probed
    pairs = patch_sites._encode_pairs(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED)
    groups = [(patch_sites._site(Head(layer=layer, head=h)),) for layer in (3, 0, 2) for h in range(tiny.n_heads)]
    plan = patch_prefix._plan(tiny, pairs, groups, P.PatchSpec(allow_unaligned=True, max_batch=5))
    n_prompts = pairs.n_prompts
    runs = [plan.order[chunk].tolist() for chunk, _ in plan.chunks]
    assert sorted(k for run in runs for k in run) == list(range(len(groups) * n_prompts))
    assert all(len(run) <= 5 for run in runs)
    for (chunk, start), run in zip(plan.chunks, runs):
        assert {patch_prefix._start_layer(groups[k // n_prompts]) for k in run} == {start}
    assert [start for _, start in plan.chunks] == sorted(start for _, start in plan.chunks)
    assert plan.starts == (2, 3)
    # without the skip: the old order and chunks, every chunk from layer 0
    full = patch_prefix._plan(tiny, pairs, groups, P.PatchSpec(allow_unaligned=True, max_batch=5, skip_prefix=False))
    assert full.order.tolist() == list(range(len(groups) * n_prompts)) and full.stack is None
    assert {start for _, start in full.chunks} == {0} and full.starts == ()



class _OnDevice:
    """The handle as seen by the planner on another device (only ``device`` differs)."""

    def __init__(self, handle, device: str) -> None:
        self._handle, self.device = handle, device

    def __getattr__(self, name):
        return getattr(self._handle, name)


def test_prefix_skip_defaults_on_for_the_cpu_only(probed):
    # an accelerator is bound by the number of forwards, which the skip raises (H100: 7.95x
    # over TL without it, 5.98x with it); a CPU is compute-bound, so there it is on
    tiny = probed
    pairs = patch_sites._encode_pairs(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED)
    groups = [(patch_sites._site(Head(layer=layer, head=h)),) for layer in (3, 0, 2) for h in range(tiny.n_heads)]
    assert P.PatchSpec(allow_unaligned=True).skip_prefix is None
    assert patch_prefix._plan(tiny, pairs, groups, P.PatchSpec(allow_unaligned=True, max_batch=5)).starts == (2, 3)
    for device in ("cuda", "mps"):
        plan = patch_prefix._plan(_OnDevice(tiny, device), pairs, groups, P.PatchSpec(allow_unaligned=True, max_batch=5))
        assert plan.stack is None and plan.starts == ()
        forced = patch_prefix._plan(_OnDevice(tiny, device), pairs, groups, P.PatchSpec(allow_unaligned=True, max_batch=5, skip_prefix=True))
        assert forced.starts == (2, 3)

MIXED_GROUPS = [
    [Head(layer=1, head=0), MlpOut(layer=3)],
    Resid(layer=2, pos=-1),
    Neuron(layer=3, index=5),
    Head(layer=0, head=2),
    [Resid(layer=1), AttnOut(layer=2)],
    Resid(layer=3),
    [AttnOut(layer=3), Head(layer=2, head=1)],
    [Resid(layer=2, pos=-2), Resid(layer=3, pos=-1), Neuron(layer=2, index=0)],
]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("max_batch", [1, 4, 1000])
def test_prefix_skip_equals_the_full_forward_for_groups_across_layers(tiny, metric, direction, max_batch):
    skipped = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, MIXED_GROUPS,
                                 P.PatchSpec(allow_unaligned=True, direction=direction, max_batch=max_batch))
    full = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, MIXED_GROUPS,
                              P.PatchSpec(allow_unaligned=True, direction=direction, max_batch=max_batch, skip_prefix=False))
    _assert_same(skipped, full)
    assert (skipped.effect.abs() > 1e-3).any(), "the groups must actually change the metric"


def test_prefix_skip_with_whole_residual_at_the_start_layer_is_the_source_run(tiny, metric):
    """Resid(layer=L) at all positions is patched *after* the injected base residual."""
    result = P.patch_components(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric,
                                [Resid(layer=layer) for layer in range(1, tiny.n_layers)])
    torch.testing.assert_close(result.metric, result.source.expand_as(result.metric), atol=ATOL, rtol=0)


def _add(act, hook, *, value):
    return act + value


@dataclass(frozen=True)
class _BridgeName:
    """A site's hook point under the bridge's own name, not the alias :func:`hook_name` gives."""

    site: Any


def _hooked_name(handle, site) -> str:
    if isinstance(site, _BridgeName):
        return handle.bridge.hook_dict[hook_name(site.site)].name
    return hook_name(site)


@pytest.mark.parametrize("sites", [
    (Resid(layer=0),),
    (Embed(), Resid(layer=2)),  # the latter is a start layer's injection point
    (_BridgeName(Resid(layer=1)), Head(layer=2, head=0), MlpOut(layer=3)),  # another name, inside and after
])
def test_prefix_skip_keeps_corruption_hooks_exact(tiny, metric, sites):
    """Corruption hooks of the base run act once: in the cached residual or in the run, never twice."""
    names = [_hooked_name(tiny, site) for site in sites]
    hooks = tuple((name, partial(_add, value=0.05 * (i + 1))) for i, name in enumerate(names))
    for groups in (MIXED_GROUPS, [Resid(layer=layer, pos=-1) for layer in range(tiny.n_layers)]):
        skipped = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, groups,
                                     P.PatchSpec(allow_unaligned=True, corrupt_hooks=hooks, max_batch=7))
        full = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, groups,
                                  P.PatchSpec(allow_unaligned=True, corrupt_hooks=hooks, max_batch=7, skip_prefix=False))
        _assert_same(skipped, full)
        assert (skipped.corrupted - skipped.clean).abs().max() > 1e-3, "the corruption must do something"


def test_prefix_skip_falls_back_for_name_filter_hooks(probed, metric):
    tiny = probed
    hooks = ((lambda name: name == hook_name(Resid(layer=2)), partial(_add, value=0.1)),)
    calls, handles = _layer_calls(tiny)
    try:
        skipped = P.patch_attn_out(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric,
                                   P.PatchSpec(allow_unaligned=True, corrupt_hooks=hooks, max_batch=2))
    finally:
        for handle in handles:
            handle.remove()
    full = P.patch_attn_out(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric,
                            P.PatchSpec(allow_unaligned=True, corrupt_hooks=hooks, max_batch=2, skip_prefix=False))
    _assert_same(skipped, full)
    assert calls[0] == calls[tiny.n_layers - 1], "a name filter's reach is unknown: every copy runs all layers"


def test_prefix_skip_falls_back_without_a_plain_layer_list(tiny, metric):
    from types import SimpleNamespace

    fake = SimpleNamespace(hf_model=SimpleNamespace(model=SimpleNamespace(layers=list(tiny.bridge.blocks))),
                           bridge=tiny.bridge, n_layers=tiny.n_layers)
    assert patch_prefix._layer_stack(fake) is None
    fake.hf_model = SimpleNamespace()  # no .model at all
    assert patch_prefix._layer_stack(fake) is None
    assert patch_prefix._layer_stack(tiny) is tiny.hf_model.model


def test_prefix_skip_falls_back_when_the_probe_disagrees(tiny, metric, monkeypatch):
    """A model whose skipped forward differs from its full forward runs every layer, with a warning."""
    import weakref

    monkeypatch.setattr(patch_prefix, "_SKIP_VERIFIED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(patch_prefix, "_inject", lambda act, hook, *, resid: act)  # as if the injection were lost
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        skipped = P.patch_mlp_out(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, max_batch=5))
    assert patch_prefix._SKIP_VERIFIED[tiny.bridge] is False
    full = P.patch_mlp_out(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric,
                           P.PatchSpec(allow_unaligned=True, max_batch=5, skip_prefix=False))
    _assert_same(skipped, full)


def test_layer_list_is_restored_after_an_exception(tiny, metric, monkeypatch):
    layers = tiny.hf_model.model.layers
    seen = []

    def broken_splice(act, hook, **kwargs):
        seen.append(len(tiny.hf_model.model.layers))
        raise RuntimeError("hook failed")

    monkeypatch.setattr(patch_sites, "_splice", broken_splice)
    with pytest.raises(RuntimeError, match="hook failed"):
        P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(allow_unaligned=True, layers=(2,)))
    assert seen and seen[0] < tiny.n_layers, "the exception must be raised inside a skipped forward"
    assert tiny.hf_model.model.layers is layers and len(layers) == tiny.n_layers
    assert all(layer is block for layer, block in zip(layers, tiny.bridge.blocks))
    monkeypatch.undo()
    # and the model still runs every layer afterwards
    ids, mask = tiny.encode(UNEQUAL_CLEAN)
    with torch.no_grad():
        last = hook_name(ResidPost(layer=tiny.n_layers - 1))
        _, cache = tiny.bridge.run_with_cache(ids, attention_mask=mask, names_filter=[last])
    assert cache[last].shape[0] == len(UNEQUAL_CLEAN)


# ----------------------------------------------------------------------------- attribution patching

def _nudge(act, hook, *, eps, direction):
    return act + eps * direction


def _perturbed_spec(tiny, eps):
    """Corrupted = the clean prompts with eps * a fixed unit direction added to every embedding.

    (The tiny model's embeddings have norm ~0.5, so eps 0.04 is already a large nudge.)
    """
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(tiny.d_model, generator=generator)
    direction = direction / direction.norm()
    return P.PatchSpec(allow_unaligned=True, corrupt_hooks=((hook_name(Resid(layer=0)), partial(_nudge, eps=eps, direction=direction)),))


def _relative_error(estimate, exact):
    return float((estimate - exact).norm() / exact.norm())


EPSILONS = (0.04, 0.01, 0.0025)


def test_atp_is_exact_patching_to_first_order(tiny, metric):
    """The AtP error relative to exact patching shrinks linearly with the perturbation."""
    neurons = tuple(range(0, tiny.d_mlp, 8))
    errors = {}
    for eps in EPSILONS:
        spec = _perturbed_spec(tiny, eps)
        atp = P.attribution_patch(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, spec)
        heads = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, spec)
        cells = P.patch_neurons(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, spec, neurons=neurons)
        errors[eps] = (_relative_error(atp.heads, heads.effect),
                       _relative_error(atp.neurons[:, list(neurons)], cells.effect))
        if eps == EPSILONS[-1]:
            both = torch.stack([atp.heads.flatten(), heads.effect.flatten()])
            assert torch.corrcoef(both)[0, 1] > 0.99
    for kind in (0, 1):
        large, middle, small = (errors[eps][kind] for eps in EPSILONS)
        assert small < middle < large, errors
        assert small < 0.25 * large, errors  # first order: eps / 16 should divide the error by ~16
        assert small < 0.02, errors


def test_atp_noising_mirrors_denoising_to_first_order(tiny, metric):
    spec = _perturbed_spec(tiny, EPSILONS[-1])
    noise = P.attribution_patch(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric,
                                P.PatchSpec(allow_unaligned=True, direction="noising", corrupt_hooks=spec.corrupt_hooks))
    exact = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric,
                          P.PatchSpec(allow_unaligned=True, direction="noising", corrupt_hooks=spec.corrupt_hooks))
    assert _relative_error(noise.heads, exact.effect) < 0.02
    torch.testing.assert_close(noise.base, noise.clean)


def test_verify_top_k_patches_the_atp_ranked_heads_exactly(tiny, metric):
    atp = P.attribution_patch(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, UNALIGNED, neurons=False)
    assert atp.neurons is None
    check = P.verify_top_k(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, atp, k=5, spec=UNALIGNED)
    magnitudes = [abs(float(atp.heads[h.layer, h.head].mean())) for h in check.heads]
    assert len(check.heads) == 5 and magnitudes == sorted(magnitudes, reverse=True)
    assert magnitudes[-1] >= float(atp.heads.mean(-1).abs().flatten().kthvalue(tiny.n_layers * tiny.n_heads - 4).values)
    full = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, UNALIGNED)
    for row, head in enumerate(check.heads):
        torch.testing.assert_close(check.exact[row], full.effect[head.layer, head.head], atol=ATOL, rtol=0)
        torch.testing.assert_close(check.atp[row], atp.heads[head.layer, head.head])
    torch.testing.assert_close(atp.clean, full.clean, atol=ATOL, rtol=0)
    torch.testing.assert_close(atp.corrupted, full.corrupted, atol=ATOL, rtol=0)


def test_rank_agreement_is_seeded_and_bounded(tiny, metric):
    spec = _perturbed_spec(tiny, EPSILONS[-1])
    atp = P.attribution_patch(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, spec, neurons=False)
    exact = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CLEAN, metric, spec)
    first = P.rank_agreement(atp.heads.mean(-1), exact.effect.mean(-1), n_boot=500, seed=3)
    again = P.rank_agreement(atp.heads.mean(-1), exact.effect.mean(-1), n_boot=500, seed=3)
    assert first == again
    assert first.value > 0.95 and first.ci_low <= first.value <= first.ci_high <= 1.0
    assert first.n == tiny.n_layers * tiny.n_heads
    reversed_ = P.rank_agreement(atp.heads.mean(-1), -exact.effect.mean(-1), n_boot=200, seed=3)
    assert reversed_.value == pytest.approx(-first.value)


# ----------------------------------------------------------------------------- positions that correspond

def test_every_position_patch_refuses_pairs_of_unequal_length(tiny, metric):
    # Aligned from the end, the longer prompt's system and instruction tokens would receive the
    # other prompt's activations from shifted positions: such a patch measures nothing.
    with pytest.raises(P.UnalignedPairsError, match="differ in token length"):
        P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric)
    with pytest.raises(P.UnalignedPairsError):
        P.attribution_patch(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric)
    assert P.patch_heads(tiny, EQUAL_CLEAN, EQUAL_CORRUPTED, metric).positions is None


def test_post_instruction_patch_touches_only_the_template_positions(tiny, metric):
    from instruments.positions import post_instruction_length

    n = post_instruction_length(tiny)
    spec = P.PatchSpec(positions=n, direction="noising")
    window = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, [MlpOut(layer=1)], spec)
    by_pos = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric,
                                [[Resid(layer=0, pos=p) for p in range(-n, 0)]], P.PatchSpec(positions=n))
    assert window.positions == n and window.n_pairs == len(UNEQUAL_CLEAN)
    # the template's tokens are the same in both prompts: patching their embeddings changes nothing
    torch.testing.assert_close(by_pos.metric[0], by_pos.base, atol=1e-5, rtol=0)
    # and a window patch equals the naive splice restricted to those positions
    expected = _naive(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, "noising",
                      [(hook_name(MlpOut(layer=1)), (slice(-n, None),))])
    torch.testing.assert_close(window.metric, expected, atol=ATOL, rtol=0)
    atp = P.attribution_patch(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(positions=n))
    assert atp.positions == n


def test_patch_result_keeps_its_positions_through_a_checkpoint(tiny, metric):
    res = P.patch_heads(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, P.PatchSpec(positions=4, layers=(1,)))
    back = P.PatchResult.from_tensors(res.to_tensors(), res.metadata())
    assert back.positions == 4 and P.PatchResult.concat([back]).positions == 4


# ----------------------------------------------------------------------------- circuits in isolation

def test_complement_identities(tiny, metric):
    from instruments.positions import post_instruction_length

    n = post_instruction_length(tiny)
    spec = P.PatchSpec(positions=n, direction="noising")
    everything = [*all_heads(tiny.n_layers, tiny.n_heads),
                  *(Neuron(layer=L, index=i) for L in range(tiny.n_layers) for i in range(tiny.d_mlp))]
    res = P.patch_complement(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, [everything, ()], spec)
    # keeping every unit is the clean run; keeping none rebuilds the corrupted run's residual in
    # the window (its embeddings are the same template tokens), so the last position is corrupted's
    torch.testing.assert_close(res.metric[0], res.clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(res.metric[1], res.corrupted, atol=1e-4, rtol=0)
    # all but one head kept = that one head patched alone
    head = Head(layer=2, head=1)
    rest = [c for c in everything if c != head]
    alone = P.patch_complement(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, [rest], spec)
    single = P.patch_components(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, [head], spec)
    torch.testing.assert_close(alone.metric[0], single.metric[0], atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="heads and neurons"):
        P.patch_complement(tiny, UNEQUAL_CLEAN, UNEQUAL_CORRUPTED, metric, [[MlpOut(layer=0)]], spec)
