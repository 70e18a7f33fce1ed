"""The model registry and the one loading path: errors with fixes, devices, dtypes, the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fixtures import builders
from fixtures.config import RefusalConfig
from fixtures.models import (REGISTRY, DeviceUnavailableError, ModelLoadError, check_memory_budget, load_model,
                             model_alias, resolve_device, resolve_dtype)
from fixtures.storage import sha256_file
from instruments.components import Head, Resid, hook_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(model: str, **kw) -> RefusalConfig:
    return RefusalConfig(model=model, device="cpu", **kw)


# ----------------------------------------------------------------------------- load errors

def test_unknown_alias_lists_known_aliases():
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg("not-a-model"))
    message = str(err.value)
    assert "'not-a-model'" in message
    known = {"tiny", "smollm2-135m-instruct", "organism", "llama3-8b-random", "llama3-70b-random"}
    for alias in known:
        assert alias in message
    assert set(REGISTRY) == known


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg(str(tmp_path)))
    assert "has no config.json" in str(err.value) and str(tmp_path) in str(err.value)


def test_pickled_bin_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text((builders.build_tiny(seed=0) / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg(str(tmp_path)))
    message = str(err.value)
    assert "no .safetensors weights" in message and "only safetensors are loaded" in message


def test_hub_id_missing_offline_names_cache_and_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "nonexistent-org/nonexistent-model-xyz"
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg(name))
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert f"huggingface-cli download {name}" in message and "pass a local folder to --model" in message


def _connection_errors():
    """The ways huggingface_hub reports a hub it cannot reach: its transport's errors, sockets, its own wrapper."""
    import errno

    import httpx
    import requests
    from huggingface_hub.errors import LocalEntryNotFoundError

    wrapped = LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")
    wrapped.__cause__ = httpx.ConnectError("[Errno -2] Name or service not known")
    return [httpx.ConnectError("[Errno -2] Name or service not known"),
            requests.ConnectionError("Max retries exceeded with url: /api/models/someone/does-not-exist"),
            OSError(errno.ENETUNREACH, "Network is unreachable"), wrapped]


@pytest.mark.parametrize("failure", _connection_errors(), ids=lambda e: type(e).__module__ + "." + type(e).__name__)
def test_hub_id_without_network_names_id_and_fixes(monkeypatch, failure):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise failure

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    name = "someone/does-not-exist"
    with pytest.raises(ModelLoadError) as err:
        load_model(_cfg(name))
    message = str(err.value)
    assert f"cannot load {name!r}" in message and "the Hugging Face hub cannot be reached" in message
    assert "local model folder to --model" in message and "HF_HUB_OFFLINE=1 with a cached copy" in message
    assert "where the hub can be reached" in message
    # the transport's own traceback is not chained onto the message
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_hub_failure_other_than_network_keeps_its_reason(monkeypatch):
    import huggingface_hub

    def broken(*args, **kwargs):
        raise ValueError("revision main has no config")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(ModelLoadError, match="could not fetch someone/model .*revision main has no config"):
        load_model(_cfg("someone/model"))


def test_model_alias_is_filesystem_safe():
    assert model_alias("tiny") == "tiny"
    assert model_alias("meta-llama/Llama-3-8B") == "meta-llama--Llama-3-8B"
    assert "/" not in model_alias("/abs/path/to/model/")


# ----------------------------------------------------------------------------- devices and dtypes

def _devices(monkeypatch, *, cuda: bool, mps: bool) -> None:
    """Change only what torch reports about the hardware."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_named_cuda_when_absent_is_an_error(monkeypatch):
    _devices(monkeypatch, cuda=False, mps=False)
    with pytest.raises(DeviceUnavailableError, match="--device cuda was requested but torch sees no CUDA device"):
        resolve_device("cuda")


def test_auto_is_cpu_without_accelerators(monkeypatch):
    _devices(monkeypatch, cuda=False, mps=False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_auto_prefers_cuda_then_mps(monkeypatch):
    _devices(monkeypatch, cuda=True, mps=True)
    assert resolve_device("auto") == "cuda"
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


def test_mps_path_sets_the_transformerlens_switches(monkeypatch):
    for var in ("TRANSFORMERLENS_ALLOW_MPS", "PYTORCH_ENABLE_MPS_FALLBACK"):
        # setenv records the original state (value or absence) so teardown restores it; a bare
        # delenv of an absent variable records nothing and would leak what resolve_device sets.
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)
    _devices(monkeypatch, cuda=False, mps=True)
    import os

    assert resolve_device("auto") == "mps"
    assert os.environ["TRANSFORMERLENS_ALLOW_MPS"] == "1"
    assert os.environ["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert resolve_dtype("auto", "mps") == torch.float16
    assert resolve_device("mps") == "mps"


def test_named_mps_when_absent_is_an_error(monkeypatch):
    _devices(monkeypatch, cuda=False, mps=False)
    with pytest.raises(DeviceUnavailableError, match=r"torch.backends.mps.is_available\(\) is False"):
        resolve_device("mps")


def test_unknown_device_and_explicit_dtypes():
    with pytest.raises(DeviceUnavailableError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bfloat16", "mps") == torch.bfloat16


# ----------------------------------------------------------------------------- memory budget

def test_memory_budget_too_small_names_the_estimate():
    with pytest.raises(ModelLoadError) as err:
        load_model(RefusalConfig(model="tiny", device="cpu", memory_budget_gb=0.01))
    message = str(err.value)
    assert "estimated footprint" in message and "exceeds --memory-budget 0.01 GiB" in message
    assert "GiB (weights" in message and "--quant nf4" in message


def test_memory_budget_large_enough_passes():
    estimate = check_memory_budget(builders.build_tiny(seed=0), budget_gib=64, quant="none", dtype=torch.float32,
                                   device="cpu")
    assert 0 < estimate["total_bytes"] <= 64 * 1024 ** 3


# ----------------------------------------------------------------------------- the tiny model

def test_tiny_has_grouped_query_attention(tiny):
    assert tiny.n_kv_heads < tiny.n_heads
    assert tiny.n_heads % tiny.n_kv_heads == 0
    attn = tiny.hf_model.model.layers[0].self_attn
    assert attn.k_proj.out_features == tiny.n_kv_heads * tiny.d_head
    assert attn.q_proj.out_features == tiny.n_heads * tiny.d_head
    assert tiny.describe()["n_kv_heads"] == tiny.n_kv_heads
    assert (tiny.device, tiny.dtype, tiny.quant) == ("cpu", torch.float32, "none")


def test_tiny_applies_its_chat_template(tiny):
    ids, mask = tiny.encode(["Hello there"])
    text = tiny.tokenizer.decode(ids[0][mask[0].bool()])
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert text == tiny.chat("Hello there")
    raw_ids, _ = tiny.encode(["Hello there"], chat=False)
    assert tiny.tokenizer.decode(raw_ids[0]) == "Hello there"


def test_encode_takes_a_sequence_not_a_string(tiny):
    with pytest.raises(TypeError, match="sequence of prompts"):
        tiny.encode("Hello")


def test_tiny_pads_on_the_left(tiny):
    short, long_ = "Hi", "A considerably longer prompt than the first one"
    ids, mask = tiny.encode([short, long_])
    assert mask[0, 0] == 0, "the short prompt must be padded at the start"
    assert torch.all(mask[:, -1] == 1), "position -1 must be every prompt's last token"
    assert torch.all(mask[1] == 1)
    assert torch.all(mask[0].diff() >= 0), "padding must be a prefix"
    n_pad = int((mask[0] == 0).sum())
    assert torch.all(ids[0, :n_pad] == tiny.tokenizer.pad_token_id)
    alone, _ = tiny.encode([short])
    assert torch.equal(ids[0, n_pad:], alone[0])


def test_prompt_longer_than_context_is_refused(tiny):
    with pytest.raises(ValueError, match=r"longer than the model's context of 1024"):
        tiny.encode(["short", "x" * (tiny.n_ctx + 10)])


def test_weights_hash_is_the_safetensors_sha256(tiny):
    folder = builders.build_tiny(seed=0)
    assert tiny.weights_sha256 == sha256_file(folder / "model.safetensors")
    assert json.loads((folder / "manifest.json").read_text())["weights_sha256"] == tiny.weights_sha256


def test_nf4_tiny_quantizes_linear_layers_and_keeps_hooks():
    bnb = pytest.importorskip("bitsandbytes")
    handle, info = load_model(RefusalConfig(model="tiny", device="cpu", quant="nf4"))
    assert handle.quant == "nf4" and info["memory_estimate"]["n_params"] > 0
    block_linears = [m for name, m in handle.hf_model.named_modules()
                     if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    assert len(block_linears) == handle.n_layers * 7  # q, k, v, o, gate, up, down
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in block_linears)
    seen = []

    def hook(z, hook):
        seen.append(tuple(z.shape))
        return z

    ids, mask = handle.encode(["Hello", "How are you today?"])
    with handle.bridge.hooks(fwd_hooks=[(hook_name(Head(layer=0, head=0)), hook)]):
        logits = handle.bridge(ids, attention_mask=mask)
    assert seen == [(2, ids.shape[1], handle.n_heads, handle.d_head)]
    assert torch.isfinite(logits).all()


def test_nf4_model_stays_differentiable_after_a_plain_forward():
    # bitsandbytes repacks 4-bit weights for a backward-less kernel on AVX512-BF16 CPUs at the
    # first no-grad forward; the loader turns that off, so gradients reach hook_z afterwards
    bnb = pytest.importorskip("bitsandbytes")
    handle, _ = load_model(RefusalConfig(model="tiny", device="cpu", quant="nf4"))
    layers = [m for m in handle.hf_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    ids, mask = handle.encode(["Hello", "How are you today?"])
    with torch.no_grad():
        handle.bridge(ids, attention_mask=mask)  # where the repacking would happen
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    store = {}

    def keep(z, hook):
        store["z"] = z
        return z

    def leaf(resid, hook):
        return resid.detach().requires_grad_(True)

    with torch.enable_grad(), handle.bridge.hooks(fwd_hooks=[(hook_name(Resid(layer=0)), leaf),
                                                             (hook_name(Head(layer=0, head=0)), keep)]):
        logits = handle.bridge(ids, attention_mask=mask)
        (grad,) = torch.autograd.grad(logits[:, -1].float().sum(), [store["z"]])
    assert grad.abs().sum() > 0


# ----------------------------------------------------------------------------- deterministic builds

def test_tiny_build_is_cached_and_deterministic(tmp_path, monkeypatch):
    first, second = builders.build_tiny(seed=0), builders.build_tiny(seed=0)
    assert first == second
    sha = json.loads((first / "manifest.json").read_text())["weights_sha256"]
    assert sha == sha256_file(first / "model.safetensors")

    monkeypatch.setenv("REFUSAL_CIRCUITS_CACHE", str(tmp_path))
    fresh = builders.build_tiny(seed=0)
    assert fresh.is_relative_to(tmp_path) and fresh.name == first.name
    assert sha256_file(fresh / "model.safetensors") == sha
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir() and p != fresh]
    assert not leftovers, f"temporary build folders left behind: {leftovers}"

    other = builders.build_tiny(seed=1)
    assert other != fresh and sha256_file(other / "model.safetensors") != sha


def test_build_once_replaces_a_folder_without_manifest(tmp_path, monkeypatch):
    """A crash mid-build leaves no manifest; the next build must redo it, not trust it."""
    monkeypatch.setenv("REFUSAL_CIRCUITS_CACHE", str(tmp_path))
    stale = builders.models_root() / "thing-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "garbage.txt").write_text("half-written")

    def build(folder):
        (folder / "model.safetensors").write_bytes(b"weights")
        return {"extra": 1}

    out = builders.build_once("thing", "0123456789abcdef" + "f" * 48, build)
    assert out == stale and not (out / "garbage.txt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"] == 1 and manifest["weights_sha256"] == sha256_file(out / "model.safetensors")
    calls = []
    assert builders.build_once("thing", "0123456789abcdef" + "f" * 48, lambda f: calls.append(f) or {}) == out
    assert not calls, "a finished build must not be rebuilt"
    shutil.rmtree(out)
