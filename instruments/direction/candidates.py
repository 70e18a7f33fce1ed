"""Candidate refusal directions (Arditi et al. 2024, "Refusal in language models is mediated by a
single direction").

At every layer's ``resid_pre`` and every post-instruction position (the chat template
tokens after the user's message, where every prompt reads the same tokens): the
difference in means of harmful and harmless activations, and the first principal
component of the paired differences. :class:`DirectionSpec` holds every knob of finding
a direction and of selecting one (:mod:`instruments.direction.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.behavior import batches
from instruments.components import Direction, Resid, hook_name
from instruments.handle import ModelHandle
from instruments.patching.spec import LAST_ONLY
from instruments.positions import post_instruction_length

Vector = Float[torch.Tensor, "d_model"]

# Differently-ending user messages whose chat-formatted token ids share only the template's tail.
_TEMPLATE_PROBES = ("a", "Why?", "1 2 3.")


class DirectionError(ValueError):
    """A direction computation got inputs it cannot use; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class DirectionSpec:
    """Every knob of direction finding and selection.

    ``n_positions``: how many post-instruction positions to search, counted from the end
    (None: all of them, as Arditi et al. 2024 do; more than the template has is an error).
    ``layers``: which layers to evaluate during selection (None: all not pruned).
    ``prune_layer_fraction``: layers >= int(n_layers * (1 - fraction)) are never chosen.
    ``kl_threshold``: max mean KL(clean || ablated) on harmless val prompts.
    ``induce_threshold``: min mean refusal score on harmless val prompts with the direction added.
    ``batch_size``: prompts per forward pass; ``max_rows``: rows per batched selection forward,
    each row one (candidate, prompt), so several candidates share a pass (a memory knob).
    ``screen``: with more candidates than this, every candidate is first screened by its
    bypass score and KL on the first ``screen_prompts`` val prompts per side, and only
    ``screen`` of them (lowest bypass among those within twice the KL threshold first) are
    scored on every val prompt (None: score all). Screening by the selection's own scores,
    then measuring the few survivors fully, is the rank-then-verify recipe of Kramar et al.
    2024; it makes an every-position search affordable on a CPU.
    """

    method: Literal["mean_diff", "pca"] = "mean_diff"
    n_positions: int | None = None
    layers: tuple[int, ...] | None = None
    prune_layer_fraction: float = 0.2
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    batch_size: int = 16
    max_rows: int = 64
    screen: int | None = None
    screen_prompts: int = 8

    def __post_init__(self) -> None:
        if self.screen is not None and self.screen < 1:
            raise DirectionError("screen must be None (score every candidate) or >= 1")
        if self.screen_prompts < 1:
            raise DirectionError("screen_prompts must be >= 1")
        if self.method not in ("mean_diff", "pca"):
            raise DirectionError(f"unknown method {self.method!r}; use 'mean_diff' or 'pca'")
        if self.n_positions is not None and self.n_positions < 1:
            raise DirectionError("n_positions must be None or >= 1")
        if not 0.0 <= self.prune_layer_fraction < 1.0:
            raise DirectionError("prune_layer_fraction must be in [0, 1)")
        if self.batch_size < 1 or self.max_rows < 1:
            raise DirectionError("batch_size and max_rows must be >= 1")


# ----------------------------------------------------------------------------- activations

def post_instruction_ids(handle: ModelHandle) -> tuple[int, ...]:
    """Token ids the chat template puts after the user's message (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``).

    Found as the longest common token suffix of chat-formatted probe messages that end in
    different characters, so it is the template's own tokenization in context (a tail
    tokenized on its own can merge differently).
    """
    seqs = [handle.tokenizer(handle.chat(p), add_special_tokens=False)["input_ids"] for p in _TEMPLATE_PROBES]
    k = 0
    while all(len(s) > k for s in seqs) and len({s[-1 - k] for s in seqs}) == 1:
        k += 1
    if k == 0:
        raise DirectionError("the chat template adds no tokens after the user's message; there are no "
                             "post-instruction positions to read a direction from")
    return tuple(seqs[0][-k:])


def resid_names(n_layers: int) -> list[str]:
    return [hook_name(Resid(layer=layer)) for layer in range(n_layers)]


@torch.no_grad()
def resid_at(handle: ModelHandle, prompts: Sequence[str], *, positions: Sequence[int], batch_size: int = 16,
             layers: Sequence[int] | None = None) -> Float[torch.Tensor, "prompt pos layer d_model"]:
    """resid_pre at ``positions`` (negative offsets: left padding aligns the ends) of ``layers``
    (None: every layer, in order). The forward stops after the deepest layer asked for."""
    layers = tuple(range(handle.n_layers)) if layers is None else tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < handle.n_layers for layer in layers):
        raise DirectionError(f"layers must be a non-empty subset of 0..{handle.n_layers - 1}, got {layers}")
    names = [resid_names(handle.n_layers)[layer] for layer in layers]
    # blocks past the deepest requested resid_pre cannot change it: do not run them
    stop = max(layers) + 1 if max(layers) + 1 < handle.n_layers else None
    rows = []
    label = (f"direction: residual stream at {progress.count(len(positions), 'position')} × "
            f"{progress.count(len(layers), 'layer')}, {progress.count(len(prompts), 'prompt')}")
    for chunk in progress.track(list(batches(list(prompts), batch_size)), label, unit="batch", quiet=True):
        ids, mask = handle.encode(chunk)
        # the cache holds only the positions read (and no logits beyond the last position)
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names, stop_at_layer=stop,
                                                pos_slice=list(positions), **LAST_ONLY)
        # each layer's residual is where its layer ran (several devices under a --device-map)
        rows.append(torch.stack([cache[n].float().cpu() for n in names], dim=2))
    return torch.cat(rows)


def mean_difference(harmful: Float[torch.Tensor, "n_harmful *rest"],
                    harmless: Float[torch.Tensor, "n_harmless *rest"]) -> Float[torch.Tensor, "*rest"]:
    """mean(harmful) - mean(harmless) over the first axis."""
    return harmful.float().mean(0) - harmless.float().mean(0)


def paired_first_pc(harmful: Float[torch.Tensor, "pair *rest d_model"], harmless: Float[torch.Tensor, "pair *rest d_model"]
                    ) -> tuple[Float[torch.Tensor, "*rest d_model"], Float[torch.Tensor, "*rest"]]:
    """Unit first principal axis of the paired differences, and the share of their second moment it holds.

    Uncentered on purpose: centering would subtract the mean difference, which is exactly
    the shared harmful-vs-harmless shift we want, leaving only pair-to-pair variation.
    (RepE reaches the same by flipping pairs at random before a centered PCA.) The sign is
    chosen so the axis points from harmless to harmful (positive dot with the mean difference).
    """
    if harmful.shape != harmless.shape:
        raise DirectionError(f"paired PCA needs pairs: got {tuple(harmful.shape)} harmful vs "
                             f"{tuple(harmless.shape)} harmless activations")
    diffs = (harmful.float() - harmless.float()).movedim(0, -2)  # [*rest, pair, d_model]
    _, s, vh = torch.linalg.svd(diffs, full_matrices=False)
    axis = vh[..., 0, :]
    sign = torch.sign((axis * diffs.mean(-2)).sum(-1, keepdim=True))
    axis = axis * torch.where(sign == 0, torch.ones_like(sign), sign)
    return axis, s[..., 0] ** 2 / (s ** 2).sum(-1).clamp_min(1e-30)


@dataclass(frozen=True, kw_only=True)
class CandidateDirections:
    """Candidate refusal directions at each post-instruction position and layer.

    ``positions`` are negative offsets from the end (-1: the last template token).
    ``mean_diff`` is unnormalized (its norm is the harmful-harmless separation, ``norms``);
    ``pca`` are unit vectors (None when the sets are not paired one-to-one).
    """

    positions: tuple[int, ...]
    mean_diff: Float[torch.Tensor, "pos layer d_model"]
    norms: Float[torch.Tensor, "pos layer"]
    pca: Float[torch.Tensor, "pos layer d_model"] | None
    pca_explained: Float[torch.Tensor, "pos layer"] | None
    n_harmful: int
    n_harmless: int

    def vectors(self, method: str = "mean_diff") -> Float[torch.Tensor, "pos layer d_model"]:
        """Candidates in activation units (what steering adds): the PC axis is scaled by the
        mean difference's length along it, so both methods shift activations equally far."""
        if method == "mean_diff":
            return self.mean_diff
        if method == "pca":
            if self.pca is None:
                raise DirectionError("no PCA candidates: harmful and harmless prompts were not paired")
            return self.pca * (self.pca * self.mean_diff).sum(-1, keepdim=True)
        raise DirectionError(f"unknown method {method!r}; use 'mean_diff' or 'pca'")


def searched_positions(handle: ModelHandle, spec: DirectionSpec = DirectionSpec()) -> tuple[int, ...]:
    """Negative offsets of the post-instruction positions the candidates are read at (Arditi et al. 2024)."""
    k = post_instruction_length(handle)
    if k == 0:
        raise DirectionError("the chat template adds no tokens after the user's message; there are no "
                             "post-instruction positions to read a direction from")
    if spec.n_positions is not None and spec.n_positions > k:
        raise DirectionError(f"n_positions={spec.n_positions}, but the chat template puts only {k} tokens after "
                             f"the user's message; ask for at most {k}, or None (all of them)")
    n = k if spec.n_positions is None else spec.n_positions
    return tuple(range(-n, 0))


def candidate_directions(handle: ModelHandle, harmful: Sequence[str], harmless: Sequence[str], *,
                         spec: DirectionSpec = DirectionSpec()) -> CandidateDirections:
    """Difference-in-means (and paired-PC) candidates from TRAIN prompts."""
    if not harmful or not harmless:
        raise DirectionError("need at least one harmful and one harmless prompt")
    positions = searched_positions(handle, spec)
    acts_h = resid_at(handle, harmful, positions=positions, batch_size=spec.batch_size)
    acts_s = resid_at(handle, harmless, positions=positions, batch_size=spec.batch_size)
    diff = mean_difference(acts_h, acts_s)
    pca, explained = paired_first_pc(acts_h, acts_s) if len(harmful) == len(harmless) else (None, None)
    return CandidateDirections(positions=positions, mean_diff=diff, norms=diff.norm(dim=-1), pca=pca,
                               pca_explained=explained, n_harmful=len(harmful), n_harmless=len(harmless))


def _unit(direction: Direction | torch.Tensor) -> Vector:
    v = direction.tensor() if isinstance(direction, Direction) else direction.detach().float().cpu()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise DirectionError("a direction must be a finite non-zero vector")
    return v / norm


@torch.no_grad()
def layer_projections(handle: ModelHandle, prompts: Sequence[str], direction: Direction | torch.Tensor, *,
                      position: int = -1, batch_size: int = 16) -> Float[torch.Tensor, "layer prompt"]:
    """Scalar projection of resid_pre onto the unit direction, per layer and prompt (for plots)."""
    acts = resid_at(handle, prompts, positions=(position,), batch_size=batch_size)[:, 0]  # prompt layer d
    return (acts @ _unit(direction)).T
