"""The pre-registration: what every line will be decided on, fixed before a test pair is scored.

:func:`record` reads the claims table, the configuration and the study's *selection*
stages (train and val only) and returns a JSON-able record; the study hashes it and the
fixture writes it to ``preregistration.json``. Every verdict cites the hash, so a reader
can check that the bars, corrections and components were not changed after the result.
"""

from __future__ import annotations

from typing import Any

from hypotheses import claims
from hypotheses.decisions import POWER
from hypotheses.structure import val_contrast
from instruments.components import Head, Neuron, label


def _components(comps) -> dict[str, Any]:
    heads = [label(c) for c in comps if isinstance(c, Head)]
    neurons = [label(c) for c in comps if isinstance(c, Neuron)]
    from fixtures.storage import stable_hash

    return {"count": len(comps), "heads": heads, "n_neurons": len(neurons), "neurons": neurons[:200],
            "sha256": stable_hash("components", [label(c) for c in comps])}


def undecided(cfg, sizes: dict[str, int], model: dict[str, str]) -> dict[str, Any]:
    """The record of a run that decided no verdict (e.g. ``-m "phase1 or phase2"``): its bars and
    rules, and no selection, so that every run states what it would have been held to."""
    out = _rules(cfg)
    out |= {"splits": dict(sizes), "model": dict(model), "selected": None,
            "note": "this run decided no verdict: nothing was selected and no test pair was scored for a hypothesis"}
    return out


def _rules(cfg) -> dict[str, Any]:
    lines = []
    for claim in claims.CLAIMS:
        for ln in claim.lines:
            lines.append({"claim": claim.id, "evidence": "<each category>" if ln.per_category else ln.evidence,
                          "statistic": ln.statistic, "bar": None if ln.bar is None else float(ln.bar(cfg)),
                          "side": ln.side, "control": ln.control, "result": ln.result,
                          "correction": claim.correction, "decided_by": "study" if claim.in_study else "its own test"})
    return {
        "claims": [{"id": c.id, "kind": c.kind, "title": c.title(cfg)} for c in claims.CLAIMS],
        "lines": lines,
        "rules": {"alpha": cfg.alpha, "ci": f"{1 - cfg.alpha:.0%} two-sided bootstrap", "power_for_mde": POWER,
                  "supported": "every line's CI above its bar (intersection-union test)",
                  "refuted": "a line's CI below its bar and its Holm-adjusted one-sided p-value below alpha / 2",
                  "side_effects": {"max_kl": cfg.max_kl, "max_ce": cfg.max_ce},
                  "controls": "ablation lines decide on circuit minus size- and layer-matched random set",
                  "attribution": f"AtP, {cfg.atp_rule} rule; candidates: AtP's top {cfg.head_candidates} heads and "
                                 f"the exact sweep's top {cfg.min_heads}"},
        "bars": {f.name: getattr(cfg, f.name) for f in cfg.fields()
                 if f.name in ("h1_fraction", "h1_share", "h1_drop", "h3_ratio", "head_effect", "min_heads",
                               "ablation_drop", "gradient_r", "max_kl", "max_ce", "alpha", "direction_kl",
                               "direction_induce", "direction_prune")},
    }


def record(study) -> dict[str, Any]:
    cfg, data = study.cfg, study.data
    out = _rules(cfg)
    out |= {
        "splits": {"train": len(data.train), "val": len(data.val), "test": len(data.test),
                   "ranking_pairs": len(study.train_pairs), "sweep_pairs": min(cfg.sweep_pairs, len(study.train_pairs)),
                   "neuron_pairs": min(cfg.neuron_pairs, len(study.train_pairs)), "depth_pairs": cfg.depth_pairs,
                   "direction_val_pairs": cfg.direction_val_pairs},
        "model": {"alias": getattr(study.handle, "alias", ""), "weights_sha256": getattr(study.handle, "weights_sha256", "")},
    }
    if not study.behaviour.present and not cfg.rehearsal:
        out["selected"] = None
        out["note"] = "no refusal behaviour to explain (phase 2's gate): nothing was selected, every line is inconclusive"
        return out
    sel = study.direction[1]
    out["selected"] = {
        "head_candidates": [label(h) for h in study.candidates],
        "ranking": [label(h) for h in study.ranking.components],
        "h1_components": _components(study.h1_set),
        "h1_parameter_components": _components(study.h1_parameter_set),
        "circuit": _components(study.circuit),
        "controls": {k: _components(v) for k, v in study.controls.items()},
        # members a control had to share with its set (0 unless the set holds over half of a kind)
        "controls_overlap": {k: len(set(v) & set(chosen)) for k, v in study.controls.items()
                             for chosen in [{"h1": study.h1_set, "h1_parameters": study.h1_parameter_set,
                                             "circuit": study.circuit,
                                             "heads": study.ranking.top(cfg.top_heads)}[k]]},
        "direction": {"layer": sel.layer, "pos": sel.pos, "meets_thresholds": sel.meets_thresholds},
        "detection_peak_layer_val": val_contrast(*study.detection_val, cfg)[1],
        "category_heads": {c: [label(h) for h in hs] for c, hs in study.category_heads.items()},
    }
    return out
