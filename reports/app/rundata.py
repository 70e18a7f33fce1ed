"""What the explorer reads from a run directory, through the record classes (hypotheses/records.py;
reports/SCHEMA.md is generated from them).

Everything here is optional: a run may lack any result (a phase skipped or failed), and
the explorer must then say so rather than substitute something else. A run recorded on
another model is rejected as a whole, since its components and direction would be
meaningless on this one. Nothing here touches Streamlit or the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from fixtures.models import model_alias
from hypotheses import records
from instruments.components import Direction, Head, Neuron, UnknownComponentError, from_json, label, validate


R = TypeVar("R", bound=records.Result)


class RunError(ValueError):
    """The run directory cannot be used with this model; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class RankedHead:
    head: Head
    effect: float | None  # normalized patching effect recorded in the run (phase3/heads ranking)


@dataclass(frozen=True, kw_only=True)
class CatalogueNeuron:
    neuron: Neuron
    atp: float | None
    activation_diff: float | None
    top_activation: float | None  # the largest activation among its recorded top examples


@dataclass(frozen=True, kw_only=True)
class RunData:
    """The parts of a run the explorer uses; empty fields mean "not in this run" (see ``missing``)."""

    path: Path
    model: str  # the model alias the run was recorded on
    heads: tuple[RankedHead, ...] = ()
    neurons: tuple[CatalogueNeuron, ...] = ()
    direction: Direction | None = None
    direction_refs: dict[str, list[float]] = field(default_factory=dict)  # mean projection by layer
    lens_refs: dict[str, list[float]] = field(default_factory=dict)  # mean P(refusal) by layer
    entropy_refs: dict[str, list[float]] = field(default_factory=dict)  # mean entropy by layer
    refusal_tokens: tuple[str, ...] = ()
    compliance_tokens: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # result names the explorer looked for and did not find
    notes: tuple[str, ...] = ()  # warnings worth showing (e.g. weights differ)


def _number(value: Any) -> float | None:
    if isinstance(value, dict):  # an Estimate.to_dict()
        value = value.get("value")
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _layer_means(arrays: dict[str, torch.Tensor | None], reduce: tuple[int, ...]) -> dict[str, list[float]]:
    """Mean over ``reduce`` axes of each recorded array, as a per-layer list (reference curves)."""
    return {side: [float(x) for x in a.float().nanmean(dim=reduce)] for side, a in arrays.items() if a is not None}


def check_model(manifest: dict[str, Any], model: str, describe: dict[str, Any]) -> list[str]:
    """Raise RunError when the run was recorded on another model; return softer notes."""
    recorded = manifest.get("model", {}).get("alias") or manifest.get("config", {}).get("model")
    if recorded is None:
        raise RunError("its manifest.json names no model (neither model.alias nor config.model), so it cannot "
                       "be matched to this one")
    recorded_alias = model_alias(str(recorded))
    if recorded_alias != model_alias(model):
        raise RunError(f"it was recorded on model '{recorded_alias}', but the explorer runs '{model_alias(model)}'. "
                       f"Restart with --model {recorded_alias}, or pass a run of {model_alias(model)}")
    notes = []
    sha = manifest.get("model", {}).get("weights_sha256")
    if sha and describe.get("weights_sha256") and sha != describe["weights_sha256"]:
        notes.append("the run's weights hash differs from the loaded model's (the model was rebuilt since): "
                     "its components may no longer match")
    return notes


def load_run(path: str | Path, *, model: str, describe: dict[str, Any]) -> RunData:
    """Read the explorer's view of a run directory, validated against the loaded model's shape."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise RunError(f"{path} is not a run directory (it has no manifest.json); pass runs/<model>/<run-id>")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{manifest_path} is not valid JSON ({err.msg})") from err
    notes = check_model(manifest, model, describe)
    shape = {k: describe[k] for k in ("n_layers", "n_heads", "d_mlp", "d_model")}
    missing: list[str] = []
    data: dict[str, Any] = {}

    def load(cls: type[R]) -> R | None:
        try:
            found = records.load(path, cls)
        except Exception as err:  # a corrupt file, or one not of its record class's format, is reported, never a crash
            notes.append(f"{cls.NAME} could not be read ({type(err).__name__}: {err})")
            return None
        if found is None:
            missing.append(cls.NAME)
        return found

    def component(raw: dict[str, Any], kind: type):
        try:
            c = from_json(raw)
            validate(c, **shape)
        except (UnknownComponentError, TypeError, KeyError) as err:
            raise RunError(f"it holds a component that does not exist in this model ({err})") from err
        if not isinstance(c, kind):
            raise RunError(f"expected a {kind.__name__}, found {label(c)}")
        return c

    if (heads := load(records.HeadRanking)) is not None:
        data["heads"] = tuple(RankedHead(head=component(row["component"], Head), effect=_number(row.get("effect")))
                              for row in heads.ranking or [])
    if (neurons := load(records.NeuronCatalogue)) is not None:
        data["neurons"] = tuple(
            CatalogueNeuron(neuron=component(row["component"], Neuron), atp=_number(row.get("atp")),
                            activation_diff=_number(row.get("activation_diff")),
                            top_activation=max((a for a in (_number(e.get("activation")) for e in
                                                             row.get("top_examples", [])) if a is not None),
                                               default=None))
            for row in neurons.catalogue or [])
    if (direction := load(records.RefusalDirection)) is not None and direction.direction is not None:
        vector = direction.direction.float().flatten()
        if vector.numel() != describe["d_model"]:
            raise RunError(f"its refusal direction has {vector.numel()} entries, the model's d_model is "
                           f"{describe['d_model']}")
        if not torch.isfinite(vector).all() or float(vector.norm()) == 0:
            raise RunError("its refusal direction is zero or not finite")
        data["direction"] = Direction(layer=int(direction.layer or 0), vector=tuple((vector / vector.norm()).tolist()))
        data["direction_refs"] = _layer_means({"harmful": direction.projection_harmful,
                                               "harmless": direction.projection_harmless}, (1,))
    elif direction is not None:
        notes.append("phase5/direction holds no 'direction' array: no direction to project on or ablate")
    if (first := load(records.FirstToken)) is not None:
        data["refusal_tokens"] = tuple(str(t) for t in first.refusal_tokens or [])
        data["compliance_tokens"] = tuple(str(t) for t in first.compliance_tokens or [])
    if (lens := load(records.LogitLens)) is not None:
        data["lens_refs"] = _layer_means({"harmful": lens.harmful, "harmless": lens.harmless}, (1,))
    if (entropy := load(records.AttentionEntropy)) is not None:
        data["entropy_refs"] = _layer_means({"harmful": entropy.harmful, "harmless": entropy.harmless}, (0, 2))
    return RunData(path=path, model=model_alias(model), missing=tuple(missing), notes=tuple(notes), **data)
