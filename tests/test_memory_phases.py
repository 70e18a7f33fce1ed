"""The per-phase memory estimator: its terms add up, grow with what the phases hold, and explain
the measured load of the 2-layer Llama-3-8B rehearsal model; the plugin records it per phase."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from fixtures.config import RefusalConfig
from fixtures.memory import GIB, estimate_memory
from fixtures.memory_phases import PHASES, STEPS, Model, Sizes, load_estimate, phase_estimate, session_estimator
from fixtures.storage import REPO_ROOT

pytest_plugins = ["pytester"]

LLAMA3_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
             "dtype": "bfloat16"}
LLAMA3_8B_2L = {**LLAMA3_8B, "num_hidden_layers": 2}
CFG = RefusalConfig()
SIZES = Sizes(train=184, val=88, test=88, window=5)
WORKING = [p for p in PHASES if p not in ("h2", "h3", "criteria")]  # the three reuse H1's stages


def estimate(phase: str, config: dict = LLAMA3_8B, *, cfg: RefusalConfig = CFG, quant: str = "nf4",
             dtype: str = "float32", device: str = "cpu", seq_len: int = 57, sizes: Sizes = SIZES):
    return phase_estimate(phase, config, cfg=cfg, quant=quant, dtype=dtype, device=device, seq_len=seq_len,
                          sizes=sizes)


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("phase", PHASES)
def test_breakdown_sums_to_the_total(phase, device):
    e = estimate(phase, device=device, dtype="float32" if device == "cpu" else "bfloat16")
    out = e.to_dict()
    assert sum(out["breakdown"].values()) == out["total_bytes"] == e.total_bytes
    assert list(out["breakdown"])[:2] == ["weights", "runtime"]
    # the heaviest step's working set is the breakdown beyond weights and runtime
    assert out["steps"][e.step] == e.total_bytes - out["breakdown"]["weights"] - out["breakdown"]["runtime"]
    assert out["steps"][e.step] == max(out["steps"].values())
    assert e.describe().startswith(f"{phase}: ")


def test_every_mark_of_the_study_has_an_estimate():
    import tomllib

    marks = {line.split(":")[0] for line in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
             ["tool"]["pytest"]["ini_options"]["markers"]}
    study = {m for m in marks if m.startswith("phase") and m not in ("phase6", "phase7")} | {"h1", "h2", "h3",
                                                                                             "criteria"}
    assert study == set(PHASES) == set(STEPS)
    with pytest.raises(ValueError, match="phase1, phase2"):
        estimate("phase9")


def test_accelerators_count_no_runtime():
    # torch.cuda.max_memory_allocated and MPS driver memory see tensors, not the process or the CUDA context
    for device in ("cuda", "mps"):
        assert estimate("phase3", device=device, dtype="bfloat16").to_dict()["breakdown"]["runtime"] == 0
    assert estimate("phase3").to_dict()["breakdown"]["runtime"] > 0


@pytest.mark.parametrize("phase", WORKING)
def test_monotone_in_batch_sequence_and_vocabulary(phase):
    small = replace(CFG, batch_size=4, max_batch=8)
    base = estimate(phase, cfg=small).total_bytes
    bigger = {"batch": estimate(phase, cfg=replace(CFG, batch_size=16, max_batch=64)).total_bytes,
              "sequence": estimate(phase, cfg=small, seq_len=4 * 57).total_bytes,
              "vocabulary": estimate(phase, {**LLAMA3_8B, "vocab_size": 4 * 128256}, cfg=small).total_bytes}
    assert all(b >= base for b in bigger.values()), (base, bigger)
    assert bigger["sequence"] > base  # every step holds activations of every position
    if phase != "phase1":  # phase 1 runs two prompts whatever the batch size
        assert bigger["batch"] > base
    assert estimate(phase, cfg=small, seq_len=16).total_bytes < base


def test_a_step_is_padded_to_the_longest_prompt_of_the_split_it_reads():
    # integrated gradients run on train prompts: a longer val prompt does not change them
    short = Sizes(train=184, val=88, test=88, train_len=30, val_len=30, test_len=30)
    long_val = replace(short, val_len=50)
    ig = [estimate("phase4", sizes=z).to_dict()["steps"]["integrated gradients"] for z in (short, long_val)]
    assert ig[0] == ig[1]
    selection = [estimate("phase3", sizes=z).to_dict()["steps"]["refusal direction: selection"]
                 for z in (short, long_val)]
    assert selection[1] > selection[0]  # the direction is selected on val prompts
    assert estimate("phase4", sizes=long_val).total_bytes < estimate("phase4", seq_len=50).total_bytes


def test_logits_over_a_128k_vocabulary():
    # [batch, pos, vocab] float32 logits: a full-logit backward holds them and their gradient; the answer
    # cross-entropy holds its float32 log-probabilities (and the contiguous copy log_softmax makes)
    m = Model.of(LLAMA3_8B_2L, quant="nf4", dtype="float32", seq_len=57)
    full = m.backward(16, last_only=False)
    assert full["logits"] == full["logit gradients"] == 16 * 57 * 128256 * 4
    assert m.backward(16, last_only=True)["logits"] == 16 * 128256 * 4
    scores = m.answer_scores(16, 32, previous=True)
    assert scores["log-probabilities"] == scores["contiguous answer logits"] == 16 * 32 * 128256 * 4
    assert scores["previous batch's log-probabilities"] == scores["log-probabilities"]
    assert "log-probabilities" not in m.answer_scores(16, 1, previous=False)  # the forward holds more then


@pytest.mark.parametrize("phase", PHASES)
def test_weights_by_storage(phase):
    by = {(q, d): estimate(phase, quant=q, dtype=d).to_dict()["breakdown"]["weights"]
          for q, d in (("nf4", "bfloat16"), ("int8", "bfloat16"), ("none", "bfloat16"), ("none", "float32"))}
    assert by[("nf4", "bfloat16")] < by[("int8", "bfloat16")] < by[("none", "bfloat16")] < by[("none", "float32")]
    totals = [estimate(phase, quant=q, dtype="bfloat16").total_bytes for q in ("nf4", "int8", "none")]
    assert totals == sorted(totals)


def test_the_load_of_the_2_layer_rehearsal_model():
    # Measured on 2 CPU cores: 8.45 and 8.65 GB peak RSS loading the 2-layer 8B-wide NF4 model (float32
    # embeddings and head, 2.97 GB of bf16 shards), where the steady-state estimate says 5.47 GiB.
    steady = estimate_memory(LLAMA3_8B_2L, quant="nf4", dtype="float32", device="cpu")
    load = load_estimate(LLAMA3_8B_2L, quant="nf4", dtype="float32", device="cpu", file_bytes=2_973_804_960)
    parts = load.to_dict()["breakdown"]
    assert parts["weights"] == steady.weights_bytes and parts["safetensors pages read"] == 2_973_804_960
    assert parts["quantizing one weight"] == 4096 * 14336 * (4 + 10)
    for measured in (8.45e9, 8.65e9):
        assert 0.8 < measured / load.total_bytes < 1.2
        assert measured / steady.total_bytes > 1.4  # what the steady-state estimate missed
    # no file pages count on an accelerator: only a tensor in the file's dtype on its way to the device
    gpu = load_estimate(LLAMA3_8B, quant="nf4", dtype="bfloat16", device="cuda", file_bytes=16 * GIB).to_dict()
    assert "safetensors pages read" not in gpu["breakdown"] and gpu["breakdown"]["runtime"] == 0


def test_the_session_estimator_of_tiny(tiny):
    from fixtures.data import load_prompts
    from instruments.positions import post_instruction_length

    dataset = load_prompts(None).subsample(2)
    est = session_estimator(tiny, dataset)
    def longest(split: str) -> int:
        return max(int(tiny.encode([t])[1].sum()) for p in dataset.split(split) for t in (p.harmful, p.harmless))

    assert est.seq_len == max(longest(s) for s in ("train", "val", "test"))
    assert est.sizes == Sizes(train=len(dataset.split("train")), val=len(dataset.split("val")),
                              test=len(dataset.split("test")), train_len=longest("train"), val_len=longest("val"),
                              test_len=longest("test"), window=post_instruction_length(tiny))
    e = est("phase3", RefusalConfig(model="tiny"))
    assert e.to_dict()["breakdown"]["weights"] == sum(p.numel() * 4 for p in tiny.hf_model.parameters())


def test_the_side_effect_steps_score_the_answers_as_encoded():
    """Answers are scored re-tokenized from their text, which can be far longer than the tokens generated
    (the rehearsal model's filler tokens re-encode to ~9 pieces each: 89 tokens for 8 generated)."""
    step = {"phase4": "answer cross-entropy (harmless test)", "h1": "cross-category side effects"}
    for phase, name in step.items():
        budget = estimate(phase, sizes=replace(SIZES, answer_len=CFG.max_new_tokens)).to_dict()["steps"][name]
        assert estimate(phase).to_dict()["steps"][name] == budget  # before phase 2: the generation budget
        assert estimate(phase, sizes=replace(SIZES, answer_len=89)).to_dict()["steps"][name] > 2 * budget
    from fixtures.memory_phases import Estimator

    plain = Estimator(model_config=LLAMA3_8B, quant="nf4", dtype="float32", device="cpu", seq_len=57, sizes=SIZES)
    assert plain.answered(["any answer"]) is plain  # no tokenizer: nothing to measure
    counted = replace(plain, answer_tokens=len)
    assert counted.answered([]) is counted and counted.answered(["ab", "abcde"]).sizes.answer_len == 5


SESSION = '''
import pytest

@pytest.mark.phase2
def test_a_phase(subject, recorder):
    assert subject.n_layers
    recorder.save("generations/test-harmless", numbers={"texts": ["Sure, here is a long answer to that question."]})

@pytest.mark.h1
def test_a_hypothesis(subject):
    assert subject.n_heads
'''


def test_the_manifest_holds_each_phase_beside_its_estimate(pytester, monkeypatch, tiny):
    from fixtures.data import load_prompts

    pytester.makeini("[pytest]\nmarkers =\n    phase2: a phase\n    h1: a hypothesis\n")
    pytester.makepyfile(test_session=SESSION)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = pytester.path / "run"
    result = pytester.runpytest_subprocess("-p", "fixtures.plugin", "-p", "no:cacheprovider", "--model", "tiny",
                                           "--run-dir", str(run_dir), timeout=300)
    assert result.ret == 0, result.stdout.str()[-2000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for phase in ("phase2", "h1"):
        entry = manifest["phases"][phase]
        assert entry["tests"] == 1 and entry["peak_bytes"] > 0
        assert entry["estimated_bytes"] == entry["estimate"]["total_bytes"] > 0
        assert sum(entry["estimate"]["breakdown"].values()) == entry["estimated_bytes"]
        assert entry["measured_over_estimated"] == round(entry["peak_bytes"] / entry["estimated_bytes"], 3)
    # H1's side effects are estimated at the length of the answer phase 2 recorded, in tiny's tokens
    from fixtures.memory_phases import Estimator

    tiny_est = session_estimator(tiny, load_prompts(None))
    answer = len(tiny.tokenizer("Sure, here is a long answer to that question.", add_special_tokens=False)["input_ids"])
    assert tiny_est.answered(["Sure, here is a long answer to that question."]).sizes.answer_len == answer
    side = manifest["phases"]["h1"]["estimate"]["steps"]["cross-category side effects"]
    assert side == Estimator.__call__(replace(tiny_est, sizes=replace(tiny_est.sizes, answer_len=answer)), "h1",
                                      RefusalConfig(**{k: v for k, v in manifest["config"].items()
                                                       if k in RefusalConfig.__dataclass_fields__})
                                      ).to_dict()["steps"]["cross-category side effects"]
    load = manifest["model_load"]
    assert load["estimated_bytes"] == load["estimate"]["total_bytes"] > load["memory_estimate"]["weights_bytes"]
    assert load["measured_over_estimated"] == round(load["memory"]["peak_bytes"] / load["estimated_bytes"], 3)



def test_the_report_flags_an_estimate_off_by_more_than_a_fifth(tmp_path):
    from reports.render import render_report
    from reports.synthetic import build_run

    run_dir = build_run(tmp_path)
    render_report(run_dir)
    rows = [line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| phase")
            or line.startswith("| model load")]
    flagged = [row.split("|")[1].strip() for row in rows if "estimate off by more than 20%" in row]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    off = [p for p, e in manifest["phases"].items() if abs(e["measured_over_estimated"] - 1) > 0.2]
    assert flagged == off == ["phase3"]
    assert any(row.startswith("| model load") for row in rows)
