"""Session fixtures shared by the research phases: the subject's own behaviour on the dataset.

Generations are the expensive part of Phase 2 and several phases need them, so each set
is computed once per session and recorded; with --resume a recorded set is reused.
"""

from __future__ import annotations

import pytest

from fixtures.storage import CODE_VERSION, stable_hash
from fixtures.sweeps import cached_generations
from hypotheses.baseline import OPENING_TOKENS, SplitGenerations
from instruments import behavior, metrics, progress


def _generations(subject, recorder, dataset, split: str, max_new_tokens: int, batch_size: int) -> SplitGenerations:
    pairs = dataset.split(split)
    out = {}
    for side in ("harmful", "harmless"):
        prompts = [getattr(p, side) for p in pairs]
        key = stable_hash("generations", subject.weights_sha256, subject.quant, dataset.sha256, prompts,
                          max_new_tokens, CODE_VERSION)

        def compute(prompts=prompts):
            # through the user-cache generation store: the organism's build already made the train
            # split's (fixtures/organism/evaluate.py uses the same settings)
            # the instrument's line cannot know the split and side; a quiet task names them only when it runs long
            with progress.task(f"generations: {split} split, {side}", None, quiet=True):
                gen = cached_generations(subject, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
            return {"numbers": {"texts": list(gen.texts), "first_tokens": list(gen.first_tokens),
                                "refused": list(gen.refused)}, "prompts": prompts}

        rec = recorder.memo(f"generations/{split}-{side}", key, compute)
        out[side] = behavior.Generations(prompts=tuple(rec.prompts), texts=tuple(rec.numbers["texts"]),
                                         first_tokens=tuple(rec.numbers["first_tokens"]),
                                         refused=tuple(rec.numbers["refused"]))
    return SplitGenerations(**out)


@pytest.fixture(scope="session")
def train_generations(subject, recorder, dataset, refusal_config) -> SplitGenerations:
    """Short completions of the train split: enough to see how the model opens an answer."""
    return _generations(subject, recorder, dataset, "train", max_new_tokens=OPENING_TOKENS,
                        batch_size=refusal_config.batch_size)


@pytest.fixture(scope="session")
def test_generations(subject, recorder, dataset, refusal_config) -> SplitGenerations:
    """Completions of the held-out test split, long enough for the refusal classifier."""
    return _generations(subject, recorder, dataset, "test", max_new_tokens=refusal_config.max_new_tokens,
                        batch_size=refusal_config.batch_size)


@pytest.fixture(scope="session")
def refusal_tokens(subject, train_generations) -> metrics.RefusalTokens:
    """The model's own refusal and compliance opening tokens, found on the train split."""
    gen = train_generations
    return metrics.tokens_from_generations(subject.tokenizer, gen.harmful, gen.harmless)


# ----------------------------------------------------------------------------- the study (phases 2-5, H1-H3)

def _sweep_batch(subject, refusal_config) -> int:
    """--refusal-max-batch, lowered if the memory estimator says a streamed sweep or AtP's backward would not fit."""
    import psutil

    from fixtures.memory_phases import max_batch_for_budget
    from instruments.positions import post_instruction_length

    budget = refusal_config.memory_budget_gb or 0.8 * psutil.virtual_memory().available / 2**30
    window = None if refusal_config.patch_positions == "all" else post_instruction_length(subject)
    fits = max_batch_for_budget(subject.hf_model.config.to_dict(), budget_gib=budget, quant=subject.quant,
                                dtype=str(subject.dtype).removeprefix("torch."), device=subject.device,
                                n_prompts=refusal_config.patch_pairs, window=window)
    return max(1, min(refusal_config.max_batch, fits or 1))


@pytest.fixture(scope="session")
def study(subject, dataset, refusal_tokens, refusal_config, recorder, test_generations):
    """The lazily computed study of the subject: each phase test pulls the stages it needs.

    The exact head sweep streams one layer at a time into the run directory's checkpoints,
    so an interrupted run resumed with --resume loses no finished layer.
    """
    from dataclasses import replace

    from fixtures.sweeps import run_layer_sweep
    from hypotheses.study import Study, StudyData
    from instruments.patching import PatchResult

    cfg = replace(refusal_config, max_batch=_sweep_batch(subject, refusal_config))
    data = StudyData.from_prompt_set(dataset)
    recorder.note(study={"max_batch": cfg.max_batch, "judge": cfg.judge, "patch_pairs": cfg.patch_pairs,
                         "sweep_pairs": cfg.sweep_pairs})

    def sweeper(fn, layers):
        study_pairs = [(p.harmful, p.harmless) for p in data.train]
        key = stable_hash("heads-denoising", subject.weights_sha256, subject.quant, str(subject.dtype),
                          dataset.sha256, study_pairs, cfg.patch_pairs, cfg.sweep_pairs,
                          sorted(refusal_tokens.refusal_ids),
                          sorted(refusal_tokens.compliance_ids), CODE_VERSION)
        return run_layer_sweep(fn, list(layers), recorder.run_dir / "checkpoints" / "heads-denoising", key,
                               result_type=PatchResult)

    def preregister(record, digest):
        from fixtures.recording import write_preregistration

        recorder.note(preregistration=write_preregistration(recorder.run_dir, record, digest))

    study = Study(handle=subject, data=data, tokens=refusal_tokens, cfg=cfg, sweeper=sweeper,
                  test_generations=test_generations, preregister=preregister)
    yield study
    # where the study's time went, stage by stage (exclusive of nested stages), slowest first
    recorder.note(study_stage_seconds=dict(sorted(study.clock.seconds.items(), key=lambda kv: -kv[1])))


_ORDER = {"phase1": 1, "phase2": 2, "phase3": 3, "phase4": 4, "phase5": 5, "h1": 6, "h2": 7, "h3": 8, "criteria": 9,
          "report": 100}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the research phases in their order, then the hypotheses, then the criteria.

    Results do not depend on the order (the study computes each stage on first use), but
    the per-phase durations and memory in the manifest do, and a reader of the terminal
    output expects phase 3 before H1. Items outside hypotheses/ keep their places.
    """
    def rank(item: pytest.Item) -> float:
        marks = [_ORDER[m.name] for m in item.iter_markers() if m.name in _ORDER]
        return max(marks) if marks else 0
    items.sort(key=rank)  # stable: ties keep their collected order


@pytest.fixture(scope="session", autouse=True)
def _dataset_in_manifest(recorder, dataset):
    """Every research run records which prompts it used (path, hash, split sizes) in its manifest."""
    recorder.note(dataset={"path": str(dataset.path), "sha256": dataset.sha256, "sizes": dataset.sizes(),
                           "categories": list(dataset.categories)})


@pytest.fixture(scope="session", autouse=True)
def _preregistration_in_every_run(recorder, refusal_config, dataset):
    """A run that decided no verdict (its study never scored a test pair) still writes the bars and
    rules it would have been held to, with no selection, so every run has a preregistration.json."""
    yield
    if (recorder.run_dir / "preregistration.json").is_file():
        return
    from fixtures.recording import write_preregistration
    from hypotheses.preregistration import undecided

    model = recorder.manifest.get("model") or {}
    sizes = {split: len(dataset.split(split)) for split in ("train", "val", "test")}
    rec = undecided(refusal_config, sizes, {"alias": str(model.get("alias", "")),
                                            "weights_sha256": str(model.get("weights_sha256", ""))})
    recorder.note(preregistration=write_preregistration(recorder.run_dir, rec, stable_hash("preregistration", rec)))


# ----------------------------------------------------------------------------- every result is readable
# (hypotheses/records.py: a phase that saves what the report cannot read fails here, not in the report)

@pytest.fixture(scope="session")
def recorder(recorder):
    """The run's recorder, each save and memo read back strictly through its record class before it is
    written: a result that does not match its class, or a name with no class, fails the test saving it."""
    from hypotheses.records import Checked

    return Checked(recorder)
