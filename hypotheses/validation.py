"""The validation card: how often this suite's verdicts are right on models whose truth is known.

Every design of the planted family (:mod:`fixtures.family`) fixes by construction whether
each line of evidence is true or false; the study (:func:`hypotheses.study.run_study`, the
code path every real run takes, with the same decision rules) is run on each, and its
verdicts are counted against that truth. Nulls are random models that refuse (so the
behaviour gate passes and every decision rule runs) but were built to carry no structure;
label-shuffled variants of planted models are nulls the gate should stop.

A verdict is *wrong* when it says supported where the truth is false, or refuted where it
is true; inconclusive is never wrong, only a loss of power. Power is the rate of supported
verdicts on true lines; the false-positive rate is the rate of supported verdicts on false
lines and on nulls; every rate has its exact (Clopper-Pearson) 95% interval.

``./suite validate`` (reports/validate.py) writes the full card (``docs/validation_card.json``, and
its page ``.md``); ``./suite validate --quick`` the one-seed card CI checks (``tests/test_validation.py``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fixtures import family, family_build
from fixtures.storage import CODE_VERSION, atomic_write_json, utc_now
from hypotheses import claims
from instruments import progress, stats

CARD_VERSION = 1
DOCS = Path(__file__).resolve().parent.parent / "docs"
OVERALL = ("H1/overall", "H2/overall", "H3/overall")
KEYS = family.LINES + OVERALL
MAX_NULL_FPR = 0.05  # the bar on the point estimate: above it, CI fails
MODES = {  # design seeds, null seeds, label-shuffled runs
    "quick": dict(seeds=(0,), nulls=5, shuffled=2),
    "full": dict(seeds=(0, 1, 2), nulls=50, shuffled=10),
}


def family_config(**overrides):
    """The configuration every card study runs with: the self-validation one, sized for the family's data.

    The synthetic set has 32 train, 16 val and 16 test pairs; every one of them is used.
    """
    from fixtures.planted import selfvalidation_config

    return selfvalidation_config(**{"patch_pairs": 32, "direction_val_pairs": 16, **overrides})


def line_key(claim: str, evidence: str, categories: Sequence[str]) -> str:
    """A verdict's row on the card: H3's harm categories pool into ``H3/category``."""
    return f"{claim}/{'category' if claim == 'H3' and evidence in categories else evidence}"


def truth_of(design: family.Design, key: str) -> bool | None:
    """A line's truth; a claim's overall truth is false if any line is, true if every line is."""
    if key not in OVERALL:
        return design.truth.get(key)
    claim = key.split("/")[0]
    lines = [v for k, v in design.truth.items() if k.startswith(claim + "/")]
    if any(v is False for v in lines):
        return False
    return True if lines and all(v is True for v in lines) else None


@dataclass(frozen=True, kw_only=True)
class Run:
    """One study on one model: its verdicts beside the truth."""

    member: str
    seed: int
    kind: str  # "planted", "null" or "shuffled"
    behaviour_present: bool
    seconds: float
    verdicts: dict[str, list[str]]  # line key -> statuses (H3/category has one per harm category)
    truth: dict[str, bool | None]
    wrong: tuple[str, ...]

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "wrong": list(self.wrong)}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> "Run":
        return cls(**{**r, "wrong": tuple(r["wrong"])})


def is_wrong(status: str, truth: bool | None) -> bool:
    return (status == "supported" and truth is False) or (status == "refuted" and truth is True)


def run_member(design: family.Design, seed: int, kind: str, cfg) -> Run:
    """Build the model, run the whole study, and score its verdicts against the design's truth."""
    from hypotheses.study import StudyData, run_study

    start = time.time()
    member = family_build.build_member(design, seed)
    if kind == "shuffled":
        member = family_build.shuffled_member(member, seed)
    study = run_study(member.handle, StudyData.from_prompt_set(member.dataset), member.tokens, cfg)
    verdicts: dict[str, list[str]] = {}
    for v in study.verdicts:
        verdicts.setdefault(line_key(v.claim, v.evidence, member.dataset.categories), []).append(v.status)
    truth = {k: (None if kind == "shuffled" else truth_of(design, k)) for k in KEYS}
    wrong = tuple(k for k, statuses in verdicts.items() for s in statuses if is_wrong(s, truth.get(k)))
    return Run(member=design.name, seed=seed, kind=kind, behaviour_present=bool(study.behaviour.present),
               seconds=round(time.time() - start, 1), verdicts=verdicts, truth=truth, wrong=wrong)


def plan(mode: str) -> list[tuple[family.Design, int, str]]:
    """Every (design, seed, kind) the card runs, planted designs first."""
    m = MODES[mode]
    jobs = [(d, s, "planted") for s in m["seeds"] for d in family.DESIGNS]
    jobs += [(family.null_design(s), s, "null") for s in range(m["nulls"])]
    jobs += [(family.DESIGNS[i % len(family.DESIGNS)], i, "shuffled") for i in range(m["shuffled"])]
    return jobs


def run_all(mode: str, cfg=None, *, on_run: Callable[[Run], None] | None = None) -> list[Run]:
    """Run the card's plan, one progress step (with an ETA) per study; ``on_run(run)`` is called after each."""
    cfg = cfg or family_config()
    jobs, runs = plan(mode), []
    with progress.task(f"validation card ({mode}): {len(jobs)} studies", len(jobs), unit="study") as studies:
        for design, seed, kind in jobs:
            run = run_member(design, seed, kind, cfg)
            runs.append(run)
            if on_run is not None:
                on_run(run)
            studies.advance()
    return runs


# ----------------------------------------------------------------------------- the card

def _rate(k: int, n: int) -> dict[str, Any]:
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci_low": None, "ci_high": None}
    e = stats.proportion_ci(k, n, method="beta")
    return {"k": k, "n": n, "rate": e.value, "ci_low": e.ci_low, "ci_high": e.ci_high}


def _title(key: str) -> str:
    claim_id, evidence = key.split("/")
    if evidence == "overall":  # no claim title: its bars are the card's, which need not be a run's
        return f"{claim_id} as a whole: supported only when every line is"
    line = claims.claim(claim_id).line(evidence)
    return line.statistic if line is not None else key


def summarize(runs: Sequence[Run], *, mode: str, seconds: float, cfg) -> dict[str, Any]:
    """The card: truth-by-verdict counts per line, power, false-positive rates and the null FPR."""
    def counts(statuses: list[str]) -> dict[str, int]:
        return {**{s: statuses.count(s) for s in ("supported", "inconclusive", "refuted")}, "n": len(statuses)}

    lines = []
    for key in KEYS:
        cells: dict[str, list[str]] = {"true": [], "false": [], "null": []}
        for r in runs:
            for status in r.verdicts.get(key, []):
                if r.kind == "null":  # label-shuffled runs stop at the gate: counted in null_fpr instead
                    cells["null"].append(status)
                elif r.kind != "planted":
                    continue
                elif r.truth.get(key) is not None:
                    cells["true" if r.truth[key] else "false"].append(status)
        c = {name: counts(v) for name, v in cells.items()}
        claim_id, evidence = key.split("/")
        lines.append({"key": key, "claim": claim_id, "evidence": evidence, "title": _title(key), **c,
                      "power": _rate(c["true"]["supported"], c["true"]["n"]),
                      "fpr_false": _rate(c["false"]["supported"], c["false"]["n"]),
                      "fpr_null": _rate(c["null"]["supported"], c["null"]["n"]),
                      "wrong_refutations": c["true"]["refuted"]})
    nulls = [r for r in runs if r.kind == "null" and r.behaviour_present]
    shuffled = [r for r in runs if r.kind == "shuffled"]
    fp = sum(any(s == "supported" for k in OVERALL for s in r.verdicts.get(k, [])) for r in nulls)
    null_fpr = {**_rate(fp, len(nulls)), "n_gate_passed": len(nulls),
                "n_nulls": sum(r.kind == "null" for r in runs), "n_shuffled": len(shuffled),
                "shuffled_gate_passed": sum(r.behaviour_present for r in shuffled),
                "shuffled_supported": sum(any(s == "supported" for k in OVERALL for s in r.verdicts.get(k, []))
                                          for r in shuffled)}
    findings = [f"WRONG: {r.member} (seed {r.seed}) {k}: {', '.join(r.verdicts[k])} where the truth is "
                f"{'true' if r.truth[k] else 'false'}" for r in runs for k in dict.fromkeys(r.wrong)]
    findings += [f"{ln['key']}: no design where it is {side}" for ln in lines for side in ("true", "false")
                 if ln["key"] not in OVERALL and ln[side]["n"] == 0]
    return {"version": CARD_VERSION, "generated": utc_now(), "code_version": CODE_VERSION,
            "command": "./suite validate" + (" --quick" if mode == "quick" else ""), "mode": mode,
            "seconds": round(seconds, 1), "machine": f"{cores()} CPU cores", "config": cfg.to_dict(),
            "members": [d.to_dict() for d in family.DESIGNS], "runs": [r.to_record() for r in runs],
            "lines": lines, "null_fpr": null_fpr, "findings": findings}


def cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_card(card: dict[str, Any], folder: Path = DOCS) -> Path:
    """Atomically write ``validation_card.json`` (the quick card: ``validation_card_quick.json``).

    Its page (``.md``) is the report's rendering of it, written by ``./suite validate`` (reports/validate.py).
    """
    stem = "validation_card" if card["mode"] == "full" else "validation_card_quick"
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / f"{stem}.json"
    atomic_write_json(js, card)
    return js
