"""Load one run directory into a typed context: the only thing the report is rendered from.

Everything comes from the given directory (its manifest.json and results/), read through
``fixtures.recording.Recorder.load`` so the format is exactly what the phases wrote. A
result that is absent or unreadable is listed as missing, never looked up elsewhere: a
figure from another run would be a silent lie about this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fixtures.recording import Record, Recorder
from fixtures.storage import stable_hash
from hypotheses.verdicts import combine

# Every result the report knows how to show (reports/SCHEMA.md), in reading order.
KNOWN_RESULTS: tuple[str, ...] = (
    "phase2/refusal_rates", "phase2/first_token", "phase2/logit_lens", "phase2/attention_entropy",
    "phase3/layer_patching", "phase3/heads", "phase3/attention_patterns", "phase3/neurons",
    "phase4/ablation", "phase4/gradients",
    "phase5/circuit", "phase5/direction", "phase5/activation_scatter",
    "h2/keyword_attention", "h3/cross_category", "organism/card",
)
CLAIM_ORDER: tuple[str, ...] = ("H1", "H2", "H3", "C1", "C2", "C3")
# Where a line of evidence is shown when its verdict does not name its result.
EVIDENCE_RESULT: dict[str, str] = {
    "patching": "phase3/heads", "ablation": "phase4/ablation", "gradients": "phase4/gradients",
    "direction": "phase5/direction", "attention": "phase2/attention_entropy", "circuit": "phase5/circuit",
}
MISSING = "missing"


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
    results: Mapping[str, Record]
    missing: tuple[str, ...]
    unreadable: Mapping[str, str]  # result name -> why it could not be read
    claims: tuple[ClaimRow, ...]
    extra_results: tuple[str, ...] = field(default=())  # recorded names the report does not show

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
    """The claim in words, from the research plan, with this run's thresholds filled in."""
    c = dict(config)
    titles = {
        "H1": (f"Refusal is carried by a localized circuit: at most {100 * c.get('h1_fraction', 0.05):.0f}% of "
               f"components carry {100 * c.get('h1_share', 0.8):.0f}% of the effect, and ablating them cuts "
               f"refusal by {100 * c.get('h1_drop', 0.6):.0f}%"),
        "H2": "Hierarchical stages: detection early, accumulation in the middle, execution late",
        "H3": "Shared substrate: the same components serve every harm category",
        "C1": (f"At least {c.get('min_heads', 10)} heads have a normalized causal effect above "
               f"{100 * c.get('head_effect', 0.1):.0f}%"),
        "C2": f"Ablating the circuit cuts the refusal rate by more than {100 * c.get('ablation_drop', 0.3):.0f}%",
        "C3": "Reproducible: the same seed gives the same numbers, with full provenance",
        "S1": (f"Gradient attribution agrees with patching (rank correlation r > "
               f"{c.get('gradient_r', 0.7)})"),
    }
    return titles.get(claim, f"Stretch goal {claim}" if claim.startswith("S") else claim)


def _claim_sort_key(claim: str) -> tuple[int, str]:
    return (CLAIM_ORDER.index(claim), "") if claim in CLAIM_ORDER else (len(CLAIM_ORDER), claim)


def _verdict_lines(recorder: Recorder, run_dir: Path, unreadable: dict[str, str]) -> list[VerdictLine]:
    lines = []
    for path in sorted((run_dir / "results").glob("verdicts_*.json")):
        try:
            name = json.loads(path.read_text())["name"]
            rec = recorder.load(name)
            v = rec.verdict if rec is not None else None
            if not isinstance(v, Mapping) or "claim" not in v or "status" not in v:
                raise ValueError("no verdict with a claim and a status")
        except (OSError, ValueError, KeyError, TypeError) as err:
            unreadable[path.name] = f"{type(err).__name__}: {err}"
            continue
        numbers = v.get("numbers") or {}
        evidence = str(v.get("evidence") or "overall")
        lines.append(VerdictLine(claim=str(v["claim"]), status=str(v["status"]), summary=str(v.get("summary", "")),
                                 evidence=evidence, numbers=numbers,
                                 evidence_result=numbers.get("evidence_result") or EVIDENCE_RESULT.get(evidence)
                                 or ("h3/cross_category" if str(v["claim"]) == "H3" else None)))
    return lines


def claim_rows(lines: list[VerdictLine], config: Mapping[str, Any]) -> tuple[ClaimRow, ...]:
    """H1-H3 and C1-C3 always (missing when unrecorded), then any stretch goal that was recorded."""
    by_claim: dict[str, list[VerdictLine]] = {}
    for line in lines:
        by_claim.setdefault(line.claim, []).append(line)
    rows = []
    for claim in sorted(set(CLAIM_ORDER) | set(by_claim), key=_claim_sort_key):
        mine = tuple(by_claim.get(claim, ()))
        title = next((str(ln.numbers["title"]) for ln in mine if ln.numbers.get("title")), default_title(claim, config))
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


def load_run(run_dir: Path | str) -> RunContext:
    run_dir = Path(run_dir).resolve()
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise RunDirError(f"{run_dir} is not a run directory: it has no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    recorder = Recorder(run_dir=run_dir)
    results: dict[str, Record] = {}
    unreadable: dict[str, str] = {}
    for name in KNOWN_RESULTS:
        try:
            rec = recorder.load(name)
        except Exception as err:  # a torn or hand-edited file must not take the whole report down
            unreadable[name] = f"{type(err).__name__}: {err}"
            continue
        if rec is not None:
            results[name] = rec
    lines = _verdict_lines(recorder, run_dir, unreadable)
    recorded = sorted(p.stem for p in (run_dir / "results").glob("*.json")) if (run_dir / "results").is_dir() else []
    shown = {n.replace("/", "_") for n in KNOWN_RESULTS}
    extra = tuple(n for n in recorded if n not in shown and not n.startswith("verdicts_"))
    missing = tuple(n for n in KNOWN_RESULTS if n not in results and n != "organism/card")
    return RunContext(run_dir=run_dir, run_key=run_key(manifest, run_dir), manifest=manifest, results=results,
                      missing=missing, unreadable=unreadable, claims=claim_rows(lines, manifest.get("config") or {}),
                      extra_results=extra)
