"""The prompts and positions every measurement runs on: the two sides of the pairs, the refusal
metric, and where the study patches and mean-ablates (the post-instruction window, or every
position on the pairs whose positions correspond there).
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from instruments.metrics import RefusalTokens, refusal_score
from instruments.patching import PatchSpec


def metric_for(tokens: RefusalTokens):
    """The refusal score (log-odds of the refusal tokens at the last position) as a patching metric."""
    return partial(refusal_score, tokens=tokens)


def harmful(pairs: Sequence[Pair]) -> list[str]:
    return [p.harmful for p in pairs]


def harmless(pairs: Sequence[Pair]) -> list[str]:
    return [p.harmless for p in pairs]


def window(handle, cfg: RefusalConfig) -> int | None:
    """Where the study patches and mean-ablates: the last N (post-instruction) positions, or None (all).

    The post-instruction tokens are the same in every prompt, so a patch there splices like
    into like whatever the pair's lengths (Arditi et al. 2024 search the same positions).
    """
    from instruments.positions import post_instruction_length

    return post_instruction_length(handle) if cfg.patch_positions == "post-instruction" else None


def positions_label(positions: int | None) -> str:
    """How a record names the positions a sweep used."""
    return "all" if positions is None else f"post-instruction (last {positions})"


def aligned(handle, pairs: Sequence[Pair], cfg: RefusalConfig) -> tuple[Pair, ...]:
    """The pairs the configured positions correspond on: all of them for post-instruction
    patching; for every-position patching only those of equal token length."""
    if window(handle, cfg) is not None:
        return tuple(pairs)
    from instruments.positions import same_length

    keep = same_length(handle, harmful(pairs), harmless(pairs))
    return tuple(p for p, k in zip(pairs, keep.tolist()) if k)


def patch_spec(handle, cfg: RefusalConfig, *, direction: str = "denoising", layers: tuple[int, ...] | None = None,
               kl: bool = False) -> PatchSpec:
    return PatchSpec(direction=direction, max_batch=cfg.max_batch, layers=layers, kl=kl,
                     positions=window(handle, cfg))
