"""The run's pre-registration in the report: its hash at the top, its promise in the methodology.

The manifest's ``preregistration`` record (``{sha256, path, changed, note}``) says the run
wrote its bars, alpha, corrections, split sizes and selected components to a file and hashed
it before any stage scored a test pair. The report repeats only what that record says, warns
when the bars changed after selection, and flags every verdict line decided under another hash.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from fixtures.storage import stable_hash
from reports.context import RunContext
from reports.document import Block, Span, para

SHORT = 12  # hex characters shown in the text; the full hash is the tooltip
NONE_RECORDED = "no pre-registration recorded"


def sha(ctx: RunContext) -> str | None:
    found = ctx.preregistration.get("sha256")
    return str(found) if found else None


def hash_span(full: str) -> Span:
    return Span(text=full[:SHORT], code=True, title=full)


def _path(ctx: RunContext) -> str:
    return str(ctx.preregistration.get("path") or "preregistration.json")


def record(ctx: RunContext) -> Mapping[str, Any] | None:
    """The pre-registered record from the run's file (None when the file is absent or unreadable)."""
    try:
        found = json.loads((ctx.run_dir / _path(ctx)).read_text()).get("record")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, Mapping) else None


def reproduces(ctx: RunContext) -> bool | None:
    """Whether the file's record hashes to the manifest's sha256 (as hypotheses/study.py hashes it)."""
    rec, full = record(ctx), sha(ctx)
    return None if rec is None or full is None else stable_hash("preregistration", rec) == full


def _promise(ctx: RunContext) -> str:
    path = _path(ctx)
    check = {True: f" ({path} reproduces this hash)", False: "",
             None: f" ({path} is missing or unreadable here, so the hash cannot be checked)"}[reproduces(ctx)]
    rec = record(ctx)
    if rec is not None and "selected" in rec and rec["selected"] is None:  # nothing was selected in this run
        return (f": the bars, alpha, corrections and split sizes were written to {path} and hashed{check}; no "
                f"component was selected ({rec.get('note') or 'no note recorded'}).")
    return (f": the bars, alpha, corrections, split sizes and selected components were written to {path} and "
            f"hashed before any stage scored a test pair{check}.")


def tampered_warning(ctx: RunContext) -> Block | None:
    if reproduces(ctx) is not False:
        return None
    return para(f"WARNING: {_path(ctx)} does NOT reproduce the manifest's pre-registration hash: the file changed "
                "after the run recorded it, so it is not the record the verdicts cite.", css="warning")


def rules(ctx: RunContext) -> Mapping[str, Any]:
    """The decision rules the run pre-registered (``record.rules``); empty when none are recorded."""
    found = (record(ctx) or {}).get("rules")
    return found if isinstance(found, Mapping) else {}


def changed_warning(ctx: RunContext) -> Block | None:
    if not ctx.preregistration.get("changed"):
        return None
    note = str(ctx.preregistration.get("note") or "no note recorded")
    return para(f"WARNING: the pre-registered bars CHANGED AFTER the components were selected, so the verdicts are "
                f"not held to bars fixed in advance. Recorded note: {note}", css="warning")


def blocks(ctx: RunContext, *, heading: bool = False) -> list[Block]:
    """The pre-registration line (and its warning), for the top of the report and (``heading``) the methodology."""
    lead: list[Span | str] = [Span(text="Pre-registration.", strong=True), " "] if heading else []
    full = sha(ctx)
    if full is None:
        return [para(*lead, f"Pre-registration: {NONE_RECORDED} in this run's manifest, so nothing shows that the "
                     "bars were fixed before the test pairs were scored.", css="warning")]
    out: list[Block] = [para(*lead, "Hash " if heading else "Pre-registration ", hash_span(full), _promise(ctx),
                             _rules_sentence(ctx) if heading else "")]
    return out + [w for w in (tampered_warning(ctx), changed_warning(ctx)) if w is not None]


def _rules_sentence(ctx: RunContext) -> str:
    found = rules(ctx)
    said = [f"{what}{found[key]}" for key, what in (("supported", "supported when "), ("refuted", "refuted when "),
                                                    ("controls", "controls: ")) if found.get(key)]
    return (" Its decision rules: " + "; ".join(said) + ".") if said else ""


def line_warning(numbers: Mapping[str, Any], ctx: RunContext) -> str | None:
    """Why a verdict line's pre-registration is not the run's (None when it matches or the line records none)."""
    own = numbers.get("preregistration")
    if not own:
        return None
    run = sha(ctx)
    if run is None:
        return f"WARNING: this line cites pre-registration {str(own)[:SHORT]}, but the run recorded none."
    if str(own) != run:
        return (f"WARNING: this line was decided under pre-registration {str(own)[:SHORT]}, not the run's "
                f"{run[:SHORT]}.")
    return None


def provenance_rows(ctx: RunContext) -> list[tuple[str, str]]:
    full = sha(ctx)
    if full is None:
        return [("pre-registration", NONE_RECORDED)]
    changed = " (CHANGED after selection)" if ctx.preregistration.get("changed") else ""
    return [("pre-registration sha256", f"{full}{changed}"),
            ("pre-registration file", str(ctx.preregistration.get("path") or "n/a"))]
