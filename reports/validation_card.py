"""The suite's validation card in the report: how often this suite's "supported" is wrong.

The card is ``docs/validation_card.json``, written by ``./suite validate`` (hypotheses/validation.py):
the studies run on planted designs whose truth is known, on null designs and on shuffled labels.
It describes the instruments, not this run, so it is the one input read from outside the run
directory; the report names its file, command, date and code version beside it. An absent or
unreadable card is said in words, never filled in.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from reports import fmt
from reports.document import Block, Span, bullets, cell, para, table
from reports.templating import block_markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO_ROOT / "docs" / "validation_card.json"
ENV_VAR = "REFUSAL_VALIDATION_CARD"  # overrides the default path when no path is passed
VERSION = 1
TITLE_CHARS = 60
ABSENT = "No validation card is committed: run ./suite validate"


class CardError(ValueError):
    """The card's JSON does not have the fields the report reads."""


@dataclass(frozen=True, kw_only=True)
class Counts:
    """Verdicts of one line on one kind of case: supported / inconclusive / refuted of n."""

    supported: int
    inconclusive: int
    refuted: int
    n: int


@dataclass(frozen=True, kw_only=True)
class Rate:
    """k of n with its exact (Clopper-Pearson) interval; rate and bounds are None when n is 0."""

    k: int
    n: int
    rate: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True, kw_only=True)
class CardLine:
    key: str
    title: str
    true: Counts
    false: Counts
    null: Counts
    power: Rate
    fpr_false: Rate
    fpr_null: Rate
    wrong_refutations: int

    @property
    def wrong(self) -> bool:
        """Whether any verdict contradicted the truth: refuted when true, or supported when false.

        A null has no truth per line (it was built without structure, not proven to lack every
        property), so a line supported on a null is shown as a rate, not as a wrong verdict."""
        return self.wrong_refutations > 0 or self.false.supported > 0


@dataclass(frozen=True, kw_only=True)
class NullFpr:
    rate: Rate  # null runs that passed the gate with any line supported
    n_gate_passed: int | None
    n_shuffled: int | None
    shuffled_supported: int | None


@dataclass(frozen=True, kw_only=True)
class Card:
    path: Path
    generated: str
    mode: str
    command: str
    code_version: str
    seconds: float | None
    machine: str
    members: tuple[str, ...]
    designs: tuple[str, ...]  # one sentence per member: what it is and the truth it fixes
    n_runs: int
    n_planted: int
    n_null: int
    n_shuffled: int
    lines: tuple[CardLine, ...]
    null_fpr: NullFpr
    findings: tuple[str, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class CardRead:
    """What reading the card gave: the card, or the sentence the report shows instead."""

    path: Path
    card: Card | None
    problem: str  # "" when the card was read


def resolve(path: Path | str | None = None) -> Path:
    """The card's path: the one passed, else $REFUSAL_VALIDATION_CARD, else the repo's docs/validation_card.json."""
    if path is not None:
        return Path(path)
    explicit = os.environ.get(ENV_VAR)
    return Path(explicit) if explicit else DEFAULT_PATH


def shown_path(path: Path) -> str:
    """The card's path as the report names it: relative to the repo when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _need(data: Any, key: str, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise CardError(f"{where} is not an object")
    if key not in data:
        raise CardError(f"{where} has no {key!r}")
    return data[key]


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise CardError(f"{where} is not a whole number ({value!r})")
    return int(value)


def _opt_int(data: Mapping[str, Any], key: str, where: str) -> int | None:
    return None if data.get(key) is None else _int(data[key], f"{where}.{key}")


def _counts(data: Any, where: str) -> Counts:
    keys = ("supported", "inconclusive", "refuted", "n")
    return Counts(**{k: _int(_need(data, k, where), f"{where}.{k}") for k in keys})


def _rate(data: Any, where: str) -> Rate:
    k, n = _int(_need(data, "k", where), f"{where}.k"), _int(_need(data, "n", where), f"{where}.n")
    return Rate(k=k, n=n, rate=fmt.finite(data.get("rate")), ci_low=fmt.finite(data.get("ci_low")),
                ci_high=fmt.finite(data.get("ci_high")))


def _line(data: Any, i: int) -> CardLine:
    where = f"lines[{i}]"
    true = _counts(_need(data, "true", where), f"{where}.true")
    wrong = data.get("wrong_refutations")
    return CardLine(key=str(_need(data, "key", where)), title=str(data.get("title") or ""), true=true,
                    false=_counts(_need(data, "false", where), f"{where}.false"),
                    null=_counts(_need(data, "null", where), f"{where}.null"),
                    power=_rate(_need(data, "power", where), f"{where}.power"),
                    fpr_false=_rate(_need(data, "fpr_false", where), f"{where}.fpr_false"),
                    fpr_null=_rate(_need(data, "fpr_null", where), f"{where}.fpr_null"),
                    # refuted when true is the true cases' refuted count by definition
                    wrong_refutations=true.refuted if wrong is None else _int(wrong, f"{where}.wrong_refutations"))


def _design(member: Mapping[str, Any]) -> str:
    hard = f" ({member['hard_case']})" if member.get("hard_case") else ""
    truth = member.get("truth") or {}
    fixed = ", ".join(f"{k} {'true' if v else 'false'}" for k, v in truth.items() if v is not None)
    return f"{member.get('name', '?')}{hard}: {member.get('description', '')}. Truth: {fixed or 'none fixed'}."


def _list(data: Mapping[str, Any], key: str) -> list:
    value = _need(data, key, "the card")
    if not isinstance(value, list):
        raise CardError(f"the card's {key!r} is not a list")
    return value


def parse(data: Any, path: Path) -> Card:
    """The card's JSON as the report's view of it; CardError names the first field it lacks."""
    version = _need(data, "version", "the card")
    if version != VERSION:
        raise CardError(f"it is version {version!r}; this report reads version {VERSION}")
    members, runs, lines = _list(data, "members"), _list(data, "runs"), _list(data, "lines")
    kinds = [str(r.get("kind")) if isinstance(r, Mapping) else "" for r in runs]
    null = _need(data, "null_fpr", "the card")
    findings = data.get("findings") or []
    if not isinstance(findings, list):
        raise CardError("the card's 'findings' is not a list")
    generated, mode = str(_need(data, "generated", "the card")), str(_need(data, "mode", "the card"))
    return Card(path=path, generated=generated, mode=mode, command=str(data.get("command") or "./suite validate"),
                code_version=str(data.get("code_version") or ""),
                seconds=fmt.finite(data.get("seconds")), machine=str(data.get("machine") or ""),
                members=tuple(str(m.get("name", "?")) if isinstance(m, Mapping) else str(m) for m in members),
                designs=tuple(_design(m) for m in members if isinstance(m, Mapping)),
                n_runs=len(runs), n_planted=kinds.count("planted"), n_null=kinds.count("null"),
                n_shuffled=kinds.count("shuffled"), lines=tuple(_line(ln, i) for i, ln in enumerate(lines)),
                null_fpr=NullFpr(rate=_rate(null, "null_fpr"),
                                 n_gate_passed=_opt_int(null, "n_gate_passed", "null_fpr"),
                                 n_shuffled=_opt_int(null, "n_shuffled", "null_fpr"),
                                 shuffled_supported=_opt_int(null, "shuffled_supported", "null_fpr")),
                findings=tuple(str(f) for f in findings))


def read_card(path: Path | str | None = None) -> CardRead:
    """Read the card at ``path`` (see :func:`resolve`); a missing or malformed one gives its sentence."""
    where = resolve(path)
    if not where.is_file():
        return CardRead(path=where, card=None, problem=f"{ABSENT} (no {shown_path(where)}).")
    try:
        return CardRead(path=where, card=parse(json.loads(where.read_text()), where), problem="")
    except (OSError, UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and CardError are ValueErrors
        return CardRead(path=where, card=None,
                        problem=f"The validation card {shown_path(where)} cannot be read ({type(err).__name__}: "
                                f"{err}), so this report shows no validation figures: run ./suite validate to "
                                "write it again.")


def load_card(path: Path | str | None = None) -> Card | None:
    """The card, or None when it is absent or unreadable."""
    return read_card(path).card


def _short(text: str) -> str:
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1].rstrip() + "…"


def _sir(counts: Counts) -> str:
    """``4 / 1 / 0 of 5`` (supported / inconclusive / refuted)."""
    if counts.n == 0:
        return "no case"
    return f"{counts.supported} / {counts.inconclusive} / {counts.refuted} of {counts.n}"


def rate_text(rate: Rate) -> str:
    """``4/5 = 80.0% [95% CI 28.0%, 99.0%]``; ``n/a`` without cases."""
    if rate.n == 0:
        return "n/a"
    est = {"value": rate.rate, "ci_low": rate.ci_low, "ci_high": rate.ci_high}
    return f"{rate.k}/{rate.n} = {fmt.estimate(est, pct=True, with_n=False)}"


def _wrong_text(line: CardLine) -> str:
    parts = [(line.wrong_refutations, "refuted when true"), (line.false.supported, "supported when false")]
    found = [f"{k} {what}" for k, what in parts if k > 0]
    return "WRONG: " + ", ".join(found) if found else "none"


def summary(card: Card) -> str:
    took = f"{fmt.seconds(card.seconds)}" + (f" on {card.machine}" if card.machine else "")
    version = f", code version {card.code_version}" if card.code_version else ""
    designs = ", ".join(card.members)
    return (f"The suite's validation card ({shown_path(card.path)}: {card.command}, {card.mode} mode, generated "
            f"{card.generated}{version}, {took}) ran the studies on {len(card.members)} planted designs whose truth "
            f"is known ({designs}): {card.n_runs} runs, of which {card.n_planted} planted, {card.n_null} null (no "
            f"planted mechanism) and {card.n_shuffled} with shuffled labels. It describes the instruments, not this "
            "run.")


def _null_sentence(card: Card) -> str:
    null = card.null_fpr
    passed = null.n_gate_passed
    gate = f"; {passed} of {card.n_null} null runs passed the gate" if passed is not None else ""
    text = (f"Null false-positive rate (null runs that passed the behaviour gate with any hypothesis supported): "
            f"{rate_text(null.rate)}{gate}.")
    if null.n_shuffled is not None and null.shuffled_supported is not None:
        text += (f" Shuffled labels: {null.shuffled_supported} of {null.n_shuffled} runs had a hypothesis "
                 "supported.")
    return text


def blocks(read: CardRead, *, code_version: str | None = None) -> list[Block]:
    """The card's blocks for the methodology section: summary, truth-by-verdict table, null FPR, findings.

    ``code_version`` is this run's (manifest provenance): a card of another version is flagged.
    """
    card = read.card
    if card is None:
        return [para(read.problem, css="warning")]
    out: list[Block] = [para(summary(card))]
    if code_version and card.code_version and str(code_version) != card.code_version:
        out.append(para(f"The card was made with code version {card.code_version}, this run with {code_version}: "
                        "it describes another version of the instruments.", css="warning"))
    out.append(para("Each row counts a line's verdicts (supported / inconclusive / refuted) where the design makes it "
                    "true, where it makes it false, and on null designs. Power is the share supported when true, FPR "
                    "the share supported when false or null, each with its exact (Clopper-Pearson) interval. A row "
                    "marked WRONG gave a verdict the truth contradicts (supported when false, refuted when true); a "
                    "null has no truth per line, and a hypothesis supported on a null counts in the null "
                    "false-positive rate below."))
    rows = [(cell(Span(text=line.key, strong=True)), _short(line.title), _sir(line.true), rate_text(line.power),
             _sir(line.false), rate_text(line.fpr_false), _sir(line.null), rate_text(line.fpr_null), _wrong_text(line))
            for line in card.lines]
    out.append(table(("line", "claim", "true: S / I / R", "power", "false: S / I / R", "FPR (false)",
                      "null: S / I / R", "FPR (null)", "wrong verdicts"), rows, css="validation-card",
                     row_css=tuple("card-wrong" if line.wrong else "" for line in card.lines),
                     dom_id="table-validation-card"))
    out.append(para(_null_sentence(card)))
    if card.findings:
        out.append(para("What validation found:"))
        out.append(bullets(list(card.findings)))
    else:
        out.append(para("The card records no findings."))
    return out


def markdown(read: CardRead) -> str:
    """The card as a page (docs/validation_card.md): the report's very blocks, then the designs."""
    card = read.card
    title = f"# Validation card ({card.mode})" if card is not None else "# Validation card"
    parts = [title, *(block_markdown(b) for b in blocks(read))]
    if card is not None and card.designs:
        parts += ["## Designs", block_markdown(bullets(list(card.designs)))]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"
