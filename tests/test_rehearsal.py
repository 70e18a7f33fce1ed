"""Rehearsal models and the rehearsal mode: the flagship's shape with random weights, every stage run.

The real ``llama3-8b-random`` is 128k x 4096 embeddings plus 218M parameters a layer; these
tests build the same code path at a shrunken width (``SHAPES`` patched), and check the
tokenizer, template and shape facts of the real one without writing its weights.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fixtures import rehearsal
from fixtures.config import REHEARSAL_DESIGN, RefusalConfig, resolve
from fixtures.data import DatasetError, load_prompts
from fixtures.models import REGISTRY, ModelLoadError, is_rehearsal, load_model

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

MINI = dict(rehearsal.SHAPES["llama3-8b"], hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_hidden_layers=3)


@pytest.fixture()
def mini_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_CIRCUITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(rehearsal.SHAPES, "mini", MINI)
    return "mini"


@pytest.fixture(scope="module")
def tokenizer():
    return rehearsal.tokenizer_for(rehearsal._corpus())


def test_the_shapes_are_llama3s():
    s8, s70 = rehearsal.SHAPES["llama3-8b"], rehearsal.SHAPES["llama3-70b"]
    assert (s8["num_hidden_layers"], s8["hidden_size"], s8["num_attention_heads"], s8["num_key_value_heads"],
            s8["intermediate_size"], s8["vocab_size"], s8["rope_theta"]) == (32, 4096, 32, 8, 14336, 128256, 500000.0)
    assert (s70["num_hidden_layers"], s70["hidden_size"], s70["num_attention_heads"]) == (80, 8192, 64)
    # 8B parameters (Meta's card: 8.03B)
    n = sum(torch.Size(shape).numel() for _, shape, _ in rehearsal._tensors(s8, 32))
    assert 8.0e9 < n < 8.1e9


def test_tokenizer_has_llama3s_vocabulary_and_template(tokenizer):
    assert len(tokenizer) == 128256
    assert tokenizer.convert_tokens_to_ids("<|begin_of_text|>") == 128000
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.bos_token == "<|begin_of_text|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                         add_generation_prompt=True, tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow do I bake bread?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # word-sized pieces, as a real BPE gives: not one token per byte
    assert len(ids) < 25 and ids[0] == 128000 and ids[-5] == 128009
    assert tokenizer.decode(ids) == text
    # the filler entries only pad the vocabulary: BPE never emits them
    prompts = [p.harmful for p in load_prompts().pairs[:50]]
    used = {i for p in prompts for i in tokenizer(p, add_special_tokens=False)["input_ids"]}
    assert not any(tokenizer.convert_ids_to_tokens(i).startswith("<unused_") for i in used)


def test_layers_resolve_by_device():
    assert rehearsal.resolve_layers(0, "llama3-8b", "cpu") == rehearsal.CPU_LAYERS
    assert rehearsal.resolve_layers(0, "llama3-8b", "cuda") == 32
    assert rehearsal.resolve_layers(5, "llama3-8b", "cpu") == 5
    with pytest.raises(ValueError, match="has 32 layers"):
        rehearsal.resolve_layers(33, "llama3-8b", "cpu")
    with pytest.raises(ModelLoadError, match="--rehearsal-layers 99"):
        REGISTRY["llama3-8b-random"].materialize(REGISTRY["llama3-8b-random"],
                                                 RefusalConfig(model="llama3-8b-random", rehearsal_layers=99))


def test_build_is_seeded_sharded_and_loads_on_the_shared_path(mini_shape):
    folder = rehearsal.build_rehearsal(mini_shape, n_layers=3, seed=0)
    manifest = json.loads((folder / "manifest.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert manifest["rehearsal"] and manifest["n_layers"] == 3 and manifest["full_layers"] == MINI["num_hidden_layers"]
    assert len(manifest["weight_files"]) == 5  # embeddings, one shard per layer, the norm and head
    assert set(index["weight_map"].values()) == set(manifest["weight_files"])
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["vocab_size"], config["rope_parameters"]["rope_theta"]) == (3, 128256, 500000.0)
    # a weight depends on (seed, name) alone: the same tensor in a 2-layer build is identical
    from safetensors.torch import load_file

    two = rehearsal.build_rehearsal(mini_shape, n_layers=2, seed=0)
    name = "model.layers.1.mlp.up_proj.weight"
    a = load_file(str(folder / index["weight_map"][name]))[name]
    b_index = json.loads((two / "model.safetensors.index.json").read_text())
    b = load_file(str(two / b_index["weight_map"][name]))[name]
    assert torch.equal(a, b) and a.dtype == torch.bfloat16 and 0.015 < a.float().std() < 0.025
    other = rehearsal.build_rehearsal(mini_shape, n_layers=2, seed=1)
    c = load_file(str(other / b_index["weight_map"][name]))[name]
    assert not torch.equal(a, c)
    # loaded through the one path every model takes, quantization included
    for quant in ("none", "nf4"):
        from fixtures.models import _local_folder  # noqa: F401 - the path load_model takes

        handle, info = load_model(RefusalConfig(model=str(folder), quant=quant, device="cpu"))
        assert handle.n_layers == 3 and handle.tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
        ids, mask = handle.encode(["How do I bake bread?"])
        with torch.no_grad():
            logits = handle.bridge(ids, attention_mask=mask)
        assert logits.shape[-1] == 128256 and torch.isfinite(logits).all()
        assert handle.weights_sha256 == manifest["weights_sha256"]


def test_rehearsal_models_imply_the_rehearsal_design():
    assert is_rehearsal(RefusalConfig(model="llama3-8b-random"))
    assert not is_rehearsal(RefusalConfig(model="organism")) and is_rehearsal(RefusalConfig(rehearsal=True))
    models = frozenset(a for a, s in REGISTRY.items() if s.rehearsal)
    assert models == {"llama3-8b-random", "llama3-70b-random"}
    implied = resolve({"model": "llama3-8b-random"}, rehearsal_models=models)
    assert implied.rehearsal and all(getattr(implied, k) == v for k, v in REHEARSAL_DESIGN.items())
    # phase 4 asserts integrated gradients' completeness, which 4 steps missed on the random model
    assert "ig_steps" not in REHEARSAL_DESIGN and implied.ig_steps == RefusalConfig().ig_steps
    # a knob given explicitly wins over the rehearsal design
    given = resolve({"model": "llama3-8b-random", "patch_pairs": "12"}, rehearsal_models=models)
    assert given.patch_pairs == 12 and given.sweep_pairs == REHEARSAL_DESIGN["sweep_pairs"]
    flagged = resolve({"model": "organism", "rehearsal": "true"}, rehearsal_models=models)
    assert flagged.rehearsal and flagged.pairs_per_category == REHEARSAL_DESIGN["pairs_per_category"]
    plain = resolve({"model": "organism"}, rehearsal_models=models)
    assert not plain.rehearsal and plain.patch_pairs == RefusalConfig().patch_pairs


def test_subsample_takes_the_first_pairs_of_each_category_and_split():
    data = load_prompts()
    small = data.subsample(2)
    for cat in data.categories:
        for split in ("train", "val", "test"):
            assert small.by_category(cat, split) == data.by_category(cat, split)[:2]
    assert small.sha256 != data.sha256 and data.subsample(0) is data
    with pytest.raises(DatasetError, match="0 \\(all\\) or positive"):
        data.subsample(-1)


def test_a_rehearsal_computes_every_stage_and_claims_nothing():
    from fixtures.planted import random_null, selfvalidation_config
    from hypotheses.study import StudyData, run_study
    from hypotheses.verdicts import REHEARSAL_NOTE

    null = random_null(0)  # a random model: the behaviour gate stops an honest study before any H stage
    data = StudyData.from_prompt_set(null.dataset)
    cfg = selfvalidation_config(n_bootstrap=200)
    gated = run_study(null.handle, data, null.tokens, cfg)
    assert not gated.behaviour.present
    heavy = {"h1_ablation", "h1_control", "circuit_ablation", "circuit_control", "verified", "effect_share",
             "cross_category", "block_direct", "gradient_vs_patching"}
    assert not heavy & set(gated.clock.seconds)
    study = run_study(null.handle, data, null.tokens, replace(cfg, rehearsal=True))
    assert heavy <= set(study.clock.seconds), heavy - set(study.clock.seconds)
    assert len(study.verdicts) == len(gated.verdicts)
    assert all(v.status == "inconclusive" and v.numbers["rehearsal"] and v.summary.startswith(REHEARSAL_NOTE)
               for v in study.verdicts)
