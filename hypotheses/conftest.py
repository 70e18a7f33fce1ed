"""Session fixtures shared by the research phases: the subject's own behaviour on the dataset.

Generations are the expensive part of Phase 2 and several phases need them, so each set
is computed once per session and recorded; with --resume a recorded set is reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fixtures.storage import CODE_VERSION, stable_hash
from instruments import behavior, metrics


@dataclass(frozen=True, kw_only=True)
class SplitGenerations:
    """Greedy completions of one split's harmful and harmless prompts."""

    harmful: behavior.Generations
    harmless: behavior.Generations


def _generations(subject, recorder, dataset, split: str, max_new_tokens: int, batch_size: int) -> SplitGenerations:
    pairs = dataset.split(split)
    out = {}
    for side in ("harmful", "harmless"):
        prompts = [getattr(p, side) for p in pairs]
        key = stable_hash("generations", subject.weights_sha256, subject.quant, dataset.sha256, prompts,
                          max_new_tokens, CODE_VERSION)

        def compute(prompts=prompts):
            gen = behavior.generate(subject, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
            return {"numbers": {"texts": list(gen.texts), "first_tokens": list(gen.first_tokens),
                                "refused": list(gen.refused)}, "prompts": prompts}

        rec = recorder.memo(f"generations/{split}-{side}", key, compute)
        out[side] = behavior.Generations(prompts=tuple(rec.prompts), texts=tuple(rec.numbers["texts"]),
                                         first_tokens=tuple(rec.numbers["first_tokens"]),
                                         refused=tuple(rec.numbers["refused"]))
    return SplitGenerations(**out)


@pytest.fixture(scope="session")
def train_generations(subject, recorder, dataset, refusal_config) -> SplitGenerations:
    """Short completions of the train split: enough to see how the model opens an answer."""
    return _generations(subject, recorder, dataset, "train", max_new_tokens=12,
                        batch_size=refusal_config.batch_size)


@pytest.fixture(scope="session")
def test_generations(subject, recorder, dataset, refusal_config) -> SplitGenerations:
    """Completions of the held-out test split, long enough for the refusal classifier."""
    return _generations(subject, recorder, dataset, "test", max_new_tokens=refusal_config.max_new_tokens,
                        batch_size=refusal_config.batch_size)


@pytest.fixture(scope="session")
def refusal_tokens(subject, train_generations) -> metrics.RefusalTokens:
    """The model's own refusal and compliance opening tokens, found on the train split."""
    gen = train_generations
    return metrics.discover_tokens(
        subject.tokenizer,
        refused_first=[t for t, r in zip(gen.harmful.first_tokens, gen.harmful.refused) if r],
        complied_first=[t for t, r in zip(gen.harmless.first_tokens, gen.harmless.refused) if not r])
