"""Significance tests and their corrections for multiple testing: the paired sign-flip permutation
test, McNemar's test of paired refusal, and Holm's and Benjamini-Hochberg's adjustments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
from jaxtyping import Bool

from instruments.stats.intervals import Estimate, Items, PairedItems, _estimate, _paired, _require, bootstrap_ci
from instruments.stats.proportions import proportion_ci

Alternative = Literal["two-sided", "greater", "less"]

# Sign-flip permutation tests enumerate all 2**n flips up to this n (32768 rows x 15).
EXACT_PERMUTATION_MAX_N = 15
# statsmodels' guidance: the chi-square McNemar is poor when b + c is small; below this
# many discordant pairs the exact binomial test is used.
MCNEMAR_EXACT_BELOW = 25


# ----------------------------------------------------------------------------- permutation test

@dataclass(frozen=True, kw_only=True)
class PermutationResult:
    """Sign-flip test of the mean paired difference x - y."""

    difference: Estimate  # mean(x - y) with a BCa bootstrap CI
    p_value: float
    alternative: str
    exact: bool  # all 2**n sign patterns enumerated (n <= EXACT_PERMUTATION_MAX_N)
    n_perm: int  # sign patterns used

    def to_dict(self) -> dict[str, Any]:
        return {"difference": self.difference.to_dict(), "p_value": float(self.p_value),
                "alternative": self.alternative, "exact": self.exact, "n_perm": int(self.n_perm)}


def _sign_patterns(n: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    if n <= EXACT_PERMUTATION_MAX_N:
        # Row r holds the bits of r as signs: every one of the 2**n patterns exactly once.
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
        return 1.0 - 2.0 * bits, True
    return rng.choice(np.array([1.0, -1.0]), size=(n_perm, n)), False


def paired_permutation_test(x: PairedItems, y: PairedItems, *, n_perm: int = 10000, seed: int = 0,
                            alternative: Alternative = "two-sided", alpha: float = 0.05) -> PermutationResult:
    """Paired test of mean(x - y) = 0 by flipping the signs of the differences.

    Under the null each difference is symmetric about 0, so every sign pattern is equally
    likely. With n <= 15 all 2**n patterns are enumerated (exact p); otherwise ``n_perm``
    random patterns are drawn and p = (1 + #as-extreme) / (1 + n_perm), which is never 0
    and keeps the test valid (Phipson & Smyth 2010).
    """
    a, b = _paired("paired_permutation_test", x, y, 2)
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    d = a - b
    observed = d.mean()
    rng = np.random.default_rng(seed)
    signs, exact = _sign_patterns(d.size, n_perm, rng)
    null = signs @ d / d.size
    # A relative tolerance so that flips giving the same mean up to rounding count as ties.
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(observed) - tol
    elif alternative == "greater":
        extreme = null >= observed - tol
    else:
        extreme = null <= observed + tol
    count = int(extreme.sum())
    p = count / null.size if exact else (count + 1) / (null.size + 1)
    diff = bootstrap_ci(d, n_boot=2000, alpha=alpha, seed=seed, name="paired_permutation_test")
    return PermutationResult(difference=diff, p_value=float(min(1.0, p)), alternative=alternative, exact=exact,
                             n_perm=int(null.size))


# ----------------------------------------------------------------------------- McNemar

@dataclass(frozen=True, kw_only=True)
class McNemarResult:
    """Refusal on the same prompts before vs after an intervention.

    ``table`` is [[both, before only], [after only, neither]]; the test uses only the
    discordant cells b = before-only and c = after-only.
    """

    table: tuple[tuple[int, int], tuple[int, int]]
    statistic: float  # exact: min(b, c); asymptotic: chi-square with continuity correction
    p_value: float
    exact: bool
    rate_before: Estimate
    rate_after: Estimate
    difference: Estimate  # rate_after - rate_before, paired bootstrap over prompts

    def to_dict(self) -> dict[str, Any]:
        return {"table": [list(r) for r in self.table], "statistic": float(self.statistic),
                "p_value": float(self.p_value), "exact": self.exact, "rate_before": self.rate_before.to_dict(),
                "rate_after": self.rate_after.to_dict(), "difference": self.difference.to_dict()}


def mcnemar(before: Bool[np.ndarray, "n"] | Sequence[bool], after: Bool[np.ndarray, "n"] | Sequence[bool], *,
            exact: bool | None = None, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> McNemarResult:
    """McNemar's test that refusal changed on the same prompts (statsmodels).

    ``exact=None`` picks the exact binomial test when the discordant count b + c is below
    :data:`MCNEMAR_EXACT_BELOW`, else the continuity-corrected chi-square.
    """
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    pre = np.asarray(before, dtype=bool).reshape(-1)
    post = np.asarray(after, dtype=bool).reshape(-1)
    if pre.shape != post.shape:
        raise ValueError(f"mcnemar: before and after must cover the same prompts, got {pre.size} and {post.size}")
    _require("mcnemar", pre.size, 1, "prompts")
    both, b = int(np.sum(pre & post)), int(np.sum(pre & ~post))
    c, neither = int(np.sum(~pre & post)), int(np.sum(~pre & ~post))
    table = ((both, b), (c, neither))
    use_exact = (b + c) < MCNEMAR_EXACT_BELOW if exact is None else bool(exact)
    result = sm_mcnemar(np.array(table), exact=use_exact, correction=True)
    p = float(result.pvalue) if b + c > 0 else 1.0  # no discordant pair: no evidence of change
    stat = float(result.statistic) if b + c > 0 else 0.0
    diff = _paired_rate_difference(pre, post, alpha=alpha, n_boot=n_boot, seed=seed)
    return McNemarResult(table=table, statistic=stat, p_value=min(1.0, p), exact=use_exact,
                         rate_before=proportion_ci(int(pre.sum()), pre.size, alpha),
                         rate_after=proportion_ci(int(post.sum()), post.size, alpha), difference=diff)


def _paired_rate_difference(pre: np.ndarray, post: np.ndarray, *, alpha: float, n_boot: int, seed: int) -> Estimate:
    if pre.size < 2 or np.array_equal(pre, post):
        # Nothing to resample (one prompt) or nothing changed: the difference is exactly
        # (c - b) / n with no sampling spread visible in these data; report it as a point.
        value = float(post.mean() - pre.mean())
        return _estimate(value, value, value, method="paired difference (no variation)", n=pre.size, alpha=alpha)
    return bootstrap_ci((post.astype(float), pre.astype(float)), lambda a, b: a.mean(-1) - b.mean(-1),
                        n_boot=n_boot, alpha=alpha, seed=seed, method="percentile", name="mcnemar difference")


# ----------------------------------------------------------------------------- multiple testing

@dataclass(frozen=True, kw_only=True)
class MultipleTestResult:
    p_values: tuple[float, ...]
    p_adjusted: tuple[float, ...]
    reject: tuple[bool, ...]
    method: str
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return {"p_values": list(self.p_values), "p_adjusted": list(self.p_adjusted), "reject": list(self.reject),
                "method": self.method, "alpha": self.alpha}


def _adjust(pvalues: Any, *, alpha: float, method: str, label: str) -> MultipleTestResult:
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    _require(label, p.size, 1, "p-values")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"{label}: p-values must lie in [0, 1] (and not be NaN), got {p.tolist()}")
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method=method)
    return MultipleTestResult(p_values=tuple(float(v) for v in p), p_adjusted=tuple(float(v) for v in adjusted),
                              reject=tuple(bool(r) for r in reject), method=label, alpha=alpha)


def holm(pvalues: Items, *, alpha: float = 0.05) -> MultipleTestResult:
    """Holm step-down: controls the family-wise error rate under any dependence."""
    return _adjust(pvalues, alpha=alpha, method="holm", label="holm")


def benjamini_hochberg(pvalues: Items, *, alpha: float = 0.05) -> MultipleTestResult:
    """Benjamini-Hochberg step-up: controls the false discovery rate (independent or PRDS tests)."""
    return _adjust(pvalues, alpha=alpha, method="fdr_bh", label="benjamini_hochberg")
