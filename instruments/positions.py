"""Where each token of a chat-formatted prompt comes from: system/template, the user's message, padding.

Measurements that compare positions across prompts need to know which positions
correspond. Two kinds do, whatever the prompts' lengths:

* the *post-instruction* positions: the chat template's tokens after the user message
  (for ChatML ``<|im_end|>``, ``\\n``, ``<|im_start|>``, ``assistant``, ``\\n``), the same
  tokens at the same distance from the end in every left-padded prompt. Arditi et al.
  (2024) search the refusal direction there, and a patch there splices like into like;
* every position, but only between two prompts of the same token length (the pair's
  template prefix then lines up as well, token for token).

The user-message span is located through the chat template (the text before and after a
sentinel message), never through the pad id: a tokenizer's pad can be a real template
token (SmolLM2's is ``<|im_end|>``). Padding comes from the attention mask alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Bool, Int

from instruments.handle import ModelHandle

_SENTINEL = "\u2063REFUSAL-CIRCUITS-USER-MESSAGE\u2063"


class TemplateError(ValueError):
    """The chat template does not place the user's message verbatim in the formatted text."""


@dataclass(frozen=True, kw_only=True)
class Spans:
    """A batch of chat-formatted prompts, left-padded, with each token's origin.

    ``user[b, t]``: token t of prompt b is (part of) the user's message. ``post``: how many
    tokens at the end of every prompt come after the message (template only; the minimum
    over the batch, so the last ``post`` positions are template tokens in every prompt).
    """

    ids: Int[torch.Tensor, "batch pos"]
    mask: Int[torch.Tensor, "batch pos"]
    user: Bool[torch.Tensor, "batch pos"]
    post: int

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.mask.sum(1)]


def template_parts(handle: ModelHandle) -> tuple[str, str]:
    """(text before, text after) the user's message in the handle's chat format."""
    text = handle.chat(_SENTINEL)
    if text.count(_SENTINEL) != 1:
        raise TemplateError("the chat template does not copy the user's message into the prompt exactly once; "
                            "positions of the message cannot be located")
    before, after = text.split(_SENTINEL)
    return before, after


def spans(handle: ModelHandle, prompts: Sequence[str]) -> Spans:
    """Encode ``prompts`` as :meth:`ModelHandle.encode` does, and mark each token's origin."""
    if isinstance(prompts, str):
        raise TypeError("spans takes a sequence of prompts, not one string")
    ids, mask = handle.encode(list(prompts))
    before, after = template_parts(handle)
    texts = [before + p + after for p in prompts]
    if texts != [handle.chat(p) for p in prompts]:
        raise TemplateError("the chat template changes the user's message (e.g. strips it); "
                            "positions of the message cannot be located")
    enc = handle.tokenizer(texts, return_offsets_mapping=True, padding=True, add_special_tokens=False,
                           return_tensors="pt")
    if not torch.equal(enc["input_ids"].to(ids.device), ids):
        raise TemplateError("offsets tokenization disagrees with handle.encode; cannot locate the message")
    offsets = enc["offset_mapping"]  # [batch, pos, 2] character spans in each text
    start = torch.tensor([len(before)] * len(prompts))[:, None]
    end = start + torch.tensor([len(p) for p in prompts])[:, None]
    real = enc["attention_mask"].bool()
    s, e = offsets[..., 0], offsets[..., 1]
    user = real & (s < end) & (e > start) & (e > s)
    after_msg = real & (s >= end)
    # the post-instruction run: template tokens after the message, counted back from the last token
    post = min(_trailing(after_msg[b]) for b in range(len(prompts)))
    return Spans(ids=ids, mask=mask, user=user.to(ids.device), post=post)


def _trailing(flags: torch.Tensor) -> int:
    n = 0
    for value in reversed(flags.tolist()):
        if not value:
            break
        n += 1
    return n


def post_instruction_length(handle: ModelHandle) -> int:
    """Template tokens after the user's message: the positions that correspond in every prompt."""
    return spans(handle, ["Hello there.", "What is the capital of France?"]).post


def token_lengths(handle: ModelHandle, prompts: Sequence[str]) -> list[int]:
    """Each prompt's token count after chat formatting (padding excluded)."""
    _, mask = handle.encode(list(prompts))
    return [int(n) for n in mask.sum(1)]


def same_length(handle: ModelHandle, first: Sequence[str], second: Sequence[str]) -> Bool[torch.Tensor, "pair"]:
    """Which pairs (first[i], second[i]) have the same token length: all their positions correspond."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} and {len(second)} prompts: pairs need equal numbers")
    a, b = token_lengths(handle, first), token_lengths(handle, second)
    return torch.tensor([x == y for x, y in zip(a, b)], dtype=torch.bool)


# ----------------------------------------------------------------------------- where the prompt ends

_PROMPT_END: ContextVar[int | torch.Tensor | None] = ContextVar("prompt_end", default=None)


@contextmanager
def prompt_end(end: int | torch.Tensor) -> Iterator[None]:
    """Declare where the prompt ends on the position axis of the forward passes run inside.

    A position-aware intervention (e.g. mean ablation of the post-instruction positions)
    edits the ``N`` positions before this index. An int applies to every row, a tensor
    gives one index per row; 0 says the forward holds no prompt position (a KV-cached
    generation step). Outside any such block the whole sequence is the prompt.
    """
    token = _PROMPT_END.set(end)
    try:
        yield
    finally:
        _PROMPT_END.reset(token)


def current_prompt_end(length: int) -> int | torch.Tensor:
    """The declared end of the prompt, or ``length`` (the forward is over bare prompts)."""
    end = _PROMPT_END.get()
    return length if end is None else end
