"""Phase 3.2, the heads: every head ranked (AtP over all of them, exact patching of the
candidates, both on train pairs), its necessity by noising, and what the top heads attend to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fixtures.data import Pair
from hypotheses import records
from hypotheses.evidence import AtpScan, Ranking, harmful, positions_label
from hypotheses.localization import Verified
from instruments import stats
from instruments.components import Head, Pattern, hook_name, label
from instruments.patching import LAST_ONLY, PatchResult

N_RANKED = 30  # rows of the ranking in the record
N_PATTERN_HEADS = 5  # top heads whose attention patterns are recorded

RANKING_METHOD = ("AtP over every head on n_pairs_atp train pairs; the top n_candidates verified by exact "
                  "patching on the same pairs (Kramar et al. 2024); the full exact sweep (n_pairs_sweep) "
                  "is descriptive")


@dataclass(frozen=True, kw_only=True)
class HeadRanking:
    """What phase 3.2 records of the study's head stages, beside the noising sweep and AtP's agreement."""

    exact: PatchResult  # every head, denoising, on the sweep's train pairs
    noising: PatchResult  # every head, noising, on a third of them
    ranking: Ranking  # the candidates verified exactly
    atp: AtpScan
    agreement: stats.Estimate  # Spearman of AtP with the exact sweep, over every head
    n_candidates: int
    verified: Verified  # the candidates' exact effects on test pairs
    bar: float  # --refusal-head-effect
    train_pairs: tuple[Pair, ...]

    def record(self) -> records.HeadRanking:
        exact, ranking, verified = self.exact, self.ranking, self.verified
        return records.HeadRanking(
            ranking=ranking.rows(N_RANKED), atp_vs_exact_spearman=self.agreement.to_dict(),
            n_heads=exact.metric.shape[0] * exact.metric.shape[1], n_pairs=ranking.n_pairs,
            n_pairs_atp=self.atp.n_pairs, n_pairs_sweep=exact.n_pairs, n_candidates=self.n_candidates,
            ranking_method=RANKING_METHOD, n_pairs_noising=self.noising.n_pairs,
            positions=positions_label(ranking.positions), heads_over_bar=int((ranking.effect > self.bar).sum()),
            bar=self.bar,
            verified_on_test={"heads": [label(h) for h in verified.components],
                              "effect": [float(x) for x in verified.effect], "se": [float(x) for x in verified.se],
                              "p_above": [float(x) for x in verified.p_above], "n_pairs": verified.n_pairs},
            exact_denoising=exact.normalized.float(), exact_noising=self.noising.normalized.float(),
            atp_denoising=self.atp.heads.float(), exact_denoising_per_prompt=exact.normalized_per_prompt.float(),
            prompts=harmful(self.train_pairs))


@dataclass(frozen=True, kw_only=True)
class AttentionPatterns:
    """The top heads' attention patterns on one harmful test prompt and its harmless analogue."""

    heads: tuple[Head, ...]
    pair: Pair
    tokens: dict[str, tuple[str, ...]]  # side -> decoded tokens
    patterns: dict[str, dict[str, torch.Tensor]]  # side -> head label -> [query, key]

    def record(self) -> records.AttentionPatterns:
        return records.AttentionPatterns(
            heads=[label(h) for h in self.heads],
            prompts={"harmful": self.pair.harmful, "harmless": self.pair.harmless},
            tokens={side: list(toks) for side, toks in self.tokens.items()}, harmful=dict(self.patterns["harmful"]),
            harmless=dict(self.patterns["harmless"]))


@torch.no_grad()
def attention_patterns(handle, heads: Sequence[Head], pair: Pair) -> AttentionPatterns:
    names = {hook_name(Pattern(layer=h.layer)) for h in heads}
    tokens, patterns = {}, {}
    for side in ("harmful", "harmless"):
        ids, mask = handle.encode([getattr(pair, side)])
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names,
                                                **LAST_ONLY)  # the logits are not read
        tokens[side] = tuple(handle.tokenizer.decode([t]) for t in ids[0].tolist())
        patterns[side] = {label(h): cache[hook_name(Pattern(layer=h.layer))][0, h.head].float().cpu() for h in heads}
    return AttentionPatterns(heads=tuple(heads), pair=pair, tokens=tokens, patterns=patterns)
