"""Sweeps on Llama-3-8B at NF4 fit a 16 GB Mac by the estimator, because they stream per layer."""

from fixtures.memory import GIB
from fixtures.memory_phases import max_batch_for_budget, sweep_peak_bytes

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


def test_streamed_sweep_fits_16gb_and_streaming_is_what_saves_memory():
    budget = 16 * 0.8  # leave a fifth of a 16 GB Mac to the OS and other programs
    batch = max_batch_for_budget(LLAMA3_8B, budget_gib=budget, quant="nf4", dtype="float16", device="mps")
    assert batch >= 8
    streamed = sweep_peak_bytes(LLAMA3_8B, quant="nf4", dtype="float16", device="mps", max_batch=batch)
    assert streamed <= budget * GIB
    # patching every position (--refusal-patch-positions all), the sources cover every position
    kw = dict(quant="nf4", dtype="float16", device="mps", max_batch=batch, window=None)
    streamed = sweep_peak_bytes(LLAMA3_8B, **kw)
    whole = sweep_peak_bytes(LLAMA3_8B, streamed=False, **kw)
    assert streamed <= budget * GIB < 16 * GIB
    per_layer = (whole - streamed) / (LLAMA3_8B["num_hidden_layers"] - 1)
    # holding every layer's float16 cache (z, MLP post, two residuals) of 16 prompts would cost GBs
    assert per_layer > 0 and whole - streamed > 2 * GIB


def test_budget_bounds_the_batch():
    small = max_batch_for_budget(LLAMA3_8B, budget_gib=7.0, quant="nf4", dtype="float16", device="mps")
    large = max_batch_for_budget(LLAMA3_8B, budget_gib=12.0, quant="nf4", dtype="float16", device="mps")
    assert small < large
    assert max_batch_for_budget(LLAMA3_8B, budget_gib=4.0, quant="nf4", dtype="float16", device="mps") == 0
    assert max_batch_for_budget(LLAMA3_8B, budget_gib=6.0, quant="none", dtype="float16", device="mps") == 0


def test_atps_backward_bounds_the_batch_at_8b():
    """AtP runs its backward --refusal-max-batch prompts a chunk: at 8B its saved tensors, not the
    sweep's chunk, decide what fits, so the batch the study uses is the one both fit."""
    from fixtures.memory_phases import atp_peak_bytes

    kw = dict(quant="nf4", dtype="float16", device="mps")
    assert atp_peak_bytes(LLAMA3_8B, max_batch=64, **kw) > 16 * GIB > sweep_peak_bytes(LLAMA3_8B, max_batch=64, **kw)
    batch = max_batch_for_budget(LLAMA3_8B, budget_gib=16 * 0.8, **kw)
    assert 1 <= batch < 64 and atp_peak_bytes(LLAMA3_8B, max_batch=batch, **kw) <= 16 * 0.8 * GIB
