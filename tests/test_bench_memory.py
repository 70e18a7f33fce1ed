"""Each phase's heaviest workload on ``tiny``, its measured peak beside the per-phase estimate (recorded,
never asserted on).

For every phase, :func:`fixtures.memory_phases.phase_estimate` names the step that holds the most; the
benchmark runs that step's instrument call once inside ``fixtures.memory.measure`` and writes to
``benchmark.extra_info`` (the JSON of ``--benchmark-json``) the measured peak, the estimate and their
ratio, and the measured rise over the RSS before the call beside the step's estimated working set.
On ``tiny`` the working sets are a few MB, so the totals mostly compare the runtime term with this
process; the check at scale is a rehearsal's manifest (``./suite main --model llama3-8b-random``).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fixtures.config import RefusalConfig
from fixtures.memory import measure
from fixtures.memory_phases import PHASES, Estimator, Sizes
from fixtures.recording import measured_over_estimated
from instruments import ablation, behavior, direction, gradients
from instruments import patching as P
from instruments.components import AttnOut, Embed, Head, MlpOut, Neuron, Pattern, Resid, ResidMid, ResidPost, hook_name
from instruments.metrics import fallback_tokens, refusal_score
from instruments.positions import post_instruction_length

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_PAIRS = 4
CFG = RefusalConfig(model="tiny", batch_size=N_PAIRS, max_batch=16, ig_steps=4, max_new_tokens=8)


@pytest.fixture(scope="module")
def pairs(dataset):
    chosen = dataset.split("train")[:N_PAIRS]
    return [p.harmful for p in chosen], [p.harmless for p in chosen]


@pytest.fixture(scope="module")
def estimator(tiny, pairs):
    harmful, harmless = pairs
    longest = int(tiny.encode(harmful + harmless)[1].sum(1).max())
    sizes = Sizes(train=N_PAIRS, val=N_PAIRS, test=N_PAIRS, window=post_instruction_length(tiny))
    return Estimator(model_config=tiny.hf_model.config.to_dict(), quant="none", dtype="float32", device="cpu",
                     seq_len=longest, sizes=sizes)


def _every_hook(n_layers: int) -> list[str]:
    names = {hook_name(Embed())}
    for layer in range(n_layers):
        for kind in (Resid(layer=layer), ResidMid(layer=layer), ResidPost(layer=layer), AttnOut(layer=layer),
                     MlpOut(layer=layer), Head(layer=layer, head=0), Neuron(layer=layer, index=0),
                     Pattern(layer=layer)):
            names.add(hook_name(kind))
    return sorted(names)


def _workloads(tiny, pairs) -> dict:
    """The instrument call behind each step the estimator can name heaviest on ``tiny``."""
    harmful, harmless = pairs
    metric = partial(refusal_score, tokens=fallback_tokens(tiny.tokenizer))
    spec = P.PatchSpec(positions=post_instruction_length(tiny), max_batch=CFG.max_batch)
    every = [Head(layer=layer, head=h) for layer in range(tiny.n_layers) for h in range(tiny.n_heads)]
    every += [Neuron(layer=layer, index=i) for layer in range(tiny.n_layers) for i in range(0, tiny.d_mlp, 8)]
    z_post = [hook_name(c) for layer in range(tiny.n_layers) for c in (Head(layer=layer, head=0),
                                                                         Neuron(layer=layer, index=0))]

    def answers():
        return ablation.answer_scores(tiny, harmless, ["Sure, here is an answer."] * len(harmless),
                                      batch_size=CFG.batch_size)

    def cached(prompts, names):
        ids, mask = tiny.encode(prompts)
        with torch.no_grad():
            return tiny.bridge.run_with_cache(ids, attention_mask=mask, names_filter=names)[0][:, -1].clone()

    return {
        "every hook cached (2 prompts)": lambda: cached(harmful[:2], _every_hook(tiny.n_layers)),
        "generation (test split)": lambda: behavior.generate(tiny, harmful, max_new_tokens=CFG.max_new_tokens,
                                                             batch_size=CFG.batch_size),
        "AtP over heads and neurons (train pairs)": lambda: P.attribution_patch(tiny, harmful, harmless, metric, spec),
        "AtP over heads and neurons (test pairs)": lambda: P.attribution_patch(tiny, harmful, harmless, metric, spec),
        "integrated gradients": lambda: gradients.integrated_gradients(
            tiny, harmful[:1], metric, gradients.IGSpec(steps=CFG.ig_steps, batch_size=CFG.batch_size,
                                                        baseline=gradients.Baseline(prompts=tuple(harmless[:1])))),
        "gradient flow and saliency": lambda: gradients.neuron_saliency(
            tiny, harmful, metric, gradients.GradientSpec(batch_size=CFG.batch_size)),
        "circuit node activations": lambda: cached(harmful, z_post),
        "activation scatter (val and test)": lambda: direction.resid_at(tiny, harmful + harmless, positions=(-1,),
                                                                       batch_size=CFG.batch_size),
        "reference means (z, MLP post)": lambda: ablation.reference_activations(
            tiny, harmless, z_post, positions=post_instruction_length(tiny), batch_size=CFG.batch_size),
        "answer cross-entropy (harmless test)": answers,
        "cross-category side effects": answers,
        "effect-share curve (groups patched together)": lambda: P.patch_components(
            tiny, harmful, harmless, metric, [tuple(every[: len(every) // k]) for k in (1, 2, 4, 8)], spec),
        "reused stages (computed by H1's verdicts)": lambda: None,
    }


@pytest.mark.parametrize("phase", PHASES)
def test_bench_phase_memory(benchmark, tiny, pairs, estimator, phase):
    estimate = estimator(phase, CFG)
    workloads = _workloads(tiny, pairs)
    if estimate.step not in workloads:
        pytest.skip(f"{phase}: no tiny workload for its heaviest step {estimate.step!r}; add one to _workloads")
    readings = []

    def measured():
        with measure(tiny.device) as before:
            pass
        with measure(tiny.device) as reading:
            workloads[estimate.step]()
        readings.append((before, reading))

    benchmark.pedantic(measured, rounds=1, iterations=1)
    before, reading = readings[0]
    parts = estimate.to_dict()
    working = parts["steps"][estimate.step]
    rise = reading.peak_bytes - before.peak_bytes
    assert reading.peak_bytes > 0
    benchmark.extra_info.update({
        "phase": phase, "step": estimate.step, "model": tiny.alias, "device": tiny.device, "peak_kind": reading.kind,
        "measured_bytes": reading.peak_bytes, "estimated_bytes": estimate.total_bytes,
        "measured_over_estimated": measured_over_estimated(reading.peak_bytes, estimate.total_bytes),
        "measured_rise_bytes": rise, "estimated_working_bytes": working,
        "rise_over_working": measured_over_estimated(rise, working), "breakdown": parts["breakdown"],
        "seq_len": estimator.seq_len, "torch_threads": torch.get_num_threads()})
