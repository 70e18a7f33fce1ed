"""Checkpointed layer sweeps resume without recomputing, and the activation cache reuses disk."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fixtures.storage import atomic_save_tensors
from fixtures.sweeps import SweepKeyError, cached_activations, run_layer_sweep
from instruments import patching as P
from instruments.components import Head, Resid, hook_name
from instruments.metrics import fallback_tokens, refusal_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = [0, 1, 2, 3, 4]


class Interrupted(RuntimeError):
    pass


def _layer_fn(calls: list[int], *, fail_at: int | None = None):
    def fn(*, layers):
        (layer,) = layers
        calls.append(layer)
        if layer == fail_at:
            raise Interrupted(f"killed at layer {layer}")
        return {"metric": torch.full((1, 3), float(layer)) + torch.arange(3.0),
                "kl": torch.full((1, 2, 2), 10.0 * layer)}
    return fn


def test_interrupted_sweep_resumes_without_recomputing(tmp_path):
    first: list[int] = []
    with pytest.raises(Interrupted):
        run_layer_sweep(_layer_fn(first, fail_at=2), LAYERS, tmp_path / "ckpt", "sweep-a")
    assert first == [0, 1, 2]
    sweep_dir = tmp_path / "ckpt" / "sweep-a"
    assert sorted(p.name for p in sweep_dir.glob("*.safetensors")) == ["layer_0.safetensors", "layer_1.safetensors"]
    assert not list(sweep_dir.glob(".*.tmp")), "an interrupted layer must leave no partial file"

    second: list[int] = []
    resumed = run_layer_sweep(_layer_fn(second), LAYERS, tmp_path / "ckpt", "sweep-a")
    assert second == [2, 3, 4]  # layers 0 and 1 came from disk

    fresh: list[int] = []
    uninterrupted = run_layer_sweep(_layer_fn(fresh), LAYERS, tmp_path / "other", "sweep-a")
    assert fresh == LAYERS
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.equal(resumed[name], uninterrupted[name])
    assert resumed["metric"].shape == (5, 3) and resumed["kl"].shape == (5, 2, 2)

    third: list[int] = []
    again = run_layer_sweep(_layer_fn(third), LAYERS, tmp_path / "ckpt", "sweep-a")
    assert third == [] and torch.equal(again["metric"], uninterrupted["metric"])


def test_a_checkpoint_dir_of_another_sweep_is_refused(tmp_path):
    run_layer_sweep(_layer_fn([]), [0], tmp_path, "sweep-a")
    with pytest.raises(SweepKeyError, match="sweep-a"):
        run_layer_sweep(_layer_fn([]), [0], tmp_path, "sweep-b")
    with pytest.raises(ValueError, match="key"):
        run_layer_sweep(_layer_fn([]), [0], tmp_path / "x", "../escape")


def _truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def _bad_header(path):
    path.write_bytes(b"\xff" * 8 + b"not a safetensors header")


def _wrong_shape(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    atomic_save_tensors(path, {"metric": torch.zeros(2, 3), "kl": torch.zeros(1, 2, 2)}, metadata)


def _wrong_layer(path):
    from safetensors import safe_open

    other = path.with_name("layer_4.safetensors")
    with safe_open(str(other), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    atomic_save_tensors(path, tensors, metadata)  # layer 4's numbers under layer 3's name


@pytest.mark.parametrize("damage, why", [(_truncate, "unreadable: SafetensorError"),
                                         (_bad_header, "unreadable: SafetensorError"),
                                         (_wrong_shape, "differ from the other layers'"),
                                         (_wrong_layer, "it holds layer 4 of sweep 'sweep-a', not layer 3")],
                         ids=["truncated", "bad-header", "wrong-shape", "wrong-layer"])
def test_a_damaged_checkpoint_is_recomputed_and_the_rest_kept(tmp_path, monkeypatch, damage, why):
    from instruments import progress

    run_layer_sweep(_layer_fn([]), LAYERS, tmp_path / "heads-denoising", "sweep-a")
    sweep_dir = tmp_path / "heads-denoising" / "sweep-a"
    damaged = sweep_dir / "layer_3.safetensors"
    damage(damaged)
    kept = {p.name: p.stat().st_mtime_ns for p in sweep_dir.glob("layer_*.safetensors") if p != damaged}
    said: list[str] = []
    monkeypatch.setattr(progress, "note", said.append)

    calls: list[int] = []
    resumed = run_layer_sweep(_layer_fn(calls), LAYERS, tmp_path / "heads-denoising", "sweep-a")
    assert calls == [3]  # only the damaged layer was recomputed
    fresh = run_layer_sweep(_layer_fn([]), LAYERS, tmp_path / "fresh", "sweep-a")
    assert all(torch.equal(resumed[name], fresh[name]) for name in fresh)
    assert len(said) == 1 and said[0].startswith("checkpoint layer_3.safetensors of heads-denoising is damaged (")
    assert why in said[0] and said[0].endswith("; recomputing that layer")
    assert {p.name: p.stat().st_mtime_ns for p in sweep_dir.glob("layer_*.safetensors") if p != damaged} == kept
    assert not list(sweep_dir.glob(".*.tmp"))
    again: list[int] = []
    run_layer_sweep(_layer_fn(again), LAYERS, tmp_path / "heads-denoising", "sweep-a")
    assert again == [] and len(said) == 1  # the replacement is a good checkpoint


def test_a_damaged_checkpoint_of_a_patching_sweep_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    from instruments import progress

    metric = partial(refusal_score, tokens=fallback_tokens(tiny.tokenizer))
    clean, corrupted = ["How to build a bomb?"], ["How to build a shed?"]
    calls: list[int] = []

    def fn(*, layers):
        calls.extend(layers)
        return P.patch_heads(tiny, clean, corrupted, metric, P.PatchSpec(layers=layers, positions=8))

    first = run_layer_sweep(fn, range(tiny.n_layers), tmp_path, "heads", result_type=P.PatchResult)
    _truncate(tmp_path / "heads" / "layer_1.safetensors")
    monkeypatch.setattr(progress, "note", lambda line: None)
    calls.clear()
    resumed = run_layer_sweep(fn, range(tiny.n_layers), tmp_path, "heads", result_type=P.PatchResult)
    assert calls == [1] and resumed.coords == first.coords
    torch.testing.assert_close(resumed.metric, first.metric, atol=0, rtol=0)


def test_a_patching_sweep_streamed_by_layer_equals_the_full_sweep(tiny, tmp_path):
    metric = partial(refusal_score, tokens=fallback_tokens(tiny.tokenizer))
    clean, corrupted = ["How to build a bomb?", "Steal a car"], ["How to build a shed?", "Wash a car for me"]

    def fn(*, layers):
        return P.patch_heads(tiny, clean, corrupted, metric, P.PatchSpec(layers=layers, positions=8))

    streamed = run_layer_sweep(fn, range(tiny.n_layers), tmp_path, "heads", result_type=P.PatchResult)
    full = P.patch_heads(tiny, clean, corrupted, metric, P.PatchSpec(positions=8))
    assert streamed.axes == full.axes and streamed.coords == full.coords
    torch.testing.assert_close(streamed.metric, full.metric, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.kl, full.kl, atol=1e-5, rtol=0)
    reloaded = run_layer_sweep(None, range(tiny.n_layers), tmp_path, "heads", result_type=P.PatchResult)
    torch.testing.assert_close(reloaded.metric, streamed.metric, atol=0, rtol=0)


def test_cached_activations_load_from_disk_the_second_time(tiny, tmp_path):
    prompts = ["How to build a bomb?", "Hi", "Write a haiku about the sea"]
    names = [hook_name(Resid(layer=1)), hook_name(Head(layer=2, head=0))]
    forwards: list[int] = []

    def count(act, hook):
        forwards.append(act.shape[0])
        return act

    with tiny.bridge.hooks(fwd_hooks=[(hook_name(Resid(layer=0)), count)]):
        first = cached_activations(tiny, prompts, names, tmp_path, batch_size=2)
        assert sum(forwards) == len(prompts)
        second = cached_activations(tiny, prompts, names, tmp_path)
        assert sum(forwards) == len(prompts), "the second call must not run the model"
    assert set(first) == set(second) == set(names)
    for name in names:
        assert torch.equal(first[name], second[name])
    ids, mask = tiny.encode(prompts)
    _, cache = tiny.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
    for name in names:
        torch.testing.assert_close(first[name], cache[name], atol=1e-5, rtol=0)
    other = cached_activations(tiny, prompts[:2], names, tmp_path)
    assert other[names[0]].shape[0] == 2 and len(list(tmp_path.glob("activations-*.safetensors"))) == 2


def test_cached_generations_run_once_and_rederive_verdicts(tiny, tmp_path, monkeypatch):
    from fixtures.sweeps import cached_generations
    from instruments import behavior

    prompts = ["How to build a bomb?", "Hi", "Write a haiku about the sea"]
    calls: list[int] = []
    real = behavior.generate
    monkeypatch.setattr(behavior, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = cached_generations(tiny, prompts, max_new_tokens=4, batch_size=2, root=tmp_path)
    second = cached_generations(tiny, prompts, max_new_tokens=4, batch_size=2, root=tmp_path)
    assert len(calls) == 1, "the second call must read the disk, not generate"
    assert (second.texts, second.first_tokens, second.refused) == (first.texts, first.first_tokens, first.refused)
    assert second.refused == tuple(behavior.is_refusal(t) for t in second.texts)
    # another length or batch size is another key
    cached_generations(tiny, prompts, max_new_tokens=3, batch_size=2, root=tmp_path)
    cached_generations(tiny, prompts, max_new_tokens=4, batch_size=3, root=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    # verdicts come from the classifier of the day, not from the file
    monkeypatch.setattr(behavior, "is_refusal", lambda text, spec=None: True)
    assert all(cached_generations(tiny, prompts, max_new_tokens=4, batch_size=2, root=tmp_path).refused)
    assert len(calls) == 3
