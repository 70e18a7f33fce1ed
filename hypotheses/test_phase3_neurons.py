"""Phase 3.3, a catalogue of refusal neurons: a first pass at interpreting them.

Neurons are ranked by attribution patching over every MLP neuron (one backward pass),
the top ``--refusal-top-neurons`` verified by exact patching. For each: its exact effect
with a CI, its mean activation difference harmful - harmless at the last position, and
the tokens (in context) that activate it most across the train prompts (both sides).
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np
import pytest
import torch

from hypotheses.evidence import harmful, harmless, positions_label
from instruments import behavior
from instruments.components import Neuron, hook_name, label, to_json

pytestmark = [pytest.mark.phase3, pytest.mark.integration]

TOP_EXAMPLES = 5


@torch.no_grad()
def _last_position_acts(subject, prompts, neurons, batch_size) -> np.ndarray:
    names = {hook_name(n) for n in neurons}
    out = []
    for chunk in behavior.batches(prompts, batch_size):
        ids, mask = subject.encode(chunk)
        _, cache = subject.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
        out.append(torch.stack([cache[hook_name(n)][:, -1, n.index].float().cpu()
                                for n in neurons], 1))
    return torch.cat(out).numpy()  # [prompt, neuron]


@torch.no_grad()
def _top_examples(subject, prompts, sides, neurons, batch_size) -> dict[Neuron, list[tuple]]:
    """The strongest activations of each neuron over every real token of every prompt."""
    names = {hook_name(n) for n in neurons}
    best: dict[Neuron, list[tuple]] = defaultdict(list)  # min-heaps of (activation, prompt, pos)
    start = 0
    for chunk in behavior.batches(prompts, batch_size):
        ids, mask = subject.encode(chunk)
        _, cache = subject.bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n in names)
        for n in neurons:
            act = cache[hook_name(n)][..., n.index].float().cpu()
            act = act.masked_fill(~mask.bool().cpu(), -torch.inf)
            values, flat = torch.topk(act.reshape(-1), TOP_EXAMPLES)
            for v, f in zip(values.tolist(), flat.tolist()):
                b, pos = divmod(f, act.shape[1])
                item = (v, start + b, pos, ids[b].tolist())
                heap = best[n]
                if len(heap) < TOP_EXAMPLES:
                    heapq.heappush(heap, item[:3] + (item[3],))
                elif v > heap[0][0]:
                    heapq.heapreplace(heap, item[:3] + (item[3],))
        start += len(chunk)
    return best


def test_neuron_catalogue(subject, study, recorder, dataset, refusal_config):
    ranking = study.neurons
    neurons = list(ranking.components)
    assert len(neurons) == min(refusal_config.top_neurons, subject.n_layers * subject.d_mlp)
    assert len(set(neurons)) == len(neurons), "a neuron appears twice in the catalogue"
    bs = refusal_config.batch_size
    pairs = study.train_pairs
    diff = (_last_position_acts(subject, harmful(pairs), neurons, bs)
            - _last_position_acts(subject, harmless(pairs), neurons, bs)).mean(0)
    corpus = dataset.split("train")
    prompts = [p.harmful for p in corpus] + [p.harmless for p in corpus]
    sides = ["harmful"] * len(corpus) + ["harmless"] * len(corpus)
    examples = _top_examples(subject, prompts, sides, neurons, bs)
    tok = subject.tokenizer
    catalogue = []
    for rank, (n, effect, lo, hi, atp, d) in enumerate(zip(neurons, ranking.effect, ranking.ci_low, ranking.ci_high,
                                                           ranking.atp, diff)):
        rows = []
        for value, prompt, pos, ids in sorted(examples[n], reverse=True):
            assert np.isfinite(value), "a top activation must sit on a real token"
            rows.append({"token": tok.decode([ids[pos]]), "context": tok.decode(ids[max(0, pos - 6):pos + 2],
                                                                               skip_special_tokens=True),
                         "prompt": prompts[prompt], "activation": float(value), "side": sides[prompt]})
        catalogue.append({"component": to_json(n), "label": label(n), "rank": rank, "atp": float(atp),
                          "exact": float(effect), "ci_low": float(lo), "ci_high": float(hi),
                          "activation_diff": float(d), "top_examples": rows})
    recorder.save("phase3/neurons", numbers={"catalogue": catalogue, "n_pairs": len(pairs),
                                             "ranking_n_pairs": study.neurons.n_pairs,
                                             "positions": positions_label(study.neurons.positions),
                                             "corpus_prompts": len(prompts)})
