"""Phase 4, verification: zero, mean and resample ablation of heads, neurons, layers and directions.

An ablation replaces what a component contributes with a value that carries no
information about the current input: zero, the mean over a reference prompt set, or the
value from a different (seeded) reference prompt. Where it writes is ``AblationSpec.positions``:

* ``positions=N`` (position-aware): only the prompt's last N positions - with N the
  post-instruction length (:func:`instruments.positions.post_instruction_length`), the
  chat template's tokens after the user message - and each from the reference's value at
  the *same* position counted from the end, where every reference prompt has the same
  token. System prompt, instruction and generated tokens keep what the model computes.
  This is the intervention the study's patching uses to find components, so a circuit is
  verified with the intervention that found it (Hanna et al. 2024, "Have faith in
  faithfulness"); one mean pooled over every position would write a value far off the
  distribution of most positions.
* ``positions=None``: one value per component written at every position, generated
  ones included (zero ablation, or a mean pooled over all non-pad reference tokens);
  what removing a direction everywhere needs (Arditi et al. 2024).

Where the prompt ends in a forward pass is declared by the code that runs it
(:func:`instruments.positions.prompt_end`: generation declares no prompt position in its
KV-cached steps, answer scoring the end of each prompt before its answer); a forward
over bare prompts needs no declaration. A resample takes one reference prompt's own
values (with N=1: its last-position activation, verbatim).

Hooks are grouped by hook point, so one hook per point edits all components living
there; it clones the activation first, since the same tensor may be read elsewhere (the
residual stream is shared by the cache and later blocks). Hooks are attached only by
:func:`ablated` or by the ``fwd_hooks`` argument of :mod:`instruments.behavior`.

This module never modifies or exports model weights.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from jaxtyping import Bool, Float

from instruments import progress
from instruments.behavior import Generations, batches, generate, last_logits
from instruments.components import (AttnOut, Component, Direction, Head, MlpOut, Neuron, Resid, hook_name,
                                    validate)
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens, kl_divergence, refusal_score
from instruments.positions import current_prompt_end, prompt_end

Hook = tuple[str, Callable[[torch.Tensor, Any], torch.Tensor]]
# An edit receives the hook's (already cloned) activation and returns the edited one.
Edit = Callable[[torch.Tensor], torch.Tensor]

METHODS = ("zero", "mean", "resample")


class AblationError(ValueError):
    """An ablation was asked for something it cannot do; the message names the fix."""


@dataclass(frozen=True, kw_only=True)
class AblationSpec:
    """How to ablate.

    ``direction_layers``: a :class:`Direction` is removed from the residual stream at every
    layer ("all", Arditi et al.) or only where it enters ``Direction.layer`` ("single").
    ``seed`` fixes which reference prompt each batch row receives when resampling.
    ``positions``: the last N prompt positions, each from its own reference position (see
    the module docstring), or None: every position, one value.
    """

    method: Literal["zero", "mean", "resample"] = "zero"
    positions: int | None = None
    seed: int = 0
    direction_layers: Literal["all", "single"] = "all"
    batch_size: int = 16
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise AblationError(f"unknown ablation method {self.method!r}; use one of {METHODS}")
        if self.positions is not None and (not isinstance(self.positions, int) or self.positions < 1):
            raise AblationError(f"positions must be None (every position) or a positive int, got {self.positions!r}")
        if self.direction_layers not in ("all", "single"):
            raise AblationError("direction_layers must be 'all' or 'single'")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise AblationError("batch_size and max_new_tokens must be >= 1")


# ----------------------------------------------------------------------------- where components live

def direction_sites(n_layers: int, *, layer: int | None = None) -> tuple[str, ...]:
    """Hook points where a direction is projected out.

    Complete ablation (``layer=None``) edits every *write* into the residual stream: the
    stream entering layer 0 (= the embedding) and each attention and MLP output. By
    induction the stream is then orthogonal to r at every layer and position: resid_pre,
    resid_mid, resid_post and the final norm's input, exactly as with orthogonalized
    weights. resid_pre of every later layer is projected too (Arditi et al.'s definition);
    for zero ablation that is redundant, for mean ablation it is consistent (means add up).
    ``hook_resid_mid`` is deliberately not an edit site: in the bridge it is the input of
    the second norm (``ln2.hook_in``), so editing it changes what the MLP reads but not the
    residual carried on to the next layer.

    ``layer=L``: only the stream entering block L (later writes may re-introduce r).
    """
    if layer is not None:
        return (hook_name(Resid(layer=layer)),)
    sites: list[str] = []
    for L in range(n_layers):
        sites += [hook_name(Resid(layer=L)), hook_name(AttnOut(layer=L)), hook_name(MlpOut(layer=L))]
    return tuple(sites)


def _sites(component: Component, n_layers: int, spec: AblationSpec) -> tuple[str, ...]:
    if isinstance(component, Direction):
        return direction_sites(n_layers, layer=component.layer if spec.direction_layers == "single" else None)
    return (hook_name(component),)


def _index(component: Component) -> tuple[int, ...]:
    """Index of the component within its hook's activation, after the (batch, pos) axes."""
    if isinstance(component, Head):
        return (component.head,)
    if isinstance(component, Neuron):
        return (component.index,)
    return ()


def _check(handle: ModelHandle, components: Sequence[Component]) -> tuple[Component, ...]:
    out = tuple(components)
    for c in out:
        if isinstance(c, Resid):
            raise AblationError(f"{c!r}: ablating the whole residual stream erases the input; ablate a "
                                "Direction in it, or an AttnOut/MlpOut/Head/Neuron that writes to it")
        validate(c, n_layers=handle.n_layers, n_heads=handle.n_heads, d_mlp=handle.d_mlp, d_model=handle.d_model)
    return out


def hook_points(handle: ModelHandle, components: Sequence[Component], *, spec: AblationSpec) -> tuple[str, ...]:
    """Every hook point the ablation of ``components`` edits, in a stable order."""
    names = [n for c in _check(handle, components) for n in _sites(c, handle.n_layers, spec)]
    return tuple(dict.fromkeys(names))


# ----------------------------------------------------------------------------- reference statistics

@dataclass(frozen=True, kw_only=True)
class ReferenceActivations:
    """Activations of each reference prompt at the hooks an ablation edits, on the clean model.

    ``positions=None``: ``per_prompt[name]`` is [prompt, *activation], the mean over the
    prompt's non-pad positions, and ``counts`` how many there were. ``positions=N``:
    [prompt, N, *activation], the prompt's own activation at each of its last N positions.
    """

    prompts: tuple[str, ...]
    positions: int | None
    per_prompt: Mapping[str, Float[torch.Tensor, "prompt ..."]]
    counts: Float[torch.Tensor, "prompt"]

    def mean(self, name: str) -> Float[torch.Tensor, "..."]:
        """Mean over prompts: per position (``positions=N``: [N, *act]), or pooled over all
        (prompt, position) tokens (None: longer prompts weigh more)."""
        acts = self.per_prompt[name]
        if self.positions is not None:
            return acts.mean(0)
        w = self.counts.reshape((-1,) + (1,) * (acts.dim() - 1)).to(acts.device)
        return (acts * w).sum(0) / w.sum()


@torch.no_grad()
def reference_activations(handle: ModelHandle, prompts: Sequence[str], names: Sequence[str], *,
                          positions: int | None = None, batch_size: int = 16) -> ReferenceActivations:
    """Reference activations at ``names`` on the clean model (float32, on the model's device):
    per-prompt means over non-pad positions, or (``positions=N``) each of the last N positions."""
    if not prompts:
        raise AblationError("mean/resample ablation needs at least one reference prompt")
    names = list(dict.fromkeys(names))
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    counts: list[torch.Tensor] = []
    label = (f"reference activations at {progress.count(len(names), 'hook point')}: "
            f"{progress.count(len(prompts), 'prompt')}")
    for chunk in progress.track(list(batches(list(prompts), batch_size)), label, unit="batch", quiet=True):
        ids, mask = handle.encode(chunk)
        if positions is not None and int(mask.sum(1).min()) < positions:
            raise AblationError(f"a reference prompt has fewer than positions={positions} tokens")
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
        keep = mask.float()
        counts.append(keep.sum(1) if positions is None else torch.full((ids.shape[0],), float(positions)))
        for n in names:
            act = cache[n].float()
            if positions is not None:  # left padding: the last N positions are real tokens
                parts[n].append(act[:, act.shape[1] - positions:])
                continue
            w = keep.reshape(keep.shape + (1,) * (act.dim() - 2))
            parts[n].append((act * w).sum(1) / keep.sum(1).reshape((-1,) + (1,) * (act.dim() - 2)))
    count = torch.cat(counts)
    per_prompt = {n: torch.cat(parts[n]) for n in names}
    return ReferenceActivations(prompts=tuple(prompts), positions=positions,
                                per_prompt=MappingProxyType(per_prompt), counts=count)


def resample_rows(batch: int, n_reference: int, seed: int) -> torch.Tensor:
    """Which reference prompt each batch row receives: depends only on (batch, n, seed).

    Re-drawn identically on every hook call, so a row keeps its reference prompt across the
    steps of a KV-cached generation, and all components of a row come from the same prompt
    (a coherent resample, not a mixture).
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n_reference, (batch,), generator=gen)


# ----------------------------------------------------------------------------- edits

def _replacement(component: Component, name: str, spec: AblationSpec,
                 ref: ReferenceActivations | None) -> Callable[[int], torch.Tensor | float]:
    """value(batch) for the component's slice: broadcastable to [batch, pos, *slice], where
    pos is every position (``positions=None``) or the N positions of the window."""
    comp = _index(component)
    if spec.method == "zero":
        return lambda batch: 0.0
    assert ref is not None
    window = () if spec.positions is None else (slice(None),)
    if spec.method == "mean":
        mean = ref.mean(name)[window + comp]  # [*slice] or [N, *slice]
        return lambda batch: mean
    table = ref.per_prompt[name][(slice(None),) + window + comp]  # [n_ref, *slice] or [n_ref, N, *slice]
    rows = (lambda batch: table[resample_rows(batch, table.shape[0], spec.seed).to(table.device)])
    return rows if spec.positions is not None else (lambda batch: rows(batch).unsqueeze(1))


def _window(act: torch.Tensor, positions: int | None) -> tuple[Any, ...] | None:
    """Index of the edited (batch, pos) cells: every position, the prompt's last N, or None (none here)."""
    if positions is None:
        return (slice(None), slice(None))
    end = current_prompt_end(act.shape[1])
    ends = torch.as_tensor(end, device=act.device).reshape(-1).expand(act.shape[0])
    if bool((ends <= 0).all()):  # a KV-cached generation step: no prompt position in this forward
        return None
    cols = ends[:, None] - positions + torch.arange(positions, device=act.device)[None]
    if bool((cols < 0).any()) or bool((cols >= act.shape[1]).any()):
        raise AblationError(f"a prompt has fewer than positions={positions} tokens in this forward pass")
    return (torch.arange(act.shape[0], device=act.device)[:, None], cols)


def _slice_edit(component: Component, value: Callable[[int], torch.Tensor | float], positions: int | None) -> Edit:
    comp = _index(component)

    def edit(act: torch.Tensor) -> torch.Tensor:
        where = _window(act, positions)
        if where is None:
            return act
        v = value(act.shape[0])
        act[where + comp] = v if isinstance(v, float) else v.to(device=act.device, dtype=act.dtype)
        return act

    return edit


def _direction_edit(component: Direction, name: str, spec: AblationSpec,
                    ref: ReferenceActivations | None) -> Edit:
    """Set the activation's coordinate along unit r to 0, its reference mean, or a resample."""
    r = component.tensor()
    r = r / r.norm()
    if spec.method == "zero":
        target: Callable[[int], torch.Tensor | float] = lambda batch: 0.0
    elif spec.method == "mean":
        mean = ref.mean(name)  # type: ignore[union-attr]
        mean_coord = mean @ r.to(mean.device)  # [] or [N]
        target = lambda batch: mean_coord
    else:
        coords = ref.per_prompt[name] @ r.to(ref.per_prompt[name].device)  # type: ignore[union-attr]
        picked = lambda batch: coords[resample_rows(batch, coords.shape[0], spec.seed).to(coords.device)]
        target = picked if spec.positions is not None else (lambda batch: picked(batch)[:, None])

    def edit(act: torch.Tensor) -> torch.Tensor:
        where = _window(act, spec.positions)
        if where is None:
            return act
        unit = r.to(device=act.device, dtype=act.dtype)
        t = target(act.shape[0])
        t = t if isinstance(t, float) else t.to(device=act.device, dtype=act.dtype)
        cells = act[where]  # [batch, pos or N, d_model]
        act[where] = cells + (t - cells @ unit)[..., None] * unit
        return act

    return edit


def _grouped_hook(edits: Sequence[Edit]) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def hook(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        out = activation.clone()
        for edit in edits:
            out = edit(out)
        return out

    return hook


def _reference_for(handle: ModelHandle, components: tuple[Component, ...], spec: AblationSpec,
                   reference: Sequence[str] | ReferenceActivations | None) -> ReferenceActivations | None:
    if spec.method == "zero" or not components:
        return None
    names = hook_points(handle, components, spec=spec)
    if reference is None:
        raise AblationError(f"{spec.method} ablation needs reference=... (harmless TRAIN prompts, or their "
                            "ReferenceActivations), never the prompts under evaluation")
    if isinstance(reference, ReferenceActivations):
        missing = [n for n in names if n not in reference.per_prompt]
        if missing:
            raise AblationError(f"reference activations lack hook(s) {missing}; compute them with "
                                "reference_activations(handle, prompts, hook_points(...))")
        if reference.positions != spec.positions:
            raise AblationError(f"reference activations were taken over positions={reference.positions}, the "
                                f"spec asks for {spec.positions}")
        return reference
    if isinstance(reference, str):
        raise AblationError("reference takes a sequence of prompts, not one string")
    return reference_activations(handle, reference, names, positions=spec.positions,
                                 batch_size=spec.batch_size)


def ablation_hooks(handle: ModelHandle, components: Sequence[Component], *, spec: AblationSpec = AblationSpec(),
                   reference: Sequence[str] | ReferenceActivations | None = None) -> list[Hook]:
    """The fwd_hooks (one per hook point) that ablate ``components``; attach them via a context.

    Statistics for mean/resample are computed here, on the model as it is now: call this
    outside any other intervention so they are clean.
    """
    comps = _check(handle, components)
    ref = _reference_for(handle, comps, spec, reference)
    edits: dict[str, list[Edit]] = defaultdict(list)
    for c in comps:
        for name in _sites(c, handle.n_layers, spec):
            if isinstance(c, Direction):
                edits[name].append(_direction_edit(c, name, spec, ref))
            else:
                edits[name].append(_slice_edit(c, _replacement(c, name, spec, ref), spec.positions))
    return [(name, _grouped_hook(group)) for name, group in edits.items()]


@contextmanager
def ablated(handle: ModelHandle, components: Sequence[Component], *, spec: AblationSpec = AblationSpec(),
            reference: Sequence[str] | ReferenceActivations | None = None) -> Iterator[list[Hook]]:
    """Run forward passes and :func:`behavior.generate` under the ablation for the block.

    The bridge's context removes exactly the hooks it added on exit (also on error), so
    hooks attached by an enclosing context survive and nothing leaks out.
    """
    hooks = ablation_hooks(handle, components, spec=spec, reference=reference)
    with handle.bridge.hooks(fwd_hooks=hooks):
        yield hooks


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
        with handle.bridge.hooks(fwd_hooks=list(fwd_hooks)), prompt_end(ends):
            logits = handle.bridge(ids, attention_mask=mask)
        # the prompt's last token sits just before its answer (left padding: answers end at the end)
        last = torch.tensor([length - len(a) - 1 for _, a in rows], device=logits.device)
        nexts.append(logits[torch.arange(len(rows), device=logits.device), last].float().cpu())
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
        t = target[:, 1:]
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
