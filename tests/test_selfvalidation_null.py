"""The suite validates itself (issue 5): no hypothesis is supported on null models.

Nulls: the seeded random ``tiny`` Llama at several seeds (no refusal behaviour at all),
and the planted model (``fixtures.planted``) with harmful and harmless swapped within
pairs at random (the mechanism is intact, but the labels no longer say which prompt
triggers it). In at least 95% of them no hypothesis may come out ``supported``; the
false-positive rate is printed, written to a JSON file and recorded as a property.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from fixtures.planted import build_planted, null_models, selfvalidation_config

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

N_RANDOM, N_SHUFFLED = 12, 8  # 20 nulls
HYPOTHESES = ("H1", "H2", "H3")
MAX_FALSE_POSITIVE_RATE = 0.05


def test_no_hypothesis_is_supported_on_null_models(tmp_path, record_property):
    from hypotheses.study import StudyData, run_study

    # smaller sweeps than the known answer: the behaviour gate that keeps nulls inconclusive does not
    # depend on them, and 20 studies must fit the unit-test budget
    cfg = selfvalidation_config(model="null", patch_pairs=8, top_neurons=10, direction_positions=1)
    rows = []
    for null in null_models(n_random=N_RANDOM, n_shuffled=N_SHUFFLED, planted=build_planted(seed=0)):
        start = time.time()
        study = run_study(null.handle, StudyData.from_prompt_set(null.dataset), null.tokens, cfg)
        overall = {claim: study.overall(claim) for claim in HYPOTHESES}
        behaviour = study.behaviour
        rows.append({"null": null.name, "dataset": null.dataset.path, "overall": overall,
                     "false_positive": any(s == "supported" for s in overall.values()),
                     "behaviour_present": bool(behaviour.present), "behaviour": behaviour.reason(cfg.alpha),
                     "seconds": round(time.time() - start, 1)})
    n_fp = sum(r["false_positive"] for r in rows)
    rate = n_fp / len(rows)
    summary = {"n_nulls": len(rows), "n_random_tiny": N_RANDOM, "n_label_shuffled": N_SHUFFLED,
               "false_positives": n_fp, "false_positive_rate": rate,
               "refuted_anywhere": sum(any(s == "refuted" for s in r["overall"].values()) for r in rows),
               "behaviour_present": sum(r["behaviour_present"] for r in rows), "nulls": rows}
    out = tmp_path / "null_false_positive_rate.json"
    out.write_text(json.dumps(summary, indent=2))
    record_property("null_false_positive_rate", rate)
    record_property("null_summary", json.dumps({k: v for k, v in summary.items() if k != "nulls"}))
    print(f"null models: {n_fp}/{len(rows)} with a supported hypothesis (false-positive rate {rate:.1%}); "
          f"details in {out}")
    for r in rows:
        print(f"  {r['null']:<24} {r['overall']} present={r['behaviour_present']} ({r['seconds']} s)")
    assert len(rows) >= 20
    assert n_fp <= math.floor(MAX_FALSE_POSITIVE_RATE * len(rows)), json.dumps(summary, indent=2)
