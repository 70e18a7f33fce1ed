"""The explorer's views: widgets and layout only; every number comes from probe.Explorer."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import pandas as pd
import streamlit as st

from instruments.behavior import classify
from instruments.components import Head, label
from reports import fmt
from reports.app import charts
from reports.app.probe import Explorer, check_prompt, parse_components, patch_component, sweep_groups


@contextmanager
def guard(where: str) -> Iterator[None]:
    """Show a failure inside a view as a message in the page (Streamlit's reruns pass through)."""
    try:
        yield
    except Exception as err:
        st.error(f"{where} failed: {type(err).__name__}: {err}")


# the classifier's three classes as the page names them (a degenerate answer has no letter or digit)
VERDICT_WORDS = {"refusal": "refusal", "compliance": "complies", "degenerate": "degenerate"}


def _fmt(p: float) -> str:
    return f"{p:.3f}"


def stream_into(explorer: Explorer, prompt: str, *, components=(), method: str = "zero") -> dict:
    """Stream a greedy generation into the page; return it with its timings and verdict."""
    stats = {"start": time.perf_counter(), "first": None}
    gen = explorer.stream(prompt, max_new_tokens=st.session_state["max_new"], components=components, method=method)

    def timed():
        for piece in gen:
            if stats["first"] is None:
                stats["first"] = time.perf_counter() - stats["start"]
            yield piece

    try:
        text = st.write_stream(timed())
    finally:
        gen.close()  # releases the model lock and the ablation hooks even if a rerun interrupts
    text = text if isinstance(text, str) else "".join(map(str, text))
    return {"prompt": prompt, "text": text, "verdict": classify(text), "ttft": stats["first"],
            "seconds": time.perf_counter() - stats["start"]}


def show_generation(gen: dict, *, streamed: bool) -> None:
    if not gen["text"].strip():
        st.caption("(no visible text: the model ended its turn at once or wrote only whitespace, "
                   f"{gen['text']!r}; the classifier counts an empty answer as degenerate, not as a refusal)")
    elif not streamed:
        st.markdown(gen["text"])
    st.metric("Classifier verdict", VERDICT_WORDS[gen["verdict"]])
    first = "no tokens" if gen["ttft"] is None else f"first token after {gen['ttft']:.2f} s"
    st.caption(f"{first}, {gen['seconds']:.2f} s in all")


def prompt_panel(explorer: Explorer, prompt: str) -> None:
    """First-token refusal probability, and generation on demand with the classifier's verdict."""
    ft = explorer.first_token(prompt)
    cols = st.columns(4)
    cols[0].metric("P(refusal), first token", _fmt(ft.p_refusal))
    cols[1].metric("P(compliance), first token", _fmt(ft.p_compliance))
    cols[2].metric("Refusal score (log-odds)", f"{ft.score:+.2f}")
    with cols[3]:
        clicked = st.button("Generate", key="btn_generate", type="primary")
    if clicked:
        st.session_state["generation"] = stream_into(explorer, prompt)
    gen = st.session_state.get("generation")
    if gen and gen["prompt"] == prompt:
        show_generation(gen, streamed=clicked)


def layers(explorer: Explorer, prompt: str) -> None:
    run = explorer.run
    lv = explorer.layers(prompt)
    left, right = st.columns(2)
    left.plotly_chart(charts.layer_curves({"this prompt": lv["lens"]}, run.lens_refs if run else {},
                                          title="Logit lens: P(refusal tokens) read at each layer", y="P(refusal)"))
    if lv["projection"] is not None:
        right.plotly_chart(charts.layer_curves({"this prompt": lv["projection"]}, run.direction_refs,
                                               title=f"Projection on the refusal direction (from layer "
                                                     f"{run.direction.layer})", y="projection"))
    else:
        right.info("No refusal direction: the projection needs a run with phase5/direction (--run).")
    left.plotly_chart(charts.layer_curves({"this prompt": lv["entropy"]}, run.entropy_refs if run else {},
                                          title="Attention entropy from the last token (mean over heads)",
                                          y="entropy (nats)"))
    right.plotly_chart(charts.head_heatmap(lv["entropy_heads"], [], title="Attention entropy per head",
                                           colorbar="nats"))
    table = {"layer": list(range(len(lv["lens"]))), "P(refusal) lens": lv["lens"], "entropy": lv["entropy"]}
    if lv["projection"] is not None:
        table["projection"] = lv["projection"]
    frame = pd.DataFrame(table)
    # logit-lens probabilities reach 1e-14: scientific outside [1e-3, 1e3), the numbers stay sortable
    st.dataframe(frame.style.format(fmt.number, subset=[c for c in frame.columns if c != "layer"]), hide_index=True)


def circuit(explorer: Explorer, prompt: str) -> None:
    run = explorer.run
    c = explorer.circuit(prompt)
    norms = c["head_norms"]
    ranked = run.heads if run else ()
    st.plotly_chart(charts.head_heatmap(norms.tolist(), [(r.head.layer, r.head.head) for r in ranked],
                                        title="What each head writes at the last token (norm)", colorbar="norm"))
    if run is None:
        st.info("Circuit highlighting needs a run (--run): its ranked heads, neuron catalogue and direction.")
        return
    flat = norms.flatten()
    if ranked:
        rows = []
        for r in ranked:
            value = float(norms[r.head.layer, r.head.head])
            row = {"head": label(r.head), "run effect": r.effect, "write norm now": value,
                   "fires (percentile of all heads)": float((flat < value).float().mean())}
            if c["head_along"] is not None:
                row["write along direction"] = float(c["head_along"][r.head.layer, r.head.head])
            rows.append(row)
        st.subheader("The run's top heads on this prompt")
        st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
            "fires (percentile of all heads)": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0)})
    if run.neurons:
        rows = []
        for n in run.neurons:
            act = c["neuron_acts"][n.neuron]
            top = n.top_activation
            rows.append({"neuron": label(n.neuron), "activation now": act, "top recorded activation": top,
                         "fires (share of top)": max(0.0, min(1.0, act / top)) if top else None})
        st.subheader("The run's catalogued neurons on this prompt")
        st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
            "fires (share of top)": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0)})
    if explorer.direction is not None:
        d = explorer.direction
        value = explorer.layers(prompt)["projection"][d.layer]
        refs = {side: v[d.layer] for side, v in run.direction_refs.items() if len(v) > d.layer}
        scale = ""
        if {"harmful", "harmless"} <= refs.keys() and refs["harmful"] != refs["harmless"]:
            where = (value - refs["harmless"]) / (refs["harmful"] - refs["harmless"])
            scale = f"; 0 = the run's harmless mean, 1 = its harmful mean: {where:.2f}"
        st.metric(f"Projection on the refusal direction at layer {d.layer}", f"{value:.3f}")
        st.caption("How far this prompt's last token lies along the direction" + scale)


def _set_top_k(explorer: Explorer) -> None:
    """'Top-k from the run': tick exactly the k best heads and neurons of the run's rankings."""
    k = int(st.session_state["abl_k"])
    for i, r in enumerate(explorer.run.heads):
        st.session_state[f"abl_head_{label(r.head)}"] = i < k
    for i, n in enumerate(explorer.run.neurons):
        st.session_state[f"abl_neuron_{label(n.neuron)}"] = i < k


def _checkbox_grid(items: list, prefix: str, caption) -> list:
    cols = st.columns(6)
    chosen = []
    for i, (component, extra) in enumerate(items):
        key = f"{prefix}{label(component)}"
        st.session_state.setdefault(key, False)
        if cols[i % 6].checkbox(caption(component, extra), key=key):
            chosen.append(component)
    return chosen


def ablation(explorer: Explorer, prompt: str) -> None:
    run = explorer.run
    st.session_state.setdefault("abl_method", "zero")
    st.session_state.setdefault("abl_k", 5)
    st.session_state.setdefault("abl_manual", "")
    st.radio("Ablation", ["zero", "mean"], key="abl_method", horizontal=True,
             help="mean: the average activation over harmless train prompts")
    heads = list(run.heads) if run else []
    no_top = "no run directory (--run)" if run is None else "the run has no phase3/heads ranking" if not heads else ""
    a, b = st.columns([1, 3])
    a.number_input("k", min_value=1, max_value=max(1, len(heads)), key="abl_k")
    b.button("Select top-k from the run", key="btn_topk", on_click=_set_top_k, args=(explorer,),
             disabled=bool(no_top), help=no_top or "ticks the run's k best heads (and neurons)")
    if no_top:
        b.caption(f"Top-k from the run is unavailable: {no_top}.")
    chosen = []
    if heads:
        st.caption("Heads (run effect)")
        chosen += _checkbox_grid([(r.head, r.effect) for r in heads[:30]], "abl_head_",
                                 lambda c, e: label(c) + ("" if e is None else f" ({e:.2f})"))
    if run and run.neurons:
        st.caption("Neurons (attribution)")
        chosen += _checkbox_grid([(n.neuron, n.atp) for n in run.neurons[:30]], "abl_neuron_",
                                 lambda c, e: label(c))
    if explorer.direction is not None:
        st.session_state.setdefault("abl_direction", False)
        if st.checkbox(f"Refusal direction (from layer {explorer.direction.layer}; removed at every layer)",
                       key="abl_direction"):
            chosen.append(explorer.direction)
    manual, problems = parse_components(st.text_input("Other heads and neurons, by label", key="abl_manual",
                                                      placeholder="e.g. L3H1, L5N20"), explorer.handle)
    for problem in problems:
        st.error(problem)
    chosen = list(dict.fromkeys(chosen + manual))
    if not chosen:
        st.info("Tick components (or type their labels) to ablate them.")
        return
    method = st.session_state["abl_method"]
    st.caption(f"Ablating ({method}): " + ", ".join(label(c) for c in chosen))
    clean = explorer.first_token(prompt)
    ablated = explorer.first_token(prompt, tuple(chosen), method)
    cols = st.columns(3)
    cols[0].metric("P(refusal), clean", _fmt(clean.p_refusal))
    cols[1].metric("P(refusal), ablated", _fmt(ablated.p_refusal), delta=f"{ablated.p_refusal - clean.p_refusal:+.3f}",
                   delta_color="inverse")
    cols[2].metric("Refusal score, ablated", f"{ablated.score:+.2f}", delta=f"{ablated.score - clean.score:+.2f}",
                   delta_color="inverse")
    key = (prompt, tuple(label(c) for c in chosen), method, st.session_state["max_new"])
    left, right = st.columns(2)
    with left:
        st.markdown("**Clean model**")
        gen = st.session_state.get("generation")
        if gen and gen["prompt"] == prompt:
            show_generation(gen, streamed=False)
        else:
            st.caption("Press Generate above to see the clean output.")
    with right:
        st.markdown("**Ablated model**")
        clicked = st.button("Regenerate with ablation", key="btn_ablate_generate")
        if clicked:
            st.session_state["ablated_generation"] = {**stream_into(explorer, prompt, components=chosen,
                                                                    method=method), "key": key}
        gen = st.session_state.get("ablated_generation")
        if gen and gen["key"] == key:
            show_generation(gen, streamed=clicked)


def compare(explorer: Explorer, prompt: str) -> None:
    cols = st.columns(2)
    sides = {"harmful": "cmp_harmful", "harmless": "cmp_harmless"}
    texts, lenses = {}, {}
    generate = st.button("Generate both", key="btn_compare_generate")
    for col, (side, key) in zip(cols, sides.items()):
        with col:
            text = st.text_area("Harmful prompt" if side == "harmful" else "Harmless analogue", key=key, height=90)
            problem = check_prompt(explorer.handle, text, max_new_tokens=st.session_state["max_new"])
            if problem:
                st.error(problem)
                continue
            texts[side] = text
            ft = explorer.first_token(text)
            st.metric(f"P(refusal), {side}", _fmt(ft.p_refusal))
            lenses[side] = explorer.layers(text)
            if generate:
                st.session_state[f"cmp_gen_{side}"] = stream_into(explorer, text)
            gen = st.session_state.get(f"cmp_gen_{side}")
            if gen and gen["prompt"] == text:
                show_generation(gen, streamed=generate)
    if lenses:
        left, right = st.columns(2)
        left.plotly_chart(charts.layer_curves({s: v["lens"] for s, v in lenses.items()}, {},
                                              title="Logit lens, side by side", y="P(refusal)"))
        if all(v["projection"] is not None for v in lenses.values()):
            right.plotly_chart(charts.layer_curves({s: v["projection"] for s, v in lenses.items()}, {},
                                                   title="Projection on the refusal direction", y="projection"))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


def patching(explorer: Explorer, prompt: str) -> None:
    h = explorer.handle
    harmful, harmless = st.session_state.get("cmp_harmful", ""), st.session_state.get("cmp_harmless", "")
    for text in (harmful, harmless):
        problem = check_prompt(h, text, max_new_tokens=st.session_state["max_new"])
        if problem:
            st.error(f"The pair to patch (edit it in Compare) is not usable: {problem}")
            return
    st.caption(f"Pair (edit it in Compare): harmful “{harmful}” / harmless “{harmless}”")
    st.session_state.setdefault("patch_dir", "denoising")
    st.session_state.setdefault("patch_kind", "resid")
    st.session_state.setdefault("patch_layer", explorer.direction.layer if explorer.direction else h.n_layers // 2)
    st.session_state.setdefault("patch_head", 0)
    st.session_state.setdefault("patch_pos", -1)
    direction = st.radio("Run", ["denoising", "noising"], key="patch_dir", horizontal=True, format_func=lambda d: {
        "denoising": "harmless prompt, patched from the harmful one (does it carry refusal?)",
        "noising": "harmful prompt, patched from the harmless one (is it needed?)"}[d])
    cols = st.columns(3)
    kind = cols[0].selectbox("Component", ["resid", "attn", "mlp", "head"], key="patch_kind",
                             format_func=lambda k: {"resid": "residual stream", "attn": "attention output",
                                                    "mlp": "MLP output", "head": "one head"}[k])
    layer = int(cols[1].number_input("Layer", min_value=0, max_value=h.n_layers - 1, key="patch_layer"))
    head, pos = 0, None
    if kind == "head":
        head = int(cols[2].number_input("Head", min_value=0, max_value=h.n_heads - 1, key="patch_head"))
    if kind == "resid":
        base, other = (harmless, harmful) if direction == "denoising" else (harmful, harmless)
        labels = explorer.prompt_tokens(base)
        # positions count from the end, where the pair is aligned; none beyond the shorter prompt
        n = min(len(labels), len(explorer.prompt_tokens(other)), 16)
        options = [None] + list(range(-n, 0))
        if st.session_state["patch_pos"] not in options:
            st.session_state["patch_pos"] = -1
        pos = cols[2].selectbox("Position (from the end)", options, key="patch_pos",
                                format_func=lambda p: "all positions" if p is None else f"{p}: {labels[p]!r}")
    else:
        cols[2].caption("Attention, MLP and head outputs are patched at every position when the two prompts "
                        "have the same token length, else at the post-instruction positions only.")
    component = patch_component(kind, layer, head=head, pos=pos)
    out = explorer.patch(harmful, harmless, direction, (component,))
    st.caption(f"Patched positions: {out.get('positions', 'all')}.")
    m = st.columns(4)
    m[0].metric("P(refusal), unpatched", _fmt(_sigmoid(out["base"])))
    m[1].metric(f"P(refusal), {label(component)} patched", _fmt(_sigmoid(out["patched"][0])),
                delta=f"{_sigmoid(out['patched'][0]) - _sigmoid(out['base']):+.3f}", delta_color="off")
    m[2].metric("P(refusal), the other prompt", _fmt(_sigmoid(out["source"])))
    m[3].metric("Normalized effect", f"{out['normalized'][0]:.2f}", help="0 = unpatched, 1 = the other prompt")
    sweep_key = (harmful, harmless, direction, kind, pos)
    if st.button("Sweep every layer" + (" and head" if kind == "head" else ""), key="btn_patch_sweep"):
        groups = sweep_groups(kind, h.n_layers, h.n_heads, pos=pos)
        st.session_state["patch_sweep_result"] = {"key": sweep_key, **explorer.patch(harmful, harmless,
                                                                                      direction, groups)}
    sweep = st.session_state.get("patch_sweep_result")
    if sweep and sweep["key"] == sweep_key:
        if kind == "head":
            grid = [sweep["normalized"][L * h.n_heads:(L + 1) * h.n_heads] for L in range(h.n_layers)]
            st.plotly_chart(charts.head_heatmap(grid, [], title="Normalized patching effect of each head",
                                                colorbar="effect"))
        else:
            st.plotly_chart(charts.effect_bars(sweep["labels"], sweep["normalized"],
                                               title="Normalized patching effect by layer"))


def attention(explorer: Explorer, prompt: str) -> None:
    h = explorer.handle
    st.session_state.setdefault("att_layer", explorer.direction.layer if explorer.direction else 0)
    st.session_state.setdefault("att_head", 0)
    cols = st.columns(2)
    layer = int(cols[0].number_input("Layer", min_value=0, max_value=h.n_layers - 1, key="att_layer"))
    head = int(cols[1].number_input("Head", min_value=0, max_value=h.n_heads - 1, key="att_head"))
    tokens, pattern = explorer.attention(prompt, layer)
    st.plotly_chart(charts.attention_heatmap(pattern[head].tolist(), tokens,
                                             title=f"Attention of {label(Head(layer=layer, head=head))}"))
    last = pattern[head, -1]
    top = last.topk(min(5, last.numel()))
    st.caption("Where the last token looks")
    st.dataframe(pd.DataFrame({"token": [tokens[i] for i in top.indices.tolist()],
                               "weight": [float(w) for w in top.values]}), hide_index=True)
