"""Statistics for the suite: every number reported with its uncertainty.

Pure functions over numpy arrays (no I/O, no torch). Each result is a frozen,
keyword-only dataclass whose ``to_dict()`` is JSON-safe (non-finite numbers become
``None``), so it can go straight into a recorded result.

Conventions
-----------
* ``alpha`` is the two-sided error rate: intervals are ``1 - alpha`` confidence intervals.
* Bootstrap intervals default to **BCa** (bias-corrected and accelerated, Efron 1987):
  it is second-order accurate and corrects the skew that refusal scores and rates
  near 0 or 1 have, where the plain percentile interval undercovers. ``method="percentile"``
  is available and is what :func:`spearman_ci` uses (see there).
* Resampling is vectorised: one ``[n_boot, n]`` index matrix, one call of the statistic.
  A statistic therefore takes arrays whose *last* axis holds the items and reduces it
  (``lambda x: x.mean(-1)``), the same contract as ``scipy.stats.bootstrap(vectorized=True)``.
* Too little data is an error (:class:`InsufficientDataError`), never a silent NaN: a CI
  from two prompts would look like evidence and is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from jaxtyping import Bool, Float
from scipy import stats as sps

Alternative = Literal["two-sided", "greater", "less"]
BootMethod = Literal["bca", "percentile"]
# A vectorised statistic: arrays [..., n] (one per data argument) -> [...].
Statistic = Callable[..., np.ndarray]
# One value per item (prompt, pair); torch CPU tensors and lists are accepted too.
Items = Float[np.ndarray, "n"] | Sequence[float]
PairedItems = Float[np.ndarray, "n"] | Sequence[float]

# Sign-flip permutation tests enumerate all 2**n flips up to this n (32768 rows x 15).
EXACT_PERMUTATION_MAX_N = 15
# statsmodels' guidance: the chi-square McNemar is poor when b + c is small; below this
# many discordant pairs the exact binomial test is used.
MCNEMAR_EXACT_BELOW = 25


# ----------------------------------------------------------------------------- errors

class InsufficientDataError(ValueError):
    """A statistic was asked of a dataset too small to support it."""

    def __init__(self, statistic: str, *, n: int, minimum: int, unit: str = "items") -> None:
        self.statistic, self.n, self.minimum = statistic, n, minimum
        super().__init__(f"{statistic} needs at least {minimum} {unit}, got {n}; "
                         "add prompt pairs (or more items) so the estimate has a meaningful uncertainty")


class DegenerateDataError(ValueError):
    """The data are large enough but carry no variation the statistic needs (e.g. a constant)."""


def _require(statistic: str, n: int, minimum: int, unit: str = "items") -> None:
    if n < minimum:
        raise InsufficientDataError(statistic, n=n, minimum=minimum, unit=unit)


def _as_1d(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; drop or fix them first")
    return arr


def _paired(statistic: str, x: Any, y: Any, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d("x", x), _as_1d("y", y)
    if a.shape != b.shape:
        raise ValueError(f"{statistic}: paired data must have equal lengths, got {a.size} and {b.size}")
    _require(statistic, a.size, minimum, "pairs")
    return a, b


def _z(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(sps.norm.ppf(1 - alpha / 2))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


# ----------------------------------------------------------------------------- the estimate

@dataclass(frozen=True, kw_only=True)
class Estimate:
    """A point estimate with its ``1 - alpha`` confidence interval and how it was made."""

    value: float
    ci_low: float
    ci_high: float
    method: str
    n: int
    alpha: float = 0.05
    p_value: float | None = None

    def __post_init__(self) -> None:
        # Reversed bounds always mean a bug upstream. (A bound may legitimately exclude the
        # value itself: bootstrap intervals of biased statistics can, so that is not checked.)
        if self.ci_low > self.ci_high:
            raise ValueError(f"ci_low {self.ci_low} > ci_high {self.ci_high} ({self.method})")

    @property
    def width(self) -> float:
        return self.ci_high - self.ci_low

    def contains(self, x: float) -> bool:
        return self.ci_low <= x <= self.ci_high

    @property
    def excludes_zero(self) -> bool:
        return not self.contains(0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"value": _finite_or_none(self.value), "ci_low": _finite_or_none(self.ci_low),
                "ci_high": _finite_or_none(self.ci_high), "method": self.method, "n": int(self.n),
                "alpha": float(self.alpha), "p_value": _finite_or_none(self.p_value)}

    def __str__(self) -> str:
        level = round(100 * (1 - self.alpha))
        p = "" if self.p_value is None else f", p={self.p_value:.3g}"
        return f"{self.value:.4g} [{level}% CI {self.ci_low:.4g}, {self.ci_high:.4g}] (n={self.n}, {self.method}{p})"


def _estimate(value: float, low: float, high: float, **kwargs: Any) -> Estimate:
    # Floating-point noise can put a bound a few ulps past the estimate; never let it flip.
    return Estimate(value=float(value), ci_low=float(min(low, high)), ci_high=float(max(low, high)), **kwargs)


# ----------------------------------------------------------------------------- bootstrap

def _bca_bounds(theta: float, boot: np.ndarray, jack: np.ndarray, alpha: float) -> tuple[float, float]:
    """BCa interval from bootstrap replicates and leave-one-out (jackknife) replicates."""
    if np.ptp(boot) == 0:
        # Every resample gives the same value (e.g. Spearman on monotone data): no spread to correct.
        return float(boot[0]), float(boot[0])
    b = boot.size
    # Bias correction: where the estimate sits in its own bootstrap distribution (ties split),
    # clipped so that an estimate at the edge does not give an infinite z0.
    below = (np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / b
    z0 = sps.norm.ppf(np.clip(below, 1 / (b + 1), b / (b + 1)))
    # Acceleration: skewness of the jackknife influence values.
    d = jack.mean() - jack
    denom = 6.0 * np.sum(d ** 2) ** 1.5
    accel = float(np.sum(d ** 3) / denom) if denom > 0 else 0.0
    z = sps.norm.ppf([alpha / 2, 1 - alpha / 2])
    adjusted = sps.norm.cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
    low, high = np.quantile(boot, np.clip(adjusted, 0, 1))
    return float(low), float(high)


def _leave_one_out(n: int) -> np.ndarray:
    """[n, n - 1] indices; row i lists every index but i (j < i stays j, j >= i becomes j + 1)."""
    j = np.arange(n - 1)[None, :]
    return j + (j >= np.arange(n)[:, None])


def _jackknife(data: tuple[np.ndarray, ...], statistic: Statistic) -> np.ndarray:
    # all n leave-one-out samples in one vectorised call of the statistic
    keep = _leave_one_out(data[0].size)
    return np.asarray(statistic(*(d[keep] for d in data)), dtype=np.float64)


def _finite_replicates(statistic_name: str, boot: np.ndarray) -> np.ndarray:
    # Some resamples make a statistic undefined (all-equal items for a correlation); they
    # are dropped, but if most are, the interval would describe an unrepresentative subset.
    finite = boot[np.isfinite(boot)]
    if finite.size < 0.5 * boot.size:
        raise DegenerateDataError(f"{statistic_name}: {boot.size - finite.size} of {boot.size} bootstrap resamples "
                                  "gave an undefined statistic (too many tied or constant values)")
    return finite


def bootstrap_ci(data: Items | tuple[PairedItems, ...], statistic: Statistic | None = None, *,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0, method: BootMethod = "bca",
                 name: str = "bootstrap") -> Estimate:
    """Bootstrap CI of ``statistic`` over items.

    ``data`` is one array of n items, or a tuple of equal-length arrays that are paired
    item by item (each resample draws the *same* indices from every array, so pairing
    survives). ``statistic(*arrays)`` must reduce the last axis (default: the mean of one
    array). ``method``: ``"bca"`` (default, see the module doc) or ``"percentile"``.
    """
    arrays = tuple(_as_1d("data", d) for d in data) if isinstance(data, tuple) else (_as_1d("data", data),)
    n = arrays[0].size
    if any(a.size != n for a in arrays):
        raise ValueError(f"{name}: paired arrays must have equal lengths, got {[a.size for a in arrays]}")
    _require(name, n, 2)
    if n_boot < 100:
        raise ValueError(f"{name}: n_boot={n_boot} is too few resamples for a CI; use at least 1000")
    stat = statistic if statistic is not None else (lambda x: x.mean(-1))
    theta = float(np.asarray(stat(*(a[None, :] for a in arrays)))[0])
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = _finite_replicates(name, np.asarray(stat(*(a[idx] for a in arrays)), dtype=np.float64))
    if method == "percentile":
        low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    elif method == "bca":
        low, high = _bca_bounds(theta, boot, _jackknife(arrays, stat), alpha)
    else:
        raise ValueError(f"unknown bootstrap method {method!r}; use 'bca' or 'percentile'")
    return _estimate(theta, low, high, method=f"bootstrap-{method} (B={n_boot})", n=n, alpha=alpha)


def mean_ci(x: Items, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Estimate:
    """The mean with a BCa bootstrap CI."""
    return bootstrap_ci(x, n_boot=n_boot, alpha=alpha, seed=seed, name="mean_ci")


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


# ----------------------------------------------------------------------------- proportions, McNemar

def proportion_ci(k: int, n: int, alpha: float = 0.05, *, method: str = "wilson") -> Estimate:
    """k successes of n with the Wilson score interval (good coverage even at 0/n and n/n).

    ``method="beta"`` gives the exact Clopper-Pearson interval, never below its nominal
    coverage: what a false-positive rate is bounded with.
    """
    from statsmodels.stats.proportion import proportion_confint

    _require("proportion_ci", int(n), 1, "trials")
    if not 0 <= k <= n:
        raise ValueError(f"proportion_ci: need 0 <= k <= n, got k={k}, n={n}")
    if method not in ("wilson", "beta"):
        raise ValueError(f"proportion_ci: method must be 'wilson' or 'beta' (Clopper-Pearson), got {method!r}")
    low, high = proportion_confint(int(k), int(n), alpha=alpha, method=method)
    return _estimate(k / n, float(low), float(high), method="clopper-pearson" if method == "beta" else method,
                     n=int(n), alpha=alpha)


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


# ----------------------------------------------------------------------------- correlations

def _check_variation(statistic: str, **arrays: np.ndarray) -> None:
    for name, arr in arrays.items():
        if np.ptp(arr) == 0:
            raise DegenerateDataError(f"{statistic}: {name} is constant, so the correlation is undefined")


def pearson_ci(x: PairedItems, y: PairedItems, *, alpha: float = 0.05) -> Estimate:
    """Pearson r with the Fisher-z CI (atanh r ~ Normal(atanh rho, 1/(n-3))); scipy's p-value."""
    a, b = _paired("pearson_ci", x, y, 4)  # the Fisher-z standard error needs n - 3 > 0
    _check_variation("pearson_ci", x=a, y=b)
    r, p = sps.pearsonr(a, b)
    half = _z(alpha) / math.sqrt(a.size - 3)
    with np.errstate(divide="ignore"):
        z = np.arctanh(np.clip(r, -1.0, 1.0))
    return _estimate(r, np.tanh(z - half), np.tanh(z + half), method="pearson, fisher-z", n=a.size, alpha=alpha,
                     p_value=float(p))


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: Pearson r of average ranks (ties as scipy treats them)."""
    ra = sps.rankdata(a, axis=-1)
    rb = sps.rankdata(b, axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))


def spearman_ci(x: PairedItems, y: PairedItems, *, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Spearman rho with a percentile bootstrap CI over items, and scipy's p-value.

    Percentile rather than BCa: resampling duplicates items, so many resamples are full of
    ties, and the jackknife acceleration of a rank statistic is then erratic; the percentile
    interval is the usual choice here (and is exact-range: it never leaves [-1, 1]).
    """
    a, b = _paired("spearman_ci", x, y, 3)
    _check_variation("spearman_ci", x=a, y=b)
    rho, p = sps.spearmanr(a, b)
    est = bootstrap_ci((a, b), _spearman_rows, n_boot=n_boot, alpha=alpha, seed=seed, method="percentile",
                       name="spearman_ci")
    return _estimate(rho, est.ci_low, est.ci_high, method=f"spearman, {est.method}",
                     n=a.size, alpha=alpha, p_value=float(p))


# ----------------------------------------------------------------------------- effect sizes

def cohens_d(x: Items, y: Items, *, alpha: float = 0.05) -> Estimate:
    """Standardised mean difference of independent groups, (mean x - mean y) / pooled SD.

    CI from the large-sample variance of d (Hedges & Olkin 1985):
    var(d) = (n1 + n2) / (n1 n2) + d**2 / (2 (n1 + n2)). p-value: Student's t test (the
    same pooled-variance model as d).
    """
    a, b = _as_1d("x", x), _as_1d("y", y)
    _require("cohens_d", min(a.size, b.size), 2, "items per group")
    n1, n2 = a.size, b.size
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    if pooled == 0:
        raise DegenerateDataError("cohens_d: both groups are constant, so the pooled SD is 0")
    d = (a.mean() - b.mean()) / pooled
    se = math.sqrt((n1 + n2) / (n1 * n2) + d ** 2 / (2 * (n1 + n2)))
    half = _z(alpha) * se
    p = float(sps.ttest_ind(a, b, equal_var=True).pvalue)
    return _estimate(d, d - half, d + half, method="cohen's d, hedges-olkin normal CI", n=n1 + n2, alpha=alpha,
                     p_value=p)


def cohens_dz(x: PairedItems, y: PairedItems, *, alpha: float = 0.05) -> Estimate:
    """Paired effect size: mean(x - y) / SD(x - y).

    CI from var(dz) = 1/n + dz**2 / (2n) (the paired analogue of Hedges & Olkin); p-value:
    the paired t test.
    """
    a, b = _paired("cohens_dz", x, y, 2)
    d = a - b
    sd = d.std(ddof=1)
    if sd == 0:
        raise DegenerateDataError("cohens_dz: every paired difference is the same, so SD(x - y) is 0")
    dz = d.mean() / sd
    n = d.size
    half = _z(alpha) * math.sqrt(1 / n + dz ** 2 / (2 * n))
    p = float(sps.ttest_rel(a, b).pvalue)
    return _estimate(dz, dz - half, dz + half, method="cohen's dz, normal CI", n=n, alpha=alpha, p_value=p)


def _auc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUC of each row pair, from ranks: (rank sum of pos - n1 (n1 + 1) / 2) / (n1 n2)."""
    n1, n2 = pos.shape[-1], neg.shape[-1]
    ranks = sps.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    return (ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n2)


def roc_auc(scores_pos: Items, scores_neg: Items, *, n_boot: int = 2000, seed: int = 0,
            alpha: float = 0.05) -> Estimate:
    """P(score_pos > score_neg) + 0.5 P(tie): the Mann-Whitney U of pos over n1 n2.

    CI: BCa bootstrap, resampling each group separately (stratified, so each resample keeps
    n1 positives and n2 negatives); the acceleration comes from the jackknife over all
    n1 + n2 items. p-value: the two-sided Mann-Whitney U test (AUC = 0.5).
    """
    pos, neg = _as_1d("scores_pos", scores_pos), _as_1d("scores_neg", scores_neg)
    _require("roc_auc", min(pos.size, neg.size), 2, "items per group")
    auc = float(_auc_rows(pos, neg))
    rng = np.random.default_rng(seed)
    boot = _auc_rows(pos[rng.integers(0, pos.size, (n_boot, pos.size))],
                     neg[rng.integers(0, neg.size, (n_boot, neg.size))])
    # jackknife over all n1 + n2 items: leave out one positive, then one negative, at a time
    jack_pos = _auc_rows(pos[_leave_one_out(pos.size)], np.broadcast_to(neg, (pos.size, neg.size)))
    jack_neg = _auc_rows(np.broadcast_to(pos, (neg.size, pos.size)), neg[_leave_one_out(neg.size)])
    low, high = _bca_bounds(auc, boot, np.concatenate([jack_pos, jack_neg]), alpha)
    p = float(sps.mannwhitneyu(pos, neg, alternative="two-sided").pvalue)
    return _estimate(auc, low, high, method=f"auc, stratified bootstrap-bca (B={n_boot})",
                     n=pos.size + neg.size, alpha=alpha, p_value=p)


def rank_biserial(scores_pos: Items, scores_neg: Items, *, n_boot: int = 2000, seed: int = 0,
                  alpha: float = 0.05) -> Estimate:
    """Rank-biserial correlation 2 AUC - 1 (in [-1, 1]; 0 = no separation), CI mapped from the AUC's."""
    auc = roc_auc(scores_pos, scores_neg, n_boot=n_boot, seed=seed, alpha=alpha)
    return _estimate(2 * auc.value - 1, 2 * auc.ci_low - 1, 2 * auc.ci_high - 1,
                     method=f"rank-biserial from {auc.method}", n=auc.n, alpha=alpha, p_value=auc.p_value)

