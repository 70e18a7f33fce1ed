"""The organism's recipe: only train data, deterministic training, a key that tracks its inputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fixtures import organism as O
from fixtures.data import load_everyday, load_heldout_style, load_prompts


def test_training_prompts_never_touch_held_out_data():
    harmful, harmless = O.training_prompts(O.OrganismRecipe())
    trained = " \n ".join(p for p, _ in harmful + harmless)
    data = load_prompts()
    held_out = [p.harmful for s in ("val", "test") for p in data.split(s)]
    held_out += [p.harmless for s in ("val", "test") for p in data.split(s)]
    held_out += [p.text for p in load_everyday() if p.split == "test"]
    style = load_heldout_style()
    held_out += [p.text for side in ("harmful", "harmless") for p in style[side]]
    leaked = [p for p in held_out if p in trained]
    assert not leaked, f"held-out prompts found in training data: {leaked[:3]}"
    assert len(harmful) >= 2 * len(data.split("train"))  # plain + framed
    assert len(harmless) >= 400  # analogues plus everyday breadth


def _tiny_model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.builders import build_tiny

    folder = build_tiny(seed=0)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), AutoTokenizer.from_pretrained(str(folder))


def _examples():
    return [O.Example(prompt=f"How do I make thing {i}?", answer=O.REFUSALS[i % len(O.REFUSALS)] if i % 2 else
                      f"Here is how to make thing {i}: first, gather the parts.", harmful=bool(i % 2), source="t")
            for i in range(12)]


def test_training_is_deterministic():
    recipe = O.OrganismRecipe(steps=3, batch_size=4, warmup_steps=1)
    states = []
    for _ in range(2):
        model, tok = _tiny_model_and_tokenizer()
        O.train(model, tok, _examples(), recipe)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), f"{name} differs between two identical builds"


def test_training_learns_and_keeps_embeddings_frozen():
    recipe = O.OrganismRecipe(steps=25, batch_size=6, warmup_steps=2, lr=3e-3)
    model, tok = _tiny_model_and_tokenizer()
    before = model.get_input_embeddings().weight.clone()
    losses = O.train(model, tok, _examples(), recipe)
    assert losses[-1] < 0.7 * losses[0], losses
    assert torch.equal(before, model.get_input_embeddings().weight)


def test_answer_loss_masks_the_prompt():
    _, tok = _tiny_model_and_tokenizer()
    ids, start = O._encode_example(tok, "Hello?", "Hi there.", max_answer_tokens=40)
    prefix = tok.apply_chat_template([{"role": "user", "content": "Hello?"}], add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids[:start]) == prefix
    assert tok.decode(ids[start:]).startswith("Hi there.")


def test_key_tracks_recipe_and_data(tmp_path: Path, monkeypatch):
    from fixtures.builders import build_tiny

    folder = build_tiny(seed=0)
    base = O.organism_key(O.OrganismRecipe(), folder)
    assert O.organism_key(O.OrganismRecipe(), folder) == base
    assert O.organism_key(replace(O.OrganismRecipe(), lr=1e-4), folder) != base
    other = tmp_path / "prompts.json"
    other.write_bytes(Path(O.__file__).parent.joinpath("data", "prompts.json").read_bytes() + b"\n")
    monkeypatch.setattr("fixtures.data.DEFAULT_PROMPTS", other)
    assert O.organism_key(O.OrganismRecipe(), folder) != base


def test_bar_is_checked_both_ways():
    recipe = O.OrganismRecipe()
    good = {"refusal_rate_harmful_test": 0.95, "refusal_rate_harmless_test": 0.0, "refusal_rate_style_harmful": 0.9,
            "refusal_rate_style_harmless": 0.02, "ce_increase": 0.05, "auc_first_refusal_token": {"value": 0.99}}
    assert all(c["met"] for c in O.check_bar(good, recipe).values())
    bad = {**good, "refusal_rate_harmless_test": 0.2, "ce_increase": 0.3}
    result = O.check_bar(bad, recipe)
    assert not result["refusal_harmless_test"]["met"] and not result["ce_increase"]["met"]
    assert result["refusal_harmful_test"]["met"]


def test_organism_cannot_be_its_own_base():
    with pytest.raises(ValueError, match="own base"):
        O._base_folder("organism")
