"""Statistics for the suite: every number reported with its uncertainty.

Pure functions over numpy arrays (no I/O, no torch); each result is a frozen dataclass
whose ``to_dict()`` is JSON-safe. The modules, in reading order:

- :mod:`~instruments.stats.intervals`: :class:`Estimate`, the errors for too little or
  degenerate data, and the (BCa or percentile) bootstrap, with the conventions all share;
- :mod:`~instruments.stats.proportions`: proportions and the AUC;
- :mod:`~instruments.stats.significance`: the paired permutation test, McNemar, Holm and
  Benjamini-Hochberg;
- :mod:`~instruments.stats.effect_sizes`: Pearson, Spearman, Cohen's d and d_z.
"""

from instruments.stats.effect_sizes import cohens_d, cohens_dz, pearson_ci, spearman_ci
from instruments.stats.intervals import (BootMethod, DegenerateDataError, Estimate, InsufficientDataError, Items,
                                         PairedItems, Statistic, bootstrap_ci, mean_ci)
from instruments.stats.proportions import proportion_ci, rank_biserial, roc_auc
from instruments.stats.significance import (EXACT_PERMUTATION_MAX_N, MCNEMAR_EXACT_BELOW, Alternative, McNemarResult,
                                            MultipleTestResult, PermutationResult, benjamini_hochberg, holm, mcnemar,
                                            paired_permutation_test)

__all__ = ["EXACT_PERMUTATION_MAX_N", "MCNEMAR_EXACT_BELOW", "Alternative", "BootMethod", "DegenerateDataError",
           "Estimate", "InsufficientDataError", "Items", "McNemarResult", "MultipleTestResult", "PairedItems",
           "PermutationResult", "Statistic", "benjamini_hochberg", "bootstrap_ci", "cohens_d", "cohens_dz", "holm",
           "mcnemar", "mean_ci", "paired_permutation_test", "pearson_ci", "proportion_ci", "rank_biserial", "roc_auc",
           "spearman_ci"]
