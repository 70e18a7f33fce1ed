"""Phase 2 in the report: refusal rates, first-token probabilities, logit lens, attention entropy.

Each builder takes the run context and returns blocks; a result the run lacks becomes a
visible "missing" note in place of its figure.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from reports import fmt
from reports.context import RunContext
from reports.document import Block, Figure, missing, para, spans, table
from reports.plots import HARMFUL, HARMLESS, NEUTRAL, band, layout, mean_ci, to_div, to_numpy

SIDES = (("harmful", HARMFUL), ("harmless", HARMLESS))


def _absent(ctx: RunContext, name: str) -> list[Block] | None:
    if ctx.get(name) is None:
        return [missing(name, ctx.unreadable.get(name))]
    return None


def refusal_rates(ctx: RunContext) -> list[Block]:
    name = "phase2/refusal_rates"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    nums = ctx.numbers(name)
    h, b = nums.get("harmful") or {}, nums.get("harmless") or {}
    blocks: list[Block] = [para(
        f"On the held-out test split, {ctx.model_name} refused {fmt.estimate(h.get('refusal_rate'), pct=True)} of "
        f"harmful prompts and {fmt.estimate(b.get('refusal_rate'), pct=True)} of harmless ones (confidence "
        "intervals as recorded by phase 2; a refusal is judged by the suite's refusal classifier on greedy "
        "completions). Degenerate answers (no letter or digit, e.g. an empty one: neither refusal nor compliance): "
        f"{_degenerate(h)} of harmful and {_degenerate(b)} of harmless prompts.")]
    rows = [(side, fmt.estimate((nums.get(side) or {}).get("refusal_rate"), pct=True),
             fmt.estimate((nums.get(side) or {}).get("compliance_rate"), pct=True),
             _degenerate(nums.get(side) or {}), fmt.number((nums.get(side) or {}).get("n"))) for side, _ in SIDES]
    blocks.append(table(("prompts", "refusal rate", "compliance rate", "degenerate rate", "n"), rows,
                        dom_id="table-refusal-rates"))
    examples = nums.get("examples_harmful") or []
    if examples:
        show = ctx.show_completions
        note = ("Completions are shown in full (--refusal-show-completions)." if show else
                f"Completions to harmful prompts are truncated to {fmt.COMPLETION_CHARS} characters "
                "(run with --refusal-show-completions to show them in full).")
        blocks.append(para(f"Examples of harmful test prompts and the subject's completions. {note}"))
        blocks.append(table(("prompt", "completion", "refused"), [
            (str(e.get("prompt", "")), fmt.truncate_completion(e.get("completion"), show=show),
             "yes" if e.get("refused") else "no (degenerate)" if e.get("degenerate") else "no") for e in examples],
            css="examples", dom_id="table-examples"))
    return blocks


def _degenerate(side: dict) -> str:
    # a record without the degenerate rate reads "n/a (not recorded)"
    return fmt.estimate(side.get("degenerate_rate"), pct=True)


def first_token(ctx: RunContext) -> list[Block]:
    name = "phase2/first_token"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    nums = rec.numbers
    tokens = ", ".join(repr(t) for t in nums.get("refusal_tokens") or []) or "n/a"
    blocks: list[Block] = [para(
        f"P(refusal tokens) at the first generated position separates harmful from harmless prompts with ROC AUC "
        f"{fmt.estimate(nums.get('auc_harmful_vs_harmless'))}. Refusal tokens (found from the subject's own "
        f"refusals): {tokens}.")]
    if "p_refusal_harmful" in rec.arrays and "p_refusal_harmless" in rec.arrays:
        fig = go.Figure([go.Box(y=to_numpy(rec.arrays[f"p_refusal_{side}"]).tolist(), name=side, boxpoints="all",
                                jitter=0.4, marker={"color": color, "size": 4}, line={"color": color})
                         for side, color in SIDES])
        layout(fig, title="P(refusal tokens) at the first position", height=360, yaxis={"title": "probability"})
        blocks.append(Figure(dom_id="fig-first-token", title="First-token refusal probability",
                             caption=spans("Each point is one held-out test prompt."),
                             html=to_div(fig, "fig-first-token"), source=fig))
    return blocks


def logit_lens(ctx: RunContext) -> list[Block]:
    name = "phase2/logit_lens"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    if not {"harmful", "harmless"} <= set(rec.arrays):
        return [missing(name, "arrays harmful/harmless absent")]
    fig = go.Figure()
    stats = {}
    for side, color in SIDES:
        arr = to_numpy(rec.arrays[side])  # [layer, prompt]
        mean, low, high = mean_ci(arr, axis=1)
        stats[side] = (mean, low, high, arr.shape[1])
        for trace in band(go, range(arr.shape[0]), mean, low, high, name=side, color=color):
            fig.add_trace(trace)
    layout(fig, title="Logit lens: P(refusal tokens) read at each layer", xaxis={"title": "layer"},
           yaxis={"title": "P(refusal tokens)"})
    last = {side: fmt.estimate({"value": m[-1], "ci_low": lo[-1], "ci_high": hi[-1], "n": n})
            for side, (m, lo, hi, n) in stats.items()}
    first = rec.numbers.get("first_layer_separating")
    where = (f"The harmful-harmless gap first exceeds half its maximum at layer {first}."
             if first is not None else "The harmful and harmless curves never separate (no positive gap).")
    return [para(f"Read through the final norm and unembedding, the last layer gives mean P(refusal tokens) "
                 f"{last['harmful']} on harmful and {last['harmless']} on harmless prompts. {where}"),
            Figure(dom_id="fig-logit-lens", title="Logit lens", html=to_div(fig, "fig-logit-lens"), source=fig,
                   caption=spans("Mean over held-out prompts; bands: 95% CI of the mean (normal approximation)."))]


def attention_entropy(ctx: RunContext) -> list[Block]:
    name = "phase2/attention_entropy"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    if not {"harmful", "harmless"} <= set(rec.arrays):
        return [missing(name, "arrays harmful/harmless absent")]
    fig = go.Figure()
    for side, color in SIDES:
        arr = to_numpy(rec.arrays[side]).mean(-1)  # [prompt, layer]: mean over heads
        mean, low, high = mean_ci(arr, axis=0)
        for trace in band(go, range(arr.shape[1]), mean, low, high, name=side, color=color):
            fig.add_trace(trace)
    differing = [int(x) for x in rec.numbers.get("layers_differing") or []]
    for layer in differing:
        fig.add_vline(x=layer, line={"color": "#999", "dash": "dot", "width": 1})
    layout(fig, title="Attention entropy by layer (mean over heads)", xaxis={"title": "layer"},
           yaxis={"title": "entropy (nats)"})
    alpha = ctx.config.get("alpha", 0.05)
    text = (f"Layers whose mean attention entropy differs between harmful prompts and their harmless analogues "
            f"(paired permutation test, Benjamini-Hochberg at alpha = {alpha}): "
            f"{', '.join(map(str, differing)) if differing else 'none'}.")
    return [para(text), Figure(dom_id="fig-attention-entropy", title="Attention entropy",
                               html=to_div(fig, "fig-attention-entropy"), source=fig,
                               caption=spans("Bands: 95% CI of the mean over prompts; dotted lines mark the "
                                             "layers that differ after correction."))]


def behaviour_blocks(ctx: RunContext) -> list[Block]:
    return [*refusal_rates(ctx), *first_token(ctx), *logit_lens(ctx), *attention_entropy(ctx)]


Profile = tuple[np.ndarray, np.ndarray, np.ndarray]  # mean, ci_low, ci_high by layer


def keyword_attention(ctx: RunContext) -> list[Block]:
    """H2's detection stage: the last position's attention to harm keywords, by layer, beside its control."""
    name = "h2/keyword_attention"
    if (gone := _absent(ctx, name)) is not None:
        return gone
    rec = ctx.get(name)
    if not {"mean", "ci_low", "ci_high"} <= set(rec.arrays):
        return [missing(name, "arrays mean/ci_low/ci_high absent")]
    profiles = {side: _profile(rec.arrays, prefix) for side, prefix in
                (("harmful", ""), ("control", "control_"), ("contrast", "contrast_"))}
    contrast = profiles["contrast"]
    titles = ["attention / keyword share"] + (["harmful minus control"] if contrast is not None else [])
    fig = make_subplots(rows=1, cols=len(titles), horizontal_spacing=0.12, subplot_titles=titles)
    for side, label, color in (("harmful", "harmful prompts' keywords", HARMFUL),
                               ("control", "harmless analogues' matched tokens", HARMLESS)):
        if profiles[side] is not None:
            _add_band(fig, profiles[side], label, color, col=1)
    fig.add_hline(y=1.0, line={"dash": "dash", "color": "#888"}, row=1, col=1)
    if contrast is not None:
        _add_band(fig, contrast, "contrast", NEUTRAL, col=2)
        fig.add_hline(y=0.0, line={"dash": "dash", "color": "#888"}, row=1, col=2)
    layout(fig, title="Attention to harm keywords by layer (relative to their share of the prompt)",
           xaxis={"title": "layer"}, yaxis={"title": "attention / keyword share"})
    fig.update_layout(margin={"t": 90})  # room for the panel titles below the figure's own
    fig.update_xaxes(title_text="layer")
    caption = "Bands: the recorded bootstrap CI over pairs."
    if profiles["control"] is not None:
        caption += " Blue: the harmless analogues' attention onto their tokens matched to the keywords (the control)."
    return [para(_keyword_sentence(rec.numbers, profiles)),
            Figure(dom_id="fig-keyword-attention", title="Keyword attention", html=to_div(fig, "fig-keyword-attention"),
                   source=fig, caption=spans(caption))]


def _add_band(fig: Any, profile: Profile, name: str, color: str, *, col: int) -> None:
    for trace in band(go, range(profile[0].shape[0]), *profile, name=name, color=color):
        fig.add_trace(trace, row=1, col=col)


def _profile(arrays: Mapping[str, Any], prefix: str) -> Profile | None:
    keys = [f"{prefix}{k}" for k in ("mean", "ci_low", "ci_high")]
    return tuple(to_numpy(arrays[k]) for k in keys) if all(k in arrays for k in keys) else None  # type: ignore


def _at(profile: Profile | None, layer: int) -> str:
    if profile is None or not 0 <= layer < profile[0].shape[0]:
        return "n/a"
    mean, low, high = profile
    return fmt.estimate({"value": mean[layer], "ci_low": low[layer], "ci_high": high[layer]})


def _keyword_sentence(nums: Mapping[str, Any], profiles: Mapping[str, Profile | None]) -> str:
    text = ("Attention from the last position to the harmful prompt's keywords (the tokens its harmless analogue "
            f"lacks), over the keywords' share of the prompt, over {nums.get('n_pairs', 'n/a')} pairs")
    if nums.get("peak_layer_val") is None:
        return f"{text}; the peak layer (chosen on val pairs) was not recorded; 1 (dashed) is no preference."
    peak = int(nums["peak_layer_val"])
    out = (f"{text}. The peak layer, chosen on {nums.get('n_val', 'n/a')} val pairs, is {peak}; there the harmful "
           f"prompts read {_at(profiles['harmful'], peak)}")
    if profiles["control"] is not None:
        out += f", their harmless analogues' matched tokens {_at(profiles['control'], peak)}"
    if profiles["contrast"] is not None:
        out += f", the contrast (n = {nums.get('n', 'n/a')} pairs) {_at(profiles['contrast'], peak)}"
    out += "; 1 (dashed) is no preference."
    if nums.get("early_minus_later") is not None:
        out += f" Early layers minus later layers, on the contrast: {fmt.estimate(nums['early_minus_later'])}."
    return out
