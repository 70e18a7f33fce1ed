"""Selection of the refusal direction among the candidates, on validation prompts (Arditi et al. 2024).

Ablating the direction should bypass refusal on harmful prompts (low refusal score),
adding it should induce refusal on harmless ones (high score), and ablating it must
barely change harmless next-token distributions (KL below a threshold). Layers in the
last 20% are excluded: there a direction can act directly on the unembedding instead of
mediating the decision. Harmful and harmless prompts share the ablated forward passes,
and each pass carries several candidates (``DirectionSpec.max_rows``); with
``DirectionSpec.screen`` only the candidates that survive a screening on a few prompts
are scored on all of them (the rank-then-verify recipe of Kramar et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float

from instruments import progress
from instruments.ablation import Hook, direction_sites
from instruments.components import Direction, Resid, hook_name
from instruments.direction.candidates import CandidateDirections, DirectionError, DirectionSpec, candidate_directions
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens, kl_divergence, refusal_score
from instruments.patching.spec import LAST_ONLY
from instruments.positions import token_lengths


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
    return handle.bridge(ids, attention_mask=mask, **LAST_ONLY)[:, -1].float().cpu()


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
