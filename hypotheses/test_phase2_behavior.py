"""Phase 2, baseline behaviour: how often the subject refuses, how sure its first token is,
at which layer the refusal becomes readable (logit lens), and whether attention differs
between harmful and harmless prompts.

The assertions check the instruments (identities that must hold on any model); the
behaviour itself is recorded with its uncertainty, never asserted, because a model that
does not refuse is a finding, not a bug.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instruments import behavior, metrics, stats

pytestmark = [pytest.mark.phase2, pytest.mark.integration]


def test_refusal_and_compliance_rates(test_generations, recorder, refusal_config, dataset):
    out = {}
    for side in ("harmful", "harmless"):
        gen = getattr(test_generations, side)
        # the recorded flags are the classifier's verdicts on the recorded texts
        assert list(gen.refused) == [behavior.is_refusal(t) for t in gen.texts]
        assert len(gen.texts) == len(dataset.split("test"))
        n, k, d = len(gen.refused), int(sum(gen.refused)), int(sum(gen.degenerate))
        # refusal, compliance and degenerate (no letter or digit) partition the answers
        rates = {name: stats.proportion_ci(count, n, alpha=refusal_config.alpha).to_dict()
                 for name, count in (("refusal_rate", k), ("compliance_rate", n - k - d), ("degenerate_rate", d))}
        out[side] = {**rates, "n": n}
    # A generation that produced nothing for every prompt would mean the generator is broken.
    assert sum(bool(t.strip()) for t in test_generations.harmless.texts) >= 0.5 * len(test_generations.harmless.texts)
    show = refusal_config.show_completions
    examples = [{"prompt": p, "completion": t if show else t[:80], "refused": r, "degenerate": d}
                for p, t, r, d in list(zip(test_generations.harmful.prompts, test_generations.harmful.texts,
                                           test_generations.harmful.refused, test_generations.harmful.degenerate))[:10]]
    recorder.save("phase2/refusal_rates", numbers={**out, "examples_harmful": examples,
                                                   "completions_truncated": not show})
    # the manifest's one-line summary of behaviour: a degenerate answer is never counted as a refusal
    recorder.note(behaviour={side: {k: out[side][k]["value"] for k in
                                    ("refusal_rate", "compliance_rate", "degenerate_rate")} | {"n": out[side]["n"]}
                             for side in out})


def test_first_token_probabilities(subject, dataset, refusal_tokens, recorder, refusal_config):
    pairs = dataset.split("test")
    harmful = behavior.first_token_probs(subject, [p.harmful for p in pairs], refusal_tokens,
                                         batch_size=refusal_config.batch_size)
    harmless = behavior.first_token_probs(subject, [p.harmless for p in pairs], refusal_tokens,
                                          batch_size=refusal_config.batch_size)
    for probs in (harmful, harmless):
        total = probs.refusal + probs.compliance
        assert torch.all((probs.refusal >= 0) & (total <= 1 + 1e-5)), "token-set probabilities must be a sub-distribution"
    auc = stats.roc_auc(harmful.refusal.numpy(), harmless.refusal.numpy(), n_boot=refusal_config.n_bootstrap,
                        seed=refusal_config.seed, alpha=refusal_config.alpha)
    recorder.save("phase2/first_token", numbers={
        "refusal_tokens": [subject.tokenizer.decode([t]) for t in refusal_tokens.refusal_ids],
        "compliance_tokens": [subject.tokenizer.decode([t]) for t in refusal_tokens.compliance_ids],
        "token_source": refusal_tokens.source, "auc_harmful_vs_harmless": auc.to_dict(),
        "mean_p_refusal": {"harmful": float(harmful.refusal.mean()), "harmless": float(harmless.refusal.mean())},
        "mean_p_compliance": {"harmful": float(harmful.compliance.mean()), "harmless": float(harmless.compliance.mean())},
    }, arrays={"p_refusal_harmful": harmful.refusal, "p_refusal_harmless": harmless.refusal,
               "p_compliance_harmful": harmful.compliance, "p_compliance_harmless": harmless.compliance},
        prompts=[p.harmful for p in pairs])


def test_logit_lens(subject, dataset, refusal_tokens, recorder, refusal_config):
    pairs = dataset.split("test")
    lens = {side: behavior.logit_lens(subject, [getattr(p, side) for p in pairs], refusal_tokens,
                                      batch_size=refusal_config.batch_size) for side in ("harmful", "harmless")}
    # Identity: the last layer read through the final norm and unembedding is the model's output.
    final = behavior.first_token_probs(subject, [p.harmful for p in pairs], refusal_tokens).refusal
    assert torch.allclose(lens["harmful"][-1], final, atol=1e-4), "logit lens at the last layer must equal the output"
    diff = (lens["harmful"] - lens["harmless"]).mean(dim=1)
    recorder.save("phase2/logit_lens", numbers={
        "first_layer_separating": int(torch.nonzero(diff > 0.5 * diff.max()).min()) if diff.max() > 0 else None},
        arrays={"harmful": lens["harmful"], "harmless": lens["harmless"]})


def test_attention_entropy(subject, dataset, recorder, refusal_config):
    pairs = dataset.split("test")
    harmful = behavior.attention_entropy(subject, [p.harmful for p in pairs], batch_size=refusal_config.batch_size)
    harmless = behavior.attention_entropy(subject, [p.harmless for p in pairs], batch_size=refusal_config.batch_size)
    ids, mask = subject.encode([p.harmful for p in pairs])
    max_entropy = torch.log(mask.sum(1).float())[:, None, None]
    assert torch.all(harmful >= -1e-5) and torch.all(harmful <= max_entropy + 1e-4), "entropy outside [0, log n]"
    # Paired test per layer (mean over heads), harmful vs its own harmless analogue, BH-corrected.
    h_layer, b_layer = harmful.mean(-1).numpy(), harmless.mean(-1).numpy()
    pvals = [stats.paired_permutation_test(h_layer[:, layer], b_layer[:, layer], n_perm=refusal_config.n_bootstrap,
                                           seed=refusal_config.seed).p_value for layer in range(subject.n_layers)]
    adjusted = stats.benjamini_hochberg(pvals, alpha=refusal_config.alpha)
    recorder.save("phase2/attention_entropy", numbers={
        "p_values": [float(p) for p in pvals], "p_adjusted_bh": [float(p) for p in adjusted.p_adjusted],
        "layers_differing": [int(i) for i in np.flatnonzero(adjusted.reject)],
        "mean_difference_by_layer": [float(x) for x in (h_layer - b_layer).mean(0)]},
        arrays={"harmful": harmful, "harmless": harmless})


def test_batched_equals_unbatched(subject, dataset):
    prompts = [p.harmful for p in dataset.split("test")[:3]] + [p.harmless for p in dataset.split("test")[:3]]
    batched = behavior.last_logits(subject, prompts, batch_size=len(prompts))
    single = behavior.last_logits(subject, prompts, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
