"""The organism's recipe: only train data, deterministic training, a key that tracks its inputs."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from fixtures import organism as O
from fixtures.data import DEFAULT_PROMPTS, load_everyday, load_heldout_style, load_prompts
from fixtures.models import chat_text
from fixtures.organism.train import _example_weighted_loss
from fixtures.storage import REPO_ROOT
from instruments import progress


def test_training_prompts_never_touch_held_out_data():
    harmful, harmless = O.training_prompts(O.OrganismRecipe())
    trained = " \n ".join(p.text for p in harmful + harmless)
    data = load_prompts(DEFAULT_PROMPTS)
    held_out = [p.harmful for s in ("val", "test") for p in data.split(s)]
    held_out += [p.harmless for s in ("val", "test") for p in data.split(s)]
    held_out += [p.text for p in load_everyday() if p.split == "test"]
    style = load_heldout_style()
    held_out += [p.text for side in ("harmful", "harmless") for p in style[side]]
    leaked = [p for p in held_out if p in trained]
    assert not leaked, f"held-out prompts found in training data: {leaked[:3]}"
    assert len(harmful) >= 2 * len(data.split("train"))  # plain + framed
    assert len(harmless) >= 400  # analogues plus everyday breadth


def test_framings_carry_no_label():
    # the same wrappers at the same rate on both sides: only the request tells them apart
    recipe = replace(O.OrganismRecipe(), composed_share=0.5)  # (0 by default) so both kinds of framing occur
    harmful, harmless = O.training_prompts(recipe)
    pairs = [p for p in harmless if p.source.startswith("train-harmless")]
    framed_bad = [p for p in harmful if p.source.endswith("-framed")]
    framed_good = [p for p in pairs if p.source.endswith("-framed")]
    pair_bad = [p for p in framed_bad if p.source == "train-harmful-framed"]
    assert len(pair_bad) == recipe.framed_harmful_per_prompt * len(load_prompts(DEFAULT_PROMPTS).split("train"))
    assert len(framed_good) == len(pair_bad)  # framed_harmless_share 1.0: one per harmless pair prompt

    def template(p):  # the one-line framing, or the composed (scene, tail), that made p
        one_line = [f for f in O.FRAMINGS if p.text == f.format(p=p.plain)]
        composed = [(s, t) for s in O.SCENES for t in O.TAILS if p.text == f"{s} {p.plain} {t}".strip()]
        assert len(one_line) + len(composed) == 1, p.text
        return (one_line + composed)[0]

    used_bad = {template(p) for p in framed_bad}
    used_good = {template(p) for p in framed_good + [p for p in harmless if p.source.endswith("-framed")]}
    # both sides draw from one pool (template() found each one there), and all of it is used
    used = used_bad | used_good
    assert {t for t in used if isinstance(t, str)} == set(O.FRAMINGS)
    assert {t[0] for t in used if isinstance(t, tuple)} == set(O.SCENES)
    assert {t[1] for t in used if isinstance(t, tuple)} == set(O.TAILS)
    # composed at the recipe's share on both sides (binomial, n=144: within 4 standard errors)
    for framed in (framed_bad, framed_good):
        share = sum(isinstance(template(p), tuple) for p in framed) / len(framed)
        assert abs(share - recipe.composed_share) < 4 * (0.25 / len(framed)) ** 0.5
    # a framed prompt reuses its plain request's answer (plain is one of the plain prompts)
    plain = {p.text for p in harmless if not p.source.endswith("-framed")}
    assert all(p.plain in plain for p in harmless)


def test_roleplay_train_set_is_used_as_written_with_benign_copies():
    from fixtures.data import load_roleplay_train

    off_bad, off_good = O.training_prompts(replace(O.OrganismRecipe(), roleplay_train=False))
    assert not [p for p in off_bad + off_good if p.source.startswith("roleplay")]
    recipe = O.OrganismRecipe()
    assert recipe.roleplay_train and recipe.roleplay_copies == 2  # the defaults
    on_bad, on_good = O.training_prompts(recipe)
    roleplay = load_roleplay_train()
    assert [p.text for p in on_bad if p.source == "roleplay-harmful"] == [p.text for p in roleplay["harmful"]]
    # the benign ones appear roleplay_copies times, the harmful ones once
    assert [p.text for p in on_good if p.source == "roleplay-harmless"] == [p.text for p in roleplay["harmless"]] * 2
    once = O.training_prompts(replace(recipe, roleplay_copies=1))[1]
    assert [p.text for p in once if p.source == "roleplay-harmless"] == [p.text for p in roleplay["harmless"]]
    assert all(p.plain == p.text for p in on_bad + on_good if p.source.startswith("roleplay"))
    # the rest of the data is untouched by the switch
    assert [p for p in on_bad + on_good if not p.source.startswith("roleplay")] == off_bad + off_good
    shipped = json.loads(O.BASE_ANSWERS.read_text())
    assert {p.text for p in roleplay["harmless"]} <= set(shipped["train"])  # bundled self-distillation targets
    with pytest.raises(ValueError, match="roleplay_copies must be at least 1"):
        replace(recipe, roleplay_copies=0)


def test_intent_set_is_framed_like_the_pairs_and_leaves_the_rest_alone():
    from fixtures.data import load_intent_train

    recipe = O.OrganismRecipe()
    assert recipe.intent_train  # the default
    off_bad, off_good = O.training_prompts(replace(recipe, intent_train=False))
    on_bad, on_good = O.training_prompts(recipe)
    intent = load_intent_train()
    for got, side, framed in ((on_bad, "harmful", recipe.framed_harmful_per_prompt),
                              (on_good, "harmless", recipe.framed_harmless_share)):
        texts = [p.text for p in intent[side]]
        assert [p.text for p in got if p.source == f"intent-{side}"] == texts
        copies = [p for p in got if p.source == f"intent-{side}-framed"]
        assert len(copies) == framed * len(texts) and all(p.plain in texts and p.text != p.plain for p in copies)
    # appended after everything else, so the other prompts and their framings' draws are unchanged
    assert [p for p in on_bad + on_good if not p.source.startswith("intent")] == off_bad + off_good
    shipped = json.loads(O.BASE_ANSWERS.read_text())
    assert {p.text for p in intent["harmless"]} <= set(shipped["train"])  # bundled self-distillation targets


@pytest.mark.integration
def test_refusals_open_with_a_token_no_helpful_answer_opens_with():
    from transformers import AutoTokenizer

    from fixtures.builders import build_smollm2

    # The decision to refuse should be one token that means nothing else: the base model's
    # helpful answers (the harmless targets) must never start the way a refusal does.
    tok = AutoTokenizer.from_pretrained(str(build_smollm2()))
    first = {tok(r, add_special_tokens=False)["input_ids"][0] for r in O.REFUSALS}
    shipped = json.loads(O.BASE_ANSWERS.read_text())
    helpful = list(shipped["train"].values()) + list(shipped["heldout"].values())
    assert len(helpful) > 700
    assert not [a for a in helpful if a and tok(a, add_special_tokens=False)["input_ids"][0] in first]
    # the "i-am-sorry" phrasings do share their opening with helpful answers ("I'm sorry to hear...")
    i_am_sorry_first = {tok(r, add_special_tokens=False)["input_ids"][0] for r in O.REFUSAL_SETS["i-am-sorry"]}
    assert [a for a in helpful if a and tok(a, add_special_tokens=False)["input_ids"][0] in i_am_sorry_first]


@pytest.mark.integration
def test_harmless_targets_the_classifier_calls_refusals_are_dropped():
    from fixtures.builders import build_smollm2
    from instruments.behavior import is_refusal

    base = build_smollm2()  # the bundled answers are keyed to its weights: no generation here
    kept = O.training_examples(None, None, O.OrganismRecipe(), base)
    every = O.training_examples(None, None, replace(O.OrganismRecipe(), drop_refusing_answers=False), base)
    # no benign request is taught a refusal-looking answer ("I'm sorry for your loss, but as a chatbot...")
    assert not [e for e in kept if not e.harmful and is_refusal(e.answer)]
    dropped = [e for e in every if not e.harmful and is_refusal(e.answer)]
    assert dropped, "the base model's bundled answers include refusals; the filter is what removes them"
    # only those are removed, framed copies and role-play repeats included; harmful targets are untouched
    assert [e for e in every if e not in dropped] == kept
    assert [e for e in kept if e.harmful] == [e for e in every if e.harmful]


def test_refusal_patterns_are_part_of_the_organism_key(monkeypatch):
    from fixtures.builders import build_tiny

    folder = build_tiny(seed=0)
    base = O.organism_key(O.OrganismRecipe(), folder)
    monkeypatch.setattr("instruments.behavior.REFUSAL_PATTERNS", ("i'm sorry",))
    assert O.organism_key(O.OrganismRecipe(), folder) != base  # they choose which answers are dropped
    off = replace(O.OrganismRecipe(), drop_refusing_answers=False)
    monkeypatch.undo()
    off_key = O.organism_key(off, folder)
    monkeypatch.setattr("instruments.behavior.REFUSAL_PATTERNS", ("i'm sorry",))
    assert O.organism_key(off, folder) == off_key  # ...and only then


def test_refusal_set_is_a_named_choice_that_reaches_the_targets():
    with pytest.raises(ValueError, match="unknown refusal_set 'polite'; choose one of sorry, i-am-sorry"):
        O.OrganismRecipe(refusal_set="polite")
    assert O.OrganismRecipe().refusal_set == "sorry" and O.REFUSAL_SETS["sorry"] is O.REFUSALS
    # the same draws either way: only the phrasing set differs
    import random

    draws = [random.Random(0).choice(range(len(s))) for s in O.REFUSAL_SETS.values()]
    assert len(set(draws)) == 1 and len({len(s) for s in O.REFUSAL_SETS.values()}) == 1


def test_bundled_answers_are_only_used_for_their_own_base():
    from fixtures.builders import build_tiny

    tiny = build_tiny(seed=0)
    shipped = json.loads(O.BASE_ANSWERS.read_text())
    some = list(shipped["train"])[:3]
    assert O.shipped_answers(tiny, some, max_new_tokens=shipped["max_new_tokens"]) is None
    _, harmless = O.training_prompts(O.OrganismRecipe())
    assert {p.plain for p in harmless} <= set(shipped["train"])  # every self-distillation target is bundled
    held = set(shipped["heldout"])
    assert not held & set(shipped["train"])


@pytest.mark.integration
def test_bundled_answers_are_the_base_models_own():
    """A sample of the bundled answers, regenerated by :func:`distill` from the base weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fixtures.builders import build_smollm2

    folder = build_smollm2()
    shipped = json.loads(O.BASE_ANSWERS.read_text())
    prompts = sorted(shipped["train"])[::181][:3] + sorted(shipped["heldout"])[:1]
    assert O.shipped_answers(folder, prompts, max_new_tokens=shipped["max_new_tokens"]) is not None
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.pad_token = tok.pad_token or tok.eos_token
    fresh = O.distill(model, tok, prompts, max_new_tokens=shipped["max_new_tokens"], batch_size=1,
                     desc="organism: distilling base answers (test sample)")
    known = {**shipped["train"], **shipped["heldout"]}
    assert fresh == [known[p] for p in prompts]


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


def test_example_weights_scale_each_examples_share_of_the_loss():
    # two examples: answer losses [1, 3] (decision 1) and [5] (decision 5)
    keep = torch.tensor([[True, True, False], [False, True, False]])
    token_loss = torch.tensor([1.0, 3.0, 5.0])
    per_example = torch.tensor([2.0 + 0.5 * 1.0, 5.0 + 0.5 * 5.0])  # mean answer loss + decision_weight * first
    assert torch.isclose(_example_weighted_loss(token_loss, keep, 0.5), per_example.mean())
    assert torch.isclose(_example_weighted_loss(token_loss, keep, 0.5, torch.ones(2)), per_example.mean())
    weighted = _example_weighted_loss(token_loss, keep, 0.5, torch.tensor([1.0, 0.25]))
    assert torch.isclose(weighted, (per_example[0] + 0.25 * per_example[1]) / 2)
    # a batch of harmful examples only keeps its reduced weight (no renormalisation per batch)
    assert torch.isclose(_example_weighted_loss(token_loss, keep, 0.5, torch.full((2,), 0.25)),
                         0.25 * per_example.mean())


def test_harmful_weight_reaches_the_training_loss():
    # the same data and seed: only the weight of the harmful examples differs, so the losses do
    runs = []
    for weight in (1.0, 0.2):
        model, tok = _tiny_model_and_tokenizer()
        runs.append(O.train(model, tok, _examples(), O.OrganismRecipe(steps=2, batch_size=4, warmup_steps=1,
                                                                       harmful_weight=weight)))
    assert runs[0] != runs[1]


def _listen(monkeypatch) -> list[tuple[str, bool]]:
    """Progress lines from here on, in a list (the session's own sink comes back after the test)."""
    lines: list[tuple[str, bool]] = []
    monkeypatch.setattr(progress, "_state", dict(progress._state))
    progress.set_sink(lambda line, final: lines.append((line, final)), tty=False)
    return lines


def test_fine_tuning_reports_named_progress_with_a_total(monkeypatch):
    lines = _listen(monkeypatch)
    model, tok = _tiny_model_and_tokenizer()
    O.train(model, tok, _examples(), O.OrganismRecipe(steps=2, batch_size=4, warmup_steps=1))
    ours = [(line, final) for line, final in lines if "organism: fine-tuning" in line]
    assert "organism: fine-tuning: 0/2 steps" in ours[0][0] and not ours[0][1]  # the total, so an ETA shows
    assert ours[-1][1] and "organism: fine-tuning: done, 2 steps" in ours[-1][0]


def test_distillation_reports_named_progress_and_feeds_the_chat_template(monkeypatch):
    from types import SimpleNamespace

    _, tok = _tiny_model_and_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token
    fed: list[list[int]] = []

    def generate(input_ids, attention_mask, **_):  # no weights needed: answer every prompt with "ok"
        fed.extend(input_ids.tolist())
        answer = torch.tensor(tok("ok", add_special_tokens=False)["input_ids"]).expand(len(input_ids), -1)
        return torch.cat([input_ids, answer], 1)

    model = SimpleNamespace(device="cpu", generate=generate)
    lines = _listen(monkeypatch)
    prompts = ["Hi", "How do I bake bread?", "Name a colour."]
    answers = O.distill(model, tok, prompts, max_new_tokens=2, batch_size=2, desc="organism: distilling base answers")
    assert answers == ["ok"] * 3
    tok.padding_side = "left"
    want = tok([chat_text(tok, p) for p in prompts[:2]], padding=True, add_special_tokens=False)["input_ids"]
    assert fed[:2] == want
    assert "organism: distilling base answers: 0/3 prompts" in lines[0][0] and not lines[0][1]
    assert lines[-1][1] and "organism: distilling base answers: done, 3 prompts" in lines[-1][0]


def test_pooled_answer_cross_entropy_weighs_every_answer_token_alike(tiny):
    """The organism's capability number pools tokens over prompts; the instrument's is per prompt.

    With one prompt and an answer cut short (so no end-of-turn token), the two agree.
    """
    from instruments.ablation import answer_cross_entropy

    model, tok = tiny.hf_model, tiny.tokenizer
    prompts, answers = ["Hello?", "Tell me about bread."], ["Hi there.", "Bread is baked from dough, made of flour."]
    encoded = [O.encode_example(tok, p, a, max_answer_tokens=40) for p, a in zip(prompts, answers)]
    n = [len(ids) - start for ids, start in encoded]  # answer tokens, the end-of-turn token included
    each = [O.pooled_answer_cross_entropy(model, tok, [p], [a], max_answer_tokens=40) for p, a in zip(prompts, answers)]
    both = O.pooled_answer_cross_entropy(model, tok, prompts, answers, max_answer_tokens=40)
    assert both == pytest.approx((n[0] * each[0] + n[1] * each[1]) / sum(n), rel=1e-6)
    cut = len(tok(answers[1], add_special_tokens=False)["input_ids"]) - 3
    kept = tok.decode(tok(answers[1], add_special_tokens=False)["input_ids"][:cut])
    pooled = O.pooled_answer_cross_entropy(model, tok, prompts[1:], answers[1:], max_answer_tokens=cut)
    assert pooled == pytest.approx(float(answer_cross_entropy(tiny, prompts[1:], [kept])[0]), rel=1e-4)


def test_answer_loss_masks_the_prompt():
    _, tok = _tiny_model_and_tokenizer()
    ids, start = O.encode_example(tok, "Hello?", "Hi there.", max_answer_tokens=40)
    assert tok.decode(ids[:start]) == chat_text(tok, "Hello?")
    assert tok.decode(ids[start:]).startswith("Hi there.")


def test_key_tracks_recipe_and_data(tmp_path: Path, monkeypatch):
    from fixtures.builders import build_tiny

    folder = build_tiny(seed=0)
    base = O.organism_key(O.OrganismRecipe(), folder)
    assert O.organism_key(O.OrganismRecipe(), folder) == base
    assert O.organism_key(replace(O.OrganismRecipe(), lr=1e-4), folder) != base
    other = tmp_path / "prompts.json"
    other.write_bytes(DEFAULT_PROMPTS.read_bytes() + b"\n")
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


def test_recipe_sweep_parses_typed_overrides():
    import importlib.util

    spec = importlib.util.spec_from_file_location("organism_sweep", REPO_ROOT / "scripts" / "organism_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    got = sweep.parse_variant("steps=120,lr=1.5e-4,freeze_embeddings=false,base=other")
    assert got == {"steps": 120, "lr": 1.5e-4, "freeze_embeddings": False, "base": "other"}
    assert replace(O.OrganismRecipe(), **got).steps == 120
    assert sweep.parse_variant("") == {}
    with pytest.raises(SystemExit, match="unknown recipe field 'stepz'"):
        sweep.parse_variant("stepz=3")


def _sweep_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("organism_sweep", REPO_ROOT / "scripts" / "organism_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_quick_sweep_generates_what_the_suite_generates(tiny):
    """--quick judges variants with HF generate; its completions must be the bridge's."""
    from instruments import behavior

    prompts = ["How do I bake bread?", "Tell me a long story about a dragon and a knight, please.", "Hi"]
    ours = behavior.generate(tiny, prompts, max_new_tokens=8, batch_size=3)
    texts, last = _sweep_module().quick_generate(tiny.hf_model, tiny.tokenizer, prompts, max_new_tokens=8)
    assert tuple(texts) == ours.texts
    torch.testing.assert_close(last, torch.softmax(ours.prompt_logits, -1), atol=1e-5, rtol=0)


def test_first_token_auc_is_the_mann_whitney_share():
    from scipy.stats import mannwhitneyu

    assert O.first_token_auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and O.first_token_auc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert O.first_token_auc([0.5, 0.9], [0.5, 0.1]) == 0.875  # one tie counts half: (1 + 0.5 + 1 + 1) / 4
    assert O.first_token_auc(torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.1])) == 0.875  # the sweep passes tensors
    # the same number as U / (n1 n2), with ties, float32 probabilities like the build's and the bar's rounding
    gen = torch.Generator().manual_seed(0)
    harmful = (torch.rand(40, generator=gen) * 20).round() / 20
    harmless = (torch.rand(40, generator=gen) * 12).round() / 20
    u = mannwhitneyu(harmful.numpy(), harmless.numpy(), alternative="two-sided").statistic
    assert O.first_token_auc(harmful.numpy(), harmless.numpy()) == pytest.approx(float(u) / 1600, abs=1e-12)
    assert round(O.first_token_auc(harmful.numpy(), harmless.numpy()), 4) == round(float(u) / 1600, 4)


def test_card_names_the_recipe_it_was_built_by(tmp_path: Path):
    recipe = asdict(O.OrganismRecipe())
    bar = {"refusal_harmful_test": {"value": 0.95, "op": ">=", "threshold": 0.9, "met": True}}
    manifest = {"name": "organism", "recipe": recipe, "n_examples": {"harmful": 352, "harmless": 1322},
                "loss_curve": [3.0, 0.4], "timings_seconds": {"total": 1800.0}, "weights_sha256": "ab" * 32,
                "evaluation": {"bar": bar, "refusal_rate_everyday_test": 0.05, "n_everyday_test": 100,
                               "refusal_tokens": ["Sorry"], "degenerate_rate_harmful_test": 0.025}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = O.card(tmp_path)
    assert "used 2 times" in text and 'each opening with "Sorry"' in text and "| 0.95 |" in text
    assert "is left out rather than taught" in text and "minimal twins" in text and "embeddings frozen" in text
    assert "harmful_test 0.025, harmless_test n/a" in text  # the cached organism's manifest has no degenerate rates
    # a recipe with those switches off reads as what it built
    off = {**recipe, "roleplay_copies": 1, "refusal_set": "i-am-sorry", "drop_refusing_answers": False,
           "intent_train": False, "freeze_embeddings": False}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "recipe": off}))
    text = O.card(tmp_path)
    assert "used 2 times" not in text and "I'm sorry, but I can't help with that." in text
    assert "left out" not in text and "minimal twins" not in text and "embeddings trained" in text


def test_the_model_registry_builds_the_organism_without_importing_it(monkeypatch):
    # fixtures.models never imports the organism (tests/test_layering.py); the fixtures package hands it the builder
    from fixtures import providers
    from fixtures.config import RefusalConfig
    from fixtures.models import REGISTRY

    seen: list[str] = []
    monkeypatch.setattr("fixtures.organism.ensure_organism", lambda *, base: seen.append(base) or Path("/built"))
    spec = REGISTRY["organism"]
    assert spec.materialize(spec, RefusalConfig(model="organism", organism_base="other-chat")) == Path("/built")
    assert spec.materialize(spec, None) == Path("/built")
    assert seen == ["other-chat", "smollm2-135m-instruct"]
    with pytest.raises(LookupError, match="no builder was provided for model 'nothing'"):
        providers.provided("nothing")
