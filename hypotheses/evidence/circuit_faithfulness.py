"""How much of the refusal score a circuit keeps by itself, beside size-matched random circuits
(the faithfulness of Wang et al. 2022 and Hanna et al. 2024).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fixtures.config import RefusalConfig
from fixtures.data import Pair
from hypotheses.evidence.bootstrap import boot_estimate, boot_index
from hypotheses.evidence.prompts import harmful, harmless, metric_for, patch_spec
from instruments import stats
from instruments.components import Component, Head, Neuron, label
from instruments.metrics import RefusalTokens


@dataclass(frozen=True, kw_only=True)
class Faithfulness:
    """How much of the refusal score a circuit keeps by itself, beside size-matched random circuits.

    F = (m(circuit alone) - m(harmless)) / (m(harmful) - m(harmless)) on held-out pairs: the
    harmful prompt runs with every head and neuron outside the circuit patched from its
    harmless analogue at the study's positions, the intervention that found the circuit
    (Wang et al. 2022; Hanna et al. 2024). 1 = the circuit alone keeps all of refusal, 0 =
    no more than the harmless run. ``random`` is the mean F of ``n_random`` random circuits
    with the same number of heads and neurons in the same layers; ``difference`` is
    F - mean random F, with a paired bootstrap over prompts.
    """

    circuit: tuple[Component, ...]
    value: stats.Estimate
    random: stats.Estimate
    difference: stats.Estimate
    n_random: int
    positions: int | None
    n_pairs: int
    score_harmful: float
    score_harmless: float
    score_circuit: float


def matched_random_circuit(handle, circuit: Sequence[Component], *, seed: int) -> tuple[Component, ...]:
    """Random heads and neurons, one per circuit component and in its layer, none in the circuit.

    A set holding more than half of a kind (at 8B, H1's top 5% of heads + neurons can hold most
    of the 1,024 heads) leaves no room for a disjoint control: the control then takes every
    component of that kind outside the set and draws the rest from the set itself, the least
    overlap a random set of the same size can have (:func:`forced_overlap` counts it).
    """
    rng = np.random.default_rng(seed)
    taken = set(circuit)
    out: list[Component] = []
    for c in circuit:
        for _ in range(1000):
            pick: Component = (Head(layer=c.layer, head=int(rng.integers(handle.n_heads))) if isinstance(c, Head)
                               else Neuron(layer=c.layer, index=int(rng.integers(handle.d_mlp))))
            if pick not in taken:
                break
        else:  # the circuit holds (nearly) all of this layer: the nearest layer with a free one of its kind
            pick = _nearest_free(handle, c, taken, rng)
            if pick is None:  # none of this kind is left outside the set: a member the control has not drawn yet
                members = sorted({m for m in circuit if type(m) is type(c)} - set(out), key=label)
                pick = members[int(rng.integers(len(members)))]
        taken.add(pick)
        out.append(pick)
    return tuple(out)


def forced_overlap(handle, circuit: Sequence[Component]) -> int:
    """Components a same-size random set must share with ``circuit`` (0 unless it holds over half of a kind)."""
    shared = 0
    for kind, pool in ((Head, handle.n_layers * handle.n_heads), (Neuron, handle.n_layers * handle.d_mlp)):
        k = len({c for c in circuit if isinstance(c, kind)})
        shared += max(0, 2 * k - pool)
    return shared


def _nearest_free(handle, c: Component, taken: set, rng: np.random.Generator) -> Component | None:
    size = handle.n_heads if isinstance(c, Head) else handle.d_mlp
    make = (lambda layer, i: Head(layer=layer, head=i)) if isinstance(c, Head) else (
        lambda layer, i: Neuron(layer=layer, index=i))
    for layer in sorted(range(handle.n_layers), key=lambda x: (abs(x - c.layer), x)):
        free = [make(layer, i) for i in range(size) if make(layer, i) not in taken]
        if free:
            return free[int(rng.integers(len(free)))]
    return None


def faithfulness(handle, pairs: Sequence[Pair], tokens: RefusalTokens, cfg: RefusalConfig,
                 circuit: Sequence[Component], *, n_random: int = 20) -> Faithfulness:
    from instruments.patching import patch_complement

    circuit = tuple(c for c in circuit if isinstance(c, (Head, Neuron)))
    randoms = [matched_random_circuit(handle, circuit, seed=cfg.seed + 100 + i) for i in range(n_random)]
    res = patch_complement(handle, harmful(pairs), harmless(pairs), metric_for(tokens), [circuit, *randoms],
                           patch_spec(handle, cfg, direction="noising"))
    metric = res.metric.double().numpy()  # [1 + n_random, prompt]
    clean, corrupted = res.clean.double().numpy(), res.corrupted.double().numpy()

    def f(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:  # rows [g, P], idx [B, P] -> [g, B]
        lo, hi = corrupted[idx].mean(-1), clean[idx].mean(-1)
        return (rows[:, idx].mean(-1) - lo) / (hi - lo)

    full = np.arange(clean.size)[None]
    idx = boot_index(clean.size, cfg, salt=50)
    with np.errstate(all="ignore"):
        point, boot = f(metric, full)[:, 0], f(metric, idx)
    own = boot_estimate(point[0], boot[0], cfg, clean.size)
    rand = boot_estimate(point[1:].mean(), boot[1:].mean(0), cfg, clean.size)
    diff = boot_estimate(point[0] - point[1:].mean(), boot[0] - boot[1:].mean(0), cfg, clean.size)
    return Faithfulness(circuit=circuit, value=own, random=rand, difference=diff, n_random=n_random,
                        positions=res.positions, n_pairs=res.n_pairs, score_harmful=float(clean.mean()),
                        score_harmless=float(corrupted.mean()), score_circuit=float(metric[0].mean()))
