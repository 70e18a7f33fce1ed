"""Gradient attributions of the refusal score, for comparison with patching and ablation.

Three instruments, all differentiating a scalar metric of the last position's logits
(default: :func:`instruments.metrics.refusal_score`):

* :func:`integrated_gradients` -- how much each input token's embedding contributes to the
  metric, relative to a baseline input (Sundararajan et al. 2017; by default each prompt's
  paired harmless prompt), with the completeness error reported per prompt.
* :func:`attention_gradient_flow` -- gradient x attention pattern per head.
* :func:`neuron_saliency` -- gradient and gradient x activation per MLP neuron (and per
  head's ``z``), all layers in one backward pass.

How gradients exist at all: the model's parameters have ``requires_grad=False`` (and may be
bitsandbytes-quantized), so the graph is rooted at a *leaf copy of the token embeddings*
that a ``hook_embed`` forward hook swaps in. Every activation downstream of it then has a
gradient; no parameter ever gets one. Token ids still go through the bridge, so position
ids derived from the left-padding mask are exactly those of every other instrument.

Why a sum over the batch is backpropagated: prompts are independent rows (left padding,
per-row attention mask), so d(sum of metrics)/d(row r's activations) is row r's gradient.

Gradients of hooked activations are reduced inside a tensor hook the moment they arrive
(e.g. summed over positions), so full ``[batch, pos, d_mlp]`` gradients for every layer are
never held at once. The hooked activations themselves are kept until then (grad x act
needs them); with ``checkpointing`` everything else a layer saves for backward is dropped.

IG baselines matter more than step counts on these models. Measured on SmolLM2-135M train
pairs at 32 Gauss-Legendre steps: the paired harmless prompt of the same length leaves a
completeness error of 1e-4 to 3e-3; the zero embedding on the user's message 2% to 18%; the
blurred baseline of a pair of unequal length up to 141% (9% at 128 steps). Replacing the chat
template as well makes the path so rough that no affordable step count converges (see
:class:`Baseline`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from instruments import progress
from instruments.behavior import batches
from instruments.components import Embed, Head, Neuron, Pattern, hook_name
from instruments.handle import ModelHandle
from instruments.metrics import RefusalTokens, refusal_score
from instruments.positions import same_length, spans

Metric = Callable[[Float[torch.Tensor, "batch vocab"]], Float[torch.Tensor, "batch"]]
# (activation, its gradient, attention mask [batch, pos] as bool) -> a reduced tensor
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def refusal_metric(tokens: RefusalTokens) -> Metric:
    """The refusal score (log-odds of the refusal tokens) as a metric of last-position logits."""
    return partial(refusal_score, tokens=tokens)


def _as_metric(metric: Metric | RefusalTokens) -> Metric:
    return refusal_metric(metric) if isinstance(metric, RefusalTokens) else metric


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise TypeError("pass a sequence of prompts, not one string")
    if len(prompts) == 0:
        raise ValueError("no prompts given")


# ----------------------------------------------------------------------------- checkpointing

def _checkpointing_layers(hf_model: Any) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in hf_model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _is_checkpointing(hf_model: Any) -> bool:
    # transformers 5.23 renamed the property; the old name still works but warns.
    name = "is_activation_checkpointing" if hasattr(type(hf_model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(hf_model, name, False))


@contextmanager
def activation_checkpointing(hf_model: Any, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer's activations in the backward pass instead of storing them.

    Uses the model's own ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    on older transformers), always **non-reentrant**: the reentrant variant runs the first
    forward under ``no_grad``, so the activations our hooks capture would have no graph.
    HF checkpoints a layer only when that layer is in training mode; rather than
    ``model.train()`` (which would switch on dropout everywhere) only the decoder layers'
    own ``training`` flag is set, and every flag is restored on exit, as is the input-grad
    hook that HF's enable call installs. Forward hooks inside a layer fire twice (forward
    and recompute); the instruments here use the first firing only.
    """
    if not enabled:
        yield
        return
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(hf_model).__name__} does not support gradient checkpointing; "
                         "run with checkpointing=False")
    already = _is_checkpointing(hf_model)
    had_input_hooks = bool(getattr(hf_model, "_require_grads_hooks", None))
    layers = _checkpointing_layers(hf_model)
    modes = [layer.training for layer in layers]
    try:
        if not already:
            kwargs = {"use_reentrant": False}
            if hasattr(hf_model, "activation_checkpointing_enable"):
                hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # transformers < 5.23
                hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for layer in layers:
            layer.training = True
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
        if not already:
            if hasattr(hf_model, "activation_checkpointing_disable"):
                hf_model.activation_checkpointing_disable()
            else:
                hf_model.gradient_checkpointing_disable()
        if not had_input_hooks and getattr(hf_model, "_require_grads_hooks", None):
            hf_model.disable_input_require_grads()


# ----------------------------------------------------------------------------- the backward pass

@torch.no_grad()
def _embed(handle: ModelHandle, ids: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos d_model"]:
    """Token embeddings exactly as ``hook_embed`` sees them, in float32."""
    return handle.hf_model.get_input_embeddings()(ids).float()


@dataclass(frozen=True, kw_only=True, eq=False)
class _Pass:
    values: Float[torch.Tensor, "batch"]
    embed_grad: Float[torch.Tensor, "batch pos d_model"]
    reduced: Mapping[str, torch.Tensor]


def _backward(handle: ModelHandle, ids: torch.Tensor, mask: torch.Tensor, metric: Metric, *,
              embeds: torch.Tensor | None = None, watch: Mapping[str, Reducer] | None = None,
              checkpointing: bool = False) -> _Pass:
    """One forward and one backward pass; gradients w.r.t. the embeddings and watched hooks."""
    watch = dict(watch or {})
    source = _embed(handle, ids) if embeds is None else embeds
    # float32 leaf, cast in the hook: gradients accumulate in float32 even on bf16 models.
    leaf = source.detach().float().clone().requires_grad_(True)
    keep = mask.bool()
    reduced: dict[str, torch.Tensor] = {}
    captured: set[str] = set()

    def feed(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if act.shape != leaf.shape:
            raise ValueError(f"embedding shape {tuple(act.shape)} != supplied {tuple(leaf.shape)}")
        return leaf.to(act.dtype)

    def watcher(name: str, reduce: Reducer) -> Callable:
        def capture(act: torch.Tensor, hook: Any) -> torch.Tensor:
            # Under checkpointing the layer is recomputed in backward and this hook fires
            # again on a copy outside the graph being differentiated: keep the first only.
            if name in captured:
                return act
            captured.add(name)
            saved = act.detach()
            act.register_hook(lambda grad: reduced.__setitem__(name, reduce(saved, grad.detach(), keep)))
            return act
        return capture

    hooks = [(hook_name(Embed()), feed)] + [(name, watcher(name, fn)) for name, fn in watch.items()]
    with torch.enable_grad(), activation_checkpointing(handle.hf_model, checkpointing), \
            handle.bridge.hooks(fwd_hooks=hooks):
        logits = handle.bridge(ids, attention_mask=mask)
        values = metric(logits[:, -1])
        if values.shape != (ids.shape[0],):
            raise ValueError(f"the metric must map [batch, vocab] to [batch]; got shape {tuple(values.shape)}")
        # Backward inside the hooks block: a checkpointed recompute must see the same hooks.
        values.sum().backward()
    missing = sorted(set(watch) - set(reduced))
    if missing:
        raise RuntimeError(f"no gradient reached {missing}; these hooks are not on the path to the metric")
    return _Pass(values=values.detach().float(), embed_grad=leaf.grad, reduced=reduced)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # where, not multiply: a padding row's value (even NaN) never leaks into a sum.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------- integrated gradients

@dataclass(frozen=True, kw_only=True)
class Baseline:
    """The reference input x' of integrated gradients.

    ``kind``: ``paired`` (default: each input's paired harmless prompt, see below),
    ``zeros`` (the zero embedding), ``pad`` (the pad token's embedding) or ``prompt`` (the
    embeddings of baseline prompts, chat-formatted like the inputs, one per input prompt or
    one for all, each with exactly as many tokens as its input).

    ``paired`` is the contrastive baseline for "why is this harmful prompt refused and its
    harmless twin not" (Sundararajan et al. 2017 IG, with the paired harmless prompt as x'):
    ``prompts`` holds one harmless prompt per input. A pair of the same token length gets
    the harmless prompt's embeddings at every position (``paired``); a pair of unequal
    length keeps every template token's own embedding and replaces each user-message token
    by the mean embedding of the harmless prompt's user-message tokens (``blurred``; its path
    is rougher, so it needs more steps). Which one each pair got is in
    :attr:`IntegratedGradients.baselines`. Its positions are fixed per pair, so ``scope``
    stays at its default.

    ``scope`` (zeros, pad, prompt): which positions the baseline replaces. ``content``
    (default): only the user's message; the chat template around it (system prompt, role
    markers, special tokens) keeps its embeddings, so attributions go to the words of the
    request and the path stays on-distribution. ``all``: every real position. Measured on
    SmolLM2-135M-Instruct, replacing the template too (above all the first token, whose
    embedding drives the attention sink) makes f wildly non-smooth along the path (it swings
    between -15 and -3 with spikes of |df/da| ~ 800), and no affordable step count gets
    completeness then. A zero baseline at every position is worse: every RMSNorm then sits
    at its singular point at a = 0 (bias-free Llama blocks keep the residual exactly 0), so
    the integrand has nested knees at scales ~ eps**(k/2) that no quadrature resolves.
    Padding positions always keep the input's embedding (zero attribution).
    """

    kind: Literal["paired", "zeros", "pad", "prompt"] = "paired"
    prompts: tuple[str, ...] = ()
    scope: Literal["content", "all"] = "content"

    def __post_init__(self) -> None:
        if self.kind not in ("paired", "zeros", "pad", "prompt"):
            raise ValueError(f"unknown baseline kind {self.kind!r}; use paired, zeros, pad or prompt")
        if self.kind == "prompt" and not self.prompts:
            raise ValueError("kind='prompt' needs baseline prompts: Baseline(kind='prompt', prompts=(...))")
        if self.kind in ("zeros", "pad") and self.prompts:
            raise ValueError(f"kind={self.kind!r} takes no prompts; use kind='paired' or 'prompt' for prompt baselines")
        if self.scope not in ("content", "all"):
            raise ValueError(f"unknown baseline scope {self.scope!r}; use content or all")
        if self.kind == "paired" and self.scope != "content":
            raise ValueError("the paired baseline sets its positions per pair; leave scope at its default")


@dataclass(frozen=True, kw_only=True)
class IGSpec:
    """``steps`` gradient evaluations per prompt, placed by ``rule`` on the path 0 -> 1.

    ``gauss_legendre`` (default): Gauss-Legendre nodes and weights on [0, 1], exact for
    polynomials of degree 2 * steps - 1, so far fewer steps reach a given completeness than
    with the trapezoid rule for these smooth (SiLU, softmax, RMSNorm) networks.
    ``trapezoid``: ``steps`` equally spaced points including both ends, end weights halved.
    Two extra forward rows (alpha = 0 and 1) give f(x') and f(x) when the rule lacks them.
    ``batch_size`` counts model rows, i.e. (prompt, alpha) pairs, per forward/backward.
    ``baseline`` defaults to the paired harmless prompts, which the caller supplies:
    ``IGSpec(baseline=Baseline(prompts=harmless))``.
    """

    steps: int = 64
    rule: Literal["gauss_legendre", "trapezoid"] = "gauss_legendre"
    baseline: Baseline = field(default_factory=Baseline)
    batch_size: int = 32
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.rule not in ("gauss_legendre", "trapezoid"):
            raise ValueError(f"unknown rule {self.rule!r}; use gauss_legendre or trapezoid")
        if self.steps < (2 if self.rule == "trapezoid" else 1) or self.batch_size < 1:
            raise ValueError("steps must be >= 1 (>= 2 for trapezoid) and batch_size >= 1")


# Sundararajan et al. (2017, section 3) check an IG computation by completeness: the
# attributions must add up to f(x) - f(x') within 5%, else take more steps. The identity is
# exact for the integral, so what is left is the quadrature's error alone; above the bar the
# path is not resolved and the split between tokens cannot be trusted either.
COMPLETENESS_BAR = 0.05


def quadrature(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [0, 1] (ascending) and weights summing to 1, always including 0 and 1.

    The end nodes carry weight 0 under Gauss-Legendre; they are there for f(x'), f(x).
    """
    if rule == "trapezoid":
        alphas = np.linspace(0.0, 1.0, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[[0, -1]] /= 2
        return alphas, weights
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return np.concatenate([[0.0], (nodes + 1) / 2, [1.0]]), np.concatenate([[0.0], weights / 2, [0.0]])


@dataclass(frozen=True, kw_only=True, eq=False)
class IntegratedGradients:
    """Per-token IG attributions (summed over d_model), left-padded like ``handle.encode``."""

    input_ids: Int[torch.Tensor, "prompt pos"]
    mask: Int[torch.Tensor, "prompt pos"]
    attributions: Float[torch.Tensor, "prompt pos"]  # 0 on padding and wherever x' = x
    replaced: Int[torch.Tensor, "prompt pos"]  # 1 where the baseline replaced the input
    score: Float[torch.Tensor, "prompt"]  # f(x)
    baseline_score: Float[torch.Tensor, "prompt"]  # f(x')
    completeness_abs: Float[torch.Tensor, "prompt"]  # |sum attr - (f(x) - f(x'))|
    completeness_error: Float[torch.Tensor, "prompt"]  # the above / |f(x) - f(x')|; NaN if that is 0
    steps: int
    rule: str
    baseline: str  # "paired", or "kind:scope", e.g. "prompt:content"
    baselines: tuple[str, ...]  # per prompt: "paired" or "blurred" (paired kind), else ``baseline``

    @property
    def max_completeness_error(self) -> float:
        """The largest relative completeness error over prompts (NaN rows skipped; NaN if all are)."""
        errors = self._finite_errors()
        return float(errors.max()) if errors.numel() else float("nan")

    @property
    def median_completeness_error(self) -> float:
        errors = self._finite_errors()
        return float(errors.double().quantile(0.5)) if errors.numel() else float("nan")

    def _finite_errors(self) -> torch.Tensor:
        return self.completeness_error[~self.completeness_error.isnan()]

    def completeness_summary(self, bar: float = COMPLETENESS_BAR) -> dict[str, Any]:
        """Relative completeness errors per prompt, their max and median, and whether all are within ``bar``."""
        per_prompt = [float(e) for e in self.completeness_error]
        return {"per_prompt": per_prompt, "max": self.max_completeness_error,
                "median": self.median_completeness_error, "bar": bar,
                "within_bar": bool(self._finite_errors().le(bar).all()), "steps": self.steps, "rule": self.rule}

    def per_prompt(self) -> tuple[Float[torch.Tensor, "pos"], ...]:
        """Attributions of each prompt's real tokens only (padding removed)."""
        return tuple(row[m.bool()] for row, m in zip(self.attributions, self.mask))

    def token_ids(self) -> tuple[Int[torch.Tensor, "pos"], ...]:
        return tuple(row[m.bool()] for row, m in zip(self.input_ids, self.mask))


def content_mask(handle: ModelHandle, prompts: Sequence[str]) -> Int[torch.Tensor, "prompt pos"]:
    """1 where a left-padded token belongs to the user's message, 0 on template and padding.

    The template is what the chat formatting of the prompt shares with that of an empty
    message: the longest common token prefix and suffix. (A merge across the boundary can
    shift it by a token; that token then counts as template.)
    """
    ids, mask = handle.encode(prompts)
    empty = handle.encode([""])[0][0].tolist()
    out = torch.zeros_like(mask)
    for row in range(ids.shape[0]):
        real = ids[row][mask[row].bool()].tolist()
        limit = min(len(real), len(empty))
        head = next((i for i in range(limit) if real[i] != empty[i]), limit)
        tail = next((i for i in range(limit - head) if real[-1 - i] != empty[-1 - i]), limit - head)
        start = ids.shape[1] - len(real)  # left padding: real tokens are right-aligned
        out[row, start + head: ids.shape[1] - tail] = 1
    return out


def _baseline_ids(handle: ModelHandle, spec: Baseline, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Baseline prompt token ids laid out like ``ids`` (same length per row, right-aligned)."""
    texts = spec.prompts if len(spec.prompts) == ids.shape[0] else spec.prompts * ids.shape[0]
    if len(texts) != ids.shape[0]:
        raise ValueError(f"give one baseline prompt, or one per prompt ({ids.shape[0]}); got {len(spec.prompts)}")
    base_ids = ids.clone()
    for row, text in enumerate(texts):
        tokens = handle.encode([text])[0][0]
        length = int(mask[row].sum())
        if tokens.numel() != length:
            raise ValueError(f"baseline prompt {row} has {tokens.numel()} tokens after chat formatting, its input "
                             f"has {length}; IG needs baselines of the same length (pad or trim the baseline)")
        base_ids[row, ids.shape[1] - length:] = tokens
    return base_ids


def _paired_embeds(handle: ModelHandle, harmless: Sequence[str], prompts: Sequence[str], mask: torch.Tensor,
                   x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(x', replaced, kind per pair) for the paired harmless baseline (see :class:`Baseline`)."""
    if not harmless:
        raise ValueError("the paired IG baseline needs each prompt's harmless twin: pass "
                         "IGSpec(baseline=Baseline(kind='paired', prompts=harmless)), or choose another "
                         "Baseline kind (e.g. kind='zeros')")
    if len(harmless) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(harmless)} paired harmless prompts; give one per prompt")
    same = same_length(handle, prompts, harmless)
    inputs, twins = spans(handle, prompts), spans(handle, harmless)
    twin_x = _embed(handle, twins.ids)
    base, replaced, kinds = x.clone(), torch.zeros_like(mask), []
    for row in range(len(prompts)):
        if same[row]:
            # left padding: the last n positions are the real tokens of both prompts
            n = int(mask[row].sum())
            base[row, -n:] = twin_x[row, -n:]
            replaced[row] = mask[row]
            kinds.append("paired")
            continue
        words = twins.user[row]
        if not words.any():
            raise ValueError(f"harmless prompt {row} ({harmless[row]!r}) has no user-message tokens to average; "
                             "pair each prompt with a non-empty harmless request")
        user = inputs.user[row]
        base[row] = torch.where(user[:, None], twin_x[row][words].mean(0), x[row])
        replaced[row] = user.to(mask.dtype)
        kinds.append("blurred")
    return base, replaced, tuple(kinds)


def _baseline_label(spec: Baseline) -> str:
    return "paired" if spec.kind == "paired" else f"{spec.kind}:{spec.scope}"


def _baseline_embeds(handle: ModelHandle, spec: Baseline, prompts: Sequence[str], ids: torch.Tensor, mask: torch.Tensor,
                     x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """(x', replaced, kind per prompt): the baseline embeddings and the positions where they replace x."""
    if spec.kind == "paired":
        return _paired_embeds(handle, list(spec.prompts), list(prompts), mask, x)
    replaced = content_mask(handle, prompts) if spec.scope == "content" else mask
    if spec.kind == "zeros":
        base = torch.zeros_like(x)
    elif spec.kind == "pad":
        base = _embed(handle, torch.full_like(ids, handle.tokenizer.pad_token_id))
    else:
        base = _embed(handle, _baseline_ids(handle, spec, ids, mask))
    kinds = (_baseline_label(spec),) * ids.shape[0]
    return torch.where(replaced.bool()[..., None], base, x), replaced, kinds


def integrated_gradients(handle: ModelHandle, prompts: Sequence[str], metric: Metric | RefusalTokens,
                         spec: IGSpec = IGSpec()) -> IntegratedGradients:
    """IG of ``metric`` (of the last position's logits) w.r.t. the input token embeddings.

    attr_t = sum_d (x - x')_td * integral_0^1 d f(x' + a (x - x')) / d x_td da, by quadrature.
    Completeness (sum_t attr_t = f(x) - f(x')) holds up to the quadrature error, which is
    reported per prompt. All (prompt, alpha) rows are flattened into one batch dimension
    and run ``spec.batch_size`` at a time.
    """
    _check_prompts(prompts)
    fn = _as_metric(metric)
    ids, mask = handle.encode(prompts)
    x = _embed(handle, ids)
    base, replaced, kinds = _baseline_embeds(handle, spec.baseline, prompts, ids, mask, x)
    alphas, weights = quadrature(spec.steps, spec.rule)
    n_alpha = alphas.size
    alpha_t = torch.tensor(alphas, dtype=torch.float32, device=x.device)
    weight_t = torch.tensor(weights, dtype=torch.float32, device=x.device)
    grad_sum = torch.zeros_like(x)
    values = torch.zeros(len(prompts), n_alpha, device=x.device)
    rows = [(p, k) for p in range(len(prompts)) for k in range(n_alpha)]
    label = f"integrated gradients: {progress.count(len(prompts), 'prompt')} × {n_alpha} points on the path"
    for chunk in progress.track(list(batches(rows, spec.batch_size)), label, unit="batch", quiet=True):
        p_idx = torch.tensor([p for p, _ in chunk], device=x.device)
        k_idx = torch.tensor([k for _, k in chunk], device=x.device)
        a = alpha_t[k_idx][:, None, None]
        path = base[p_idx] + a * (x[p_idx] - base[p_idx])
        out = _backward(handle, ids[p_idx], mask[p_idx], fn, embeds=path, checkpointing=spec.checkpointing)
        w = weight_t[k_idx][:, None, None]
        # Zero-weight rows (the end points Gauss-Legendre adds for f(x'), f(x)) are skipped with
        # where, not multiplied: at a zero baseline every RMSNorm sits at its singular point and
        # the gradient there can be inf, and 0 * inf would poison the sum with NaN.
        grad_sum.index_add_(0, p_idx, torch.where(w > 0, out.embed_grad * w, torch.zeros((), device=x.device)))
        values[p_idx, k_idx] = out.values
    attributions = _masked(((x - base) * grad_sum).sum(-1), replaced.bool())
    score, baseline_score = values[:, -1], values[:, 0]
    delta = score - baseline_score
    err = (attributions.sum(-1) - delta).abs()
    rel = torch.where(delta.abs() > 1e-8, err / delta.abs().clamp_min(1e-8), torch.full_like(err, float("nan")))
    return IntegratedGradients(input_ids=ids.cpu(), mask=mask.cpu(), attributions=attributions.cpu(),
                               replaced=replaced.cpu(),
                               score=score.cpu(), baseline_score=baseline_score.cpu(), completeness_abs=err.cpu(),
                               completeness_error=rel.cpu(), steps=spec.steps, rule=spec.rule,
                               baseline=_baseline_label(spec.baseline), baselines=kinds)


# ----------------------------------------------------------------------------- per-component gradients

@dataclass(frozen=True, kw_only=True)
class GradientSpec:
    """Batching and memory options of :func:`attention_gradient_flow` and :func:`neuron_saliency`.

    ``queries`` (attention flow only): ``all`` sums gradient x pattern over every real
    (query, key) pair -- the first-order effect of the whole head's attention, at every
    position, on the metric; ``last`` keeps only the last query row -- what the final
    position reads directly, which misses heads that act earlier in the sequence.
    """

    batch_size: int = 8
    checkpointing: bool = False
    queries: Literal["all", "last"] = "all"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.queries not in ("all", "last"):
            raise ValueError("batch_size must be >= 1 and queries 'all' or 'last'")


def _pattern_reducer(queries: str) -> Reducer:
    def reduce(pattern: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        gxa = grad.float() * pattern.float()  # batch head query key
        if queries == "last":
            return _masked(gxa[:, :, -1, :], keep[:, None, :]).sum(-1)
        pair = keep[:, None, :, None] & keep[:, None, None, :]
        return _masked(gxa, pair).sum((-2, -1))
    return reduce


def _neuron_reducer(act: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # [batch, 2, d_mlp]: sums over positions of dM/da and of dM/da * a
    g = _masked(grad.float(), keep[..., None])
    return torch.stack([g.sum(1), (g * act.float()).sum(1)], dim=1)


def _head_reducer(z: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # z: batch pos head d_head -> batch head
    return _masked(grad.float() * z.float(), keep[..., None, None]).sum((1, 3))


def _per_batch(handle: ModelHandle, prompts: Sequence[str], metric: Metric, watch: Mapping[str, Reducer],
               spec: GradientSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    values, reduced = [], {name: [] for name in watch}
    label = f"gradients at {progress.count(len(watch), 'hook point')}: {progress.count(len(prompts), 'prompt')}"
    for chunk in progress.track(list(batches(prompts, spec.batch_size)), label, unit="batch", quiet=True):
        ids, mask = handle.encode(chunk)
        out = _backward(handle, ids, mask, metric, watch=watch, checkpointing=spec.checkpointing)
        values.append(out.values.cpu())
        for name in watch:
            reduced[name].append(out.reduced[name].cpu())
    return torch.cat(values), {n: torch.cat(parts) for n, parts in reduced.items()}  # reducers put batch first


@dataclass(frozen=True, kw_only=True, eq=False)
class AttentionFlow:
    """sum over (query, key) of dM/dA * A for every head: [prompt, layer, head]."""

    scores: Float[torch.Tensor, "prompt layer head"]
    metric: Float[torch.Tensor, "prompt"]
    queries: str

    @property
    def mean(self) -> Float[torch.Tensor, "layer head"]:
        return self.scores.mean(0)

    def top_heads(self, k: int = 10) -> tuple[tuple[Head, float], ...]:
        """Heads by |mean score|, largest first."""
        return _top(self.mean, k, lambda layer, i: Head(layer=layer, head=i))


def attention_gradient_flow(handle: ModelHandle, prompts: Sequence[str], metric: Metric | RefusalTokens,
                            spec: GradientSpec = GradientSpec()) -> AttentionFlow:
    """Gradient x attention pattern of every head, one backward pass per batch.

    dM/dA * A summed over positions is the first-order change of the metric when a head's
    attention weights are scaled towards zero, the gradient analogue of ablating its pattern.
    """
    _check_prompts(prompts)
    names = [hook_name(Pattern(layer=layer)) for layer in range(handle.n_layers)]
    values, reduced = _per_batch(handle, prompts, _as_metric(metric),
                                 {n: _pattern_reducer(spec.queries) for n in names}, spec)
    return AttentionFlow(scores=torch.stack([reduced[n] for n in names], dim=1), metric=values, queries=spec.queries)


@dataclass(frozen=True, kw_only=True, eq=False)
class Saliency:
    """Gradients of the metric per MLP neuron (``mlp.hook_post``) and per head (``attn.hook_z``).

    All sums run over a prompt's real positions: ``neuron_grad`` is the metric's derivative
    when the neuron's activation is shifted by the same amount everywhere;
    ``neuron_grad_x_act`` (and ``head_grad_x_act``) is the first-order estimate of the
    metric's change when the activation is scaled up by a fraction, i.e. minus the
    attribution-patching estimate of zero-ablating it.
    """

    neuron_grad: Float[torch.Tensor, "prompt layer d_mlp"]
    neuron_grad_x_act: Float[torch.Tensor, "prompt layer d_mlp"]
    head_grad_x_act: Float[torch.Tensor, "prompt layer head"]
    metric: Float[torch.Tensor, "prompt"]

    @property
    def mean_neuron_grad_x_act(self) -> Float[torch.Tensor, "layer d_mlp"]:
        return self.neuron_grad_x_act.mean(0)

    @property
    def mean_head_grad_x_act(self) -> Float[torch.Tensor, "layer head"]:
        return self.head_grad_x_act.mean(0)

    def top_neurons(self, k: int = 20) -> tuple[tuple[Neuron, float], ...]:
        return _top(self.mean_neuron_grad_x_act, k, lambda layer, i: Neuron(layer=layer, index=i))

    def top_heads(self, k: int = 10) -> tuple[tuple[Head, float], ...]:
        return _top(self.mean_head_grad_x_act, k, lambda layer, i: Head(layer=layer, head=i))


def neuron_saliency(handle: ModelHandle, prompts: Sequence[str], metric: Metric | RefusalTokens,
                    spec: GradientSpec = GradientSpec()) -> Saliency:
    """Every neuron's and head's gradient (x activation), all layers, one backward pass per batch."""
    _check_prompts(prompts)
    post = [hook_name(Neuron(layer=layer, index=0)) for layer in range(handle.n_layers)]
    z = [hook_name(Head(layer=layer, head=0)) for layer in range(handle.n_layers)]
    watch: dict[str, Reducer] = {**{n: _neuron_reducer for n in post}, **{n: _head_reducer for n in z}}
    values, reduced = _per_batch(handle, prompts, _as_metric(metric), watch, spec)
    neurons = torch.stack([reduced[n] for n in post], dim=1)  # prompt layer 2 d_mlp
    return Saliency(neuron_grad=neurons[:, :, 0], neuron_grad_x_act=neurons[:, :, 1],
                    head_grad_x_act=torch.stack([reduced[n] for n in z], dim=1), metric=values)


def _top(scores: torch.Tensor, k: int, make: Callable[[int, int], Any]) -> tuple[tuple[Any, float], ...]:
    flat = scores.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True)[:k]
    width = scores.shape[1]
    return tuple((make(int(i) // width, int(i) % width), float(flat[i])) for i in order)
