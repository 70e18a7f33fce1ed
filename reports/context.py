"""Load one run directory into a typed context: the only thing the report is rendered from.

Everything comes from the given directory (its manifest.json and results/), read through
``fixtures.recording.Recorder.load`` and its record class (``hypotheses/records.py``, which every
phase's save is checked against), so the format is exactly what the phases wrote. A result that
is absent, unreadable or not of its class's format is listed as missing, never looked up
elsewhere: a figure from another run would be a silent lie about this one. The one input from
elsewhere is the suite's validation card (reports/validation_card.py), which describes the
instruments, not a run, and is named as such in the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

from fixtures.recording import Record, Recorder
from fixtures.storage import stable_hash
from hypotheses import claims as claim_table
from hypotheses import records
from hypotheses.verdicts import combine
from reports.validation_card import CardRead, read_card

# Every result the report knows how to show (its record classes, hypotheses/records.py), in reading order.
KNOWN: tuple[type[records.Result], ...] = (
    records.RefusalRates, records.FirstToken, records.LogitLens, records.AttentionEntropy, records.LayerPatching,
    records.HeadRanking, records.AttentionPatterns, records.NeuronCatalogue, records.EffectShare, records.Ablation,
    records.Gradients, records.Circuit, records.RefusalDirection, records.ActivationScatter,
    records.KeywordAttention, records.Accumulation, records.DirectEffects, records.CrossCategory,
    records.OrganismCard,
)
KNOWN_RESULTS: tuple[str, ...] = tuple(cls.NAME for cls in KNOWN)
CLAIM_ORDER: tuple[str, ...] = claim_table.CLAIM_ORDER
# Claims shown even when unrecorded (as NOT EVALUATED); a stretch goal appears only once recorded.
REQUIRED_CLAIMS: tuple[str, ...] = tuple(c.id for c in claim_table.CLAIMS if c.kind != "stretch")
MISSING = "missing"
R = TypeVar("R", bound=records.Result)


class RunDirError(FileNotFoundError):
    """The path is not a run directory (no manifest.json)."""


def anchor(result_name: str) -> str:
    """HTML id of a result's section: ``phase3/heads`` -> ``result-phase3-heads``."""
    return "result-" + "".join(c if c.isalnum() else "-" for c in result_name).strip("-")


def claim_anchor(claim: str) -> str:
    return "claim-" + "".join(c if c.isalnum() else "-" for c in claim)


@dataclass(frozen=True, kw_only=True)
class VerdictLine:
    """One recorded verdict: a line of evidence on a claim."""

    claim: str
    status: str
    summary: str
    evidence: str
    numbers: Mapping[str, Any]
    evidence_result: str | None

    @property
    def is_overall(self) -> bool:
        return self.evidence in ("", "overall")


@dataclass(frozen=True, kw_only=True)
class ClaimRow:
    """A claim's row in the verdict table: its overall status and the lines behind it."""

    claim: str
    title: str
    status: str  # supported | refuted | inconclusive | missing
    summary: str
    combined: bool  # True when no "overall" verdict was recorded and the lines were combined
    lines: tuple[VerdictLine, ...]

    @property
    def anchor(self) -> str:
        return claim_anchor(self.claim)

    @property
    def evidence_lines(self) -> tuple[VerdictLine, ...]:
        return tuple(line for line in self.lines if not line.is_overall)


@dataclass(frozen=True, kw_only=True)
class RunContext:
    run_dir: Path
    run_key: str  # identity of the run, stamped into its report (see render.py)
    manifest: Mapping[str, Any]
    results: Mapping[str, Record]  # what the phases wrote, each checked against its record class
    missing: tuple[str, ...]
    unreadable: Mapping[str, str]  # result name -> why it could not be read
    claims: tuple[ClaimRow, ...]
    extra_results: tuple[str, ...] = field(default=())  # recorded names the report does not show
    # the suite's validation card: about the instruments, so the one input from outside the run directory
    validation: CardRead = field(default_factory=read_card)
    typed: Mapping[str, records.Result] = field(default_factory=dict)  # the same results, typed

    def result(self, cls: type[R]) -> R | None:
        """A shown result, typed (None when missing or unreadable)."""
        found = self.typed.get(cls.NAME)
        return found if isinstance(found, cls) else None

    @property
    def config(self) -> Mapping[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def model(self) -> Mapping[str, Any]:
        return self.manifest.get("model") or {}

    @property
    def status(self) -> str:
        return str(self.manifest.get("status") or "unknown")

    @property
    def preregistration(self) -> Mapping[str, Any]:
        """The manifest's pre-registration record ({sha256, path, changed, note}); empty when none was made."""
        found = self.manifest.get("preregistration")
        return found if isinstance(found, Mapping) else {}

    @property
    def show_completions(self) -> bool:
        return bool(self.config.get("show_completions", False))

    @property
    def model_name(self) -> str:
        return str(self.model.get("alias") or self.config.get("model") or "unknown model")

    @property
    def partial(self) -> bool:
        return self.status != "finished" or bool(self.missing)

    def get(self, name: str) -> Record | None:
        return self.results.get(name)

    def numbers(self, name: str) -> Mapping[str, Any]:
        rec = self.results.get(name)
        return rec.numbers if rec is not None else {}


def default_title(claim: str, config: Mapping[str, Any]) -> str:
    """The claim in words, from the claims table, with this run's bars filled in."""
    if claim in claim_table.BY_ID:
        return claim_table.title(claim, config)
    return f"Stretch goal {claim}" if claim.startswith("S") else claim


def evidence_result(claim: str, evidence: str, numbers: Mapping[str, Any]) -> str | None:
    """The result a line rests on: the verdict's own ``evidence_result``, else the claims table's."""
    if numbers.get("evidence_result"):
        return str(numbers["evidence_result"])
    line = claim_table.claim(claim).line(evidence) if claim in claim_table.BY_ID else None
    return line.result if line is not None and line.result else None


def _claim_sort_key(claim: str) -> tuple[int, str]:
    return (CLAIM_ORDER.index(claim), "") if claim in CLAIM_ORDER else (len(CLAIM_ORDER), claim)


def _line_sort_key(line: VerdictLine, categories: tuple[str, ...]) -> tuple[int, int]:
    """A claim's lines in the claims table's order, H3's categories in the recorded order, then overall."""
    if line.is_overall:
        return (2, 0)
    claim = claim_table.BY_ID.get(line.claim)
    found = claim.line(line.evidence) if claim is not None else None
    if claim is None or found is None:
        return (1, 0)
    within = categories.index(line.evidence) if found.per_category and line.evidence in categories else 0
    return (0, claim.lines.index(found) * (len(categories) + 1) + within)


def _verdict_lines(recorder: Recorder, run_dir: Path, unreadable: dict[str, str]) -> list[VerdictLine]:
    lines = []
    for path in sorted((run_dir / "results").glob("verdicts_*.json")):
        try:
            v = records.load(recorder, records.VerdictRecord, json.loads(path.read_text())["name"])
            if v is None:
                raise ValueError("no verdict with a claim and a status")
        except (OSError, ValueError, KeyError, TypeError) as err:  # RecordError is a ValueError
            unreadable[path.name] = f"{type(err).__name__}: {err}"
            continue
        numbers = v.numbers or {}
        evidence = str(v.evidence or "overall")
        lines.append(VerdictLine(claim=v.claim, status=v.status, summary=str(v.summary or ""), evidence=evidence,
                                 numbers=numbers, evidence_result=evidence_result(v.claim, evidence, numbers)))
    return lines


def claim_rows(lines: list[VerdictLine], config: Mapping[str, Any],
               categories: tuple[str, ...] = ()) -> tuple[ClaimRow, ...]:
    """Every claim of the table but the stretch goals always (missing when unrecorded), then any recorded one."""
    by_claim: dict[str, list[VerdictLine]] = {}
    for line in lines:
        by_claim.setdefault(line.claim, []).append(line)
    rows = []
    for claim in sorted(set(REQUIRED_CLAIMS) | set(by_claim), key=_claim_sort_key):
        mine = tuple(sorted(by_claim.get(claim, ()), key=lambda ln: _line_sort_key(ln, categories)))
        recorded = next((str(ln.numbers["title"]) for ln in mine if ln.numbers.get("title")), None)
        # a claim of the table reads its title from this run's config; only an unknown one keeps its recorded title
        title = default_title(claim, config) if claim in claim_table.BY_ID or not recorded else recorded
        overall = next((ln for ln in mine if ln.is_overall), None)
        if overall is not None:
            status, summary, combined = overall.status, overall.summary, False
        elif mine:
            status = combine([ln.status for ln in mine])
            summary = "; ".join(f"{ln.evidence} {ln.status.upper()}: {ln.summary}" for ln in mine)
            combined = True
        else:
            status, summary, combined = MISSING, "no verdict was recorded in this run", False
        rows.append(ClaimRow(claim=claim, title=title, status=status, summary=summary, combined=combined,
                             lines=mine))
    return tuple(rows)


def run_key(manifest: Mapping[str, Any], run_dir: Path) -> str:
    """A run's identity: fixed when the run starts (``started_utc`` survives --resume), so its
    own report can be re-rendered while a report made from another run is recognised."""
    config = manifest.get("config") or {}
    return stable_hash("refusal-run", manifest.get("started_utc") or run_dir.name, config.get("model"),
                       config.get("seed"))[:24]


def load_run(run_dir: Path | str, *, validation_card: Path | str | None = None) -> RunContext:
    """The run at ``run_dir``, with the validation card at ``validation_card`` (default: see
    ``reports.validation_card.resolve``)."""
    run_dir = Path(run_dir).resolve()
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: it has no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    recorder = Recorder(run_dir=run_dir)
    results: dict[str, Record] = {}
    typed: dict[str, records.Result] = {}
    unreadable: dict[str, str] = {}
    for cls in KNOWN:
        try:
            rec = recorder.load(cls.NAME)
            if rec is not None:
                typed[cls.NAME] = cls.from_record(rec)
                results[cls.NAME] = rec
        except Exception as err:  # a torn, hand-edited or mismatched file must not take the whole report down
            unreadable[cls.NAME] = f"{type(err).__name__}: {err}"
    lines = _verdict_lines(recorder, run_dir, unreadable)
    recorded = sorted(p.stem for p in (run_dir / "results").glob("*.json")) if (run_dir / "results").is_dir() else []
    shown = {n.replace("/", "_") for n in KNOWN_RESULTS}
    extra = tuple(n for n in recorded if n not in shown and not n.startswith("verdicts_"))
    missing = tuple(n for n in KNOWN_RESULTS if n not in results and n != "organism/card")
    cross = typed.get(records.CrossCategory.NAME)
    categories = tuple(str(c) for c in (cross.categories or ())) if isinstance(cross, records.CrossCategory) else ()
    return RunContext(run_dir=run_dir, run_key=run_key(manifest, run_dir), manifest=manifest, results=results,
                      missing=missing, unreadable=unreadable,
                      claims=claim_rows(lines, manifest.get("config") or {}, categories), extra_results=extra,
                      validation=read_card(validation_card), typed=typed)
