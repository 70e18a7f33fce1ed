"""H3, a shared substrate: the same components serve every harm category.

Prediction (seed): refusal of weapons, malware, fraud, self-harm... requests runs through
one shared set of components, not one circuit per category.

Evidence needed:
- ablation (one line per category B): the top heads found on *other* categories' TRAIN
  pairs, mean-ablated, remove at least 80% as much of B's refusal-score gap as B's own
  top heads do, on B's VAL + TEST prompts (cross-category ablation matrix);
- direction: categories' harmful-minus-harmless activation directions on their TEST pairs
  (at the refusal direction's layer) are similar, mean pairwise cosine above 0.8.

Each category's heads are chosen by AtP on all of its TRAIN pairs; every ablation obeys
the side-effect rule; the category lines are Holm-corrected across categories.

Falsified by: a category whose refusal is removed only by its own components (ratio CI
below the bar), or dissimilar category directions. Bar: --refusal-h3-ratio.
"""

from __future__ import annotations

import pytest
import torch

from hypotheses.evidence import positions_label

pytestmark = [pytest.mark.h3, pytest.mark.integration]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "category" in metafunc.fixturenames:
        from fixtures.data import load_prompts
        from fixtures.plugin import CONFIG_KEY

        cfg = metafunc.config.stash[CONFIG_KEY]
        metafunc.parametrize("category", load_prompts(cfg.prompts).categories)


def test_h3_cross_category_matrix(study, recorder):
    if len(study.category_heads) < 2:
        pytest.skip(f"{len(study.category_heads)} harm categories with train and test pairs: H3 needs two")
    cc = study.cross_category
    matrix, overlap = cc.matrix, cc.overlap
    assert matrix.shape == (len(cc.categories),) * 2
    assert (abs(overlap.diagonal() - 1) < 1e-12).all(), "a category's heads overlap fully with themselves"
    sim_matrix, sim = study.category_similarity
    assert abs(sim_matrix.diagonal() - 1).max() < 1e-6, "cosine of a direction with itself is 1"
    recorder.save("h3/cross_category", numbers={
        "categories": list(cc.categories), "heads": {c: [f"L{h.layer}H{h.head}" for h in hs] for c, hs in cc.heads.items()},
        "similarity": sim.to_dict(), "n_eval": {c: int(cc.per_prompt[c][c].size) for c in cc.categories},
        "positions": positions_label(study.window), "n_pairs": sum(int(cc.per_prompt[c][c].size) for c in cc.categories),
        "n_find": cc.n_find, "side_effects": {c: {"kl_harmless": kl, "answer_ce_increase": ce}
                                              for c, (kl, ce) in cc.side_effects.items()},
        "similarity_split": "test"},
        arrays={"matrix": torch.as_tensor(matrix).float(), "overlap": torch.as_tensor(overlap).float(),
                "activation_correlation": torch.as_tensor(sim_matrix).float()})


def test_h3_category(study, record_verdict, category):
    lines = {v.evidence: v for v in [v for v in study.verdicts if v.claim == "H3"]}
    if category not in lines:
        pytest.skip(f"category {category!r} has no train or no test pairs, so it cannot be tested")
    record_verdict(lines[category])


def test_h3_direction_similarity(study, record_verdict):
    record_verdict(next(v for v in study.verdicts if v.claim == "H3" and v.evidence == "direction"))


def test_h3_overall(study, record_verdict):
    record_verdict([v for v in study.verdicts if v.claim == "H3"][-1])
