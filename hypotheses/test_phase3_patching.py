"""Phase 3, causal localization: which layers, components and heads carry refusal.

Protocol. Clean = a harmful prompt, corrupted = its harmless analogue of the same form.
*Denoising* runs the harmless prompt and patches in the harmful run's activation (does
this component suffice to bring refusal back?); *noising* runs the harmful prompt and
patches in the harmless one (is it necessary?). The metric is the refusal score (log-odds
of the model's own refusal tokens at the last position); effects are normalized so that 0
is the unpatched run and 1 the source run. Components are chosen on TRAIN pairs.

Assertions check identities of the instruments; the findings are recorded, not asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hypotheses.evidence import harmful, harmless, head_patching, metric_for, patch_spec, positions_label
from instruments import patching
from instruments.components import Pattern, hook_name, label

pytestmark = [pytest.mark.phase3, pytest.mark.integration]

N_POSITIONS = 6


def test_layer_component_patching(subject, study, recorder, refusal_tokens):
    """3.1: residual stream x position, attention and MLP outputs x layer, both directions, with KL."""
    # Every (layer, position) is one patched forward per pair and direction: a third of the head
    # sweep's pairs keeps this sweep within minutes on a CPU (the head sweep carries the ranking).
    pairs, metric = study.train_pairs[: max(2, study.cfg.sweep_pairs // 3)], metric_for(refusal_tokens)
    arrays, numbers = {}, {"positions": list(range(-N_POSITIONS, 0)), "n_pairs": len(pairs),
                           "block_positions": positions_label(study.window),
                           "metric": "refusal score (log-odds of the refusal tokens)"}
    results = {}
    for direction in ("denoising", "noising"):
        spec = patch_spec(subject, study.cfg, direction=direction, kl=True)
        results[direction] = {
            "resid": patching.patch_resid(subject, harmful(pairs), harmless(pairs), metric, spec,
                                          n_positions=N_POSITIONS),
            "attn_out": patching.patch_attn_out(subject, harmful(pairs), harmless(pairs), metric, spec),
            "mlp_out": patching.patch_mlp_out(subject, harmful(pairs), harmless(pairs), metric, spec)}
        for kind, res in results[direction].items():
            assert torch.isfinite(res.metric).all(), f"{kind} {direction}: non-finite patched metric"
            assert (res.kl >= -1e-5).all(), f"{kind} {direction}: KL must be non-negative"
            arrays[f"{kind}.{direction}"] = res.normalized.float()
            arrays[f"{kind}.{direction}.kl"] = res.kl.mean(-1).float()
    den, noi = results["denoising"]["resid"], results["noising"]["resid"]
    # The two directions run the same two prompt sets: their unpatched baselines must swap exactly.
    torch.testing.assert_close(den.clean, noi.clean)
    torch.testing.assert_close(den.corrupted, noi.corrupted)
    # Identity: at layer 0 the residual stream is the token embedding, and the chat template's
    # closing tokens are the same in both prompts, so patching them there changes nothing.
    from instruments.direction import post_instruction_ids

    k = min(len(post_instruction_ids(subject)), N_POSITIONS)
    for direction, res in ((d, results[d]["resid"]) for d in ("denoising", "noising")):
        torch.testing.assert_close(res.metric[0, -k:], res.base.expand(k, -1), atol=1e-4, rtol=0,
                                   msg=lambda m: f"{direction}: layer-0 template positions must have no effect: {m}")
    ids, _ = subject.encode([pairs[0].harmful])
    numbers["position_labels"] = [subject.tokenizer.decode([t]) for t in ids[0, -N_POSITIONS:].tolist()]
    recorder.save("phase3/layer_patching", numbers=numbers, arrays=arrays, prompts=harmful(pairs))


def test_head_ranking(subject, study, recorder, refusal_tokens, refusal_config):
    """3.2: every head ranked by exact patching (denoising and noising), cross-checked by AtP."""
    exact, ranking = study.exact_heads, study.ranking
    assert exact.metric.shape[:2] == (subject.n_layers, subject.n_heads)
    assert np.all(np.diff(ranking.effect) <= 1e-12), "ranking must be sorted by effect"
    finite = np.isfinite(ranking.ci_low) & np.isfinite(ranking.ci_high)
    assert np.all(ranking.ci_low[finite] <= ranking.effect[finite] + 1e-9)
    assert np.all(ranking.effect[finite] <= ranking.ci_high[finite] + 1e-9)
    agreement = patching.rank_agreement(study.atp.heads, exact.normalized, n_boot=refusal_config.n_bootstrap,
                                        seed=refusal_config.seed, alpha=refusal_config.alpha)
    # Necessity, on fewer pairs (a third of the train pairs of the sufficiency sweep).
    noising = head_patching(subject, study.train_pairs[: max(2, study.cfg.sweep_pairs // 3)], refusal_tokens,
                            study.cfg, direction="noising")
    bar = refusal_config.head_effect
    recorder.save("phase3/heads", numbers={
        "ranking": ranking.rows(30), "atp_vs_exact_spearman": agreement.to_dict(), "n_heads": exact.metric.shape[0]
        * exact.metric.shape[1], "n_pairs": ranking.n_pairs, "n_pairs_atp": study.atp.n_pairs,
        "n_pairs_sweep": exact.n_pairs, "n_candidates": len(study.candidates),
        "ranking_method": "AtP over every head on n_pairs_atp train pairs; the top n_candidates verified by exact "
                          "patching on the same pairs (Kramar et al. 2024); the full exact sweep (n_pairs_sweep) "
                          "is descriptive",
        "n_pairs_noising": noising.n_pairs, "positions": positions_label(ranking.positions),
        "heads_over_bar": int((ranking.effect > bar).sum()), "bar": bar,
        "verified_on_test": {"heads": [label(h) for h in study.verified.components],
                             "effect": [float(x) for x in study.verified.effect],
                             "se": [float(x) for x in study.verified.se],
                             "p_above": [float(x) for x in study.verified.p_above],
                             "n_pairs": study.verified.n_pairs}},
        arrays={"exact.denoising": exact.normalized.float(), "exact.noising": noising.normalized.float(),
                "atp.denoising": study.atp.heads.float(), "exact.denoising.per_prompt": exact.normalized_per_prompt.float()},
        prompts=harmful(study.train_pairs))


@torch.no_grad()
def test_top_head_attention_patterns(subject, study, recorder, dataset):
    """3.2: what the top heads attend to, on one harmful test prompt and its harmless analogue."""
    heads = study.ranking.top(5)
    pair = dataset.split("test")[0]
    numbers = {"heads": [label(h) for h in heads], "prompts": {"harmful": pair.harmful, "harmless": pair.harmless},
               "tokens": {}}
    arrays = {}
    for side in ("harmful", "harmless"):
        ids, mask = subject.encode([getattr(pair, side)])
        names = {hook_name(Pattern(layer=h.layer)) for h in heads}
        _, cache = subject.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
        numbers["tokens"][side] = [subject.tokenizer.decode([t]) for t in ids[0].tolist()]
        for h in heads:
            pattern = cache[hook_name(Pattern(layer=h.layer))][0, h.head].float().cpu()
            # each query's attention is a distribution over keys
            torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[0]), atol=1e-4, rtol=0)
            arrays[f"{side}.{label(h)}"] = pattern
    recorder.save("phase3/attention_patterns", numbers=numbers, arrays=arrays)
