"""The seeded bootstrap the measurements' intervals come from: one draw of prompt indices shared
by all components, percentile intervals that skip undefined replicates, and normalized
patching effects with their intervals.
"""

from __future__ import annotations

import math

import numpy as np

from fixtures.config import RefusalConfig
from instruments import stats


def boot_index(n: int, cfg: RefusalConfig, salt: int = 0) -> np.ndarray:
    """Bootstrap resamples of n items, [B, n]: one seeded draw shared by all components."""
    return np.random.default_rng(cfg.seed + salt).integers(0, n, size=(cfg.n_bootstrap, n))


def percentile(boot: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CI over the last axis, ignoring non-finite replicates (an empty gap in a resample)."""
    import warnings

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row yields NaN bounds: inconclusive
        lo, hi = np.nanquantile(np.where(np.isfinite(boot), boot, np.nan), [alpha / 2, 1 - alpha / 2], axis=-1)
    return lo, hi


def boot_estimate(value: float, boot: np.ndarray, cfg: RefusalConfig, n: int,
                  method: str = "bootstrap-percentile") -> stats.Estimate:
    """A point value with the percentile CI of its bootstrap replicates.

    The interval is widened to contain the point itself (a percentile interval of a biased
    statistic can miss it), so a decision never rests on an interval that excludes its own
    estimate. Undefined values and bounds stay NaN, which the decisions read as inconclusive.
    """
    lo, hi = (float(x[0]) for x in percentile(np.asarray(boot, dtype=np.float64)[None], cfg.alpha))
    value = float(value)
    if not math.isnan(value):
        lo = lo if math.isnan(lo) else min(lo, value)
        hi = hi if math.isnan(hi) else max(hi, value)
    else:
        lo = hi = float("nan")
    return stats.Estimate(value=value, ci_low=lo, ci_high=hi, method=f"{method} (B={np.size(boot)})", n=int(n),
                          alpha=cfg.alpha)


def normalized_with_ci(metric: np.ndarray, base: np.ndarray, source: np.ndarray,
                       cfg: RefusalConfig, salt: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalized effect (0 = base, 1 = source) of each component row, with a bootstrap CI over prompts.

    ``metric`` is [component, prompt]; normalization happens after averaging the resampled
    prompts, as in :attr:`PatchResult.normalized`.
    """
    metric, base, source = (np.asarray(x, dtype=np.float64) for x in (metric, base, source))
    value = (metric.mean(-1) - base.mean()) / (source.mean() - base.mean())
    idx = boot_index(base.size, cfg, salt)
    b, s = base[idx].mean(-1), source[idx].mean(-1)  # [B]
    with np.errstate(all="ignore"):
        boot = (metric[:, idx].mean(-1) - b) / (s - b)  # [component, B]
    lo, hi = percentile(boot, cfg.alpha)
    return value, lo, hi
