"""Phase 2, baseline behaviour: how often the subject refuses, how sure its first token is,
at which layer the refusal becomes readable (logit lens), and whether attention differs
between harmful and harmless prompts.

The study's stages measure (``hypotheses.baseline``, on the test split); the assertions
check the instruments (identities that must hold on any model); the behaviour itself is
recorded with its uncertainty, never asserted, because a model that does not refuse is a
finding, not a bug.
"""

from __future__ import annotations

import pytest
import torch

from hypotheses import records
from instruments import behavior

pytestmark = [pytest.mark.phase2, pytest.mark.integration]


def test_refusal_and_compliance_rates(study, recorder):
    rates = study.refusal_rates
    for side in ("harmful", "harmless"):
        gen = getattr(rates.generations, side)
        # the recorded flags are the classifier's verdicts on the recorded texts
        assert list(gen.refused) == [behavior.is_refusal(t) for t in gen.texts]
        assert len(gen.texts) == len(study.data.test)
    # A generation that produced nothing for every prompt would mean the generator is broken.
    harmless = rates.generations.harmless.texts
    assert sum(bool(t.strip()) for t in harmless) >= 0.5 * len(harmless)
    records.save(recorder, rates.record())
    # the manifest's one-line summary of behaviour: a degenerate answer is never counted as a refusal
    recorder.note(behaviour=rates.manifest_note())


def test_first_token_probabilities(study, recorder):
    first = study.first_token
    for probs in (first.harmful, first.harmless):
        total = probs.refusal + probs.compliance
        assert torch.all((probs.refusal >= 0) & (total <= 1 + 1e-5)), \
            "token-set probabilities must be a sub-distribution"
    records.save(recorder, first.record())


def test_logit_lens(study, recorder):
    lens = study.logit_lens
    # Identity: the last layer read through the final norm and unembedding is the model's output.
    final = study.first_token.harmful.refusal
    assert torch.allclose(lens.harmful[-1], final, atol=1e-4), "logit lens at the last layer must equal the output"
    records.save(recorder, lens.record())


def test_attention_entropy(subject, study, recorder):
    entropy = study.attention_entropy
    _, mask = subject.encode(list(entropy.prompts))
    max_entropy = torch.log(mask.sum(1).float())[:, None, None]
    harmful = entropy.harmful
    assert torch.all(harmful >= -1e-5) and torch.all(harmful <= max_entropy + 1e-4), "entropy outside [0, log n]"
    records.save(recorder, entropy.record())


def test_batched_equals_unbatched(subject, dataset):
    prompts = [p.harmful for p in dataset.split("test")[:3]] + [p.harmless for p in dataset.split("test")[:3]]
    batched = behavior.last_logits(subject, prompts, batch_size=len(prompts))
    single = behavior.last_logits(subject, prompts, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
