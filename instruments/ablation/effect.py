"""What an ablation does to refusal and to capability, on the same prompts.

Refusal: greedy generations (texts, refused flags) and refusal scores with and without
the ablation, row-aligned so a McNemar test can pair them (:class:`AblationEffect`).
Capability: KL(clean || ablated) of the next token after harmless prompts, and the
cross-entropy of the clean model's own answers to them under both models, from one
forward pass over prompt + answer (:func:`answer_scores`).

This module never modifies or exports model weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.ablation.hooks import AblationError, AblationSpec, Hook, ReferenceActivations, _check, ablation_hooks
from instruments.behavior import Generations, batches, generate, last_logits
from instruments.components import Component
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens, kl_divergence, refusal_score
from instruments.positions import prompt_end


# ----------------------------------------------------------------------------- capability side effects

@dataclass(frozen=True, kw_only=True)
class AnswerScores:
    """One forward pass over prompt + answer: the answer's cross-entropy and the next-token
    logits after the prompt (the logits a next-token KL compares), so a capability check
    needs no second pass over the prompts."""

    cross_entropy: Float[torch.Tensor, "prompt"]  # nats/token; NaN for an empty answer
    prompt_logits: Float[torch.Tensor, "prompt vocab"]


@torch.no_grad()
def answer_scores(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16,
                  fwd_hooks: Sequence[Hook] = ()) -> AnswerScores:
    """Cross-entropy of each answer after its chat-formatted prompt, and the logits after the prompt.

    Prompt and answer are tokenized separately and concatenated, so the answer tokens are
    the same ids under every intervention being compared.
    """
    if len(prompts) != len(answers):
        raise AblationError(f"{len(prompts)} prompts but {len(answers)} answers")
    tok = handle.tokenizer
    ces: list[torch.Tensor] = []
    nexts: list[torch.Tensor] = []
    label = f"answer cross-entropy: {progress.count(len(prompts), 'prompt')}" + (
        f", under {progress.count(len(fwd_hooks), 'hook')}" if fwd_hooks else "")
    for chunk in progress.track(list(batches(list(zip(prompts, answers)), batch_size)), label, unit="batch", quiet=True):
        rows = [(tok(handle.chat(p), add_special_tokens=False)["input_ids"],
                 tok(a, add_special_tokens=False)["input_ids"]) for p, a in chunk]
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (p, a) in enumerate(rows):
            seq = p + a
            ids[i, length - len(seq):] = torch.tensor(seq)
            mask[i, length - len(seq):] = 1
            if a:
                target[i, length - len(a):] = True
        ids, mask = ids.to(handle.device), mask.to(handle.device)
        ends = torch.tensor([length - len(a) for _, a in rows], device=ids.device)
        # only the positions read are unembedded: each prompt's last token and its answer's (the last
        # ``keep``, as left padding ends every answer at the end); logits[:, j] is position length - keep + j
        keep = max(len(a) for _, a in rows) + 1
        with handle.bridge.hooks(fwd_hooks=list(fwd_hooks)), prompt_end(ends):
            logits = handle.bridge(ids, attention_mask=mask, logits_to_keep=keep)
        # the prompt's last token sits just before its answer
        last = torch.tensor([keep - len(a) - 1 for _, a in rows], device=logits.device)
        nexts.append(logits[torch.arange(len(rows), device=logits.device), last].float().cpu())
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, length - keep + 1:, None]).squeeze(-1).cpu()
        t = target[:, length - keep + 1:]
        ces.append(torch.where(t.sum(1) > 0, (nll * t).sum(1) / t.sum(1).clamp_min(1), torch.nan))
    return AnswerScores(cross_entropy=torch.cat(ces), prompt_logits=torch.cat(nexts))


def answer_cross_entropy(handle: ModelHandle, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 16,
                         fwd_hooks: Sequence[Hook] = ()) -> Float[torch.Tensor, "prompt"]:
    """Mean cross-entropy (nats/token) of each answer after its chat-formatted prompt; NaN if empty.

    One number per prompt, each answer scored as given (not cut, no end-of-turn token), under
    ``fwd_hooks``. The organism's capability check pools tokens over prompts instead
    (``fixtures.organism.pooled_answer_cross_entropy``), so a long answer weighs more there.
    """
    return answer_scores(handle, prompts, answers, batch_size=batch_size, fwd_hooks=fwd_hooks).cross_entropy


# ----------------------------------------------------------------------------- the effect of an ablation

@dataclass(frozen=True, kw_only=True)
class AblationEffect:
    """Refusal and capability under an ablation vs the clean model, on the same prompts.

    ``baseline`` / ``ablated`` hold the greedy generations (texts, refused flags) row-aligned
    with ``prompts``, so a McNemar test can pair them (:attr:`discordant`). Refusal scores
    are metrics.refusal_score at the last prompt position. Capability: KL(clean || ablated)
    of next-token distributions after each harmless prompt, and the cross-entropy of the
    clean model's own greedy answers to them (``reference_answers``) under both models.
    """

    components: tuple[Component, ...]
    spec: AblationSpec
    prompts: tuple[str, ...]
    baseline: Generations
    ablated: Generations
    refusal_score_baseline: Float[torch.Tensor, "prompt"]
    refusal_score_ablated: Float[torch.Tensor, "prompt"]
    harmless_prompts: tuple[str, ...]
    reference_answers: tuple[str, ...]
    kl_harmless: Float[torch.Tensor, "harmless"]
    answer_ce_clean: Float[torch.Tensor, "harmless"]
    answer_ce_ablated: Float[torch.Tensor, "harmless"]

    @property
    def refusal_rate_baseline(self) -> float:
        return self.baseline.refusal_rate

    @property
    def refusal_rate_ablated(self) -> float:
        return self.ablated.refusal_rate

    @property
    def refused_baseline(self) -> tuple[bool, ...]:
        return self.baseline.refused

    @property
    def refused_ablated(self) -> tuple[bool, ...]:
        return self.ablated.refused

    @property
    def discordant(self) -> tuple[int, int]:
        """(refused only at baseline, refused only under ablation): McNemar's b and c."""
        pairs = list(zip(self.baseline.refused, self.ablated.refused))
        return sum(b and not a for b, a in pairs), sum(a and not b for b, a in pairs)

    @property
    def mean_refusal_score_baseline(self) -> float:
        return float(self.refusal_score_baseline.mean())

    @property
    def mean_refusal_score_ablated(self) -> float:
        return float(self.refusal_score_ablated.mean())

    @property
    def mean_kl(self) -> float:
        return float(self.kl_harmless.mean())

    @property
    def answer_ce_increase(self) -> float:
        """Mean over harmless prompts with a non-empty answer of CE(ablated) - CE(clean)."""
        return float((self.answer_ce_ablated - self.answer_ce_clean).nanmean())


def ablation_effect(handle: ModelHandle, prompts: Sequence[str], components: Sequence[Component], *,
                    spec: AblationSpec = AblationSpec(), harmless_prompts: Sequence[str],
                    reference_answers: Sequence[str] | None = None, tokens: RefusalTokens,
                    reference: Sequence[str] | ReferenceActivations | None = None) -> AblationEffect:
    """Refusal (generation + score) and capability (KL, answer CE) with ``components`` ablated.

    ``reference`` (mean/resample only) should be harmless TRAIN prompts, disjoint from both
    ``prompts`` and ``harmless_prompts``. Reference answers default to the clean model's
    greedy answers to ``harmless_prompts``.
    """
    comps = _check(handle, components)
    hooks = ablation_hooks(handle, comps, spec=spec, reference=reference)
    bs, n_new = spec.batch_size, spec.max_new_tokens
    # for the ETA a generation counts one step per token it may write, any other pass one step
    n_steps = (2 + (reference_answers is None)) * n_new + 6
    with progress.task(f"ablation of {len(comps)} components: {len(prompts)} prompts, {len(harmless_prompts)} harmless",
                       n_steps, unit="step", quiet=True) as steps:
        if reference_answers is None:
            reference_answers = generate(handle, harmless_prompts, max_new_tokens=n_new, batch_size=bs).texts
            steps.advance(n_new)
        baseline = generate(handle, prompts, max_new_tokens=n_new, batch_size=bs)
        steps.advance(n_new)
        under = generate(handle, prompts, max_new_tokens=n_new, batch_size=bs, fwd_hooks=hooks)
        steps.advance(n_new)
        score_clean = refusal_score(last_logits(handle, prompts, batch_size=bs), tokens)
        score_ablated = refusal_score(last_logits(handle, prompts, batch_size=bs, fwd_hooks=hooks), tokens)
        clean_harmless = last_logits(handle, harmless_prompts, batch_size=bs)
        ablated_harmless = last_logits(handle, harmless_prompts, batch_size=bs, fwd_hooks=hooks)
        steps.advance(4)
        ce_clean = answer_cross_entropy(handle, harmless_prompts, reference_answers, batch_size=bs)
        ce_ablated = answer_cross_entropy(handle, harmless_prompts, reference_answers, batch_size=bs, fwd_hooks=hooks)
        steps.advance(2)
    return AblationEffect(
        components=comps, spec=spec, prompts=tuple(prompts), baseline=baseline, ablated=under,
        refusal_score_baseline=score_clean, refusal_score_ablated=score_ablated,
        harmless_prompts=tuple(harmless_prompts), reference_answers=tuple(reference_answers),
        kl_harmless=kl_divergence(clean_harmless, ablated_harmless), answer_ce_clean=ce_clean,
        answer_ce_ablated=ce_ablated)
