"""Peak memory and time of each instrument on the subject, recorded (never asserted on time).

Each benchmark runs one instrument once on a few train pairs inside
``fixtures.memory.measure``, and records its peak (per-phase peak RSS on the CPU,
``max_memory_allocated`` on CUDA) in ``benchmark.extra_info``, so the JSON under
.benchmarks/ carries the memory profile of the whole instrument set.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fixtures.memory import measure
from instruments import ablation, behavior, direction, gradients
from instruments import patching as P
from instruments.components import Head, Neuron
from instruments.metrics import fallback_tokens, refusal_score
from instruments.positions import post_instruction_length

pytestmark = [pytest.mark.slow, pytest.mark.integration]

N_PAIRS = 4


@pytest.fixture(scope="module")
def pairs(dataset):
    chosen = dataset.split("train")[:N_PAIRS]
    return [p.harmful for p in chosen], [p.harmless for p in chosen]


def _cases(subject, pairs):
    harmful, harmless = pairs
    tokens = fallback_tokens(subject.tokenizer)
    metric = partial(refusal_score, tokens=tokens)
    last = subject.n_layers - 1
    window = post_instruction_length(subject)  # the positions that correspond in every pair
    heads = [Head(layer=last, head=h) for h in range(subject.n_heads)]
    neurons = [Neuron(layer=last, index=i) for i in range(16)]
    return {
        "exact_heads_one_layer": lambda: P.patch_heads(subject, harmful, harmless, metric,
                                                       P.PatchSpec(layers=(last,), kl=False, positions=window)),
        "atp_all_heads_neurons": lambda: P.attribution_patch(subject, harmful, harmless, metric,
                                                             P.PatchSpec(positions=window)),
        "mean_ablation_forward": lambda: _ablated_logits(subject, harmful, harmless, heads + neurons),
        "neuron_saliency": lambda: gradients.neuron_saliency(subject, harmful[:2], metric),
        "integrated_gradients": lambda: gradients.integrated_gradients(subject, harmful[:1], metric,
                                                                      gradients.IGSpec(steps=16, baseline=gradients.Baseline(
                                                                          prompts=tuple(harmless[:1])))),
        "direction_candidates": lambda: direction.candidate_directions(subject, harmful, harmless),
        "generation_16_tokens": lambda: behavior.generate(subject, harmful, max_new_tokens=16),
    }


def _ablated_logits(subject, harmful, harmless, components):
    spec = ablation.AblationSpec(method="mean")
    with ablation.ablated(subject, components, spec=spec, reference=harmless):
        return behavior.last_logits(subject, harmful)


CASES = ("exact_heads_one_layer", "atp_all_heads_neurons", "mean_ablation_forward", "neuron_saliency",
         "integrated_gradients", "direction_candidates", "generation_16_tokens")


@pytest.mark.parametrize("name", CASES)
def test_bench_instrument_memory(benchmark, subject, pairs, name):
    run = _cases(subject, pairs)[name]
    readings = []

    def measured():
        with measure(subject.device) as reading:
            out = run()
        readings.append(reading)
        return out

    result = benchmark.pedantic(measured, rounds=1, iterations=1)
    assert result is not None and readings[0].peak_bytes > 0
    benchmark.extra_info.update({"instrument": name, "model": subject.alias, "device": subject.device,
                                 "quant": subject.quant, "n_pairs": N_PAIRS, "peak_bytes": readings[0].peak_bytes,
                                 "peak_kind": readings[0].kind, "torch_threads": torch.get_num_threads()})
