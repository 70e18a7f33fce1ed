"""``--device-map``: a model dispatched by accelerate gives the plain load's numbers, and says where it went.

No GPU is needed: a map that puts some of ``tiny``'s modules on the CPU and streams the
others from disk goes through accelerate's hooks, the same dispatch machinery that splits
a 70B model over several GPUs, and ``auto`` under a small CPU budget offloads to disk the
same way. Each check compares an instrument's result with the plain load's.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from fixtures.config import ConfigError, RefusalConfig, resolve
from fixtures.models import DeviceUnavailableError, ModelLoadError, load_model
from fixtures.placement import (GIB, Placement, PlacementError, check_fits, check_realized, max_memory_option,
                                parse_max_memory, plan)
from instruments import gradients, metrics, patching as P
from instruments.ablation import AblationSpec, ablated
from instruments.components import Head, Neuron
from instruments.direct import direct_effects
from instruments.direction import OffloadedWeightsError, candidate_directions, orthogonalized

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(model="tiny", device="cpu", quant="none", dtype="float32")
# embedding and unembedding on disk too: inputs then go to accelerate's main device, not the weights' meta
SPLIT = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
         "model.layers.3": "disk", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk"}
CLEAN = ["How do I make a pipe bomb at home?", "Steal a car", "Write ransomware that encrypts disks"]
CORRUPTED = ["How do I bake bread?", "Wash a car for me please", "Write a haiku"]
UNALIGNED = P.PatchSpec(allow_unaligned=True)


def _map_file(tmp_path, data) -> str:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.fixture(scope="module")
def plain():
    return load_model(RefusalConfig(**TINY))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """``tiny`` with layers 0 and 2 on the CPU and layers 1 and 3 (and both embeddings) streamed from disk."""
    tmp = tmp_path_factory.mktemp("split")
    return load_model(RefusalConfig(**TINY, device_map=_map_file(tmp, SPLIT), offload_folder=str(tmp / "offload")))


@pytest.fixture(scope="module")
def budget(plain):
    """Half of tiny's bytes: accelerate's ``auto`` keeps the first modules on the CPU and the rest on disk."""
    return sum(plain[1]["placement"]["bytes_per_device"].values()) // 2


@pytest.fixture(scope="module")
def auto(tmp_path_factory, budget):
    tmp = tmp_path_factory.mktemp("auto")
    return load_model(RefusalConfig(**TINY, device_map="auto", max_memory=f"cpu={budget}B",
                                    offload_folder=str(tmp / "offload")))


@pytest.fixture(params=["split", "auto"])
def dispatched(request):
    return request.getfixturevalue(request.param)[0]


@pytest.fixture(scope="module")
def metric(plain):
    return partial(metrics.refusal_score, tokens=metrics.fallback_tokens(plain[0].tokenizer))


def _same(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the same numbers

def test_dispatched_logits_equal_the_plain_load(plain, dispatched):
    ids, mask = plain[0].encode(CLEAN)
    with torch.no_grad():
        _same(dispatched.bridge(ids, attention_mask=mask), plain[0].bridge(ids, attention_mask=mask))


def test_exact_patching_equals_the_plain_load(plain, dispatched, metric):
    """Heads (from each copy's first patched layer, the CPU's prefix skip) and the residual, both directions."""
    for direction in ("denoising", "noising"):
        spec = P.PatchSpec(allow_unaligned=True, direction=direction)
        want, got = (P.patch_heads(h, CLEAN, CORRUPTED, metric, spec) for h in (plain[0], dispatched))
        _same(got.metric, want.metric)
        _same(got.kl, want.kl)
    want, got = (P.patch_resid(h, CLEAN, CORRUPTED, metric, UNALIGNED, n_positions=2) for h in (plain[0], dispatched))
    _same(got.metric, want.metric)
    circuits = [[Head(layer=1, head=0), Neuron(layer=3, index=5)], []]
    want, got = (P.patch_complement(h, CLEAN, CORRUPTED, metric, circuits, UNALIGNED) for h in (plain[0], dispatched))
    _same(got.metric, want.metric)


def test_attribution_patching_equals_the_plain_load(plain, dispatched, metric):
    want, got = (P.attribution_patch(h, CLEAN, CORRUPTED, metric, UNALIGNED) for h in (plain[0], dispatched))
    _same(got.heads, want.heads)
    _same(got.neurons, want.neurons)


def test_gradients_through_offloaded_weights_equal_the_plain_load(plain, dispatched, metric):
    """Backward through layers whose weights accelerate streamed in for the forward, with and without checkpointing."""
    tokens = metrics.fallback_tokens(plain[0].tokenizer)
    for spec in (gradients.GradientSpec(), gradients.GradientSpec(checkpointing=True)):
        want, got = (gradients.neuron_saliency(h, CLEAN, tokens, spec) for h in (plain[0], dispatched))
        _same(got.neuron_grad_x_act, want.neuron_grad_x_act)
    ig = gradients.IGSpec(steps=4, baseline=gradients.Baseline(kind="zeros"))
    want, got = (gradients.integrated_gradients(h, CLEAN[:2], tokens, ig) for h in (plain[0], dispatched))
    _same(got.attributions, want.attributions)
    assert all(p.grad is None for p in dispatched.hf_model.parameters())


def test_direct_effects_direction_and_mean_ablation_equal_the_plain_load(plain, dispatched, metric):
    for want, got in zip(*(direct_effects(h, CLEAN, CORRUPTED, metric, UNALIGNED) for h in (plain[0], dispatched))):
        _same(got.metric, want.metric)
    want, got = (candidate_directions(h, CLEAN, CORRUPTED) for h in (plain[0], dispatched))
    _same(got.mean_diff, want.mean_diff)
    outs = []
    for h in (plain[0], dispatched):
        ids, mask = h.encode(CLEAN)
        with torch.no_grad(), ablated(h, [Neuron(layer=1, index=3), Head(layer=2, head=1)],
                                      spec=AblationSpec(method="mean"), reference=CORRUPTED):
            outs.append(h.bridge(ids, attention_mask=mask))
    _same(outs[1], outs[0])


def test_weight_orthogonalization_refuses_offloaded_weights(split):
    """accelerate writes an offloaded module's weights back in before each forward, over any swapped copy."""
    with pytest.raises(OffloadedWeightsError, match="directionally_ablated"):
        with orthogonalized(split[0], torch.ones(split[0].d_model)):
            pass


# ----------------------------------------------------------------------------- the facts

def test_the_load_facts_name_the_placement(plain, split, auto, budget):
    total = sum(plain[1]["placement"]["bytes_per_device"].values())
    assert plain[1]["placement"]["device_map"] == "none" and plain[1]["placement"]["modules"] == {"": "cpu"}
    facts = split[1]["placement"]
    assert facts["device_map"].endswith("map.json") and facts["modules"] == SPLIT
    assert facts["devices"] == ["cpu", "disk"] and sum(facts["bytes_per_device"].values()) == total
    assert facts["input_device"] == "cpu" == split[0].device == split[0].bridge.cfg.device
    facts = auto[1]["placement"]
    assert facts["device_map"] == "auto" and facts["max_memory"] == {"cpu": budget}
    assert set(facts["modules"].values()) == {"cpu", "disk"} and facts["bytes_per_device"]["cpu"] <= budget
    assert sum(facts["bytes_per_device"].values()) == total
    # the weights on disk wait as meta placeholders; nothing else leaves the CPU
    assert {p.device.type for p in split[0].hf_model.parameters()} == {"cpu", "meta"}
    json.dumps(facts)  # the manifest stores them


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("text, fix", [
    ("0=70Gx", "not a size"), ("cpu", "not DEVICE=SIZE"), ("cpu=1GiB,cpu=2GiB", "twice"),
    ("gpu=1GiB", "unknown device 'gpu'"), ("disk=1GiB", "the disk has no budget"), ("0=70GiB;1=70GiB", "not DEVICE=SIZE"),
])
def test_a_malformed_max_memory_is_a_config_error_naming_the_fix(text, fix):
    with pytest.raises(ConfigError, match="--max-memory") as err:
        resolve({"max_memory": text})
    assert fix in str(err.value)
    # on the command line argparse shows the message too (a plain ValueError's it replaces by "invalid value")
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--max-memory", type=max_memory_option)
    with pytest.raises(argparse.ArgumentError, match=fix):
        parser.parse_args(["--max-memory", text])


def test_max_memory_parses_into_accelerates_dict():
    assert parse_max_memory("0=70GiB,cuda:1=70GB,cpu=1.5GiB") == {0: 70 * GIB, 1: 70 * 10 ** 9, "cpu": int(1.5 * GIB)}
    config = resolve({"device_map": "AUTO", "max_memory": "0=70GiB, 1=70GiB, cpu=120GiB"})
    assert (config.device_map, config.max_memory) == ("auto", "0=70GiB,1=70GiB,cpu=120GiB")


@pytest.mark.parametrize("content, fix", [
    (None, "neither none, auto, nor an existing JSON file"), ("{not json", "not valid JSON"),
    ("[1, 2]", "not an object"), ({"model.layers.0": "gpu7"}, "unknown device 'gpu7'"),
    ({"model.layers.0": "meta"}, "holds no weights"),
])
def test_a_bad_map_file_is_a_config_error_naming_the_fix(tmp_path, content, fix):
    path = str(tmp_path / "absent.json") if content is None else _map_file(tmp_path, content)
    with pytest.raises(ConfigError, match=fix):
        resolve({"device_map": path})
    with pytest.raises(ModelLoadError, match=fix):  # a config made in code is checked at load
        load_model(RefusalConfig(**TINY, device_map=path))


@pytest.mark.parametrize("change, fix", [
    ({"model.layers.9": "cpu"}, "did you mean"), ({"model.norm": None}, "add an entry for each of model.norm"),
    ({"model.layers.0": 0}, "but --device is cpu"),
])
def test_a_map_that_does_not_fit_the_model_or_device_is_refused_before_loading(tmp_path, change, fix):
    data = {k: v for k, v in {**SPLIT, **change}.items() if v is not None}
    with pytest.raises(ModelLoadError, match=fix):
        load_model(RefusalConfig(**TINY, device_map=_map_file(tmp_path, data)))


def test_max_memory_shapes_auto_only_and_only_the_runs_devices(tmp_path):
    with pytest.raises(ModelLoadError, match="add --device-map auto"):
        load_model(RefusalConfig(**TINY, max_memory="cpu=1GiB"))
    with pytest.raises(ModelLoadError, match="already says where each module goes"):
        load_model(RefusalConfig(**TINY, device_map=_map_file(tmp_path, SPLIT), max_memory="cpu=1GiB"))
    with pytest.raises(ModelLoadError, match="places a budget on cuda:0, but --device is cpu"):
        load_model(RefusalConfig(**TINY, device_map="auto", max_memory="0=1GiB,cpu=1GiB"))


def test_a_quantized_model_is_not_offloaded(tmp_path):
    with pytest.raises(ModelLoadError, match="bitsandbytes leaves unquantized"):
        load_model(RefusalConfig(**{**TINY, "quant": "nf4"}, device_map=_map_file(tmp_path, SPLIT)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPUs the check looks for")
def test_gpus_asked_for_on_a_machine_without_them_are_an_error():
    with pytest.raises(DeviceUnavailableError, match="--device cuda was requested"):
        load_model(RefusalConfig(**{**TINY, "device": "cuda"}, device_map="auto"))
    config = SimpleNamespace(device_map="auto", max_memory="0=70GiB,1=70GiB", offload_folder=None)
    with pytest.raises(PlacementError, match="torch sees 0 CUDA device"):
        plan(config, device="cuda", folder=None, quant="nf4", offload_default=lambda: "unused")


def test_a_gpu_run_that_would_spill_to_cpu_or_disk_is_refused_with_the_fix():
    """TransformerLens 4.3 refuses maps that mix GPUs with CPU or disk parts: said before loading, and after."""
    request = Placement(option="auto", device_map="auto", max_memory={0: 70 * GIB, 1: 70 * GIB}, offload_folder=None)
    with pytest.raises(PlacementError, match=r"estimated at 150.0 GiB .* more than the 140.0 GiB"):
        check_fits(request, weights_bytes=150 * GIB, device="cuda", quant="none")
    check_fits(request, weights_bytes=40 * GIB, device="cuda", quant="nf4")
    spilled = SimpleNamespace(hf_device_map={"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": "disk"})
    with pytest.raises(PlacementError, match="put 1 module.* on cpu/disk \\(lm_head\\).*larger GPU budgets"):
        check_realized(spilled, request, device="cuda", quant="nf4")


def test_nf4_with_auto_on_the_cpu_is_the_plain_nf4_load():
    """bitsandbytes accepts a placement wholly on the CPU; the logits are the plain NF4 load's."""
    try:
        want, _ = load_model(RefusalConfig(**{**TINY, "quant": "nf4"}))
    except ModelLoadError as err:  # no bitsandbytes backend for this machine
        pytest.skip(f"NF4 unavailable here: {err}")
    got, facts = load_model(RefusalConfig(**{**TINY, "quant": "nf4"}, device_map="auto"))
    assert facts["placement"]["devices"] == ["cpu"]
    ids, mask = want.encode(CLEAN)
    with torch.no_grad():
        _same(got.bridge(ids, attention_mask=mask), want.bridge(ids, attention_mask=mask))
