"""Number formatting for the write-up: every number printed with its uncertainty.

The report never types a number by hand; prose and tables call these helpers on recorded
values. An estimate (``instruments.stats.Estimate.to_dict()``) is printed with its
confidence interval; a value recorded without one says so rather than looking exact.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# Harmful-prompt completions are cut to this many characters unless show_completions is on:
# enough to see whether the model refused, too little to carry harmful instructions.
COMPLETION_CHARS = 80


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def finite(value: Any) -> float | None:
    """The value as a float; None when absent, boolean or not finite."""
    return _num(value)


def number(value: Any, *, digits: int = 3, pct: bool = False) -> str:
    """A plain number (``n/a`` when absent or not finite); ``pct`` prints a share as a percentage."""
    x = _num(value)
    if x is None:
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%"
    if x != 0 and (abs(x) >= 10 ** 5 or abs(x) < 10 ** -3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def bounds(est: Mapping[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """(value, ci_low, ci_high) of an estimate (``instruments.stats.Estimate.to_dict()``)."""
    if not isinstance(est, Mapping):
        return _num(est), None, None
    return _num(est.get("value")), _num(est.get("ci_low")), _num(est.get("ci_high"))


def estimate(est: Mapping[str, Any] | None, *, digits: int = 3, pct: bool = False, with_n: bool = True) -> str:
    """``0.825 [95% CI 0.71, 0.9, n=40]``; an estimate without an interval is flagged as such.

    ``with_n=False`` leaves the n out, for sentences that state it once for several estimates.
    """
    if est is None:
        return "n/a (not recorded)"
    value, low, high = bounds(est)
    if value is None:
        return "n/a"
    text = number(value, digits=digits, pct=pct)
    if low is None or high is None:
        return f"{text} (no CI recorded)"
    alpha = _num(est.get("alpha")) if isinstance(est, Mapping) else None
    level = round(100 * (1 - alpha)) if alpha is not None and 0 < alpha < 1 else 95
    n = est.get("n") if isinstance(est, Mapping) else None
    tail = f", n={n}" if with_n and isinstance(n, int) and not isinstance(n, bool) else ""
    return f"{text} [{level}% CI {number(low, digits=digits, pct=pct)}, {number(high, digits=digits, pct=pct)}{tail}]"


def count(value: Any) -> str:
    """A whole count in full (``1536``), never in scientific notation."""
    x = _num(value)
    return "n/a" if x is None else f"{x:.0f}"


def share(value: Any) -> str:
    """A bar or a power as a percentage without spurious decimals: ``80%``, ``12.5%``."""
    x = _num(value)
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if abs(100 * x - round(100 * x)) < 1e-9 else f"{100 * x:.3g}%"


def signed(value: Any, *, digits: int = 3) -> str:
    """A change with its sign: ``+0.02``, ``-0.1``."""
    x = _num(value)
    return "n/a" if x is None else ("+" if x >= 0 else "") + number(x, digits=digits)


def p_value(p: Any) -> str:
    x = _num(p)
    if x is None:
        return "n/a"
    return "p < 0.001" if x < 0.001 else f"p = {x:.3g}"


def byte_size(n: Any) -> str:
    x = _num(n)
    if x is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.2f} {unit}"
        x /= 1024
    return f"{x:.2f} GiB"


def seconds(s: Any) -> str:
    x = _num(s)
    if x is None:
        return "n/a"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def truncate_completion(text: Any, *, show: bool, limit: int = COMPLETION_CHARS) -> str:
    """A completion to a harmful prompt, cut to ``limit`` characters unless ``show``."""
    text = "" if text is None else str(text)
    if show or len(text) <= limit:
        return text
    return text[:limit].rstrip() + " … [truncated]"


def phase_of(result_name: str) -> str:
    """Who records a result, for the 'missing' notes: ``phase3/heads`` -> ``phase 3``."""
    head = result_name.split("/", 1)[0]
    if head.startswith("phase") and head[5:].isdigit():
        return f"phase {head[5:]}"
    if head in ("h1", "h2", "h3"):
        return f"the {head.upper()} test"
    return head


def params(n: Any) -> str:
    """A parameter count: ``134.5M``, ``8.03B``."""
    x = _num(n)
    if x is None:
        return "n/a"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.0f}"
