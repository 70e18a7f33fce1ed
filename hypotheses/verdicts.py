"""Verdicts: what a hypothesis test concludes, with the evidence that backs it.

A refuted hypothesis is a scientific result, not a failure: by default the test passes
and the verdict is recorded, printed in the terminal summary and shown in the report.
``--refusal-verdicts strict`` turns every verdict other than ``supported`` into a test
failure. A broken instrument still fails, because its own assertions fail first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["supported", "refuted", "inconclusive"]
STATUSES: tuple[str, ...] = ("supported", "refuted", "inconclusive")


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """One line of evidence on one claim (a hypothesis, a criterion, or a part of one)."""

    claim: str  # e.g. "H1", "criterion: >=10 heads with >10% effect"
    status: Status
    summary: str  # one sentence a reader can quote, with the numbers in it
    evidence: str = ""  # which instrument / line of evidence ("patching", "ablation", ...)
    numbers: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


REHEARSAL_NOTE = ("Rehearsal run (it measures time and memory only, on a subject that need not refuse and with "
                  "a reduced design): this line means nothing.")


def rehearsed(v: Verdict) -> Verdict:
    """A rehearsal's line: inconclusive whatever it computed, saying why, its numbers kept for cost checks."""
    from dataclasses import replace

    return replace(v, status="inconclusive", summary=f"{REHEARSAL_NOTE} It computed: {v.summary}",
                   numbers={**v.numbers, "rehearsal": True, "computed_status": v.status})


def decide(*, supported_if: bool, refuted_if: bool) -> Status:
    """Three-way decision: a claim is supported or refuted only when the CI clears the bar.

    Callers pass conditions on confidence bounds (e.g. ``ci_low > 0.8`` to support,
    ``ci_high < 0.8`` to refute); anything straddling the bar is inconclusive.
    """
    if supported_if and refuted_if:
        raise ValueError("a claim cannot be both supported and refuted: check the bounds passed in")
    return "supported" if supported_if else "refuted" if refuted_if else "inconclusive"


def combine(statuses: list[str]) -> Status:
    """Overall verdict from several lines of evidence: all agree, or it is inconclusive."""
    if statuses and all(s == "supported" for s in statuses):
        return "supported"
    if any(s == "refuted" for s in statuses) and not any(s == "supported" for s in statuses):
        return "refuted"
    return "inconclusive"
