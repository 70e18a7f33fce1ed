"""The explorer's computations on one loaded model: plain functions and one class, no Streamlit.

Every number comes from the instruments (behavior, metrics, ablation, direction,
patching), so the app shows what the phases measure. Results are memoised per prompt
(an interaction that only changes what is *shown* costs no forward pass), and every use
of the model holds one lock: Streamlit serves each browser session from its own thread,
and hooks attached by one session must never leak into another's forward pass.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch

from instruments import behavior, metrics
from instruments.ablation import AblationSpec, ablated, reference_activations
from instruments.components import (AttnOut, Component, Direction, Head, MlpOut, Neuron, Pattern, Resid,
                                    UnknownComponentError, hook_name, label, validate)
from instruments.direction import layer_projections
from instruments.patching import PatchSpec, patch_components
from instruments.positions import post_instruction_length, same_length
from reports.app.rundata import RunData

# Reference prompts for mean ablation: harmless TRAIN prompts (instruments.ablation's rule), this many.
N_REFERENCE = 16
# Train pairs generated at start-up to discover refusal tokens when the run has none.
N_DISCOVERY = 8
LABEL = re.compile(r"^L(\d+)([HN])(\d+)$")


@dataclass(frozen=True, kw_only=True)
class FirstToken:
    p_refusal: float
    p_compliance: float
    score: float  # metrics.refusal_score: log-odds of the refusal tokens


# ----------------------------------------------------------------------------- inputs

def check_prompt(handle, prompt: str, *, max_new_tokens: int) -> str | None:
    """A message for the page when ``prompt`` cannot be run, else None."""
    if not prompt or not prompt.strip():
        return "The prompt is empty: type a request (or pick a dataset pair) to probe the model."
    n = len(handle.tokenizer(handle.chat(prompt), add_special_tokens=False)["input_ids"])
    room = handle.n_ctx - max_new_tokens
    if n > room:
        return (f"The prompt is {n} tokens after chat formatting, but this model's context is {handle.n_ctx} "
                f"tokens and generation needs {max_new_tokens} more: shorten it to at most {room} tokens.")
    return None


def parse_components(text: str, handle) -> tuple[list[Component], list[str]]:
    """Heads and neurons typed by hand as labels (``L3H1, L5N20``); returns (components, problems)."""
    found: list[Component] = []
    problems: list[str] = []
    for raw in re.split(r"[\s,;]+", text.strip()):
        if not raw:
            continue
        m = LABEL.match(raw.upper())
        if m is None:
            problems.append(f"'{raw}' is not a label like L3H1 (head 1 of layer 3) or L5N20 (neuron 20 of layer 5)")
            continue
        layer, kind, index = int(m[1]), m[2], int(m[3])
        c = Head(layer=layer, head=index) if kind == "H" else Neuron(layer=layer, index=index)
        try:
            validate(c, n_layers=handle.n_layers, n_heads=handle.n_heads, d_mlp=handle.d_mlp, d_model=handle.d_model)
        except UnknownComponentError as err:
            problems.append(f"{raw}: {err}")
            continue
        found.append(c)
    return list(dict.fromkeys(found)), problems


def tokens_from_strings(tokenizer, refusal: Sequence[str], compliance: Sequence[str]) -> metrics.RefusalTokens | None:
    """Token ids of the run's recorded token strings (decoded single tokens); None if unusable."""
    vocab: dict[str, int] | None = None

    def ids(strings: Sequence[str]) -> list[int]:
        nonlocal vocab
        out = []
        for s in strings:
            enc = tokenizer(s, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                out.append(int(enc[0]))
                continue
            if vocab is None:  # a string that does not re-encode to one token: look it up by decoding
                vocab = {}
                for i in range(len(tokenizer)):
                    vocab.setdefault(tokenizer.decode([i]), i)
            if s in vocab:
                out.append(vocab[s])
        return list(dict.fromkeys(out))

    refusal_ids = ids(refusal)
    compliance_ids = [t for t in ids(compliance) if t not in refusal_ids]
    if not refusal_ids or not compliance_ids:
        return None
    return metrics.RefusalTokens(refusal_ids=tuple(refusal_ids), compliance_ids=tuple(compliance_ids),
                                 source="run")


def resolve_tokens(handle, run: RunData | None, dataset) -> tuple[metrics.RefusalTokens, str]:
    """The refusal/compliance first tokens, and a sentence saying where they came from.

    The run's own (phase2/first_token) when present, so the page's P(refusal) is the phases';
    otherwise discovered as the phases do, from greedy openings of a few harmful and harmless
    train prompts (metrics.discover_tokens, which falls back to fixed lists such as "I'm
    sorry"/"Sure" for a model that never refuses or never complies).
    """
    if run is not None and run.refusal_tokens:
        tokens = tokens_from_strings(handle.tokenizer, run.refusal_tokens, run.compliance_tokens)
        if tokens is not None:
            return tokens, f"from the run's phase2/first_token ({', '.join(map(repr, run.refusal_tokens))})"
    pairs = dataset.split("train")[:N_DISCOVERY]
    harmful = behavior.generate(handle, [p.harmful for p in pairs], max_new_tokens=4)
    harmless = behavior.generate(handle, [p.harmless for p in pairs], max_new_tokens=4)
    tokens = metrics.tokens_from_generations(handle.tokenizer, harmful, harmless)
    how = ("discovered from the model's openings on" if tokens.source == "discovered"
           else "the fallback lists (the model did not both refuse and comply on)")
    return tokens, f"{how} {len(pairs)} train pairs"


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One readable, unique label per token (plotly merges equal category labels)."""
    return [f"{i}:{tokenizer.decode([t]).replace(chr(10), '↵')}" for i, t in enumerate(ids)]


# ----------------------------------------------------------------------------- the probe

class Explorer:
    """One model, its refusal tokens and (optionally) a run; every computation the page shows."""

    def __init__(self, handle, *, tokens: metrics.RefusalTokens, token_source: str, run: RunData | None,
                 reference_prompts: Sequence[str], memo_size: int = 256) -> None:
        self.handle = handle
        self.tokens = tokens
        self.token_source = token_source
        self.run = run
        self.reference_prompts = tuple(reference_prompts)
        self.lock = threading.RLock()
        self._memo: OrderedDict[tuple, Any] = OrderedDict()
        self._memo_size = memo_size
        self._reference_acts = None

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
            value = compute()
            self._memo[key] = value
            if len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
            return value

    @property
    def direction(self) -> Direction | None:
        return self.run.direction if self.run is not None else None

    # -- ablation
    def _reference(self):
        """Mean activations of the harmless reference prompts at every hook an ablation can edit (once)."""
        if self._reference_acts is None:
            n = self.handle.n_layers
            names = [hook_name(site) for L in range(n) for site in
                     (Head(layer=L, head=0), Neuron(layer=L, index=0), Resid(layer=L), AttnOut(layer=L),
                      MlpOut(layer=L))]
            self._reference_acts = reference_activations(self.handle, self.reference_prompts, names)
        return self._reference_acts

    def ablation_context(self, components: Sequence[Component], method: str):
        spec = AblationSpec(method=method)
        return ablated(self.handle, list(components), spec=spec,
                       reference=self._reference() if method != "zero" and components else None)

    # -- views
    def first_token(self, prompt: str, components: tuple[Component, ...] = (), method: str = "zero") -> FirstToken:
        def compute() -> FirstToken:
            with self.ablation_context(components, method):
                logits = behavior.last_logits(self.handle, [prompt])
            return FirstToken(p_refusal=float(metrics.refusal_prob(logits, self.tokens)[0]),
                              p_compliance=float(metrics.compliance_prob(logits, self.tokens)[0]),
                              score=float(metrics.refusal_score(logits, self.tokens)[0]))
        return self._cached(("first", prompt, components, method if components else "zero"), compute)

    def layers(self, prompt: str) -> dict[str, Any]:
        """Per layer: logit-lens P(refusal), projection on the run's direction, mean attention entropy."""
        def compute() -> dict[str, Any]:
            entropy = behavior.attention_entropy(self.handle, [prompt])[0]  # layer head
            out = {"lens": [float(x) for x in behavior.logit_lens(self.handle, [prompt], self.tokens)[:, 0]],
                   "entropy": [float(x) for x in entropy.mean(-1)], "entropy_heads": entropy.tolist(),
                   "projection": None}
            if self.direction is not None:
                out["projection"] = [float(x) for x in layer_projections(self.handle, [prompt], self.direction)[:, 0]]
            return out
        return self._cached(("layers", prompt), compute)

    def circuit(self, prompt: str) -> dict[str, Any]:
        """How strongly each head and catalogued neuron fires at the prompt's last position.

        Heads: the norm of what the head writes into the residual stream (z @ W_O of its
        slice) and, with a run direction, that write's component along the direction.
        """
        def compute() -> dict[str, Any]:
            h = self.handle
            neurons = self.run.neurons if self.run is not None else ()
            names = [hook_name(Head(layer=L, head=0)) for L in range(h.n_layers)]
            names += sorted({hook_name(n.neuron) for n in neurons})
            with self.lock, torch.no_grad():
                ids, mask = h.encode([prompt])
                _, cache = h.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)
                unit = None if self.direction is None else self.direction.tensor()
                norms, along = torch.zeros(h.n_layers, h.n_heads), torch.zeros(h.n_layers, h.n_heads)
                for L in range(h.n_layers):
                    z = cache[hook_name(Head(layer=L, head=0))][0, -1].float()  # head d_head
                    w_o = h.bridge.blocks[L].attn.o.original_component.weight.float()  # d_model, head*d_head
                    writes = torch.einsum("hd,mhd->hm", z, w_o.view(h.d_model, h.n_heads, h.d_head))
                    norms[L] = writes.norm(dim=-1).cpu()
                    if unit is not None:
                        along[L] = (writes @ unit.to(writes.device)).cpu()
                acts = {n.neuron: float(cache[hook_name(n.neuron)][0, -1, n.neuron.index])
                        for n in neurons}
            return {"head_norms": norms, "head_along": along if unit is not None else None, "neuron_acts": acts}
        return self._cached(("circuit", prompt), compute)

    def attention(self, prompt: str, layer: int) -> tuple[list[str], torch.Tensor]:
        """Token labels and every head's attention pattern of ``layer``: [head, query, key]."""
        def compute():
            with self.lock, torch.no_grad():
                ids, mask = self.handle.encode([prompt])
                name = hook_name(Pattern(layer=layer))
                _, cache = self.handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=[name])
            return token_labels(self.handle.tokenizer, ids[0].tolist()), cache[name][0].float().cpu()
        return self._cached(("attention", prompt, layer), compute)

    def prompt_tokens(self, prompt: str) -> list[str]:
        return token_labels(self.handle.tokenizer, self.handle.encode([prompt])[0][0].tolist())

    # -- patching
    def _metric(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return partial(metrics.refusal_score, tokens=self.tokens)

    def patch(self, harmful: str, harmless: str, direction: str, groups: tuple[Component, ...]) -> dict[str, Any]:
        """Patch each component (one run apiece) from the other prompt of the pair into this one.

        ``denoising``: run the harmless prompt with the harmful prompt's activation (does the
        component carry refusal?); ``noising``: run the harmful prompt with the harmless one's
        (is it needed?). Effects are refusal scores; normalized 0 = unpatched, 1 = the other prompt.
        Every position is patched when the two prompts have the same token length, else only the
        post-instruction positions (the only ones that correspond).
        """
        def compute() -> dict[str, Any]:
            with self.lock:
                equal = bool(same_length(self.handle, [harmful], [harmless])[0])
                window = None if equal else post_instruction_length(self.handle)
                result = patch_components(self.handle, [harmful], [harmless], self._metric(), list(groups),
                                          PatchSpec(direction=direction, kl=False, max_batch=32, positions=window))
            return {"base": float(result.base[0]), "source": float(result.source[0]),
                    "positions": "all" if window is None else f"post-instruction (last {window})",
                    "patched": [float(x) for x in result.metric[:, 0]],
                    "normalized": [float(x) for x in result.normalized_per_prompt[:, 0]],
                    "labels": [label(g) for g in groups]}
        return self._cached(("patch", harmful, harmless, direction, groups), compute)

    # -- generation (never memoised: the user asked for it)
    def stream(self, prompt: str, *, max_new_tokens: int, components: Sequence[Component] = (),
               method: str = "zero") -> Iterator[str]:
        # The lock and the ablation hooks are held until the generator ends or is closed, so
        # callers close it (the page does, in a finally) when a rerun interrupts the stream.
        with self.lock, self.ablation_context(tuple(components), method):
            yield from behavior.stream_generate(self.handle, prompt, max_new_tokens=max_new_tokens)


def patch_component(kind: str, layer: int, *, head: int = 0, pos: int | None = None) -> Component:
    """The component the patching explorer's controls describe."""
    return {"resid": lambda: Resid(layer=layer, pos=pos), "attn": lambda: AttnOut(layer=layer),
            "mlp": lambda: MlpOut(layer=layer), "head": lambda: Head(layer=layer, head=head)}[kind]()


def sweep_groups(kind: str, n_layers: int, n_heads: int, *, pos: int | None = None) -> tuple[Component, ...]:
    """One group per layer (per head of every layer for ``head``) for the patching sweep."""
    if kind == "head":
        return tuple(Head(layer=L, head=h) for L in range(n_layers) for h in range(n_heads))
    return tuple(patch_component(kind, L, pos=pos) for L in range(n_layers))
