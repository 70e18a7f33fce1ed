"""Phase 5.2, the refusal direction (Arditi et al. 2024), steering with it, and how the prompts
sit around it.

The study chooses the direction on train + val pairs; here it is read back with its score
grids and measured on TEST prompts: adding it to harmless prompts should induce refusal,
ablating it from harmful prompts should remove it (rates, CIs, McNemar's p against the
unsteered model). When no candidate passed the filters, the best one is still recorded and
steered, flagged by ``meets_thresholds`` and ``unusable_reason``. The activation scatter
shows PCA and t-SNE (3-D) of last-position residuals, harmful vs harmless, at several depths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses import records
from hypotheses.evidence import Behaviour, Condition, Judged, harmful, harmless
from instruments import stats
from instruments.direction import CandidateDirections, DirectionSelection, resid_at

N_INDUCED_EXAMPLES = 5  # induced answers shown in the record
SCORE_FIELDS = ("bypass", "induce", "kl")


def _rate(flags: np.ndarray, alpha: float) -> dict:
    return stats.proportion_ci(int(flags.sum()), int(flags.size), alpha).to_dict()


@dataclass(frozen=True, kw_only=True)
class Steering:
    """The selected direction, its projections by layer, and steering with it on the test split."""

    candidates: CandidateDirections
    selection: DirectionSelection
    unusable_reason: str | None
    projections: tuple[torch.Tensor, torch.Tensor]  # (harmful, harmless) test, each [layer, prompt]
    bypass: Condition  # the direction ablated from harmful test prompts
    induced: Judged  # harmless test prompts with the direction added
    behaviour: Behaviour  # the unsteered test split
    induce_test: stats.McNemarResult  # unsteered vs induced refusal of the harmless prompts
    n_layers: int
    harmless_prompts: tuple[str, ...]
    alpha: float

    @property
    def positions(self) -> list[int]:
        return list(self.candidates.positions)

    def record(self) -> records.RefusalDirection:
        sel, alpha, bypass, induced = self.selection, self.alpha, self.bypass, self.induced
        base_harmless = self.behaviour.refused_harmless
        best = sel.best
        grid = {f: sel.grid(f, self.positions, self.n_layers).float() for f in SCORE_FIELDS}
        proj_h, proj_s = self.projections
        return records.RefusalDirection(
            layer=sel.layer, pos=sel.pos, method=sel.method, meets_thresholds=sel.meets_thresholds,
            excluded_layers=list(sel.excluded_layers), positions=self.positions, n_pairs=sel.n_harmful,
            screened={"kept": sel.spec.screen, "prompts": sel.spec.screen_prompts} if sel.spec.screen else None,
            scale=sel.scale,
            # the chosen candidate's own scores; with meets_thresholds False it is the best that failed
            chosen={"bypass": best.bypass, "induce": best.induce, "kl": best.kl, "rejected": best.rejected},
            unusable_reason=self.unusable_reason,
            baseline_score={"harmful_val": sel.baseline_harmful, "harmless_val": sel.baseline_harmless},
            steering={
                "induce": {"baseline": _rate(base_harmless.refused, alpha), "steered": _rate(induced.refused, alpha),
                           "mcnemar_p": self.induce_test.p_value, "n": int(base_harmless.refused.size),
                           # answers with no letter or digit, beside the refusal rates (neither refusal nor compliance)
                           "degenerate": {"baseline": _rate(base_harmless.degenerate, alpha),
                                          "steered": _rate(induced.degenerate, alpha)}},
                "bypass": {"baseline": _rate(bypass.baseline.refused, alpha),
                           "ablated": _rate(bypass.ablated.refused, alpha),
                           "mcnemar_p": bypass.mcnemar.p_value, "relative_drop": bypass.relative_drop.to_dict(),
                           "n": int(bypass.baseline.refused.size),
                           "degenerate": {"baseline": _rate(bypass.baseline.degenerate, alpha),
                                          "ablated": _rate(bypass.ablated.degenerate, alpha)}}},
            examples_induced=[{"prompt": p, "completion": t[:200]} for p, t in
                              list(zip(self.harmless_prompts, induced.texts))[:N_INDUCED_EXAMPLES]],
            direction=sel.direction.tensor().float(), projection_harmful=proj_h.float(),
            projection_harmless=proj_s.float(), scores_bypass=grid["bypass"], scores_induce=grid["induce"],
            scores_kl=grid["kl"])


def steering(direction: tuple[CandidateDirections, DirectionSelection], unusable_reason: str | None,
             projections: tuple[torch.Tensor, torch.Tensor], bypass: Condition, induced: Judged,
             behaviour: Behaviour, test: Sequence[Pair], cfg: RefusalConfig, n_layers: int) -> Steering:
    cands, sel = direction
    induce_test = stats.mcnemar(behaviour.refused_harmless.refused, induced.refused, alpha=cfg.alpha,
                                n_boot=cfg.n_bootstrap, seed=cfg.seed)
    return Steering(candidates=cands, selection=sel, unusable_reason=unusable_reason, projections=projections,
                    bypass=bypass, induced=induced, behaviour=behaviour, induce_test=induce_test, n_layers=n_layers,
                    harmless_prompts=tuple(harmless(test)), alpha=cfg.alpha)


# ----------------------------------------------------------------------------- the activation scatter

@dataclass(frozen=True, kw_only=True)
class ActivationScatter:
    """PCA (float64 coordinates) and t-SNE of last-position residuals at several layers, harmful then harmless."""

    layers: tuple[int, ...]
    pca: dict[int, torch.Tensor]  # layer -> [prompt, 3]
    tsne: dict[int, torch.Tensor]
    pairs: tuple[Pair, ...]

    def record(self) -> records.ActivationScatter:
        pairs = self.pairs
        return records.ActivationScatter(
            layers=list(self.layers), labels=["harmful"] * len(pairs) + ["harmless"] * len(pairs),
            categories=[p.category for p in pairs] * 2, prompts=harmful(pairs) + harmless(pairs),
            pca={str(layer): self.pca[layer].float() for layer in self.layers},
            tsne={str(layer): self.tsne[layer] for layer in self.layers})


def scatter_layers(n_layers: int) -> tuple[int, ...]:
    return tuple(sorted({max(1, n_layers // 6), n_layers // 3, n_layers // 2, 2 * n_layers // 3, 5 * n_layers // 6,
                         n_layers - 1}))


def pca3(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:3].T


def activation_scatter(handle, pairs: Sequence[Pair], cfg: RefusalConfig) -> ActivationScatter:
    from sklearn.manifold import TSNE

    prompts = harmful(pairs) + harmless(pairs)
    acts = resid_at(handle, prompts, positions=(-1,), batch_size=cfg.batch_size)[:, 0].double()
    layers = scatter_layers(handle.n_layers)
    pca, tsne = {}, {}
    for layer in layers:
        pca[layer] = pca3(acts[:, layer])
        fit = TSNE(n_components=3, perplexity=min(30.0, (len(prompts) - 1) / 3), init="pca", random_state=cfg.seed,
                   method="barnes_hut")
        tsne[layer] = torch.from_numpy(fit.fit_transform(acts[:, layer].numpy()).astype(np.float32))
    return ActivationScatter(layers=layers, pca=pca, tsne=tsne, pairs=tuple(pairs))
