"""Record classes of the setup and behaviour results: phase 1, phase 2, the generations, the organism.

Field descriptions here are what reports/SCHEMA.md says about each key (it is generated
from them: ``python -m hypotheses.records --schema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypotheses.records_spec import (BOOL, EST, FLOAT, INT, STR, ListOf, MapOf, Null, Obj, Result, array, number,
                                     prompt_list)

TOKENS = ListOf(STR)
SIDES_FLOAT = Obj({"harmful": FLOAT, "harmless": FLOAT})


# ----------------------------------------------------------------------------- phase 1

@dataclass(frozen=True, kw_only=True)
class Device(Result):
    """The device the model runs on."""

    NAME = "phase1/device"
    requested: str = number(STR, "the --device asked for (auto, cpu, cuda, mps)")
    device: str = number(STR, "the device every weight sits on")
    torch: str = number(STR, "torch's version")


@dataclass(frozen=True, kw_only=True)
class Quant(Result):
    """The quantization the model loaded at."""

    NAME = "phase1/quant"
    quant: str = number(STR, "none, nf4 or int8")
    dtype: str = number(STR, "the weights' dtype, e.g. torch.float32")
    linear_types: list = number(TOKENS, "the class names of the model's linear layers")


@dataclass(frozen=True, kw_only=True)
class Hooks(Result):
    """Every hook the instruments read fired on a forward pass."""

    NAME = "phase1/hooks"
    n_hooks_checked: int = number(INT, "hooks that fired (component hooks, patterns, residual stream, embeddings)")
    quant: str = number(STR, "the quantization they were checked at")


@dataclass(frozen=True, kw_only=True)
class Memory(Result):
    """Measured and estimated memory of the loaded model."""

    NAME = "phase1/memory"
    load_peak_bytes: int = number(INT, "peak memory while loading the model")
    estimate: dict = number(MapOf(FLOAT, key="part"), "fixtures.memory.MemoryEstimate.to_dict(): weights, "
                            "activations, KV cache and runtime bytes, their total and n_params")
    measured_weight_bytes: int = number(INT, "the parameters' bytes as loaded")


# ----------------------------------------------------------------------------- phase 2

RATES = Obj({"refusal_rate": EST, "compliance_rate": EST, "degenerate_rate": EST, "n": INT})
EXAMPLE = Obj({"prompt": STR, "completion": STR, "refused": BOOL, "degenerate": BOOL})


@dataclass(frozen=True, kw_only=True)
class RefusalRates(Result):
    """How often the subject refuses, complies or answers degenerately on the test split."""

    NAME = "phase2/refusal_rates"
    harmful: dict = number(RATES, "rates on the harmful test prompts: the three classes of "
                           "instruments.behavior.classify (degenerate: no letter or digit, e.g. an empty answer; "
                           "compliance and degenerate rates are shown as n/a when absent)")
    harmless: dict = number(RATES, "the same on the harmless test prompts")
    examples_harmful: list = number(ListOf(EXAMPLE), "the first harmful test prompts with their completions")
    completions_truncated: bool = number(BOOL, "completions are cut to 80 characters (--refusal-show-completions "
                                         "off)")


@dataclass(frozen=True, kw_only=True)
class FirstToken(Result):
    """How sure the first answer token is: P(refusal tokens) and P(compliance tokens) on the test split."""

    NAME = "phase2/first_token"
    auc_harmful_vs_harmless: dict = number(EST, "ROC AUC of P(refusal) separating harmful from harmless prompts")
    refusal_tokens: list = number(TOKENS, "the refusal opening tokens, decoded")
    compliance_tokens: list = number(TOKENS, "the compliance opening tokens, decoded")
    token_source: str = number(STR, "where the token sets come from (the model's own train generations, or a "
                               "fallback)")
    mean_p_refusal: dict = number(SIDES_FLOAT, "mean P(refusal tokens) of each side")
    mean_p_compliance: dict = number(SIDES_FLOAT, "mean P(compliance tokens) of each side")
    p_refusal_harmful: Any = array(("prompt",), "P(refusal tokens) of each harmful test prompt")
    p_refusal_harmless: Any = array(("prompt",), "P(refusal tokens) of each harmless analogue")
    p_compliance_harmful: Any = array(("prompt",), "P(compliance tokens) of each harmful test prompt")
    p_compliance_harmless: Any = array(("prompt",), "P(compliance tokens) of each harmless analogue")
    prompts: list = prompt_list("the harmful test prompts")


@dataclass(frozen=True, kw_only=True)
class LogitLens(Result):
    """At which layer the refusal becomes readable: P(refusal tokens) read at each layer."""

    NAME = "phase2/logit_lens"
    first_layer_separating: int | None = number(Null(INT), "the first layer where the mean harmful - harmless "
                                                "difference exceeds half its maximum (null: never)")
    harmful: Any = array(("layer", "prompt"), "P(refusal tokens) of each harmful test prompt at each layer")
    harmless: Any = array(("layer", "prompt"), "the same for the harmless analogues")


@dataclass(frozen=True, kw_only=True)
class AttentionEntropy(Result):
    """Whether attention entropy differs between harmful prompts and their analogues, per layer."""

    NAME = "phase2/attention_entropy"
    p_values: list = number(ListOf(FLOAT, dim="layer"), "paired permutation p-value per layer (mean over heads)")
    p_adjusted_bh: list = number(ListOf(FLOAT, dim="layer"), "the same, Benjamini-Hochberg adjusted")
    layers_differing: list = number(ListOf(INT), "layers whose adjusted p-value rejects at alpha")
    mean_difference_by_layer: list = number(ListOf(FLOAT, dim="layer"), "mean entropy harmful - harmless")
    harmful: Any = array(("prompt", "layer", "head"), "attention entropy of the last position, harmful prompts")
    harmless: Any = array(("prompt", "layer", "head"), "the same for the harmless analogues")


@dataclass(frozen=True, kw_only=True)
class Generations(Result):
    """Greedy completions of one split's prompts of one side (``generations/<split>-<side>``, e.g.
    ``generations/test-harmful``), reused by every phase that needs them."""

    NAME = "generations/*"
    texts: list = number(ListOf(STR, dim="prompt"), "the completions")
    first_tokens: list = number(ListOf(INT, dim="prompt"), "the first generated token id of each")
    refused: list = number(ListOf(BOOL, dim="prompt"), "instruments.behavior.is_refusal of each completion")
    prompts: list = prompt_list("the prompts, in the split's order")


# ----------------------------------------------------------------------------- the organism

@dataclass(frozen=True, kw_only=True)
class OrganismBar(Result):
    """One check of the organism's bar on data it never trained on (``organism/bar-<check>``), when the
    subject is the organism."""

    NAME = "organism/bar-*"
    value: float = number(FLOAT, "the measured value")
    op: str = number(STR, '">=" or "<="')
    threshold: float = number(FLOAT, "the bar")
    met: bool = number(BOOL, "value op threshold")


@dataclass(frozen=True, kw_only=True)
class OrganismCard(Result):
    """The organism's card (shown in the report when the manifest holds none)."""

    NAME = "organism/card"
    card: str = number(STR, "the card, markdown")
    timings_seconds: dict = number(MapOf(FLOAT, key="step"), "seconds of each build step and the total")


CLASSES: tuple[type[Result], ...] = (Device, Quant, Hooks, Memory, RefusalRates, FirstToken, LogitLens,
                                     AttentionEntropy, Generations, OrganismBar, OrganismCard)
