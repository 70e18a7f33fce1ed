"""The organism meets its bar on data it never trained on.

Unlike the hypotheses, this is a property of an instrument we built: an organism that
does not refuse would make every later phase measure noise, so a missed bar fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.phase2, pytest.mark.integration]


@pytest.fixture(scope="module")
def organism_manifest(refusal_config, subject):
    if refusal_config.model != "organism":
        pytest.skip(f"the subject is {refusal_config.model!r}, not the organism")
    from fixtures.organism import ensure_organism

    folder = ensure_organism(base=refusal_config.organism_base)
    return folder, json.loads((Path(folder) / "manifest.json").read_text())


def test_organism_is_the_subject(organism_manifest, subject):
    _, manifest = organism_manifest
    assert subject.weights_sha256 == manifest["weights_sha256"]


@pytest.mark.parametrize("check", ["refusal_harmful_test", "refusal_harmless_test", "refusal_style_harmful",
                                   "refusal_style_harmless", "ce_increase", "auc_first_refusal_token"])
def test_organism_meets_its_bar(organism_manifest, check, recorder):
    _, manifest = organism_manifest
    result = manifest["evaluation"]["bar"][check]
    recorder.save(f"organism/bar-{check}", numbers=result)
    # the recipe meets every check, so a recipe or data change that misses one fails CI; a rebuilt
    # organism is measured afresh, so no number is pinned
    assert result["met"], (f"organism misses its bar on {check}: {result['value']} (needs {result['op']} "
                           f"{result['threshold']}); docs/organism.md says why the recipe is as it is")


def test_organism_card_and_build_time(organism_manifest, recorder):
    from fixtures.organism import card

    folder, manifest = organism_manifest
    text = card(folder)
    assert "never trained on" in text and str(manifest["evaluation"]["refusal_rate_harmful_test"]) in text
    assert manifest["timings_seconds"]["total"] > 0 and len(manifest["loss_curve"]) == manifest["recipe"]["steps"]
    recorder.save("organism/card", numbers={"card": text, "timings_seconds": manifest["timings_seconds"]})
