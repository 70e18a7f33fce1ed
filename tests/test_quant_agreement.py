"""NF4 and full-precision runs of the subject agree on which heads matter most.

Quantization is how the flagship Llama-3-8B is studied on a laptop, so conclusions must
survive it: the head ranking by attribution patching is computed at both precisions on
the same train pairs, and their overlap and rank correlation are compared. A check of the
instruments under quantization, not a result of the study: its numbers go to the test's own
report (``record_property``, e.g. ``--junitxml``) and its failure message, not to the run directory.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import pytest
import torch

from fixtures.models import load_model
from instruments import behavior
from instruments import patching as P
from instruments.components import label
from instruments.metrics import refusal_score, tokens_from_generations
from instruments.positions import post_instruction_length
from instruments.stats import spearman_ci

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_PAIRS, TOP_K = 8, 10


def test_nf4_and_full_precision_agree_on_top_heads(refusal_config, dataset, record_property):
    pairs = dataset.split("train")[:N_PAIRS]
    clean, corrupted = [p.harmful for p in pairs], [p.harmless for p in pairs]
    scores, tops, tokens = {}, {}, None
    for quant in ("none", "nf4"):
        handle, _ = load_model(replace(refusal_config, quant=quant, device="cpu", dtype="float32"))
        if tokens is None:
            # the model's own openings, found as the phases find them (at full precision) and
            # then held fixed: a fixed list would assume its refusals open with "I", which the
            # organism's helpful answers also open with
            gh = behavior.generate(handle, clean, max_new_tokens=6)
            gs = behavior.generate(handle, corrupted, max_new_tokens=6)
            tokens = tokens_from_generations(handle.tokenizer, gh, gs)
        metric = partial(refusal_score, tokens=tokens)
        atp = P.attribution_patch(handle, clean, corrupted, metric,
                                  P.PatchSpec(max_batch=refusal_config.max_batch,
                                              positions=post_instruction_length(handle)), neurons=False)
        scores[quant] = atp.heads.mean(-1).flatten()
        tops[quant] = set(P.top_heads(atp, TOP_K))
        del handle
    overlap = len(tops["none"] & tops["nf4"])
    rho = spearman_ci(scores["none"].numpy(), scores["nf4"].numpy(), n_boot=refusal_config.n_bootstrap,
                      seed=refusal_config.seed)
    top = {quant: sorted(label(h) for h in heads) for quant, heads in tops.items()}
    record_property("top_head_agreement", json.dumps({
        "top_k": TOP_K, "overlap": overlap, "token_source": tokens.source, "spearman_all_heads": rho.to_dict(),
        "top_full_precision": top["none"], "top_nf4": top["nf4"]}))
    assert torch.isfinite(scores["nf4"]).all()
    # NF4 keeps ~3 significant bits per weight; the ranking of causal heads must still agree.
    assert overlap >= TOP_K // 2, (f"only {overlap}/{TOP_K} top heads shared between NF4 and full precision "
                                   f"(full: {top['none']}; NF4: {top['nf4']})")
    assert rho.value > 0.5, f"head ranking correlation NF4 vs full precision is only {rho}"
