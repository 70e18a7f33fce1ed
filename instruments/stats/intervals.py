"""Estimates with their confidence intervals, and the bootstrap most of them are made by.

Pure functions over numpy arrays (no I/O, no torch). Each result is a frozen,
keyword-only dataclass whose ``to_dict()`` is JSON-safe (non-finite numbers become
``None``), so it can go straight into a recorded result.

Conventions
-----------
* ``alpha`` is the two-sided error rate: intervals are ``1 - alpha`` confidence intervals.
* Bootstrap intervals default to **BCa** (bias-corrected and accelerated, Efron 1987):
  it is second-order accurate and corrects the skew that refusal scores and rates
  near 0 or 1 have, where the plain percentile interval undercovers. ``method="percentile"``
  is available and is what :func:`instruments.stats.spearman_ci` uses (see there).
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
from jaxtyping import Float
from scipy import stats as sps

BootMethod = Literal["bca", "percentile"]
# A vectorised statistic: arrays [..., n] (one per data argument) -> [...].
Statistic = Callable[..., np.ndarray]
# One value per item (prompt, pair); torch CPU tensors and lists are accepted too.
Items = Float[np.ndarray, "n"] | Sequence[float]
PairedItems = Float[np.ndarray, "n"] | Sequence[float]


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
