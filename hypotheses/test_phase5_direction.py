"""Phase 5.2, the refusal direction (Arditi et al. 2024) and how the prompts sit around it.

Candidates are harmful-minus-harmless mean differences at each post-instruction position
and layer (TRAIN pairs); the direction is selected on VAL pairs by bypass (refusal left
after ablating it), induce (refusal when adding it to harmless prompts) and KL on harmless
prompts, never from the last ``--refusal-direction-prune`` share of layers. When no candidate
passes the filters, the best one is still recorded and steered, flagged by
``meets_thresholds`` and ``unusable_reason``; no verdict uses it. Steering is
then measured on TEST prompts: adding the direction to harmless prompts should induce
refusal, ablating it from harmful prompts should remove it; each with rates, CIs and
McNemar's p against the unsteered model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypotheses.evidence import harmful, harmless
from instruments import stats
from instruments.direction import resid_at
from instruments.positions import post_instruction_length

pytestmark = [pytest.mark.phase5, pytest.mark.integration]


def _rate(flags: np.ndarray, alpha: float) -> dict:
    return stats.proportion_ci(int(flags.sum()), int(flags.size), alpha).to_dict()


def test_refusal_direction_and_steering(subject, study, recorder, refusal_config):
    cands, sel = study.direction
    alpha = refusal_config.alpha
    unit = study.refusal_direction.tensor()
    assert abs(float(unit.norm()) - 1.0) < 1e-4, "the selected direction must be a unit vector"
    assert sel.layer not in sel.excluded_layers, "the direction may not come from the pruned last layers"
    proj_h, proj_s = study.projections
    assert proj_h.shape == (subject.n_layers, len(study.data.test))
    bypass, induced = study.direction_ablation, study.direction_induction
    base_harmless = study.behaviour.refused_harmless.refused
    induce_test = stats.mcnemar(base_harmless, induced.refused, alpha=alpha, n_boot=refusal_config.n_bootstrap,
                                seed=refusal_config.seed)
    positions = list(cands.positions)
    # Arditi et al. (2024) search every post-instruction position and select on 32 val prompts per side
    assert sel.n_harmful == sel.n_harmless == min(len(study.data.val), refusal_config.direction_val_pairs)
    assert len(positions) == (refusal_config.direction_positions or post_instruction_length(subject))
    grids = {f"scores.{f}": sel.grid(f, positions, subject.n_layers) for f in ("bypass", "induce", "kl")}
    best = sel.best
    recorder.save("phase5/direction", numbers={
        "layer": sel.layer, "pos": sel.pos, "method": sel.method, "meets_thresholds": sel.meets_thresholds,
        "excluded_layers": list(sel.excluded_layers), "positions": positions, "n_pairs": sel.n_harmful,
        "screened": {"kept": sel.spec.screen, "prompts": sel.spec.screen_prompts} if sel.spec.screen else None,
        "scale": sel.scale,
        # the chosen candidate's own scores; with meets_thresholds False it is the best that failed
        "chosen": {"bypass": best.bypass, "induce": best.induce, "kl": best.kl, "rejected": best.rejected},
        "unusable_reason": study.direction_unusable,
        "baseline_score": {"harmful_val": sel.baseline_harmful, "harmless_val": sel.baseline_harmless},
        "steering": {
            "induce": {"baseline": _rate(base_harmless, alpha), "steered": _rate(induced.refused, alpha),
                       "mcnemar_p": induce_test.p_value, "n": int(base_harmless.size),
                       # answers with no letter or digit, beside the refusal rates (neither refusal nor compliance)
                       "degenerate": {"baseline": _rate(study.behaviour.refused_harmless.degenerate, alpha),
                                      "steered": _rate(induced.degenerate, alpha)}},
            "bypass": {"baseline": _rate(bypass.baseline.refused, alpha), "ablated": _rate(bypass.ablated.refused, alpha),
                       "mcnemar_p": bypass.mcnemar.p_value, "relative_drop": bypass.relative_drop.to_dict(),
                       "n": int(bypass.baseline.refused.size),
                       "degenerate": {"baseline": _rate(bypass.baseline.degenerate, alpha),
                                      "ablated": _rate(bypass.ablated.degenerate, alpha)}}},
        "examples_induced": [{"prompt": p, "completion": t[:200]} for p, t in
                             list(zip(harmless(study.data.test), induced.texts))[:5]]},
        arrays={"direction": unit.float(), "projection.harmful": proj_h.float(), "projection.harmless": proj_s.float(),
                **{k: v.float() for k, v in grids.items()}})


def _pca3(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:3].T


def test_activation_scatter(subject, study, recorder, refusal_config):
    """PCA and t-SNE (3-D) of last-position residuals, harmful vs harmless, at several depths."""
    from sklearn.manifold import TSNE

    pairs = [*study.data.val, *study.data.test]
    prompts = harmful(pairs) + harmless(pairs)
    acts = resid_at(subject, prompts, positions=(-1,), batch_size=refusal_config.batch_size)[:, 0].double()
    n_layers = subject.n_layers
    layers = sorted({max(1, n_layers // 6), n_layers // 3, n_layers // 2, 2 * n_layers // 3, 5 * n_layers // 6,
                     n_layers - 1})
    arrays = {}
    for layer in layers:
        pca = _pca3(acts[:, layer])
        # the top three principal axes are orthogonal: their coordinates are uncorrelated
        cov = (pca.T @ pca) / (pca.shape[0] - 1)
        off = cov - torch.diag(torch.diag(cov))
        assert off.abs().max() <= 1e-6 * cov.abs().max() + 1e-9
        arrays[f"pca.{layer}"] = pca.float()
        tsne = TSNE(n_components=3, perplexity=min(30.0, (len(prompts) - 1) / 3), init="pca",
                    random_state=refusal_config.seed, method="barnes_hut")
        arrays[f"tsne.{layer}"] = torch.from_numpy(tsne.fit_transform(acts[:, layer].numpy()).astype(np.float32))
    recorder.save("phase5/activation_scatter", numbers={
        "layers": layers, "labels": ["harmful"] * len(pairs) + ["harmless"] * len(pairs),
        "categories": [p.category for p in pairs] * 2, "prompts": prompts}, arrays=arrays)
