"""Phase 3.3, a catalogue of refusal neurons: a first pass at interpreting them.

For each of the study's top neurons (AtP over every MLP neuron, the top ones verified by
exact patching on train pairs): its exact effect with a CI, its mean activation difference
harmful - harmless at the last position on the ranking's train pairs, and the tokens (in
context) that activate it most across every train prompt, both sides.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from fixtures.data import Pair
from hypotheses import records
from hypotheses.evidence import Ranking, harmful, harmless, positions_label
from instruments import behavior
from instruments.components import Neuron, hook_name, label, to_json
from instruments.patching import LAST_ONLY

TOP_EXAMPLES = 5  # strongest activations kept per neuron
CONTEXT = (6, 2)  # tokens of context shown before and after (the token itself included) each example


@dataclass(frozen=True, kw_only=True)
class NeuronCatalogue:
    """One entry per neuron, in the ranking's order, each with its top-activating examples."""

    neurons: tuple[Neuron, ...]
    entries: tuple[dict[str, Any], ...]
    n_pairs: int  # pairs of the activation difference
    ranking: Ranking
    corpus_prompts: int  # prompts searched for top activations

    def record(self) -> records.NeuronCatalogue:
        return records.NeuronCatalogue(catalogue=list(self.entries), n_pairs=self.n_pairs,
                                       ranking_n_pairs=self.ranking.n_pairs,
                                       positions=positions_label(self.ranking.positions),
                                       corpus_prompts=self.corpus_prompts)


@torch.no_grad()
def last_position_acts(handle, prompts: Sequence[str], neurons: Sequence[Neuron], batch_size: int) -> np.ndarray:
    """Each neuron's activation at the last position, [prompt, neuron]."""
    names = {hook_name(n) for n in neurons}
    out = []
    for chunk in behavior.batches(prompts, batch_size):
        ids, mask = handle.encode(chunk)
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names,
                                                **LAST_ONLY)  # the logits are not read
        out.append(torch.stack([cache[hook_name(n)][:, -1, n.index].float().cpu() for n in neurons], 1))
    return torch.cat(out).numpy()


@torch.no_grad()
def top_examples(handle, prompts: Sequence[str], neurons: Sequence[Neuron],
                 batch_size: int) -> dict[Neuron, list[tuple]]:
    """The strongest activations of each neuron over every real token of every prompt:
    (activation, prompt index, position, token ids of the prompt)."""
    names = {hook_name(n) for n in neurons}
    best: dict[Neuron, list[tuple]] = defaultdict(list)  # min-heaps
    start = 0
    for chunk in behavior.batches(prompts, batch_size):
        ids, mask = handle.encode(chunk)
        _, cache = handle.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names,
                                                **LAST_ONLY)  # the logits are not read
        for n in neurons:
            act = cache[hook_name(n)][..., n.index].float().cpu()
            act = act.masked_fill(~mask.bool().cpu(), -torch.inf)
            values, flat = torch.topk(act.reshape(-1), TOP_EXAMPLES)
            for v, f in zip(values.tolist(), flat.tolist()):
                b, pos = divmod(f, act.shape[1])
                item = (v, start + b, pos, ids[b].tolist())
                heap = best[n]
                if len(heap) < TOP_EXAMPLES:
                    heapq.heappush(heap, item)
                elif v > heap[0][0]:
                    heapq.heapreplace(heap, item)
        start += len(chunk)
    return best


def neuron_catalogue(handle, ranking: Ranking, pairs: Sequence[Pair], corpus: Sequence[Pair],
                     batch_size: int) -> NeuronCatalogue:
    """``pairs`` give the activation difference, ``corpus`` (both sides) the top-activating tokens."""
    neurons = list(ranking.components)
    diff = (last_position_acts(handle, harmful(pairs), neurons, batch_size)
            - last_position_acts(handle, harmless(pairs), neurons, batch_size)).mean(0)
    prompts = harmful(corpus) + harmless(corpus)
    sides = ["harmful"] * len(corpus) + ["harmless"] * len(corpus)
    examples = top_examples(handle, prompts, neurons, batch_size)
    tok, before, after = handle.tokenizer, *CONTEXT
    entries = []
    for rank, (n, effect, lo, hi, atp, d) in enumerate(zip(neurons, ranking.effect, ranking.ci_low, ranking.ci_high,
                                                           ranking.atp, diff)):
        rows = [{"token": tok.decode([ids[pos]]),
                 "context": tok.decode(ids[max(0, pos - before):pos + after], skip_special_tokens=True),
                 "prompt": prompts[prompt], "activation": float(value), "side": sides[prompt]}
                for value, prompt, pos, ids in sorted(examples[n], reverse=True)]
        entries.append({"component": to_json(n), "label": label(n), "rank": rank, "atp": float(atp),
                        "exact": float(effect), "ci_low": float(lo), "ci_high": float(hi),
                        "activation_diff": float(d), "top_examples": rows})
    return NeuronCatalogue(neurons=tuple(neurons), entries=tuple(entries), n_pairs=len(pairs), ranking=ranking,
                           corpus_prompts=len(prompts))
