"""Direct effects (instruments/direct.py): identities and a known answer."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fixtures.family import design
from fixtures.family_build import build_member
from instruments.direct import direct_effects
from instruments.metrics import refusal_score
from instruments.patching import PatchSpec

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def sparse():
    return build_member("sparse", 0)


def _run(member, clean, corrupted, direction="denoising"):
    return direct_effects(member.handle, clean, corrupted, partial(refusal_score, tokens=member.tokens),
                          PatchSpec(kl=False, direction=direction))


def test_identical_prompts_have_no_direct_effect(sparse):
    prompts = [p.harmful for p in sparse.dataset.split("test")]
    for res in _run(sparse, prompts, prompts):
        assert res.metric.shape == (sparse.handle.n_layers, len(prompts)) and res.positions == 1
        torch.testing.assert_close(res.metric, res.base.expand_as(res.metric), atol=1e-4, rtol=0)


def test_direct_effects_sit_where_refusal_is_written(sparse):
    """The planted neurons (layers 5 and 6) write the refusal feature; the detector heads write a
    feature nothing but those neurons read, so their direct effect is ~0."""
    pairs = sparse.dataset.split("test")
    attn, mlp = _run(sparse, [p.harmful for p in pairs], [p.harmless for p in pairs])
    writers = {n.layer for n in design("sparse").neurons}
    assert attn.kind == "attn_out_direct" and mlp.kind == "mlp_out_direct"
    assert float(attn.normalized.abs().max()) < 0.05
    assert all(float(mlp.normalized[layer]) > 0.3 for layer in writers)
    assert all(abs(float(mlp.normalized[layer])) < 0.05 for layer in range(sparse.handle.n_layers)
               if layer not in writers)


def test_noising_swaps_base_and_source(sparse):
    pairs = sparse.dataset.split("test")[:4]
    harmful, harmless = [p.harmful for p in pairs], [p.harmless for p in pairs]
    den, noi = _run(sparse, harmful, harmless)[1], _run(sparse, harmful, harmless, "noising")[1]
    torch.testing.assert_close(den.base, noi.source)
    torch.testing.assert_close(den.source, noi.base)
