"""Each verdict line in words: its estimate against its bar and control, its n and power, its side effect.

A line's ``numbers`` (reports/SCHEMA.md, ``verdicts/<claim>--<evidence>``) may lack any of
these keys (a line decided without data records few): a missing part is left out of the
sentence, never guessed.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from reports import fmt
from reports.context import RunContext, VerdictLine
from reports.preregistration import line_warning

STATUS_WORD = {"supported": "SUPPORTED", "refuted": "REFUTED", "inconclusive": "INCONCLUSIVE",
               "missing": "NOT EVALUATED"}
_STATUS_PREFIX = re.compile(r"^\s*(?:(?P<claim>\S+)\s+(?:is|was)\s+)?(?:SUPPORTED|REFUTED|INCONCLUSIVE|NOT EVALUATED)"
                            r"\b\s*(?::|—)?\s*")


def word(status: str) -> str:
    return STATUS_WORD.get(status, status.upper())


def strip_status(summary: str, claim: str) -> str:
    """The summary without a leading "H1 is INCONCLUSIVE:" (however often), which the sentence around it says."""
    while (found := _STATUS_PREFIX.match(summary)) is not None and found.group("claim") in (None, claim):
        summary = summary[found.end():]
    return summary


def _est(value: Any) -> str:
    return fmt.estimate(value, with_n=False)


def _bar(numbers: Mapping[str, Any]) -> str:
    if fmt.finite(numbers.get("bar")) is None:
        return "no numeric bar"
    side = "below" if numbers.get("side") == "below" else "above"
    return f"bar {fmt.number(numbers['bar'])} (supported {side} it)"


def _control(numbers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The line's control, if it has one (a recorded "none" rule means it has none)."""
    control = numbers.get("control")
    return control if isinstance(control, Mapping) and control.get("rule", "") != "none" else None


def _on_difference(numbers: Mapping[str, Any]) -> bool:
    """Whether the bar is held to the line minus its control (its recorded rule says so)."""
    control = _control(numbers)
    if control is None or control.get("difference") is None:
        return False
    return "held to the bar" in str(control.get("rule") or "")


def _own(numbers: Mapping[str, Any], control: Mapping[str, Any]) -> Any:
    """The line's own value beside its control's: its estimate, unless that is the difference itself
    (then the ablation's own ``drop``, when recorded)."""
    own = numbers.get("estimate")
    if own is not None and fmt.bounds(own) != fmt.bounds(control.get("difference")):
        return own
    return numbers.get("drop") if isinstance(numbers.get("drop"), Mapping) else None


def measure(numbers: Mapping[str, Any]) -> str | None:
    """``0.42 [95% CI 0.2, 0.61] vs random 0.05 [...] → difference 0.37 [...]; bar 0.6 (supported above it)``."""
    control = _control(numbers)
    if control is not None:
        own = _own(numbers, control)
        name = control.get("name") or "the control"
        versus = f" vs {name} {_est(control.get('estimate'))}" if control.get("estimate") is not None else f" vs {name}"
        diff = f" → difference {_est(control.get('difference'))}" if control.get("difference") is not None else ""
        rule = f" ({control['rule']})" if control.get("rule") else ""
        return f"{_est(own) if own is not None else 'estimate not recorded'}{versus}{diff}{rule}; {_bar(numbers)}"
    if numbers.get("estimate") is None and numbers.get("bar") is None:
        return None
    text = _est(numbers.get("estimate")) if numbers.get("estimate") is not None else "estimate not recorded"
    return f"{text}; {_bar(numbers)}"


def _direction(numbers: Mapping[str, Any]) -> str:
    return "≤" if numbers.get("side") == "below" else "≥"


def sample(numbers: Mapping[str, Any]) -> str | None:
    """``n = 84 (test) detects a true value ≥ 0.71 with 80% power``: what the line could have found."""
    n = numbers.get("n")
    if n is None:
        return None
    split = f" ({numbers['split']})" if numbers.get("split") else ""
    mde = fmt.finite(numbers.get("min_detectable_effect"))
    if mde is None:
        return f"n = {n}{split}; no minimum detectable effect recorded"
    power = f" with {fmt.share(numbers['power'])} power" if fmt.finite(numbers.get("power")) is not None else ""
    return f"n = {n}{split} detects a true value {_direction(numbers)} {fmt.number(mde)}{power}"


def side_effect(numbers: Mapping[str, Any]) -> str | None:
    """``Side effect on harmless prompts: KL 0.04 nats, CE +0.02 nats (limit 0.1 / 0.1): within the limit``."""
    se = numbers.get("side_effect")
    if not isinstance(se, Mapping):
        return None
    ce = se.get("answer_ce_increase")
    ce_text = "CE not measured" if ce is None else f"CE {fmt.signed(ce)} nats"
    verdict = ("within the limit" if se.get("ok") else
               "OVER the limit, so its estimate cannot decide the line" if se.get("ok") is False else
               "not judged")
    return (f"Side effect on harmless prompts: KL {fmt.number(se.get('kl_harmless'))} nats, {ce_text} (limit "
            f"{fmt.number(se.get('max_kl'))} / {fmt.number(se.get('max_ce'))}): {verdict}")


def p_values(numbers: Mapping[str, Any]) -> str | None:
    """The one-sided p-values against the bar, raw and Holm-adjusted, and the correction named."""
    parts = []
    for key, h0 in (("p_value", "at or below the bar"), ("p_below", "at or above the bar")):
        if numbers.get(key) is not None:
            holm = numbers.get(f"{key}_holm" if key == "p_below" else "p_holm")
            adjusted = f", Holm-adjusted {fmt.p_value(holm)}" if holm is not None else ""
            parts.append(f"H0 {h0}: {fmt.p_value(numbers[key])}{adjusted}")
    if not parts:
        return None
    family = f" across {numbers['family_size']} lines" if numbers.get("family_size") else ""
    correction = f" (correction: {numbers['correction']}{family})" if numbers.get("correction") else ""
    return "; ".join(parts) + correction


def brief(line: VerdictLine, ctx: RunContext, *, status: bool = True) -> str:
    """A line in the verdict table: its status in lower case (the claim's is the capitalised one; left
    out with ``status=False``), the estimate the bar is held to, n and what it detects."""
    numbers = line.numbers
    on_diff = _on_difference(numbers)
    decided = numbers["control"].get("difference") if on_diff else numbers.get("estimate")
    name = f"{line.evidence} {line.status}" if status else line.evidence
    if decided is None and numbers.get("n") is None:  # decided without data: its own sentence is all there is
        return f"{name}: {strip_status(line.summary, line.claim)}"
    what = "difference from the control " if on_diff else ""
    parts = [f"{what}{_est(decided)}" if decided is not None else "", _bar(numbers) if "bar" in numbers else "",
             sample(numbers) or ""]
    se = numbers.get("side_effect")
    if isinstance(se, Mapping) and se.get("ok") is False:
        parts.append("side effect OVER the limit")
    if line_warning(numbers, ctx):
        parts.append("pre-registration MISMATCH")
    return f"{name}: " + "; ".join(p for p in parts if p)


def details(line: VerdictLine, ctx: RunContext) -> str:
    """A line in its claim's section after its name, read once: numbers, n and power, side effect,
    p-values, its decision's sentence, what is measured, and any pre-registration mismatch."""
    numbers = line.numbers
    sentences = [s for s in (measure(numbers), sample(numbers), side_effect(numbers), p_values(numbers)) if s]
    text = f"{word(line.status)}: " + ". ".join(sentences)
    summary = strip_status(line.summary, line.claim).strip()
    if summary:
        text += (". " if sentences else "") + summary.rstrip(".") + "."
    elif sentences:
        text += "."
    if numbers.get("statistic"):
        text += f" Measured: {numbers['statistic']}."
    warning = line_warning(numbers, ctx)
    return f"{text} {warning}" if warning else text
