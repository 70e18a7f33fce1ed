"""Typed results: one record class per recorded result, the registry that finds a name's class, and
the checks that keep the phases, the report and the explorer on one format.

    from hypotheses import records
    heads = records.load(run_dir, records.HeadRanking)  # None when not recorded, RecordError when unreadable
    heads.ranking[0]["label"], heads.exact_denoising.shape  # [layer, head]
    records.save(recorder, records.Device(requested="auto", device="cpu", torch="2.13.0"))

The classes live in ``records_behaviour`` (phases 1-2, generations, the organism), ``records_study``
(phases 3-5) and ``records_claims`` (H1-H3, verdicts), in the grammar of ``records_spec``. The
phases' recorder is wrapped (:class:`Checked`, hypotheses/conftest.py) so that every save is read
back strictly through its class before anything is written: a result the report could not read
fails the test that saves it, and a name with no class is refused. reports/SCHEMA.md is generated
from the classes: ``python -m hypotheses.records --schema``.
"""

from __future__ import annotations

import argparse
import fnmatch
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from fixtures.recording import Record, Recorder
from fixtures.storage import REPO_ROOT
from hypotheses import records_behaviour as behaviour
from hypotheses import records_claims as claims
from hypotheses import records_study as study
from hypotheses.records_behaviour import (AttentionEntropy, Device, FirstToken, Generations, Hooks, LogitLens, Memory,
                                          OrganismBar, OrganismCard, Quant, RefusalRates)
from hypotheses.records_claims import Accumulation, CrossCategory, DirectEffects, EffectShare, KeywordAttention, \
    VerdictRecord
from hypotheses.records_spec import RecordError, Result, checked
from hypotheses.records_study import (Ablation, ActivationScatter, AttentionPatterns, Circuit, Gradients,
                                      HeadRanking, LayerPatching, NeuronCatalogue, RefusalDirection)

__all__ = ["Ablation", "Accumulation", "ActivationScatter", "AttentionEntropy", "AttentionPatterns", "Checked",
           "Circuit", "CrossCategory", "Device", "DirectEffects", "EffectShare", "FirstToken", "Generations",
           "Gradients", "HeadRanking", "Hooks", "KeywordAttention", "LayerPatching", "LogitLens", "Memory",
           "NeuronCatalogue", "OrganismBar", "OrganismCard", "Quant", "RecordError", "RefusalDirection",
           "RefusalRates", "Result", "VerdictRecord", "class_for", "load", "parse", "save", "schema"]

R = TypeVar("R", bound=Result)
CLASSES: tuple[type[Result], ...] = behaviour.CLASSES + study.CLASSES + claims.CLASSES
REGISTRY: Mapping[str, type[Result]] = {cls.NAME: cls for cls in CLASSES}
SCHEMA_PATH = REPO_ROOT / "reports" / "SCHEMA.md"
SCHEMA_COMMAND = "python -m hypotheses.records --schema"


def class_for(name: str) -> type[Result]:
    """The record class of a result name (a pattern such as ``verdicts/*`` covers a family of names)."""
    found = REGISTRY.get(name) or next((cls for pattern, cls in REGISTRY.items()
                                        if "*" in pattern and fnmatch.fnmatchcase(name, pattern)), None)
    if found is None:
        raise RecordError(f"{name}: no record class has this name, so no reader knows its format; add one in "
                          f"hypotheses/records_*.py and list it in that module's CLASSES (known: "
                          f"{', '.join(REGISTRY)})")
    return found


def parse(record: Record, *, strict: bool = False) -> Result:
    """A Record read through the class its name has (RecordError when it does not match)."""
    return class_for(record.name).from_record(record, strict=strict)


def load(source: Recorder | Checked | Path | str, cls: type[R], name: str | None = None) -> R | None:
    """The result ``name`` (default: the class's own) of a recorder or run directory, typed; None when it
    was not recorded. RecordError when it does not match its class; a torn file raises what reading it raises."""
    name = name or cls.NAME
    if "*" in name:
        raise ValueError(f"{cls.__name__} covers the names {cls.NAME}: pass the result's name")
    if class_for(name) is not cls:
        raise ValueError(f"{name} is recorded as {class_for(name).__name__}, not {cls.__name__}")
    recorder = Recorder(run_dir=Path(source)) if isinstance(source, (str, Path)) else source
    record = recorder.load(name)
    return None if record is None else cls.from_record(record)  # type: ignore[return-value]


def check(name: str, **parts: Any) -> Result:
    """What saving ``parts`` (Recorder.save's numbers, arrays, prompts, verdict) under ``name`` would write,
    read back strictly through its class."""
    return checked(class_for(name), name, **parts)


def save(recorder: Recorder | "Checked", result: Result, name: str | None = None) -> Record:
    """Record a typed result (checked first, so nothing unreadable is ever written)."""
    name = name or result.NAME
    # the parts a result lacks are left out, as a phase leaves them out (the key hashes what is given)
    parts = {part: value for part, value in result.to_record().items() if value}
    check(name, **parts)
    return recorder.save(name, **parts)


@dataclass(frozen=True)
class Checked:
    """A Recorder whose every save and memo is checked before it is written (a result that fails its
    class's strict read raises RecordError, and nothing lands in the run directory, so a fixed rerun
    with --resume is not blocked by a bad file). Everything else is the wrapped recorder's."""

    inner: Recorder

    def __getattr__(self, attr: str) -> Any:
        if attr == "inner":  # not yet set (copy, pickle): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def save(self, name: str, *, key: str | None = None, numbers: dict[str, Any] | None = None,
             arrays: dict[str, Any] | None = None, prompts: list[str] | None = None,
             verdict: dict[str, Any] | None = None) -> Record:
        check(name, numbers=numbers, arrays=arrays, prompts=prompts, verdict=verdict)
        return self.inner.save(name, key=key, numbers=numbers, arrays=arrays, prompts=prompts, verdict=verdict)

    def memo(self, name: str, key: str, compute: Callable[[], dict[str, Any]]) -> Record:
        def computed() -> dict[str, Any]:
            out = compute()
            check(name, **out)
            return out
        return self.inner.memo(name, key, computed)


# ----------------------------------------------------------------------------- reports/SCHEMA.md

PREAMBLE = """\
# What a run directory holds (the contract between the phases, the report and the explorer)

<!-- Generated from hypotheses/records*.py by `{command}`: edit the classes, not this file. -->

A run directory is `runs/<model-alias>/<run-id>/` (see `fixtures/recording.py`):

    manifest.json                config, model (describe()), model_load (its peak beside its estimate),
                                 dataset, provenance (versions, commit, UTC time, machine), phases
                                 {{phaseN, h1, h2, h3, criteria: {{seconds, peak_bytes, tests, estimated_bytes,
                                 estimate (fixtures.memory_phases: step, breakdown, steps),
                                 measured_over_estimated}}}}, tests {{nodeid: {{...}}}}, status, started_utc,
                                 finished_utc, organism (the organism's card, when it is the subject),
                                 preregistration {{sha256, path ("preregistration.json"), changed (bool:
                                 the bars or selection differ from an earlier pre-registration of this
                                 run), note (why, when changed), previous (the earlier hash, when changed)}}
    preregistration.json         {{sha256, written_utc, record}}: the claims, lines, bars, alpha, corrections,
                                 split sizes and selected components, written and hashed before any stage
                                 scored a test pair (hypotheses/preregistration.py); a run that scored
                                 none writes the bars it would have been held to, with no selection
    results/<safe name>.json     {{"name", "key", "numbers", "prompts", "verdict", "has_arrays", "recorded_at"}}
    results/<safe name>.safetensors   the arrays of that result (when has_arrays)

Each result has a record class in `hypotheses/records*.py` (named beside its heading below). Read a
result typed with `hypotheses.records.load(run_dir, records.HeadRanking)` (attributes are the fields
below; `None` when not recorded), or raw with `fixtures.recording.Recorder(run_dir=...).load(name)`
-> `Record` (numbers, prompts, verdict, arrays as torch tensors). The file name is `safe_name(name)`
(`phase3/heads` -> `phase3_heads.json`). Any result may be missing (a phase skipped or failed):
readers must say so, never substitute another run's.

A reader accepts a record that lacks fields (a hand-made one; the report shows n/a for them), but not
one whose fields have another type or shape. Every phase's save is checked strictly before it is
written: each field not marked optional present, no key without a field, and named dimensions
(`layer`, `head`, `pos`, `prompt`, ...) of one size across the record's lists and arrays.

An *estimate* below is `instruments.stats.Estimate.to_dict()`:
`{{"value", "ci_low", "ci_high", "alpha", "method", "n", "p_value"}}` (values may be null when undefined).
A *component* is `instruments.components.to_json(c)`, e.g. `{{"kind": "Head", "layer": 12, "head": 3}}`;
its display label is `instruments.components.label(from_json(d))` (e.g. `L12H3`, `L5N1021`).
A key with `<member>` names a family of arrays (e.g. `pca.<member>`, one per layer shown)."""

CLAIMS_INTRO = """\
The claims and their lines of evidence (id, title with the run's bars, each line's statistic, bar, side,
result and control) are one table, `hypotheses/claims.py` (`CLAIMS`); the report reads its titles, order
and bars from it with the run's `config`."""

CLOSING = """\
## The validation card (the one report input from outside the run directory)
`docs/validation_card.json`, written by `./suite validate` (`hypotheses/validation.py`), describes the
instruments, not a run: the studies on planted designs of known truth, on null designs and on shuffled
labels (`version`, `generated`, `code_version`, `command`, `mode`, `seconds`, `machine`, `members`, `runs`,
`lines` [{key, title, true / false / null: {supported, inconclusive, refuted, n}, power, fpr_false,
fpr_null: {k, n, rate, ci_low, ci_high} (Clopper-Pearson), wrong_refutations}], `null_fpr` {k, n, rate,
ci_low, ci_high, n_gate_passed, n_shuffled, shuffled_supported}, `findings` [str]). Every report shows it
in its methodology (`reports/validation_card.py`; `load_run(..., validation_card=path)`, else
`$REFUSAL_VALIDATION_CARD`, else the repo's file); an absent or unreadable card is said in words, and a
card of another `code_version` than the run's is flagged."""

SECTIONS: tuple[tuple[str, str, tuple[type[Result], ...]], ...] = (
    ("Phase 1: setup", "", (Device, Quant, Hooks, Memory)),
    ("Phase 2: behaviour", "", (RefusalRates, FirstToken, LogitLens, AttentionEntropy, Generations)),
    ("The organism", "", (OrganismBar, OrganismCard)),
    ("Phase 3: localization", "", (LayerPatching, HeadRanking, AttentionPatterns, NeuronCatalogue)),
    ("Phase 4: ablation and gradients", "", (Ablation, Gradients)),
    ("Phase 5: circuit and direction", "", (Circuit, RefusalDirection, ActivationScatter)),
    ("Hypotheses and criteria", CLAIMS_INTRO, (EffectShare, KeywordAttention, Accumulation, DirectEffects,
                                               CrossCategory, VerdictRecord)),
)


def _describe(cls: type[Result]) -> list[str]:
    doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split()).replace("``", "`")
    lines = [f"### `{cls.NAME}` ({cls.__name__})", "", doc, ""]
    for _, p in cls.parts():
        note = " (optional)" if p.optional else ""
        lines.append(f"- {p.part} `{p.key}`{note}: {p.spec.text()} — {p.doc}")
    return lines + [""]


def schema() -> str:
    """The text of reports/SCHEMA.md, from the record classes."""
    placed = [cls for _, _, classes in SECTIONS for cls in classes]
    if sorted(placed, key=id) != sorted(CLASSES, key=id):
        raise RuntimeError("every record class belongs in exactly one of records.SECTIONS")
    out = [PREAMBLE.format(command=SCHEMA_COMMAND), ""]
    for title, intro, classes in SECTIONS:
        out += [f"## {title}", ""] + ([intro, ""] if intro else [])
        for cls in classes:
            out += _describe(cls)
    return "\n".join(out + [CLOSING, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hypotheses.records", description=__doc__.splitlines()[0])
    parser.add_argument("--schema", nargs="?", const=str(SCHEMA_PATH), metavar="PATH",
                        help=f"write the schema (default {SCHEMA_PATH.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)
    if args.schema is None:
        parser.print_help()
        return 2
    Path(args.schema).write_text(schema())
    print(f"wrote {args.schema}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
