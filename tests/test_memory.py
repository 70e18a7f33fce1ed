"""Memory: the analytic estimate against real parameter counts, and the per-phase peak reading."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import builders
from fixtures.config import RefusalConfig
from fixtures.memory import GIB, QUANT_BYTES, estimate_memory, measure
from fixtures.models import load_model

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M-Instruct config.json (the fields the estimate reads)
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
}
LLAMA_3_8B = {  # meta-llama/Meta-Llama-3-8B-Instruct config.json
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
}


def _real_param_count(config: dict) -> int:
    """Build the real HF Llama on the meta device (no memory, no download) and count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    return sum(p.numel() for p in model.parameters())


def test_tiny_param_count_matches_the_loaded_model(tiny):
    config = json.loads((builders.build_tiny(seed=0) / "config.json").read_text())
    estimate = estimate_memory(config, quant="none", dtype="float32", device="cpu")
    assert estimate.n_params == sum(p.numel() for p in tiny.hf_model.parameters())
    # at full precision every parameter costs its dtype's bytes, nothing more
    assert estimate.weights_bytes == estimate.n_params * 4


@pytest.mark.parametrize(("config", "expected"), [(SMOLLM2_135M, 134_515_008), (LLAMA_3_8B, 8_030_261_248)],
                         ids=["smollm2-135m", "llama-3-8b"])
def test_param_count_of_published_configs(config, expected):
    assert estimate_memory(config, quant="none", dtype="float16", device="cpu").n_params == expected
    assert _real_param_count(config) == expected


def test_llama3_8b_nf4_fits_a_16gb_mac():
    estimate = estimate_memory(LLAMA_3_8B, quant="nf4", dtype="float16", device="mps")
    assert 5 * GIB < estimate.weights_bytes < 7 * GIB
    assert estimate.total_bytes < 16 * GIB
    full = estimate_memory(LLAMA_3_8B, quant="none", dtype="float16", device="mps")
    assert full.weights_bytes == 2 * full.n_params  # ~15 GiB at fp16: does not fit with the runtime
    assert full.total_bytes > 16 * GIB
    assert "GiB (weights" in estimate.describe()
    assert estimate.to_dict()["total_bytes"] == estimate.total_bytes


def test_quantization_only_shrinks_block_linears():
    fp16 = estimate_memory(LLAMA_3_8B, quant="none", dtype="float16", device="cuda")
    nf4 = estimate_memory(LLAMA_3_8B, quant="nf4", dtype="float16", device="cuda")
    int8 = estimate_memory(LLAMA_3_8B, quant="int8", dtype="float16", device="cuda")
    d, vocab = 4096, 128256
    unquantized = 2 * vocab * d + 32 * 2 * d + d  # embeddings, unembedding and norms stay fp16
    block_linear = fp16.n_params - unquantized
    assert int8.weights_bytes == int(block_linear * 1.0 + unquantized * 2)
    assert nf4.weights_bytes == int(block_linear * QUANT_BYTES["nf4"] + unquantized * 2)
    assert nf4.weights_bytes < int8.weights_bytes < fp16.weights_bytes
    # activations and the KV cache do not depend on how the weights are stored
    assert nf4.activations_bytes == fp16.activations_bytes and nf4.kv_cache_bytes == fp16.kv_cache_bytes


def test_estimate_grows_with_sequence_and_batch():
    base = estimate_memory(SMOLLM2_135M, quant="none", dtype="float32", device="cpu", seq_len=128)
    longer = estimate_memory(SMOLLM2_135M, quant="none", dtype="float32", device="cpu", seq_len=256)
    double = estimate_memory(SMOLLM2_135M, quant="none", dtype="float32", device="cpu", seq_len=128, batch=2)
    assert longer.kv_cache_bytes == 2 * base.kv_cache_bytes
    assert double.activations_bytes == 2 * base.activations_bytes
    assert longer.weights_bytes == base.weights_bytes


def test_measure_around_loading_tiny_is_positive():
    with measure("cpu") as reading:
        handle, info = load_model(RefusalConfig(model="tiny", device="cpu", dtype="float32"))
    assert reading.device == "cpu" and reading.kind
    assert reading.peak_bytes > 0
    # the phase peak can never exceed the process's lifetime peak
    assert reading.extra["process_peak_rss_bytes"] >= reading.peak_bytes
    assert info["memory_estimate"]["n_params"] == sum(p.numel() for p in handle.hf_model.parameters())
    assert reading.to_dict()["peak_bytes"] == reading.peak_bytes


_PROBE = """
import json, torch
from fixtures.memory import measure
with measure("cpu") as baseline:
    pass
with measure("cpu") as reading:
    block = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, every page touched
    block.add_(1)
    del block
with measure("cpu") as after:
    pass
print(json.dumps([r.to_dict() for r in (baseline, reading, after)]))
"""


def test_measure_sees_a_200mb_allocation():
    # In a fresh process: after heavy tests this one holds freed-but-resident memory that a
    # new allocation can reuse without raising RSS (seen in CI), which says nothing about measure().
    import json
    import os
    import subprocess
    import sys

    from fixtures.storage import REPO_ROOT

    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    baseline, reading, after = json.loads(out.stdout.strip().splitlines()[-1])
    if not baseline["kind"].startswith("VmHWM"):
        pytest.skip("this OS cannot reset the peak RSS, so a phase peak is the process peak")
    assert reading["peak_bytes"] - baseline["peak_bytes"] >= 150 * 10 ** 6
    # freed memory is no longer counted: the peak is per phase...
    assert after["peak_bytes"] < reading["peak_bytes"] - 100 * 10 ** 6
    # ...but the process's lifetime peak survives the per-phase reset
    assert after["extra"]["process_peak_rss_bytes"] >= reading["peak_bytes"]
