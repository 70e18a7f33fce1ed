"""Scalar metrics of refusal read off the logits at the last prompt position.

The refusal score is the log-odds of the summed probability of the model's refusal
tokens (the first tokens it actually uses when it refuses, found from its own
generations rather than assumed), so it is comparable across models and never saturates
the way a raw probability does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float

# Used only when a model never refuses (e.g. the random ``tiny``) or never complies, so
# that metrics stay defined; the seed strings are tokenized by the model's own tokenizer.
FALLBACK_REFUSAL_STARTS = ("I'm sorry", "I cannot", "I can't", "Sorry", "As an AI", "I apologize", "I won't")
FALLBACK_COMPLIANCE_STARTS = ("Sure", "Here", "Certainly", "To", "1.", "The", "Of course", "Yes")


@dataclass(frozen=True, kw_only=True)
class RefusalTokens:
    """First-token sets that open a refusal and a compliance, and where they came from."""

    refusal_ids: tuple[int, ...]
    compliance_ids: tuple[int, ...]
    source: str  # "discovered" or "fallback"

    def __post_init__(self) -> None:
        if not self.refusal_ids or not self.compliance_ids:
            raise ValueError("RefusalTokens needs at least one refusal and one compliance token")
        if set(self.refusal_ids) & set(self.compliance_ids):
            raise ValueError("a token cannot open both a refusal and a compliance")


def _first_token(tokenizer, text: str) -> int:
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])


def fallback_tokens(tokenizer) -> RefusalTokens:
    refusal = tuple(dict.fromkeys(_first_token(tokenizer, s) for s in FALLBACK_REFUSAL_STARTS))
    compliance = tuple(t for t in dict.fromkeys(_first_token(tokenizer, s) for s in FALLBACK_COMPLIANCE_STARTS)
                       if t not in refusal)
    return RefusalTokens(refusal_ids=refusal, compliance_ids=compliance, source="fallback")


def tokens_from_generations(tokenizer, harmful, harmless) -> RefusalTokens:
    """:func:`discover_tokens` from greedy completions (``behavior.Generations``): the first
    tokens of the harmful prompts' refusals and of the harmless prompts' compliances (a
    degenerate answer, e.g. end-of-turn at once, opens neither)."""
    complied = [not r and not d for r, d in zip(harmless.refused, harmless.degenerate)]
    return discover_tokens(tokenizer,
                           refused_first=[t for t, r in zip(harmful.first_tokens, harmful.refused) if r],
                           complied_first=[t for t, c in zip(harmless.first_tokens, complied) if c])


def discover_tokens(tokenizer, *, refused_first: Sequence[int], complied_first: Sequence[int],
                    min_share: float = 0.02, max_tokens: int = 8) -> RefusalTokens:
    """Refusal tokens: first tokens of the model's refusals; compliance tokens: of its compliances.

    ``refused_first`` holds the first generated token of each completion the classifier
    judged a refusal (on harmful train prompts); ``complied_first`` those of completions it
    judged compliant (on harmless train prompts). Tokens used by fewer than ``min_share``
    of the completions are dropped as noise; a token that opens both is dropped from the
    compliance side (the model's refusal evidence wins).
    """
    def common(ids: Sequence[int]) -> list[int]:
        counts = Counter(int(i) for i in ids)
        total = max(1, sum(counts.values()))
        return [tok for tok, n in counts.most_common(max_tokens) if n / total >= min_share]

    refusal = common(refused_first)
    compliance = [t for t in common(complied_first) if t not in refusal]
    fallback = fallback_tokens(tokenizer)
    if not refusal or not compliance:
        refusal = refusal or list(fallback.refusal_ids)
        compliance = compliance or [t for t in fallback.compliance_ids if t not in refusal]
        return RefusalTokens(refusal_ids=tuple(refusal), compliance_ids=tuple(compliance), source="fallback")
    return RefusalTokens(refusal_ids=tuple(refusal), compliance_ids=tuple(compliance), source="discovered")


def refusal_logprob(logits: Float[torch.Tensor, "*batch vocab"], tokens: RefusalTokens) -> Float[torch.Tensor, "*batch"]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(logp[..., list(tokens.refusal_ids)], dim=-1)


def refusal_prob(logits: Float[torch.Tensor, "*batch vocab"], tokens: RefusalTokens) -> Float[torch.Tensor, "*batch"]:
    return refusal_logprob(logits, tokens).exp()


def compliance_prob(logits: Float[torch.Tensor, "*batch vocab"], tokens: RefusalTokens) -> Float[torch.Tensor, "*batch"]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.logsumexp(logp[..., list(tokens.compliance_ids)], dim=-1).exp()


def refusal_score(logits: Float[torch.Tensor, "*batch vocab"], tokens: RefusalTokens) -> Float[torch.Tensor, "*batch"]:
    """log p / (1 - p) with p the summed probability of the refusal tokens.

    Computed as logsumexp(refusal logits) - logsumexp(every other logit), which is exact and
    finite however sure the model is (log(1 - p) from p is -inf once p rounds to 1).
    """
    logits = logits.float()
    refusal = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    refusal[list(tokens.refusal_ids)] = True
    return (torch.logsumexp(logits[..., refusal], dim=-1)
            - torch.logsumexp(logits.masked_fill(refusal, float("-inf")), dim=-1))


def logit_diff(logits: Float[torch.Tensor, "*batch vocab"], tokens: RefusalTokens) -> Float[torch.Tensor, "*batch"]:
    """logsumexp of refusal-token logits minus logsumexp of compliance-token logits."""
    logits = logits.float()
    return (torch.logsumexp(logits[..., list(tokens.refusal_ids)], dim=-1)
            - torch.logsumexp(logits[..., list(tokens.compliance_ids)], dim=-1))


def kl_divergence(clean_logits: Float[torch.Tensor, "*batch vocab"],
                  other_logits: Float[torch.Tensor, "*batch vocab"]) -> Float[torch.Tensor, "*batch"]:
    """KL(clean || other) of the next-token distributions."""
    clean = torch.log_softmax(clean_logits.float(), dim=-1)
    other = torch.log_softmax(other_logits.float(), dim=-1)
    return (clean.exp() * (clean - other)).sum(-1)


def normalized_effect(patched: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor,
                      *, eps: float = 1e-8) -> torch.Tensor:
    """0 when the patched metric equals the clean run's, 1 when it equals the corrupted run's."""
    denom = corrupted - clean
    safe = torch.where(denom.abs() < eps, torch.full_like(denom, eps), denom)
    return (patched - clean) / safe
