"""Choose on train, score on test: no stage that selects components ever reads a test pair,
and the pre-registration is made before any stage scores one.

A spy around the planted model's handle records every prompt the study encodes, with the
study stage that asked for it (the innermost running stage). Every stage and every verdict
is computed, so a selection stage that sneaks a test prompt in fails here; so is every
stage behind a phase record, phase 2's first (as in a pytest run), the rest after the verdicts.
"""

from __future__ import annotations

import json

import pytest

from fixtures.planted import build_planted, selfvalidation_config
from hypotheses.phase_stages import BASELINE_STAGES, PHASE_RECORDS, PHASE_STAGES
from hypotheses.study import SELECTION_STAGES, StudyData, run_study

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


class Spy:
    """The handle, with every ``encode`` call logged as (stage, prompts)."""

    def __init__(self, handle, log: list):
        self._handle, self._log, self.clock = handle, log, None

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def encode(self, prompts, **kw):
        stage = self.clock.running[-1] if self.clock and self.clock.running else "<outside the study>"
        self._log.append((stage, tuple(prompts)))
        return self._handle.encode(prompts, **kw)


@pytest.fixture(scope="module")
def spied():
    planted = build_planted(seed=0)
    log: list = []
    events: list = []
    spy = Spy(planted.handle, log)
    from hypotheses.baseline import SplitGenerations
    from hypotheses.evidence import harmful, harmless
    from hypotheses.study import Study
    from instruments.behavior import generate

    data = StudyData.from_prompt_set(planted.dataset)
    # the recorded answers phase 2's rates read (the planted model writes bytes; a few suffice)
    answers = SplitGenerations(harmful=generate(planted.handle, harmful(data.test), max_new_tokens=2),
                               harmless=generate(planted.handle, harmless(data.test), max_new_tokens=2))
    study = Study(handle=spy, data=data, tokens=planted.tokens, cfg=selfvalidation_config(), test_generations=answers,
                  preregister=lambda record, digest: events.append((len(log), record, digest)))
    spy.clock = study.clock
    for name in BASELINE_STAGES:  # phase 2 runs first and chooses nothing
        getattr(study, name)
    study.verdicts  # noqa: B018 - every stage
    for name in PHASE_STAGES:
        getattr(study, name)
    return study, log, events, data


def _test_prompts(data) -> set[str]:
    return {p.harmful for p in data.test} | {p.harmless for p in data.test}


def test_no_selection_stage_reads_a_test_pair(spied):
    study, log, _, data = spied
    test = _test_prompts(data)
    leaks = {stage for stage, prompts in log if stage in SELECTION_STAGES and test & set(prompts)}
    assert not leaks, f"selection stages read test prompts: {sorted(leaks)}"
    ran = {stage for stage, _ in log}
    assert {"atp", "ranking", "neurons", "direction", "category_heads", "detection_val"} <= ran


def test_the_preregistration_comes_before_any_test_pair_is_scored(spied):
    study, log, events, data = spied
    assert len(events) == 1, "the pre-registration is made once"
    at, record, digest = events[0]
    test = _test_prompts(data)
    # the behaviour gate reads the test split to decide whether there is refusal to explain at all, and
    # phase 2 describes it; neither chooses anything (in a pytest run the gate reads phase 2's judgements)
    allowed = {"behaviour", *BASELINE_STAGES}
    before = [stage for stage, prompts in log[:at] if test & set(prompts) and stage not in allowed]
    assert not before, f"stages scored test pairs before the pre-registration: {sorted(set(before))}"
    assert any(test & set(prompts) for _, prompts in log[at:]), "the study scores test pairs after it"
    assert all(v.numbers["preregistration"] == digest for v in study.verdicts)
    sel = record["selected"]
    assert sel["h1_components"]["count"] == len(study.h1_set) and sel["direction"]["layer"] == study.direction[1].layer
    bars = {(ln["claim"], ln["evidence"]): ln["bar"] for ln in record["lines"]}
    assert bars[("H1", "patching")] == study.cfg.h1_share and bars[("C2", "ablation")] == study.cfg.ablation_drop
    json.dumps(record)  # the record is JSON as it is


def test_every_phase_record_comes_from_a_stage(spied):
    """Each phase stage ran (the manifest's study_stage_seconds names it) and its record, under the
    name the table gives it, reads back strictly through its record class (what a phase's save checks)."""
    from hypotheses import records

    study, log, _, _ = spied
    assert set(PHASE_STAGES) <= set(study.clock.seconds), sorted(set(PHASE_STAGES) - set(study.clock.seconds))
    assert not set(PHASE_STAGES) & set(SELECTION_STAGES), "a phase record chooses nothing"
    for name, stage in PHASE_RECORDS.items():
        result = getattr(study, stage).record()
        assert result.NAME == name, (stage, result.NAME)
        records.check(name, **{part: value for part, value in result.to_record().items() if value})
    # phase 2's stages read the test split and nothing else (the rates read the recorded answers only)
    test = _test_prompts(spied[3])
    for name in BASELINE_STAGES:
        read = [set(prompts) for stage, prompts in log if stage == name]
        assert all(r <= test for r in read), f"{name} reads prompts outside the test split"
        assert bool(read) == (name in ("first_token", "logit_lens", "attention_entropy")), name


def test_each_phase_test_saves_its_stage():
    """The table a run built outside pytest records through names the stage each phase test saves."""
    from pathlib import Path

    import hypotheses

    source = "".join(p.read_text() for p in sorted(Path(hypotheses.__file__).parent.glob("test_phase*.py")))
    for name, stage in PHASE_RECORDS.items():
        assert f"study.{stage}\n" in source, f"no phase test reads study.{stage} (recorded as {name})"
    assert source.count("records.save(recorder, ") >= len(PHASE_RECORDS)


def test_a_changed_preregistration_is_kept_and_reported(tmp_path):
    from fixtures.recording import write_preregistration

    first = write_preregistration(tmp_path, {"bars": {"h1_share": 0.8}}, "a" * 64)
    assert first["changed"] is False and (tmp_path / "preregistration.json").is_file()
    assert write_preregistration(tmp_path, {"bars": {"h1_share": 0.8}}, "a" * 64)["changed"] is False
    second = write_preregistration(tmp_path, {"bars": {"h1_share": 0.9}}, "b" * 64)
    assert second["changed"] is True and second["previous"] == "a" * 64 and "aaaaaaaaaaaa" in second["note"]
    kept = json.loads((tmp_path / "preregistration.aaaaaaaaaaaa.json").read_text())
    assert kept["record"]["bars"]["h1_share"] == 0.8
    assert json.loads((tmp_path / "preregistration.json").read_text())["sha256"] == "b" * 64


def test_non_default_bars_reach_every_title_and_line(spied):
    from dataclasses import replace

    study, _, _, data = spied
    cfg = replace(study.cfg, h1_fraction=0.1, h1_share=0.9, min_heads=7, ablation_drop=0.25, gradient_r=0.6)
    planted = build_planted(seed=0)
    other = run_study(planted.handle, data, planted.tokens, cfg)
    by = {(v.claim, v.evidence): v for v in other.verdicts}
    assert "fewer than 10%" in by[("H1", "patching")].numbers["title"]
    assert "more than 90%" in by[("H1", "overall")].numbers["title"]
    assert by[("H1", "patching")].numbers["bar"] == 0.9 and "bar: > 0.9" in by[("H1", "patching")].summary
    assert "At least 7 heads" in by[("C1", "patching")].numbers["title"]
    assert "25%" in by[("C2", "ablation")].numbers["title"] and by[("C2", "ablation")].numbers["bar"] == 0.25
    assert "r > 0.6" in by[("S1", "gradients")].numbers["title"]
    assert not any("fewer than 5%" in v.numbers["title"] or "than 80%" in v.numbers["title"] for v in other.verdicts)


def test_a_run_that_decides_nothing_preregisters_its_bars_and_no_selection(spied):
    from hypotheses.preregistration import record, undecided

    study, _, events, _ = spied
    rec = undecided(study.cfg, {"train": 1, "val": 1, "test": 1}, {"alias": "tiny", "weights_sha256": "x"})
    decided = events[0][1]
    assert rec["selected"] is None and "decided no verdict" in rec["note"]
    assert rec["lines"] == decided["lines"] and rec["rules"] == decided["rules"] and rec["bars"] == decided["bars"]
    assert record(study) == decided  # the record is a function of the study: the same on a rerun
