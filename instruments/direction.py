"""Phase 5, mechanism: the refusal direction (Arditi et al. 2024, "Refusal in language models is
mediated by a single direction").

1. Candidates: at every layer's ``resid_pre`` and every post-instruction position (the chat
   template tokens after the user's message, where every prompt reads the same tokens),
   the difference in means of harmful and harmless activations, and the first principal
   component of the paired differences.
2. Selection on validation prompts: ablating the direction should bypass refusal on
   harmful prompts (low refusal score), adding it should induce refusal on harmless ones
   (high score), and ablating it must barely change harmless next-token distributions
   (KL below a threshold). Layers in the last 20% are excluded: there a direction can act
   directly on the unembedding instead of mediating the decision.
3. Interventions, all temporary: directional ablation by hooks; the equivalent weight
   orthogonalization as in-memory copies swapped in by a context manager that restores and
   verifies the originals; activation addition (steering).

SAFETY: this module deliberately offers no way to persist a model with refusal removed:
nothing here writes weights to disk, exports them or hands back a modified model outside
a context. Tests assert that no such function exists and that weights are restored.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Literal, Mapping, Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.ablation import AblationSpec, Hook, ablation_hooks, direction_sites
from instruments.behavior import batches
from instruments.components import AttnOut, Direction, Embed, MlpOut, Resid, hook_name, writer_name
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens, kl_divergence, refusal_score
from instruments.positions import post_instruction_length, token_lengths

Vector = Float[torch.Tensor, "d_model"]

# Differently-ending user messages whose chat-formatted token ids share only the template's tail.
_TEMPLATE_PROBES = ("a", "Why?", "1 2 3.")


class DirectionError(ValueError):
    """A direction computation got inputs it cannot use; the message names the fix."""


class QuantizedWeightsError(RuntimeError):
    """Weight orthogonalization was asked of a quantized model."""


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
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names, stop_at_layer=stop)
        rows.append(torch.stack([cache[n][:, list(positions)] for n in names], dim=2).float().cpu())
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


# ----------------------------------------------------------------------------- hook interventions

def directional_ablation_hooks(handle: ModelHandle, direction: Direction | torch.Tensor, *,
                               layer: int | None = None) -> list[Hook]:
    """Hooks projecting the direction out of every residual write (``layer``: only resid_pre of it)."""
    unit = _unit(direction)
    comp = Direction(layer=0 if layer is None else layer, vector=tuple(unit.tolist()))
    spec = AblationSpec(method="zero", direction_layers="all" if layer is None else "single")
    return ablation_hooks(handle, [comp], spec=spec)


@contextmanager
def directionally_ablated(handle: ModelHandle, direction: Direction | torch.Tensor, *,
                          layer: int | None = None) -> Iterator[None]:
    with handle.bridge.hooks(fwd_hooks=directional_ablation_hooks(handle, direction, layer=layer)):
        yield


def steering_hooks(handle: ModelHandle, vector: Direction | torch.Tensor, *, layer: int,
                   coefficient: float = 1.0) -> list[Hook]:
    """Activation addition: resid_pre[layer] += coefficient * vector at every position.

    ``vector`` is used as given (not normalized), so a mean-difference candidate with
    coefficient 1 moves harmless activations by the harmful-harmless separation; a negative
    coefficient subtracts it. Position-independent, so it holds through generation.
    """
    if not 0 <= layer < handle.n_layers:
        raise DirectionError(f"layer {layer} is outside 0..{handle.n_layers - 1}")
    v = vector.tensor() if isinstance(vector, Direction) else vector.detach().float()
    if v.shape != (handle.d_model,):
        raise DirectionError(f"steering vector has shape {tuple(v.shape)}, expected ({handle.d_model},)")
    shift = coefficient * v

    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        return activation + shift.to(device=activation.device, dtype=activation.dtype)

    return [(hook_name(Resid(layer=layer)), hook)]


@contextmanager
def steered(handle: ModelHandle, vector: Direction | torch.Tensor, *, layer: int,
            coefficient: float = 1.0) -> Iterator[None]:
    with handle.bridge.hooks(fwd_hooks=steering_hooks(handle, vector, layer=layer, coefficient=coefficient)):
        yield


# ----------------------------------------------------------------------------- selection

@dataclass(frozen=True, kw_only=True)
class CandidateScore:
    """One candidate's scores; NaN and ``evaluated=False`` for layers never evaluated."""

    pos: int
    layer: int
    norm: float
    bypass: float
    induce: float
    kl: float
    evaluated: bool
    rejected: str | None  # why it cannot be chosen; None if it passes every filter
    screen_bypass: float = float("nan")  # bypass on the screening prompts (NaN: not screened)


@dataclass(frozen=True, kw_only=True)
class DirectionSelection:
    """The chosen refusal direction and the score table of every candidate.

    ``meets_thresholds`` is False when no candidate passed the KL and induce filters; the
    choice is then the lowest bypass score among non-pruned layers, flagged, not hidden.
    ``n_harmful``/``n_harmless``: how many val prompts of each kind the scores average over.
    """

    pos: int
    layer: int
    direction: Direction  # unit vector, layer = the layer it was read at
    scale: float  # length of the chosen candidate in activation units (for steering)
    method: str
    meets_thresholds: bool
    excluded_layers: tuple[int, ...]
    baseline_harmful: float  # mean clean refusal score on harmful val prompts
    baseline_harmless: float
    scores: tuple[CandidateScore, ...]
    spec: DirectionSpec
    n_harmful: int
    n_harmless: int

    @property
    def best(self) -> CandidateScore:
        """The chosen candidate's scores (its ``rejected`` says which filter it fails, if any)."""
        return next(s for s in self.scores if (s.pos, s.layer) == (self.pos, self.layer))

    def grid(self, field: str, positions: Sequence[int], n_layers: int) -> Float[torch.Tensor, "pos layer"]:
        """A score as a [pos, layer] tensor (NaN where not evaluated), for heatmaps."""
        out = torch.full((len(positions), n_layers), torch.nan)
        index = {p: i for i, p in enumerate(positions)}
        for s in self.scores:
            out[index[s.pos], s.layer] = getattr(s, field)
        return out


def pruned_layers(n_layers: int, fraction: float) -> tuple[int, ...]:
    """Layers in the last ``fraction`` of the model (Arditi et al.: l >= int(L * (1 - fraction)))."""
    return tuple(range(int(n_layers * (1.0 - fraction)), n_layers))


def _reject_reason(bypass: float, induce: float, kl: float, spec: DirectionSpec) -> str | None:
    if not kl <= spec.kl_threshold:
        return f"kl {kl:.3g} > {spec.kl_threshold}"
    if not induce >= spec.induce_threshold:
        return f"induce {induce:.3g} < {spec.induce_threshold}"
    if math.isnan(bypass):
        return "bypass is NaN"
    return None


def _length_chunks(handle: ModelHandle, prompts: Sequence[str],
                   size: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, ids, mask) of prompt chunks of similar token length, each encoded once: less padding."""
    lengths = token_lengths(handle, prompts)
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    chunks = []
    for start in range(0, len(order), size):
        index = order[start:start + size]
        ids, mask = handle.encode([prompts[i] for i in index])
        chunks.append((index, ids, mask))
    return chunks


def _next_token_logits(handle: ModelHandle, ids: torch.Tensor, mask: torch.Tensor) -> Float[torch.Tensor, "row vocab"]:
    # only the last position is unembedded: the vocabulary projection is a fifth of SmolLM2-135M's compute
    kw = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(handle.hf_model.forward).parameters else {}
    return handle.bridge(ids, attention_mask=mask, **kw)[:, -1].float().cpu()


@torch.no_grad()
def _clean_logits(handle: ModelHandle, chunks) -> Float[torch.Tensor, "prompt vocab"]:
    index = [i for idx, _, _ in chunks for i in idx]
    logits = torch.cat([_next_token_logits(handle, ids, mask) for _, ids, mask in chunks])
    return logits[torch.argsort(torch.tensor(index))]


RowHooks = Callable[[slice, int], list[Hook]]  # (candidates, prompts per candidate) -> hooks for those rows


@torch.no_grad()
def _scores_per_candidate(handle: ModelHandle, chunks, n_candidates: int, hooks_for: RowHooks, *, tokens: RefusalTokens,
                          clean: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Refusal score and KL(clean || edited) of every (candidate, prompt): [candidate, prompt] each.

    Each forward stacks several candidates' copies of one prompt chunk, candidate-major, so
    the hooks from ``hooks_for`` edit each row with its own candidate.
    """
    n_prompts = clean.shape[0]
    score, kl = torch.empty(n_candidates, n_prompts), torch.empty(n_candidates, n_prompts)
    n_passes = sum(math.ceil(n_candidates / max(1, max_rows // len(index))) for index, _, _ in chunks)
    label = f"direction: scoring {progress.count(n_candidates, 'candidate')} on {n_prompts} val prompts"
    with progress.task(label, n_passes, unit="forward pass", quiet=True) as passes:
        for index, ids, mask in chunks:
            n = len(index)
            group = max(1, max_rows // n)
            for start in range(0, n_candidates, group):
                rows = slice(start, min(n_candidates, start + group))
                g = rows.stop - rows.start
                with handle.bridge.hooks(fwd_hooks=hooks_for(rows, n)):
                    logits = _next_token_logits(handle, ids.repeat(g, 1), mask.repeat(g, 1)).view(g, n, -1)
                score[rows, index] = refusal_score(logits, tokens)
                kl[rows, index] = kl_divergence(clean[index].expand_as(logits), logits)
                passes.advance()
    return score, kl


def _row_ablation_hooks(handle: ModelHandle, units: Float[torch.Tensor, "row d_model"]) -> list[Hook]:
    """Each row's own unit direction projected out of every residual write (directional ablation)."""
    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        u = units.to(device=activation.device, dtype=activation.dtype)[:, :, None]  # [row, d_model, 1]
        # act - (act . u) u^T, as two batched matmuls: no [row, pos, d_model] temporary for the product
        return torch.baddbmm(activation, torch.bmm(activation, u), u.transpose(1, 2), alpha=-1)

    return [(name, hook) for name in direction_sites(handle.n_layers)]


def _row_steering_hooks(vectors: Float[torch.Tensor, "row d_model"], layers: torch.Tensor) -> list[Hook]:
    """Each row's own vector added to resid_pre of its own layer (activation addition)."""
    hooks = []
    for layer in sorted(set(layers.tolist())):
        shift = vectors * (layers == layer)[:, None]

        def hook(activation: torch.Tensor, hook, shift: torch.Tensor = shift) -> torch.Tensor:
            return activation + shift.to(device=activation.device, dtype=activation.dtype)[:, None, :]

        hooks.append((hook_name(Resid(layer=layer)), hook))
    return hooks


def _not_evaluated(handle: ModelHandle, candidates: CandidateDirections, vectors: torch.Tensor,
                   spec: DirectionSpec) -> dict[tuple[int, int], str]:
    """(position index, layer) -> why that candidate is not evaluated."""
    excluded = pruned_layers(handle.n_layers, spec.prune_layer_fraction)
    wanted = range(handle.n_layers) if spec.layers is None else spec.layers
    skip = {}
    for i in range(len(candidates.positions)):
        for layer in range(handle.n_layers):
            if layer in excluded:
                skip[i, layer] = "in the last layers"
            elif float(vectors[i, layer].norm()) == 0:
                # layer 0 at template positions reads only the (shared) token embedding
                skip[i, layer] = "zero difference"
            elif layer not in wanted:
                skip[i, layer] = "layer not requested"
    return skip


def _measure(handle: ModelHandle, vecs: Float[torch.Tensor, "candidate d_model"], layers: torch.Tensor, *,
             harmful_val: Sequence[str], harmless_val: Sequence[str], tokens: RefusalTokens,
             spec: DirectionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean bypass, induce and KL score per candidate ([candidate] each), and the clean refusal
    score of every val prompt (harmful first): the three measurements of Arditi et al. (2024)."""
    n_harmful = len(harmful_val)
    mixed_chunks = _length_chunks(handle, list(harmful_val) + list(harmless_val), spec.batch_size)
    clean = _clean_logits(handle, mixed_chunks)
    units = vecs / vecs.norm(dim=-1, keepdim=True)

    # row r of a forward with n prompts per candidate belongs to candidate rows.start + r // n
    def ablation(rows: slice, n: int) -> list[Hook]:
        return _row_ablation_hooks(handle, units[rows].repeat_interleave(n, 0))

    def steering(rows: slice, n: int) -> list[Hook]:
        return _row_steering_hooks(vecs[rows].repeat_interleave(n, 0), layers[rows].repeat_interleave(n, 0))

    ablated, kl = _scores_per_candidate(handle, mixed_chunks, len(vecs), ablation, tokens=tokens, clean=clean,
                                        max_rows=spec.max_rows)
    induced, _ = _scores_per_candidate(handle, _length_chunks(handle, harmless_val, spec.batch_size), len(vecs),
                                       steering, tokens=tokens, clean=clean[n_harmful:], max_rows=spec.max_rows)
    return (ablated[:, :n_harmful].mean(1), induced.mean(1), kl[:, n_harmful:].mean(1),
            refusal_score(clean, tokens))


def _screen(handle: ModelHandle, todo: Sequence[tuple[int, int]], vectors: torch.Tensor, *, harmful_val: Sequence[str],
            harmless_val: Sequence[str], tokens: RefusalTokens,
            spec: DirectionSpec) -> dict[tuple[int, int], tuple[float, str | None]]:
    """(position index, layer) -> (screening bypass, why screened out or None); empty when not screening.

    The lowest bypass scores often belong to directions whose removal breaks the model, which
    the KL filter then rejects; so candidates whose KL on the screening harmless prompts is
    within twice the threshold (a loose bound: the full sample decides) are kept first, by
    bypass, and the others only fill what is left.
    """
    if spec.screen is None or len(todo) <= spec.screen:
        return {}
    k = spec.screen_prompts
    n_harmful = len(list(harmful_val)[:k])
    chunks = _length_chunks(handle, list(harmful_val)[:k] + list(harmless_val)[:k], spec.batch_size)
    units = torch.stack([vectors[i, layer] for i, layer in todo])
    units = units / units.norm(dim=-1, keepdim=True)
    score, kl = _scores_per_candidate(handle, chunks, len(todo),
                                      lambda rows, n: _row_ablation_hooks(handle, units[rows].repeat_interleave(n, 0)),
                                      tokens=tokens, clean=_clean_logits(handle, chunks), max_rows=spec.max_rows)
    bypass, harmless_kl = score[:, :n_harmful].mean(1), kl[:, n_harmful:].mean(1)
    loose = harmless_kl <= 2 * spec.kl_threshold
    order = sorted(range(len(todo)), key=lambda j: (not bool(loose[j]), math.inf if math.isnan(bypass[j]) else
                                                    float(bypass[j])))
    kept = set(order[: spec.screen])
    return {key: (float(bypass[j]), None if j in kept else
                  f"screened out: bypass {float(bypass[j]):.3g} and KL {float(harmless_kl[j]):.3g} on {k} val "
                  f"prompts per side, not among the {spec.screen} kept")
            for j, key in enumerate(todo)}


def select_direction(handle: ModelHandle, candidates: CandidateDirections, *, harmful_val: Sequence[str],
                     harmless_val: Sequence[str], tokens: RefusalTokens,
                     spec: DirectionSpec = DirectionSpec()) -> DirectionSelection:
    """Pick the candidate with the lowest bypass score among those passing the filters (Arditi et al. 2024).

    bypass: mean refusal score on harmful val prompts with the unit direction ablated at
    every layer (lower is better). induce: mean refusal score on harmless val prompts with
    the candidate added at its own layer (higher is better). kl: mean KL(clean || ablated)
    at the last position of harmless val prompts. Harmful and harmless share the ablated
    forward passes, and each pass carries several candidates (``spec.max_rows``). With
    ``spec.screen``, only the candidates that survive screening are scored (see DirectionSpec).
    """
    if not harmful_val or not harmless_val:
        raise DirectionError("selection needs harmful and harmless validation prompts")
    if spec.layers is not None and any(not 0 <= layer < handle.n_layers for layer in spec.layers):
        raise DirectionError(f"DirectionSpec.layers {spec.layers} has layers outside 0..{handle.n_layers - 1}")
    vectors = candidates.vectors(spec.method)
    skip = _not_evaluated(handle, candidates, vectors, spec)
    todo = [(i, layer) for i in range(len(candidates.positions)) for layer in range(handle.n_layers)
            if (i, layer) not in skip]
    if not todo:
        raise DirectionError("no candidate could be evaluated: every requested layer is pruned or has a zero "
                             "direction; widen DirectionSpec.layers or lower prune_layer_fraction")
    screened = _screen(handle, todo, vectors, harmful_val=harmful_val, harmless_val=harmless_val, tokens=tokens,
                       spec=spec)
    for key, (_, reason) in screened.items():
        if reason is not None:
            skip[key] = reason
    todo = [key for key in todo if key not in skip]
    bypasses, induces, kls, base = _measure(handle, torch.stack([vectors[i, layer] for i, layer in todo]),
                                            torch.tensor([layer for _, layer in todo]), harmful_val=harmful_val,
                                            harmless_val=harmless_val, tokens=tokens, spec=spec)
    measured = {key: (float(bypasses[j]), float(induces[j]), float(kls[j])) for j, key in enumerate(todo)}
    nan = float("nan")
    rows: list[CandidateScore] = []
    for i, pos in enumerate(candidates.positions):
        for layer in range(handle.n_layers):
            norm = float(vectors[i, layer].norm())
            early = screened.get((i, layer), (nan, None))[0]
            if (i, layer) in skip:
                rows.append(CandidateScore(pos=pos, layer=layer, norm=norm, bypass=nan, induce=nan, kl=nan,
                                           evaluated=False, rejected=skip[i, layer], screen_bypass=early))
                continue
            bypass, induce, kl = measured[i, layer]
            rows.append(CandidateScore(pos=pos, layer=layer, norm=norm, bypass=bypass, induce=induce, kl=kl,
                                       evaluated=True, rejected=_reject_reason(bypass, induce, kl, spec),
                                       screen_bypass=early))
    evaluated = [r for r in rows if r.evaluated and not math.isnan(r.bypass)]
    if not evaluated:
        raise DirectionError("every evaluated candidate's bypass score is NaN; check the refusal tokens")
    passing = [r for r in evaluated if r.rejected is None]
    best = min(passing or evaluated, key=lambda r: r.bypass)
    vec = vectors[candidates.positions.index(best.pos), best.layer]
    unit = vec / vec.norm()
    n_harmful = len(harmful_val)
    return DirectionSelection(
        pos=best.pos, layer=best.layer, direction=Direction(layer=best.layer, vector=tuple(unit.tolist())),
        scale=float(vec.norm()), method=spec.method, meets_thresholds=bool(passing),
        excluded_layers=pruned_layers(handle.n_layers, spec.prune_layer_fraction),
        baseline_harmful=float(base[:n_harmful].mean()), baseline_harmless=float(base[n_harmful:].mean()),
        scores=tuple(rows), spec=spec, n_harmful=n_harmful, n_harmless=len(harmless_val))


def find_refusal_direction(handle: ModelHandle, *, harmful_train: Sequence[str], harmless_train: Sequence[str],
                           harmful_val: Sequence[str], harmless_val: Sequence[str], tokens: RefusalTokens,
                           spec: DirectionSpec = DirectionSpec()) -> tuple[CandidateDirections, DirectionSelection]:
    """Candidates from TRAIN prompts, then selection on VAL prompts."""
    cands = candidate_directions(handle, harmful_train, harmless_train, spec=spec)
    return cands, select_direction(handle, cands, harmful_val=harmful_val, harmless_val=harmless_val,
                                   tokens=tokens, spec=spec)


# ----------------------------------------------------------------------------- weight orthogonalization

def _require_full_precision(handle: ModelHandle) -> None:
    if handle.quant != "none":
        raise QuantizedWeightsError(
            f"this model is quantized ({handle.quant}): bitsandbytes weights are packed integer blocks that "
            "cannot be orthogonalized in place. Use hook-based ablation instead: "
            "direction.directionally_ablated(handle, direction) or ablation.ablated(handle, [Direction(...)])")


def _writers(handle: ModelHandle) -> dict[str, torch.nn.Module]:
    """The HF modules that write into the residual stream: embedding, attention out, MLP down.

    Only the embedding of a tied model is replaced, not the unembedding that shares its
    weight: orthogonalizing W_U too would change the logits (the final RMSNorm's gain
    re-introduces r), and the result would no longer equal directional ablation.
    """
    bridge = handle.bridge
    mods: dict[str, torch.nn.Module] = {writer_name(Embed()): bridge.embed.original_component}
    for layer in range(handle.n_layers):
        block = bridge.blocks[layer]
        mods[writer_name(AttnOut(layer=layer))] = block.attn.o.original_component
        mods[writer_name(MlpOut(layer=layer))] = block.mlp.out.original_component
    return mods


def _writer_span(n_layers: int) -> str:
    """The residual writers' names in short: the embedding, then the first and last of each per-layer kind."""
    last = n_layers - 1
    spans = [f"{writer_name(kind(layer=0))} .. {writer_name(kind(layer=last))}" for kind in (AttnOut, MlpOut)]
    return ", ".join([writer_name(Embed()), *spans])


@dataclass(frozen=True, kw_only=True)
class OrthogonalizedWeights:
    """In-memory orthogonalized copies: ``replacements[module][param]``; originals are untouched."""

    direction: Direction
    replacements: Mapping[str, Mapping[str, torch.Tensor]]


@torch.no_grad()
def orthogonalized_weights(handle: ModelHandle, direction: Direction | torch.Tensor) -> OrthogonalizedWeights:
    """W' = W - r r^T W for every residual write (bias too), so no module can write along r.

    The embedding stores written vectors as rows ([vocab, d_model]), linear layers as columns
    of ``weight`` ([d_model, d_in]); both are projected along their d_model axis, in float32.
    """
    _require_full_precision(handle)
    r = _unit(direction)
    out: dict[str, Mapping[str, torch.Tensor]] = {}
    for name, module in _writers(handle).items():
        params: dict[str, torch.Tensor] = {}
        w = module.weight
        unit = r.to(w.device)
        if isinstance(module, torch.nn.Embedding):
            wf = w.float()
            params["weight"] = (wf - (wf @ unit)[:, None] * unit[None, :]).to(w.dtype)
        else:
            wf = w.float()
            params["weight"] = (wf - unit[:, None] * (unit @ wf)[None, :]).to(w.dtype)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bf = bias.float()
            params["bias"] = (bf - (bf @ unit) * unit).to(bias.dtype)
        out[name] = MappingProxyType(params)
    return OrthogonalizedWeights(direction=Direction(layer=0, vector=tuple(r.tolist())),
                                 replacements=MappingProxyType(out))


@contextmanager
def swapped_weights(handle: ModelHandle, replacements: Mapping[str, Mapping[str, torch.Tensor]]) -> Iterator[None]:
    """Swap in replacement parameters of the residual writers for the block, then restore them.

    The original Parameter objects are put back (not copied into), and on exit each is
    checked to be the same object with an unchanged version counter, i.e. never edited in
    place; a failed check raises rather than leave a silently modified model behind.
    """
    _require_full_precision(handle)
    modules = _writers(handle)
    unknown = set(replacements) - set(modules)
    if unknown:
        raise DirectionError(f"no residual writer named {sorted(unknown)}; known: {_writer_span(handle.n_layers)}")
    saved: list[tuple[torch.nn.Module, str, torch.nn.Parameter, int]] = []
    try:
        for name, params in replacements.items():
            module = modules[name]
            for pname, new in params.items():
                old = getattr(module, pname)
                if new.shape != old.shape:
                    raise DirectionError(f"{name}.{pname}: replacement shape {tuple(new.shape)} != "
                                         f"{tuple(old.shape)}")
                saved.append((module, pname, old, old._version))
                setattr(module, pname, torch.nn.Parameter(new.to(old.device, old.dtype), requires_grad=False))
        yield
    finally:
        for module, pname, old, _ in reversed(saved):
            setattr(module, pname, old)
        broken = [pname for module, pname, old, version in saved
                  if getattr(module, pname) is not old or old._version != version]
        if broken:
            raise RuntimeError(f"original weights were not restored intact ({broken}); reload the model")


@contextmanager
def orthogonalized(handle: ModelHandle, direction: Direction | torch.Tensor) -> Iterator[OrthogonalizedWeights]:
    """Run with the direction orthogonalized out of the weights; the originals return on exit."""
    weights = orthogonalized_weights(handle, direction)
    with swapped_weights(handle, weights.replacements):
        yield weights
