"""H2, hierarchical stages: detection early, accumulation in the middle, execution late.

Prediction (seed): harmfulness is *detected* by keyword-focused attention in the early
layers, the refusal signal *accumulates* along the refusal direction in the middle
layers, and refusal is *executed* by components in the late layers.

Evidence needed (layers split into thirds; every line scored on TEST pairs):
- attention: the last position's attention to the harmful prompt's keywords (tokens its
  harmless analogue lacks), over their share of the prompt, minus the harmless
  analogue's attention to its own matched tokens (the control), is larger in the first
  third than later (CI above 0), and peaks there (peak layer chosen on VAL pairs);
- direction: the paired harmful-minus-harmless projection onto the refusal direction,
  normalized by the residual norm, rises faster in the middle third than in the early
  and late thirds (CI above 0), more than along random directions;
- patching: the attention and MLP outputs' direct effects on the refusal score (each
  block's path to the logits alone, Wang et al. 2022) sit late (effect-weighted relative
  depth, CI above 2/3).

Falsified by: keyword contrast larger later than early, a middle third that rises more
slowly than another third, or effects concentrated before the last third.
"""

from __future__ import annotations

import pytest

from hypotheses import claims

pytestmark = [pytest.mark.h2, pytest.mark.integration]


def test_h2_keyword_attention_profile(study, recorder):
    profile, det = study.keyword_profile, study.detection
    assert profile.n >= 2, "too few pairs differ in any token to locate keywords"
    assert (profile.mean > 0).all(), "attention mass on keywords is a share of a distribution: it is positive"
    assert det.peak_layer in range(study.handle.n_layers)
    import torch

    numbers = {"n": det.contrast.n, "n_pairs": profile.n, "n_val": det.contrast_val.n,
               "peak_layer_val": det.peak_layer, "early_layers": list(det.early),
               "at_peak": det.at_peak.to_dict(), "early_minus_later": det.early_minus_later.to_dict(),
               "positions": "last position, onto the user message's keywords (control: the harmless "
                            "analogue's matched tokens)"}
    arrays = {}
    for key, prof in (("", profile), ("control_", det.control), ("contrast_", det.contrast)):
        arrays |= {f"{key}mean": torch.as_tensor(prof.mean).float(), f"{key}ci_low": torch.as_tensor(prof.ci_low).float(),
                   f"{key}ci_high": torch.as_tensor(prof.ci_high).float()}
    recorder.save("h2/keyword_attention", numbers=numbers, arrays=arrays)


def test_h2_accumulation(study, recorder):
    if study.direction_unusable:
        pytest.skip(f"no usable refusal direction: {study.direction_unusable}")
    acc = study.accumulation
    assert len(acc.random) > 0 and 0 < acc.p_random <= 1
    import torch

    sel = study.direction[1]
    recorder.save("h2/accumulation", numbers={
        "layers": dict(zip(("early", "middle", "late"), (list(t) for t in acc.thirds))),
        "slopes": {k: v.to_dict() for k, v in acc.slopes.items()}, "statistic": acc.statistic.to_dict(),
        "random": list(acc.random), "p_random": acc.p_random, "n_pairs": acc.statistic.n, "position": sel.pos,
        "layer": sel.layer, "tau_middle": acc.tau.to_dict(),
        "normalization": "projection / residual norm (cosine), harmful - harmless, paired"},
        arrays={"mean": torch.as_tensor(acc.difference.mean).float(),
                "ci_low": torch.as_tensor(acc.difference.ci_low).float(),
                "ci_high": torch.as_tensor(acc.difference.ci_high).float()})


def test_h2_direct_effects(study, recorder):
    """Execution: each block's direct effect, with its identity (the base run plus nothing is the base)."""
    import torch

    attn, mlp = study.block_direct
    for res in (attn, mlp):
        assert torch.isfinite(res.metric).all(), f"{res.kind}: non-finite direct effect"
        assert res.layers == tuple(range(study.handle.n_layers))
    depth = study.depth
    recorder.save("h2/direct_effects", numbers={
        "depth": depth.to_dict(), "n_pairs": attn.n_pairs, "direction": attn.direction,
        "positions": "last position (the logits' direct path)", "metric": "refusal score (log-odds)"},
        arrays={"attn_out": attn.normalized.float(), "mlp_out": mlp.normalized.float()})


@pytest.mark.parametrize("evidence", claims.claim("H2").evidence())
def test_h2_line_of_evidence(study, record_verdict, evidence):
    verdict = next(v for v in study.verdicts if v.claim == "H2" and v.evidence == evidence)
    record_verdict(verdict)


def test_h2_overall(study, record_verdict):
    record_verdict([v for v in study.verdicts if v.claim == "H2"][-1])
