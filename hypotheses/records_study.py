"""Record classes of the study's phases: localization (3), ablation and gradients (4), circuit and
direction (5). Field descriptions are what reports/SCHEMA.md says about each key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hypotheses.records_spec import (ANY, BOOL, COMPONENT, EST, FLOAT, INT, STR, ListOf, MapOf, Null, Obj, Result,
                                     Scalar, array, number, optional, prompt_list)

LABELS = ListOf(STR)
FLOATS = ListOf(FLOAT)
POSITIONS_TEXT = "the positions patched or ablated, e.g. \"post-instruction (last 6)\" or \"all\""
_LAST_N = re.compile(r"post-instruction \(last (\d+)\)")


def positions_in_words(recorded: Any) -> str:
    """A recorded positions label in a sentence's words: "post-instruction (last 6)" -> "the last 6
    post-instruction positions", "all" -> "every position"."""
    text = str(recorded or "").strip()
    if not text:
        return "the positions (not recorded)"
    if text == "all":
        return "every position"
    found = _LAST_N.fullmatch(text)
    return f"the last {found[1]} post-instruction positions" if found else f"the {text} positions"


# ----------------------------------------------------------------------------- phase 3


@dataclass(frozen=True, kw_only=True)
class LayerPatching(Result):
    """3.1: activation patching of the residual stream per (layer, position) and of the attention and MLP
    outputs per layer, in both directions. Each ``<member>`` is ``denoising`` (the harmless run with the
    harmful activation patched in) or ``noising`` (the reverse)."""

    NAME = "phase3/layer_patching"
    positions: list = number(ListOf(INT, dim="pos"), "the positions patched, counted from the end (e.g. [-6..-1])")
    position_labels: list = number(ListOf(STR, dim="pos"), "the first pair's harmful tokens at those positions")
    n_pairs: int = number(INT, "train pairs patched")
    block_positions: str = number(STR, "the positions the attention and MLP outputs were patched at, e.g. "
                                  "\"post-instruction (last 6)\" or \"all\"")
    metric: str = number(STR, "the metric patched (the refusal score)")
    resid: dict = array(("layer", "pos"), "normalized effect (0 = unpatched, 1 = source run)", key="resid.<member>")
    resid_kl: dict = array(("layer", "pos"), "mean KL of the patched run to the clean run", key="resid.<member>.kl")
    attn_out: dict = array(("layer",), "normalized effect of each layer's attention output", key="attn_out.<member>")
    attn_out_kl: dict = array(("layer",), "mean KL to the clean run", key="attn_out.<member>.kl")
    mlp_out: dict = array(("layer",), "normalized effect of each layer's MLP output", key="mlp_out.<member>")
    mlp_out_kl: dict = array(("layer",), "mean KL to the clean run", key="mlp_out.<member>.kl")
    prompts: list = prompt_list("the harmful prompts of the pairs patched", dim="pair")


RANKED_HEAD = Obj({"component": COMPONENT, "label": STR, "effect": FLOAT, "ci_low": FLOAT, "ci_high": FLOAT,
                   "atp": FLOAT})
VERIFIED = Obj({"heads": ListOf(STR, dim="candidate"), "effect": ListOf(FLOAT, dim="candidate"),
                "se": ListOf(FLOAT, dim="candidate"), "p_above": ListOf(FLOAT, dim="candidate"), "n_pairs": INT})


@dataclass(frozen=True, kw_only=True)
class HeadRanking(Result):
    """3.2: every head ranked by attribution patching, the top candidates verified exactly (AtP*: Kramar et
    al. 2024), beside a descriptive exact sweep of every head."""

    NAME = "phase3/heads"
    ranking: list = number(ListOf(RANKED_HEAD), "the top 30 heads sorted by effect (CI over prompts; atp: the AtP "
                           "estimate on the same normalized scale)")
    atp_vs_exact_spearman: dict = number(EST, "rank agreement of AtP with the exact sweep over every head")
    n_heads: int = number(INT, "heads in the model")
    n_pairs: int = number(INT, "train pairs of the ranking")
    n_pairs_atp: int = number(INT, "train pairs AtP scores every head and neuron on")
    n_pairs_sweep: int = number(INT, "train pairs of the descriptive exact sweep behind the heat map")
    n_pairs_noising: int = number(INT, "train pairs of the noising sweep")
    n_candidates: int = number(INT, "AtP's top heads verified exactly on the same pairs")
    ranking_method: str = number(STR, "how the ranking was made, in words")
    positions: str = number(STR, POSITIONS_TEXT)
    heads_over_bar: int = number(INT, "ranked heads whose effect exceeds the bar")
    bar: float = number(FLOAT, "the head-effect bar (--refusal-head-effect)")
    verified_on_test: dict = number(VERIFIED, "the candidates' exact effects on test pairs (C1's evidence)")
    exact_denoising: Any = array(("layer", "head"), "normalized exact denoising effect", key="exact.denoising")
    exact_noising: Any = array(("layer", "head"), "normalized exact noising effect", key="exact.noising")
    atp_denoising: Any = array(("layer", "head"), "the AtP estimate on the same normalized scale",
                               key="atp.denoising")
    exact_denoising_per_prompt: Any = array(("layer", "head", "sweep pair"), "the exact sweep per pair",
                                            key="exact.denoising.per_prompt")
    prompts: list = prompt_list("the harmful train prompts", dim="train pair")


@dataclass(frozen=True, kw_only=True)
class AttentionPatterns(Result):
    """3.2: what the top heads attend to, on one harmful test prompt and its harmless analogue (``<member>``:
    a head's label, e.g. L12H3)."""

    NAME = "phase3/attention_patterns"
    heads: list = number(LABELS, "the heads shown")
    prompts: dict = number(Obj({"harmful": STR, "harmless": STR}), "the two prompts")
    tokens: dict = number(Obj({"harmful": ListOf(STR, dim="harmful token"),
                               "harmless": ListOf(STR, dim="harmless token")}), "their tokens, decoded")
    harmful: dict = array(("harmful token", "harmful token"), "[query, key] pattern of each head on the harmful "
                          "prompt", key="harmful.<member>")
    harmless: dict = array(("harmless token", "harmless token"), "the same on the harmless prompt",
                           key="harmless.<member>")


SIDE = Scalar("str", ("harmful", "harmless"))
EXAMPLE = Obj({"token": STR, "context": STR, "prompt": STR, "activation": FLOAT, "side": SIDE})
CATALOGUED = Obj({"component": COMPONENT, "label": STR, "rank": INT, "atp": FLOAT, "exact": FLOAT, "ci_low": FLOAT,
                  "ci_high": FLOAT, "activation_diff": FLOAT, "top_examples": ListOf(EXAMPLE)})


@dataclass(frozen=True, kw_only=True)
class NeuronCatalogue(Result):
    """3.3: the top neurons by attribution patching, verified exactly, with the tokens that activate them most."""

    NAME = "phase3/neurons"
    catalogue: list = number(ListOf(CATALOGUED), "top neurons: exact effect with its CI, the mean activation "
                             "difference harmful - harmless at the last position, and top_examples (context: a "
                             "short window of text around the token; side: harmful or harmless)")
    n_pairs: int = number(INT, "train pairs of the activation differences")
    ranking_n_pairs: int = number(INT, "train pairs of the ranking")
    positions: str = number(STR, POSITIONS_TEXT)
    corpus_prompts: int = number(INT, "prompts searched for top examples (both sides of the train split)")


# ----------------------------------------------------------------------------- phase 4

SIDE_EFFECT = Obj({"kl_harmless": Null(FLOAT), "answer_ce_increase": Null(FLOAT), "max_kl": FLOAT, "max_ce": FLOAT,
                   "ok": BOOL})
CONDITION = Obj({
    "name": STR, "label": STR, "kind": Scalar("str", ("circuit", "control")), "control_of": Null(STR),
    "n_components": INT, "components": LABELS, "method": STR, "positions": STR, "n_pairs": INT,
    "refusal_rate_baseline": EST, "refusal_rate_ablated": EST, "degenerate_rate_baseline": EST,
    "degenerate_rate_ablated": EST, "relative_drop": EST, "mcnemar_p": Null(FLOAT),
    "mcnemar_table": ListOf(ListOf(INT)), "p_holm": FLOAT, "refusal_score_baseline": FLOAT,
    "refusal_score_ablated": FLOAT, "kl_harmless": Null(FLOAT), "answer_ce_increase": Null(FLOAT),
    "side_effect": SIDE_EFFECT, "difference_vs_control": optional(EST)})


@dataclass(frozen=True, kw_only=True)
class Ablation(Result):
    """4.1: mean ablation on the test split, each circuit beside its size- and layer-matched random control."""

    NAME = "phase4/ablation"
    conditions: list = number(ListOf(CONDITION), "one row per condition (kind circuit or control; control_of: the "
                              "circuit a control matches): refusal and degenerate rates before and after, the relative "
                              "drop, McNemar's p (Holm-adjusted over the conditions: p_holm), the mean refusal score, "
                              "and the side effects on harmless prompts (next-token KL, the rise in the answers' "
                              "cross-entropy); difference_vs_control: a circuit's drop beyond its control's")
    n_prompts: int = number(INT, "test prompts per condition")
    split: str = number(STR, '"test"')
    judge: str = number(STR, "how a refusal is judged (generate or first_token)")
    direction: dict = number(Obj({"kind": STR, "layer": INT, "vector": STR}), "the refusal direction's component "
                             "(its vector omitted)")
    prompts: list = prompt_list("the harmful test prompts")


IG = Obj({"baseline": Obj({"kind": STR, "per_pair": ListOf(STR, dim="ig pair"), "counts": MapOf(INT, key="kind")}),
          "completeness_error": Obj({"per_prompt": ListOf(FLOAT, dim="ig pair"), "max": FLOAT, "median": FLOAT,
                                     "bar": FLOAT, "within_bar": BOOL, "steps": INT, "rule": STR}),
          "n_pairs": INT})
IG_EXAMPLE = Obj({"prompt": STR, "harmless": STR, "baseline": STR, "completeness_error": FLOAT,
                  "tokens": LABELS, "attributions": FLOATS})
CORRELATION = Obj({"name": STR, "key": STR, "versus": STR, "estimate": EST})


@dataclass(frozen=True, kw_only=True)
class Gradients(Result):
    """4.2: integrated gradients and gradient x activation, rank-correlated with patching (``<member>``: a
    correlation's key)."""

    NAME = "phase4/gradients"
    ig: dict = number(IG, "integrated gradients' baseline (kind paired, zeros:content...; per pair paired or "
                      "blurred) and completeness error (relative, per prompt, against its bar)")
    ig_completeness_error: float = number(FLOAT, "the largest relative completeness error")
    ig_steps: int = number(INT, "integration steps")
    ig_examples: list = number(ListOf(IG_EXAMPLE), "token attributions of each IG prompt")
    correlations: list = number(ListOf(CORRELATION), 'Spearman correlations of a gradient score with patching '
                                '(e.g. name "attention flow", versus "exact head patching")')
    gradient_r_bar: float = number(FLOAT, "S1's bar (--refusal-gradient-r)")
    met: bool = number(BOOL, "S1's estimate has its CI above the bar")
    s1: dict = number(Obj({"estimate": EST, "versus": STR, "n_candidates": INT, "n_pairs_test": INT}),
                      "what S1 is decided on: AtP on train pairs vs exact patching on test pairs, over the candidates")
    gradient_share: dict = number(EST, "share of the test pairs' |AtP| held by H1's components")
    k_components: int = number(INT, "H1's components")
    gradient_share_split: str = number(STR, '"test"')
    n_pairs_test: int = number(INT, "test pairs of gradient_share")
    attention_flow: Any = array(("layer", "head"), "gradient x attention pattern per head")
    scatter_x: dict = array(("<member> point",), "gradient scores of the correlation's points",
                            key="scatter.<member>.x")
    scatter_y: dict = array(("<member> point",), "patching scores of the same points", key="scatter.<member>.y")


# ----------------------------------------------------------------------------- phase 5

NODE = Obj({"id": STR, "label": STR, "kind": STR, "layer": Null(INT), "weight": Null(FLOAT)})
EDGE = Obj({"source": STR, "target": STR, "weight": FLOAT, "kind": STR})


@dataclass(frozen=True, kw_only=True)
class Circuit(Result):
    """5.1: the circuit graph of the top heads and neurons, and its faithfulness (Wang et al. 2022)."""

    NAME = "phase5/circuit"
    nodes: list = number(ListOf(NODE), "components weighted by their causal effect, plus the output (kind output)")
    edges: list = number(ListOf(EDGE), "u -> v weighted by how much ablating u moves v (kind ablation), or a "
                         "component's effect on the output (kind effect)")
    faithfulness: dict = number(EST, "share of the refusal score the circuit keeps by itself, everything outside "
                                "it patched from the harmless analogue")
    faithfulness_random: dict = number(EST, "the same for random circuits of the same size and layers")
    faithfulness_vs_random: dict = number(EST, "circuit minus random")
    n_random: int = number(INT, "random circuits")
    refusal_score: dict = number(Obj({"harmful": FLOAT, "circuit_only": FLOAT, "harmless": FLOAT}),
                                 "mean refusal score of the harmful run, the circuit alone, the harmless run")
    positions: str = number(STR, POSITIONS_TEXT)
    n_pairs: int = number(INT, "test pairs")
    n_heads: int = number(INT, "heads in the circuit")
    n_neurons: int = number(INT, "neurons in the circuit")
    dot: str = number(STR, "Graphviz source of the graph")
    node_link: dict = number(ANY, "networkx.node_link_data of the graph")
    intervention: str = number(STR, 'what "everything outside the circuit" means, in words')
    prompts: list = prompt_list("the harmful test prompts")


RATE_PAIR = {"baseline": EST, "mcnemar_p": Null(FLOAT), "n": INT}
STEERING = Obj({
    "induce": Obj({**RATE_PAIR, "steered": EST, "degenerate": Obj({"baseline": EST, "steered": EST})}),
    "bypass": Obj({**RATE_PAIR, "ablated": EST, "relative_drop": EST, "degenerate": Obj({"baseline": EST,
                                                                                          "ablated": EST})})})


@dataclass(frozen=True, kw_only=True)
class RefusalDirection(Result):
    """5.2: the refusal direction (Arditi et al. 2024), selected on val pairs, and steering with it on test
    prompts."""

    NAME = "phase5/direction"
    layer: int = number(INT, "the chosen candidate's layer")
    pos: int = number(INT, "its position, counted from the end")
    method: str = number(STR, "how it was selected")
    meets_thresholds: bool = number(BOOL, "whether it passes the selection filters (else no verdict uses it)")
    excluded_layers: list = number(ListOf(INT), "layers never chosen (--refusal-direction-prune)")
    positions: list = number(ListOf(INT, dim="pos"), "the candidate positions")
    n_pairs: int = number(INT, "val pairs per side of the selection")
    screened: dict | None = number(Null(Obj({"kept": INT, "prompts": INT})), "the bypass screen (candidates kept, "
                                   "prompts), or null")
    scale: float = number(FLOAT, "the steering scale")
    chosen: dict = number(Obj({"bypass": FLOAT, "induce": FLOAT, "kl": FLOAT, "rejected": Null(STR)}),
                          "the chosen candidate's own scores and why it failed the filters (null: it passed)")
    unusable_reason: str | None = number(Null(STR), "why no line may use it (null: usable)")
    baseline_score: dict = number(Obj({"harmful_val": FLOAT, "harmless_val": FLOAT}), "mean refusal score of the "
                                  "val prompts unsteered")
    steering: dict = number(STEERING, "refusal rates of harmless prompts with the direction added (induce) and of "
                            "harmful prompts with it ablated (bypass), McNemar's p against the unsteered model, "
                            "and the degenerate rates beside them")
    examples_induced: list = number(ListOf(Obj({"prompt": STR, "completion": STR})), "harmless test prompts "
                                    "steered, with their completions")
    direction: Any = array(("d_model",), "the unit direction")
    projection_harmful: Any = array(("layer", "test prompt"), "projection of the harmful test prompts at each layer",
                                    key="projection.harmful")
    projection_harmless: Any = array(("layer", "test prompt"), "the same for the harmless analogues",
                                     key="projection.harmless")
    scores_bypass: Any = array(("pos", "layer"), "bypass score of each candidate (NaN where not evaluated)",
                               key="scores.bypass")
    scores_induce: Any = array(("pos", "layer"), "induce score of each candidate", key="scores.induce")
    scores_kl: Any = array(("pos", "layer"), "KL on harmless val prompts of each candidate", key="scores.kl")


@dataclass(frozen=True, kw_only=True)
class ActivationScatter(Result):
    """5.2: PCA and t-SNE (3-D) of last-position residuals of val and test prompts at several depths
    (``<member>``: a layer)."""

    NAME = "phase5/activation_scatter"
    layers: list = number(ListOf(INT), "the layers shown")
    labels: list = number(ListOf(SIDE, dim="point"), "each point's side")
    categories: list = number(ListOf(STR, dim="point"), "each point's harm category")
    prompts: list = number(ListOf(STR, dim="point"), "each point's prompt")
    pca: dict = array(("point", 3), "the top three principal coordinates", key="pca.<member>")
    tsne: dict = array(("point", 3), "t-SNE coordinates", key="tsne.<member>")


CLASSES: tuple[type[Result], ...] = (LayerPatching, HeadRanking, AttentionPatterns, NeuronCatalogue, Ablation,
                                     Gradients, Circuit, RefusalDirection, ActivationScatter)
