"""The refusal explorer (reports/app) on ``tiny``: its logic, and the page driven by Streamlit's AppTest.

A small synthetic run directory, its results built through the record classes
(hypotheses/records.py) and written with the Recorder, stands in for a real run: a few
ranked heads, a neuron catalogue, a random unit direction and first-token strings. The page's numbers are checked against the instruments called
directly on the same prompt.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from fixtures.data import load_prompts
from fixtures.recording import Recorder
from hypotheses import records
from instruments import behavior, metrics
from instruments.ablation import AblationSpec, ablated, ablation_hooks
from instruments.components import Head, Neuron, Pattern, hook_name, label, to_json
from instruments.direction import layer_projections
from reports import fmt
from reports.app import charts
from reports.app.probe import check_prompt, parse_components, tokens_from_strings
from reports.app.rundata import RunError, load_run

pytestmark = [pytest.mark.explorer, pytest.mark.phase6, pytest.mark.usefixtures("one_torch_thread")]

APP = Path(__file__).resolve().parents[1] / "reports" / "app" / "explorer.py"
HEADS = (Head(layer=2, head=1), Head(layer=1, head=3), Head(layer=3, head=0), Head(layer=0, head=2))
NEURONS = (Neuron(layer=1, index=7), Neuron(layer=3, index=100))
DIRECTION_LAYER = 2


def default_prompt() -> str:
    """The page's first prompt: the harmful side of the first test pair."""
    return load_prompts().split("test")[0].harmful


def _round_trip_ids(tokenizer, n: int) -> list[int]:
    """Ids whose decoded string encodes back to that one id (what the run's strings need)."""
    return [i for i in range(n) if tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"] == [i]]


def write_run(path: Path, handle, *, model: str = "tiny") -> tuple[list[str], list[str]]:
    """A run directory per SCHEMA.md; returns the refusal and compliance token strings it records."""
    rec = Recorder(run_dir=path)
    rec.note(model={**handle.describe(), "alias": model}, config={"model": model})
    # Refusal tokens: the tiny model's likeliest round-tripping first tokens on the default
    # prompt, so P(refusal) is large enough for ablations to move its third decimal.
    logits = behavior.last_logits(handle, [default_prompt()])[0]
    usable = _round_trip_ids(handle.tokenizer, len(handle.tokenizer))
    order = sorted(usable, key=lambda i: -float(logits[i]))
    decode = handle.tokenizer.decode
    refusal, compliance = [decode([i]) for i in order[:3]], [decode([i]) for i in order[3:6]]
    save_partial(rec, records.FirstToken, refusal_tokens=refusal, compliance_tokens=compliance,
                 token_source="discovered")
    save_partial(rec, records.HeadRanking, n_heads=16, n_pairs=4, ranking=[
        {"component": to_json(h), "label": label(h), "effect": 0.4 - 0.1 * i, "ci_low": 0.0, "ci_high": 0.5,
         "atp": 0.1} for i, h in enumerate(HEADS)])
    save_partial(rec, records.NeuronCatalogue, catalogue=[
        {"component": to_json(n), "label": label(n), "rank": i, "atp": 0.2, "exact": 0.1, "ci_low": 0.0,
         "ci_high": 0.2, "activation_diff": 0.3, "top_examples": [{"token": "a", "context": "a b", "prompt": "p",
                                                                   "activation": 0.5, "side": "harmful"}]}
        for i, n in enumerate(NEURONS)])
    gen = torch.Generator().manual_seed(0)
    vector = torch.randn(handle.d_model, generator=gen)
    save_partial(rec, records.RefusalDirection, layer=DIRECTION_LAYER, pos=-1, meets_thresholds=True,
                 direction=vector / vector.norm(),
                 projection_harmful=torch.randn(handle.n_layers, 5, generator=gen) + 1.0,
                 projection_harmless=torch.randn(handle.n_layers, 5, generator=gen) - 1.0)
    return refusal, compliance


def save_partial(rec: Recorder, cls: type[records.Result], **given) -> None:
    """Save a ``cls`` result with only the ``given`` fields (a reader tolerates the others' absence)."""
    result = cls(**{f.name: None for f in dataclasses.fields(cls)} | given)
    parts = {part: value for part, value in result.to_record().items() if value}
    cls.from_record(result.as_record())  # what the explorer reads back
    rec.save(cls.NAME, **parts)


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("explorer") / "runs" / "tiny" / "20260101T000000Z"
    write_run(path, tiny)
    return path


@pytest.fixture(scope="module")
def other_model_run(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("explorer") / "runs" / "organism" / "20260101T000000Z"
    rec = Recorder(run_dir=path)
    rec.note(model={"alias": "organism", "d_model": 576}, config={"model": "organism"})
    return path


@pytest.fixture(scope="module")
def run_tokens(tiny, run_dir) -> metrics.RefusalTokens:
    data = load_run(run_dir, model="tiny", describe=tiny.describe())
    tokens = tokens_from_strings(tiny.tokenizer, data.refusal_tokens, data.compliance_tokens)
    assert tokens is not None
    return tokens


# ----------------------------------------------------------------------------- streaming generation

@pytest.mark.parametrize("prompt", ["How to build a bomb?", "hi", "Write a poem about the sea, please."])
def test_stream_generate_yields_the_same_text_as_generate(tiny, prompt):
    pieces = list(behavior.stream_generate(tiny, prompt, max_new_tokens=24))
    assert "".join(pieces) == behavior.generate(tiny, [prompt], max_new_tokens=24).texts[0]
    assert len(pieces) >= 1


def test_stream_generate_under_hooks_matches_and_removes_them(tiny):
    hooks = ablation_hooks(tiny, [Head(layer=1, head=2), Neuron(layer=2, index=5)])
    prompt = "Tell me a story."
    streamed = "".join(behavior.stream_generate(tiny, prompt, max_new_tokens=16, fwd_hooks=hooks))
    assert streamed == behavior.generate(tiny, [prompt], max_new_tokens=16, fwd_hooks=hooks).texts[0]
    # hooks are gone afterwards, even when the consumer stops after one piece
    gen = behavior.stream_generate(tiny, prompt, max_new_tokens=16, fwd_hooks=hooks)
    next(gen)
    gen.close()
    assert "".join(behavior.stream_generate(tiny, prompt, max_new_tokens=16)) == \
        behavior.generate(tiny, [prompt], max_new_tokens=16).texts[0]


# ----------------------------------------------------------------------------- logic without Streamlit

def test_load_run_reads_the_schema(tiny, run_dir):
    data = load_run(run_dir, model="tiny", describe=tiny.describe())
    assert tuple(r.head for r in data.heads) == HEADS
    assert tuple(n.neuron for n in data.neurons) == NEURONS and data.neurons[0].top_activation == 0.5
    assert data.direction.layer == DIRECTION_LAYER and len(data.direction.vector) == tiny.d_model
    assert set(data.direction_refs) == {"harmful", "harmless"} and len(data.direction_refs["harmful"]) == 4
    assert "phase2/logit_lens" in data.missing and "phase3/heads" not in data.missing


def test_load_run_rejects_another_model_and_a_missing_manifest(tiny, other_model_run, tmp_path):
    with pytest.raises(RunError, match="recorded on model 'organism'.*--model organism"):
        load_run(other_model_run, model="tiny", describe=tiny.describe())
    with pytest.raises(RunError, match="no manifest.json"):
        load_run(tmp_path, model="tiny", describe=tiny.describe())


def test_load_run_rejects_components_the_model_lacks(tiny, tmp_path):
    rec = Recorder(run_dir=tmp_path)
    rec.note(model=tiny.describe())
    save_partial(rec, records.HeadRanking, ranking=[{"component": to_json(Head(layer=9, head=0)), "label": "L9H0",
                                                     "effect": 1.0, "ci_low": 0.5, "ci_high": 1.5, "atp": 1.0}])
    with pytest.raises(RunError, match="does not exist in this model"):
        load_run(tmp_path, model="tiny", describe=tiny.describe())


def test_check_prompt_and_component_labels(tiny):
    assert "empty" in check_prompt(tiny, "   ", max_new_tokens=16)
    assert "shorten it" in check_prompt(tiny, "x" * (tiny.n_ctx + 10), max_new_tokens=16)
    assert check_prompt(tiny, "hello", max_new_tokens=16) is None
    found, problems = parse_components("L1H2, l3n100 L9H0 bogus", tiny)
    assert found == [Head(layer=1, head=2), Neuron(layer=3, index=100)]
    assert len(problems) == 2 and "4 layers" in problems[0] and "bogus" in problems[1]


def test_token_strings_round_trip(tiny, run_dir, run_tokens):
    decode = tiny.tokenizer.decode
    data = load_run(run_dir, model="tiny", describe=tiny.describe())
    assert [decode([i]) for i in run_tokens.refusal_ids] == list(data.refusal_tokens)
    assert tokens_from_strings(tiny.tokenizer, ["a"], ["a"]) is None  # nothing left for compliance


def test_charts_carry_their_numbers():
    fig = charts.attention_heatmap([[1.0, 0.0], [0.4, 0.6]], ["0:a", "1:b"], title="t")
    assert list(fig.data[0].x) == ["0:a", "1:b"] and fig.data[0].z[1][1] == 0.6
    fig = charts.head_heatmap([[0.1, 0.2]], [(0, 1)], title="t", colorbar="c")
    assert list(fig.data[1].x) == [1] and list(fig.data[1].y) == [0]


# ----------------------------------------------------------------------------- the page (AppTest)

def _app(monkeypatch, *args: str):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["explorer.py", "--model", "tiny", "--device", "cpu", *args])
    return AppTest.from_file(str(APP), default_timeout=120)


def _metric(at, name: str) -> str:
    values = [m.value for m in at.metric if m.label == name]
    assert values, f"no metric {name!r}; metrics: {[m.label for m in at.metric]}"
    return values[0]


def _clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture
def page(monkeypatch, run_dir):
    at = _app(monkeypatch, "--run", str(run_dir)).run()
    _clean(at)
    return at


def test_page_shows_first_token_probabilities_of_the_prompt(page, tiny, run_tokens):
    prompt = default_prompt()
    assert page.text_area(key="prompt").value == prompt
    expected = behavior.first_token_probs(tiny, [prompt], run_tokens)
    assert _metric(page, "P(refusal), first token") == f"{float(expected.refusal[0]):.3f}"
    assert _metric(page, "P(compliance), first token") == f"{float(expected.compliance[0]):.3f}"
    assert any("from the run's phase2/first_token" in c.value for c in page.sidebar.caption)
    assert any("4 ranked heads, 2 catalogued neurons, direction: layer 2" in c.value for c in page.sidebar.caption)


def test_generate_streams_the_greedy_text_and_the_verdict(page, tiny):
    page.sidebar.slider(key="max_new").set_value(16)
    page.button(key="btn_generate").click().run()
    _clean(page)
    text = behavior.generate(tiny, [default_prompt()], max_new_tokens=16).texts[0]
    assert text in [m.value for m in page.markdown]
    from reports.app.views import VERDICT_WORDS

    assert _metric(page, "Classifier verdict") == VERDICT_WORDS[behavior.classify(text)]
    assert any(c.value.startswith("first token after") for c in page.caption)
    # a later interaction keeps showing the stored generation
    page.radio(key="view").set_value("Attention").run()
    assert text in [m.value for m in page.markdown]


def test_choosing_a_dataset_pair_fills_the_prompt_and_compare(page):
    pairs = load_prompts().pairs
    page.selectbox(key="pair").set_value(3).run()
    _clean(page)
    assert page.text_area(key="prompt").value == pairs[3].harmful
    page.radio(key="view").set_value("Compare").run()
    _clean(page)
    assert page.text_area(key="cmp_harmful").value == pairs[3].harmful
    assert page.text_area(key="cmp_harmless").value == pairs[3].harmless
    assert {"P(refusal), harmful", "P(refusal), harmless"} <= {m.label for m in page.metric}
    page.sidebar.slider(key="max_new").set_value(8).run()
    page.button(key="btn_compare_generate").click().run()
    _clean(page)
    assert len([m for m in page.metric if m.label == "Classifier verdict"]) == 2
    assert len(page.get("plotly_chart")) == 2  # logit lens and projection, both prompts


def test_layer_view_matches_the_instruments(page, tiny, run_dir, run_tokens):
    page.radio(key="view").set_value("Layers").run()
    _clean(page)
    table = page.dataframe[0].value
    prompt = default_prompt()
    lens = behavior.logit_lens(tiny, [prompt], run_tokens)[:, 0]
    direction = load_run(run_dir, model="tiny", describe=tiny.describe()).direction
    projection = layer_projections(tiny, [prompt], direction)[:, 0]
    entropy = behavior.attention_entropy(tiny, [prompt])[0].mean(-1)
    assert len(table) == tiny.n_layers
    assert torch.allclose(torch.tensor(table["P(refusal) lens"].values), lens.double(), atol=1e-6)
    assert torch.allclose(torch.tensor(table["projection"].values), projection.double(), atol=1e-5)
    assert torch.allclose(torch.tensor(table["entropy"].values), entropy.double(), atol=1e-5)
    assert len(page.get("plotly_chart")) == 4
    # the numbers stay numbers (sortable); what the page shows is each formatted by reports.fmt.number
    shown = _display_values(page.dataframe[0])
    for column in ("P(refusal) lens", "entropy", "projection"):
        assert list(shown[column]) == [fmt.number(x) for x in table[column]], column
    assert list(shown["layer"]) == [str(i) for i in range(tiny.n_layers)]


def _display_values(frame):
    """What a styled st.dataframe shows in each cell (the table's display values, as text)."""
    from streamlit import dataframe_util

    return dataframe_util.convert_arrow_bytes_to_pandas_df(frame.proto.arrow_data.styler.display_values).astype(str)


def test_small_probabilities_read_in_scientific_notation():
    assert fmt.number(1e-14) == "1.00e-14" and fmt.number(0.00000000000001) != "0.00000000000001"
    assert fmt.number(2.5e-4) == "2.50e-04" and fmt.number(-3e-7) == "-3.00e-07"
    assert [fmt.number(x) for x in (0.001, 0.5, 0.123456, 12.34, 999.0)] == ["0.001", "0.5", "0.123", "12.3", "999"]
    assert fmt.number(1234.5) == "1.23e+03" and fmt.number(0.0) == "0" and fmt.number(float("nan")) == "n/a"


def test_circuit_view_lights_up_the_run_components(page, tiny):
    page.radio(key="view").set_value("Circuit").run()
    _clean(page)
    heads, neurons = page.dataframe[0].value, page.dataframe[1].value
    assert list(heads["head"]) == [label(h) for h in HEADS]
    assert heads["fires (percentile of all heads)"].between(0, 1).all()
    ids, mask = tiny.encode([default_prompt()])
    name = hook_name(Neuron(layer=1, index=7))
    _, cache = tiny.bridge.run_with_cache(ids, attention_mask=mask, names_filter=[name])
    assert neurons["neuron"].iloc[0] == "L1N7"
    assert abs(neurons["activation now"].iloc[0] - float(cache[name][0, -1, 7])) < 1e-5
    assert any(m.label.startswith("Projection on the refusal direction at layer 2") for m in page.metric)


def test_ablation_bench_top_k_and_direction_change_the_refusal_probability(page, tiny, run_dir, run_tokens):
    page.radio(key="view").set_value("Ablation bench").run()
    assert any("Tick components" in i.value for i in page.info)
    page.number_input(key="abl_k").set_value(2).run()
    page.button(key="btn_topk").click().run()
    _clean(page)
    assert [page.checkbox(key=f"abl_head_{label(h)}").value for h in HEADS] == [True, True, False, False]
    assert all(page.checkbox(key=f"abl_neuron_{label(n)}").value for n in NEURONS)
    page.checkbox(key="abl_direction").check().run()
    _clean(page)
    direction = load_run(run_dir, model="tiny", describe=tiny.describe()).direction
    chosen = [*HEADS[:2], *NEURONS, direction]
    prompt = default_prompt()
    with ablated(tiny, chosen, spec=AblationSpec(method="zero")):
        expected = behavior.first_token_probs(tiny, [prompt], run_tokens).refusal
    clean = behavior.first_token_probs(tiny, [prompt], run_tokens).refusal
    assert _metric(page, "P(refusal), ablated") == f"{float(expected[0]):.3f}"
    assert _metric(page, "P(refusal), clean") == f"{float(clean[0]):.3f}"
    assert _metric(page, "P(refusal), ablated") != _metric(page, "P(refusal), clean")
    # mean ablation is another number; regenerating streams the ablated model's greedy text
    page.radio(key="abl_method").set_value("mean").run()
    _clean(page)
    reference = [p.harmless for p in load_prompts().split("train")[:16]]
    with ablated(tiny, chosen, spec=AblationSpec(method="mean"), reference=reference):
        expected_mean = behavior.first_token_probs(tiny, [prompt], run_tokens).refusal
    assert _metric(page, "P(refusal), ablated") == f"{float(expected_mean[0]):.3f}"
    assert _metric(page, "P(refusal), ablated") != f"{float(expected[0]):.3f}"
    page.radio(key="abl_method").set_value("zero").run()
    page.sidebar.slider(key="max_new").set_value(16).run()
    page.button(key="btn_ablate_generate").click().run()
    _clean(page)
    with ablated(tiny, chosen):
        text = behavior.generate(tiny, [prompt], max_new_tokens=16).texts[0]
    assert text in [m.value for m in page.markdown]
    from reports.app.views import VERDICT_WORDS

    assert _metric(page, "Classifier verdict") == VERDICT_WORDS[behavior.classify(text)]


def test_ablation_bench_by_hand_and_a_bad_label(page):
    page.radio(key="view").set_value("Ablation bench").run()
    page.text_input(key="abl_manual").input("L0H1, L7H7").run()
    assert any("L7H7" in e.value and "4 layers" in e.value for e in page.error)
    assert any("Ablating (zero): L0H1" in c.value for c in page.caption)
    assert _metric(page, "P(refusal), ablated")


def test_patching_view_reports_the_effect_and_sweeps(page, tiny):
    page.radio(key="view").set_value("Patching").run()
    _clean(page)
    assert _metric(page, "P(refusal), resid L2 pos-1 patched")
    page.selectbox(key="patch_kind").set_value("head").run()
    page.number_input(key="patch_head").set_value(3).run()
    page.number_input(key="patch_layer").set_value(1).run()
    _clean(page)
    assert _metric(page, "P(refusal), L1H3 patched")
    effect = float(_metric(page, "Normalized effect"))
    assert -10 < effect < 10
    page.selectbox(key="patch_kind").set_value("mlp").run()
    page.button(key="btn_patch_sweep").click().run()
    _clean(page)
    bars = page.get("plotly_chart")
    assert bars and "mlp L3" in bars[-1].proto.spec


def test_attention_view_shows_any_head(page, tiny):
    page.radio(key="view").set_value("Attention").run()
    page.number_input(key="att_layer").set_value(1).run()
    page.number_input(key="att_head").set_value(2).run()
    _clean(page)
    top = page.dataframe[0].value
    ids, mask = tiny.encode([default_prompt()])
    name = hook_name(Pattern(layer=1))
    _, cache = tiny.bridge.run_with_cache(ids, attention_mask=mask, names_filter=[name])
    expected = cache[name][0, 2, -1].topk(5).values
    assert torch.allclose(torch.tensor(top["weight"].values, dtype=torch.float32), expected, atol=1e-5)
    assert "Attention of L1H2" in page.get("plotly_chart")[0].proto.spec


@pytest.mark.parametrize("prompt, message", [("", "The prompt is empty"),
                                             ("x" * 1100, "tokens after chat formatting")])
def test_bad_prompts_get_a_message_not_a_traceback(page, prompt, message):
    page.text_area(key="prompt").set_value(prompt).run()
    assert not page.exception
    assert any(message in e.value for e in page.error)
    assert not [m for m in page.metric if m.label == "P(refusal), first token"]


def test_a_run_of_another_model_is_refused_in_the_page(monkeypatch, other_model_run):
    at = _app(monkeypatch, "--run", str(other_model_run)).run()
    assert not at.exception
    assert any("recorded on model 'organism'" in e.value for e in at.sidebar.error)
    at.radio(key="view").set_value("Ablation bench").run()
    assert any("no run directory" in c.value for c in at.caption)


def test_without_a_run_top_k_is_disabled_and_explained(monkeypatch, tmp_path):
    at = _app(monkeypatch).run()
    _clean(at)
    assert any("No run directory" in i.value for i in at.sidebar.info)
    at.radio(key="view").set_value("Ablation bench").run()
    assert at.button(key="btn_topk").disabled
    assert any("Top-k from the run is unavailable: no run directory" in c.value for c in at.caption)
    at.text_input(key="abl_manual").input("L2H0").run()
    _clean(at)
    assert _metric(at, "P(refusal), ablated")
    at.radio(key="view").set_value("Circuit").run()
    assert any("Circuit highlighting needs a run" in i.value for i in at.info)
    missing = _app(monkeypatch, "--run", str(tmp_path / "nowhere")).run()
    assert any("is not a run directory" in e.value for e in missing.sidebar.error)


def test_an_unknown_model_is_a_message(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["explorer.py", "--model", "no-such-model", "--device", "cpu"])
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert any("Could not load model 'no-such-model'" in e.value and "unknown model" in e.value for e in at.error)
