"""Recording: round trips, atomic writes, never-overwrite, resume, worker manifests, provenance."""

from __future__ import annotations

import datetime as dt
import json
import os
import re

import pytest
import torch

from fixtures import storage
from fixtures.recording import Recorder, RecordingError, latest_run_dir, merge_worker_manifests, safe_name

CONFIG = {"model": "tiny", "seed": 0}


def _open(root, **kw) -> Recorder:
    kw.setdefault("run_dir", None)
    kw.setdefault("resume", False)
    return Recorder.open(alias="tiny", config=CONFIG, root=root, **kw)


def _stray_temp_files(folder) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_save_load_round_trip(tmp_path):
    rec = _open(tmp_path)
    arrays = {"scores": torch.linspace(-1, 1, 7), "heads": torch.arange(12).reshape(3, 4),
              "half": torch.tensor([0.5, 1.5], dtype=torch.float16)}
    numbers = {"rate": 0.25, "n": 40, "nested": {"ci": [0.1, 0.4]}, "label": "x"}
    verdict = {"claim": "H1", "status": "supported", "p": 0.001}
    saved = rec.save("phase3/heads", numbers=numbers, arrays=arrays, prompts=["a", "b"], verdict=verdict)
    loaded = rec.load("phase3/heads")
    assert loaded is not None
    assert (loaded.name, loaded.key) == ("phase3/heads", saved.key)
    assert loaded.numbers == numbers and loaded.prompts == ["a", "b"] and loaded.verdict == verdict
    assert set(loaded.arrays) == set(arrays)
    for name, tensor in arrays.items():
        assert loaded.arrays[name].dtype == tensor.dtype and torch.equal(loaded.arrays[name], tensor)
    assert dt.datetime.fromisoformat(loaded.recorded_at).tzinfo is not None
    assert rec.load("never-saved") is None


def test_result_without_arrays_writes_no_array_file(tmp_path):
    rec = _open(tmp_path)
    rec.save("plain", numbers={"x": 1})
    assert (rec.run_dir / "results" / "plain.json").exists()
    assert not (rec.run_dir / "results" / "plain.safetensors").exists()
    assert rec.load("plain").arrays == {}


def test_safe_name_makes_test_ids_file_names():
    assert safe_name("tests/x.py::t[a-b]") == "tests_x.py_t_a-b"
    assert "/" not in safe_name("phase2/refusal_rates")


def test_atomic_writes_leave_no_temp_files(tmp_path):
    rec = _open(tmp_path)
    for i in range(3):
        rec.save(f"r{i}", numbers={"i": i}, arrays={"a": torch.full((5,), float(i))})
    rec.note(dataset={"sha256": "0" * 64})
    rec.finish(status="finished")
    assert not _stray_temp_files(rec.run_dir)


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    storage.atomic_write_json(target, {"version": 1})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.atomic_write_json(target, {"version": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"version": 1}
    assert not _stray_temp_files(tmp_path)


def test_same_name_with_another_key_is_never_overwritten(tmp_path):
    rec = _open(tmp_path)
    rec.save("result", key="k1", numbers={"v": 1})
    rec.save("result", key="k1", numbers={"v": 1})  # the same key again is fine
    with pytest.raises(RecordingError) as err:
        rec.save("result", key="k2", numbers={"v": 2})
    assert "'result'" in str(err.value) and "never overwritten" in str(err.value)
    assert rec.load("result").numbers == {"v": 1} and rec.load("result").key == "k1"


def test_default_key_depends_on_content(tmp_path):
    rec = _open(tmp_path)
    rec.save("auto", numbers={"v": 1})
    with pytest.raises(RecordingError):
        rec.save("auto", numbers={"v": 2})


def test_memo_reuses_with_resume_and_computes_without(tmp_path):
    first = _open(tmp_path)
    first.memo("gen", "key-1", lambda: {"numbers": {"texts": ["hi"]}, "arrays": {"t": torch.ones(2)}})

    def must_not_run():
        raise AssertionError("compute was called although the result is recorded")

    resumed = _open(tmp_path, resume=True)
    assert resumed.run_dir == first.run_dir
    record = resumed.memo("gen", "key-1", must_not_run)
    assert record.numbers == {"texts": ["hi"]} and torch.equal(record.arrays["t"], torch.ones(2))

    calls = []
    fresh = Recorder(run_dir=first.run_dir, resume=False)
    fresh.memo("gen", "key-1", lambda: calls.append(1) or {"numbers": {"texts": ["hi"]}})
    assert calls == [1], "without --resume the result is recomputed"

    with pytest.raises(RecordingError):  # with resume, a changed key recomputes, but may not overwrite
        resumed.memo("gen", "key-2", lambda: {"numbers": {"texts": ["other"]}})


def test_interrupted_run_is_resumable(tmp_path):
    rec = _open(tmp_path)
    rec.save("a", key="ka", numbers={"v": 1})
    rec.save("b", key="kb", arrays={"x": torch.arange(3)})
    run_dir = rec.run_dir
    del rec  # the process dies: no finish(), no cleanup

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert latest_run_dir("tiny", root=tmp_path) == run_dir
    reopened = _open(tmp_path, resume=True)
    assert reopened.run_dir == run_dir
    assert reopened.load("a").numbers == {"v": 1}
    assert torch.equal(reopened.load("b").arrays["x"], torch.arange(3))
    assert reopened.memo("a", "ka", lambda: pytest.fail("recomputed a finished result")).numbers == {"v": 1}
    assert len(reopened.manifest["resumed_utc"]) == 1
    assert reopened.manifest["started_utc"] == manifest["started_utc"]


def test_new_runs_get_new_directories(tmp_path):
    one, two = _open(tmp_path), _open(tmp_path)
    assert one.run_dir != two.run_dir
    assert one.run_dir.parent == two.run_dir.parent == tmp_path / "tiny"
    assert latest_run_dir("other", root=tmp_path) is None


def test_run_dir_with_results_needs_resume(tmp_path):
    rec = _open(tmp_path)
    rec.save("a", numbers={"v": 1})
    with pytest.raises(RecordingError) as err:
        _open(tmp_path, run_dir=str(rec.run_dir))
    assert "already holds results" in str(err.value) and "--resume" in str(err.value)
    again = _open(tmp_path, run_dir=str(rec.run_dir), resume=True)
    assert again.load("a").numbers == {"v": 1}
    empty = tmp_path / "explicit"
    assert _open(tmp_path, run_dir=str(empty)).run_dir == empty  # a new or empty --run-dir is fine


def test_merge_worker_manifests(tmp_path):
    run_dir = tmp_path / "run"
    main = _open(tmp_path, run_dir=str(run_dir))
    gw0 = _open(tmp_path, run_dir=str(run_dir), worker="gw0")
    gw1 = _open(tmp_path, run_dir=str(run_dir), worker="gw1")
    assert gw0.manifest_path == run_dir / "workers" / "gw0.json"
    gw0.add_phase_timing("phase2", seconds=1.5, peak_bytes=100, test="t::a")
    gw0.add_phase_timing("phase3", seconds=4.0, peak_bytes=700, test="t::c")
    gw1.add_phase_timing("phase2", seconds=2.25, peak_bytes=300, test="t::b")
    gw0.finish(status="finished")
    gw1.finish(status="failed")
    del main

    merge_worker_manifests(run_dir)
    merged = json.loads((run_dir / "manifest.json").read_text())
    assert merged["phases"]["phase2"] == {"seconds": 3.75, "peak_bytes": 300, "tests": 2}
    assert merged["phases"]["phase3"] == {"seconds": 4.0, "peak_bytes": 700, "tests": 1}
    assert set(merged["tests"]) == {"t::a", "t::b", "t::c"}
    assert merged["workers"] == ["gw0", "gw1"]
    assert merged["status"] == "failed"  # one failed worker fails the run

    merge_worker_manifests(run_dir)  # merging again (e.g. after a --resume session) must not double count
    again = json.loads((run_dir / "manifest.json").read_text())
    assert again["phases"] == merged["phases"]


def test_merge_after_a_resumed_session_counts_each_test_once(tmp_path):
    run_dir = tmp_path / "run"
    _open(tmp_path, run_dir=str(run_dir))
    _open(tmp_path, run_dir=str(run_dir), worker="gw0").add_phase_timing("phase2", seconds=1.0, peak_bytes=10,
                                                                         test="t::a")
    merge_worker_manifests(run_dir)
    # second session, --resume: the worker reopens its manifest and adds one more test
    _open(tmp_path, run_dir=str(run_dir), worker="gw0", resume=True).add_phase_timing(
        "phase2", seconds=2.0, peak_bytes=5, test="t::b")
    merge_worker_manifests(run_dir)
    merged = json.loads((run_dir / "manifest.json").read_text())
    assert merged["phases"]["phase2"] == {"seconds": 3.0, "peak_bytes": 10, "tests": 2}


def test_merge_without_workers_is_a_no_op(tmp_path):
    rec = _open(tmp_path)
    before = (rec.run_dir / "manifest.json").read_text()
    merge_worker_manifests(rec.run_dir)
    assert (rec.run_dir / "manifest.json").read_text() == before


def test_manifest_has_provenance(tmp_path):
    rec = _open(tmp_path)
    manifest = json.loads(rec.manifest_path.read_text())
    assert manifest["config"] == CONFIG and manifest["status"] == "running"
    prov = manifest["provenance"]
    assert {"versions", "code_version", "git_commit", "git_dirty", "utc_time", "machine"} <= set(prov)
    assert prov["versions"]["python"].count(".") == 2
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
    assert dt.datetime.fromisoformat(prov["utc_time"]).utcoffset() == dt.timedelta(0)
    assert {"host", "platform", "processor", "cpu_count"} <= set(prov["machine"])
    assert prov["machine"]["cpu_count"] == os.cpu_count()
    rec.finish(status="finished")
    final = json.loads(rec.manifest_path.read_text())
    assert final["status"] == "finished" and "finished_utc" in final
