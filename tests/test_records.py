"""The record classes (hypotheses/records.py): every class round-trips, a record that is not of its
class's format fails with a message naming the result, the field and what was found, the phases'
recorder refuses to write such a record, the report marks one it meets as unreadable, and
reports/SCHEMA.md is the text generated from the classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures.recording import Record, Recorder
from hypotheses import records
from hypotheses.records import RecordError
from reports.synthetic import build_run

REPO_ROOT = Path(__file__).resolve().parents[1]

# Results the report never shows, so the synthetic run does not write them: built here, as the phases do.
HAND_BUILT = {
    "phase1/device": {"numbers": {"requested": "auto", "device": "cpu", "torch": "2.13.0"}},
    "phase1/quant": {"numbers": {"quant": "none", "dtype": "torch.float32", "linear_types": ["Linear"]}},
    "phase1/hooks": {"numbers": {"n_hooks_checked": 42, "quant": "none"}},
    "phase1/memory": {"numbers": {"load_peak_bytes": 10, "measured_weight_bytes": 8,
                                  "estimate": {"weights_bytes": 8, "total_bytes": 12, "total_gib": 0.0}}},
    "generations/test-harmful": {"numbers": {"texts": ["I can't.", "Sure"], "first_tokens": [40, 41],
                                             "refused": [True, False]}, "prompts": ["a?", "b?"]},
    "organism/bar-ce_increase": {"numbers": {"value": 0.05, "op": "<=", "threshold": 0.1, "met": True}},
    "organism/card": {"numbers": {"card": "# Card", "timings_seconds": {"train": 1.5, "total": 2.0}}},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("records"))


def _all_records(run_dir: Path) -> list[Record]:
    rec = Recorder(run_dir=run_dir)
    names = [json.loads(p.read_text())["name"] for p in sorted((run_dir / "results").glob("*.json"))]
    return [rec.load(n) for n in names]


def _record(name: str, **parts) -> Record:
    return Record(name=name, key="", numbers=parts.get("numbers", {}), prompts=parts.get("prompts", []),
                  verdict=parts.get("verdict"), arrays=parts.get("arrays", {}), recorded_at="")


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def test_every_class_round_trips_and_is_covered(run):
    loaded = _all_records(run) + [_record(name, **parts) for name, parts in HAND_BUILT.items()]
    seen = set()
    for record in loaded:
        typed = records.parse(record, strict=True)
        seen.add(type(typed))
        back = typed.to_record()
        assert _same(back["numbers"], record.numbers), record.name
        assert back["prompts"] == record.prompts and _same(back["verdict"], record.verdict), record.name
        assert sorted(back["arrays"]) == sorted(record.arrays), record.name
        for k, v in record.arrays.items():
            torch.testing.assert_close(back["arrays"][k], v, rtol=0, atol=0, equal_nan=True)
        assert _same(type(typed).from_record(typed.as_record(record.name), strict=True).to_record()["numbers"],
                     record.numbers)
    assert seen == set(records.CLASSES), f"no example of {set(records.CLASSES) - seen}"


def test_names_find_their_classes():
    assert records.class_for("phase3/heads") is records.HeadRanking
    assert records.class_for("verdicts/H3--cyber_malware") is records.VerdictRecord
    assert records.class_for("generations/train-harmless") is records.Generations
    assert len(records.REGISTRY) == len(records.CLASSES), "two record classes share a name"
    with pytest.raises(RecordError, match="phase9/new: no record class.*hypotheses/records_"):
        records.class_for("phase9/new")


def _heads(run: Path) -> Record:
    return Recorder(run_dir=run).load("phase3/heads")


def test_a_missing_field_fails_a_strict_read_and_passes_a_lenient_one(run):
    rec = _heads(run)
    numbers = {k: v for k, v in rec.numbers.items() if k != "atp_vs_exact_spearman"}
    partial = replace(rec, numbers=numbers)
    with pytest.raises(RecordError, match=r"phase3/heads: numbers\['atp_vs_exact_spearman'\] should be estimate "
                                          r".*found nothing"):
        records.HeadRanking.from_record(partial, strict=True)
    typed = records.HeadRanking.from_record(partial)  # a lenient read: the report shows n/a
    assert typed.atp_vs_exact_spearman is None and typed.ranking == rec.numbers["ranking"]


def test_a_wrong_rank_or_disagreeing_shapes_fail_even_a_lenient_read(run):
    rec = _heads(run)
    flat = replace(rec, arrays={**rec.arrays, "exact.denoising": rec.arrays["exact.denoising"].flatten()})
    with pytest.raises(RecordError, match=r"phase3/heads: arrays\['exact.denoising'\] should be a rank-2 tensor "
                                          r"\[layer, head\], found a tensor of shape \[24\]"):
        records.HeadRanking.from_record(flat)
    wider = replace(rec, arrays={**rec.arrays, "exact.noising": torch.zeros(6, 5)})
    with pytest.raises(RecordError, match=r"has 5 along 'head', but arrays\['exact.denoising'\] has 4"):
        records.HeadRanking.from_record(wider)


def test_nested_values_and_unknown_keys_are_named(run):
    rec = _heads(run)
    bad_row = [dict(rec.numbers["ranking"][0], effect="large"), *rec.numbers["ranking"][1:]]
    with pytest.raises(RecordError, match=r"numbers\['ranking'\]\[0\].effect should be float, found str 'large'"):
        records.HeadRanking.from_record(replace(rec, numbers={**rec.numbers, "ranking": bad_row}))
    est = {k: v for k, v in rec.numbers["atp_vs_exact_spearman"].items() if k != "ci_low"}
    with pytest.raises(RecordError, match=r"atp_vs_exact_spearman'\].ci_low should be float or null"):
        records.HeadRanking.from_record(replace(rec, numbers={**rec.numbers, "atp_vs_exact_spearman": est}),
                                        strict=True)
    with pytest.raises(RecordError, match=r"numbers \['surprise'\] are not fields of HeadRanking: add a field"):
        records.HeadRanking.from_record(replace(rec, numbers={**rec.numbers, "surprise": 1}), strict=True)
    bogus = [dict(rec.numbers["ranking"][0], component={"kind": "Bogus"})]
    with pytest.raises(RecordError, match="component instruments.components.from_json can read"):
        records.HeadRanking.from_record(replace(rec, numbers={**rec.numbers, "ranking": bogus}), strict=True)


def test_the_phases_recorder_refuses_what_the_report_could_not_read(tmp_path, run):
    checked = records.Checked(Recorder(run_dir=tmp_path))
    good = _heads(run)
    with pytest.raises(RecordError, match="phase3/heads"):
        checked.save("phase3/heads", numbers={**good.numbers, "n_heads": np.int64(24)}, arrays=good.arrays,
                     prompts=good.prompts)  # written as the string "24" (default=str): no reader could use it
    with pytest.raises(RecordError, match="no record class"):
        checked.save("phase9/new", numbers={"x": 1})
    with pytest.raises(RecordError, match=r"generations/test-harmful: numbers\['refused'\] has 1 along 'prompt'"):
        checked.memo("generations/test-harmful", "k", lambda: {"numbers": {"texts": ["a", "b"], "first_tokens": [1, 2],
                                                                           "refused": [True]}, "prompts": ["p", "q"]})
    assert not (tmp_path / "results").exists(), "nothing unreadable may land in the run directory"
    checked.save("phase3/heads", numbers=good.numbers, arrays=good.arrays, prompts=good.prompts)
    assert records.load(tmp_path, records.HeadRanking).n_heads == good.numbers["n_heads"]
    assert checked.run_dir == tmp_path  # everything else is the wrapped recorder's


def test_records_save_checks_a_typed_result(tmp_path):
    rec = Recorder(run_dir=tmp_path)
    records.save(rec, records.Device(requested="auto", device="cpu", torch="2.13.0"))
    assert records.load(tmp_path, records.Device).device == "cpu"
    with pytest.raises(RecordError, match=r"phase1/quant: numbers\['linear_types'\] should be \[str\]"):
        records.save(rec, records.Quant(quant="none", dtype="torch.float32", linear_types="Linear"))


def test_the_report_marks_a_record_of_the_wrong_shape_unreadable(tmp_path):
    from reports.context import load_run

    run = build_run(tmp_path)
    heads = Recorder(run_dir=run).load("phase3/heads")
    (run / "results" / "phase3_heads.json").unlink()  # results are never overwritten: write it afresh
    Recorder(run_dir=run).save("phase3/heads", numbers=heads.numbers, prompts=heads.prompts,
                               arrays={**heads.arrays, "atp.denoising": torch.zeros(3)})
    ctx = load_run(run)
    assert "phase3/heads" in ctx.missing and "RecordError" in ctx.unreadable["phase3/heads"]
    assert ctx.result(records.LogitLens) is not None and ctx.result(records.HeadRanking) is None


SESSION_TEST = '''
import pytest

from hypotheses.conftest import recorder  # noqa: F401 - the phases' recorder fixture
from hypotheses.records import Checked, RecordError


def test_the_phases_recorder_is_checked(recorder):
    assert isinstance(recorder, Checked)
    with pytest.raises(RecordError, match="phase2/first_token"):
        recorder.save("phase2/first_token", numbers={"refusal_tokens": "I"})
    recorder.save("phase1/hooks", numbers={"n_hooks_checked": 3, "quant": "none"})
'''


def test_hypotheses_conftest_wraps_the_session_recorder(tmp_path):
    (tmp_path / "test_wrapped.py").write_text(textwrap.dedent(SESSION_TEST))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "fixtures.plugin", "-p", "no:cacheprovider", "-c",
                          os.devnull, "--rootdir", str(tmp_path), "-q", "--model", "tiny", "--no-refusal-report",
                          "--run-dir", str(tmp_path / "run"), str(tmp_path / "test_wrapped.py")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "run" / "results" / "phase1_hooks.json").exists()
    assert not (tmp_path / "run" / "results" / "phase2_first_token.json").exists()


def test_schema_md_is_generated_from_the_classes():
    committed = records.SCHEMA_PATH.read_text()
    assert committed == records.schema(), (f"reports/SCHEMA.md differs from the record classes: regenerate it with "
                                           f"`{records.SCHEMA_COMMAND}` (and commit it)")
    for cls in records.CLASSES:
        assert f"### `{cls.NAME}` ({cls.__name__})" in committed
