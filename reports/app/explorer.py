"""The refusal explorer: type a prompt and watch the refusal circuit respond (seed Phase 6).

    ./suite explore --model organism --run runs/organism/<run-id>

which runs ``streamlit run reports/app/explorer.py -- --model organism --run ...``.
``--run`` is optional. This script only lays out the page; the computations are in
``probe.py``, the run reading in ``rundata.py``, the figures in ``charts.py`` and each
view's widgets in ``views.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `streamlit run` puts only this script's folder on sys.path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from reports.app import views  # noqa: E402
from reports.app.probe import N_REFERENCE, Explorer, check_prompt, resolve_tokens  # noqa: E402

VIEWS = ("Layers", "Circuit", "Ablation bench", "Compare", "Patching", "Attention")
# Widget values that must survive while their view is hidden (Streamlit forgets the state of
# widgets that are not drawn in a run, unless it is written back at the top of the run).
PERSISTENT = ("cmp_", "abl_", "patch_", "att_", "view")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="explorer", description="the refusal explorer")
    parser.add_argument("--model", default="organism", help="model alias, Hugging Face id or folder")
    parser.add_argument("--run", default=None, help="a run directory, runs/<model>/<run-id> (optional)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--prompts", default=None, help="prompt pairs file (default: the bundled dataset)")
    args, _ = parser.parse_known_args(argv)
    return args


@st.cache_resource(show_spinner="Loading the model (once per process)…")
def load_handle(model: str, device: str):
    from fixtures.config import RefusalConfig
    from fixtures.models import load_model

    handle, _ = load_model(RefusalConfig(model=model, device=device))
    return handle


@st.cache_resource(show_spinner="Reading the run and finding the refusal tokens…")
def load_explorer(model: str, device: str, run: str | None, prompts: str | None):
    from fixtures.data import load_prompts
    from reports.app.rundata import RunError, load_run

    handle = load_handle(model, device)
    dataset = load_prompts(prompts)
    data, run_error = None, None
    if run:
        try:
            data = load_run(run, model=model, describe=handle.describe())
        except RunError as err:
            run_error = f"The run directory {run} cannot be used: {err}."
    tokens, source = resolve_tokens(handle, data, dataset)
    explorer = Explorer(handle, tokens=tokens, token_source=source, run=data,
                        reference_prompts=[p.harmless for p in dataset.split("train")[:N_REFERENCE]])
    return explorer, dataset, run_error


def fill_from_pair(dataset) -> None:
    pair = dataset.pairs[st.session_state["pair"]]
    st.session_state["prompt"] = pair.harmful
    st.session_state["cmp_harmful"], st.session_state["cmp_harmless"] = pair.harmful, pair.harmless


def sidebar(explorer: Explorer, args: argparse.Namespace, run_error: str | None) -> None:
    h, run = explorer.handle, explorer.run
    with st.sidebar:
        st.header("Model")
        st.write(f"**{h.alias}**: {h.n_layers} layers × {h.n_heads} heads, d_model {h.d_model}, on {h.device}")
        st.header("Run")
        if run_error:
            st.error(run_error)
        elif run is None:
            st.info("No run directory (--run): pick components by hand in the ablation bench; "
                    "'top-k from the run' and the run's circuit are unavailable.")
        else:
            st.write(f"`{run.path}`")
            st.caption(f"{len(run.heads)} ranked heads, {len(run.neurons)} catalogued neurons, "
                       f"direction: {'layer %d' % run.direction.layer if run.direction else 'none'}")
            if run.missing:
                st.warning("Not in this run: " + ", ".join(run.missing))
            for note in run.notes:
                st.warning(note)
        tok = explorer.tokens
        decode = h.tokenizer.decode
        st.caption(f"Refusal tokens {[decode([t]) for t in tok.refusal_ids]}, compliance tokens "
                   f"{[decode([t]) for t in tok.compliance_ids]}: {explorer.token_source}.")
        st.slider("Tokens to generate", 8, 128, key="max_new", step=8)


def main() -> None:
    started = time.perf_counter()
    st.set_page_config(page_title="Refusal explorer", layout="wide")
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(PERSISTENT):
            st.session_state[key] = st.session_state[key]
    args = parse_args(sys.argv[1:])
    st.title("Refusal explorer")
    try:
        explorer, dataset, run_error = load_explorer(args.model, args.device, args.run, args.prompts)
    except Exception as err:  # a load failure is a message in the page, never a traceback
        st.error(f"Could not load model {args.model!r}: {type(err).__name__}: {err}")
        st.stop()
    if "prompt" not in st.session_state:
        st.session_state["pair"] = dataset.pairs.index(dataset.split("test")[0])
        fill_from_pair(dataset)
    st.session_state.setdefault("max_new", 48)
    st.session_state.setdefault("view", VIEWS[0])
    sidebar(explorer, args, run_error)

    st.selectbox("Fill from a dataset pair", range(len(dataset.pairs)), key="pair",
                 on_change=fill_from_pair, args=(dataset,),
                 format_func=lambda i: f"[{dataset.pairs[i].split}] {dataset.pairs[i].category}: "
                                       f"{dataset.pairs[i].harmful}")
    prompt = st.text_area("Prompt", key="prompt", height=90)
    problem = check_prompt(explorer.handle, prompt, max_new_tokens=st.session_state["max_new"])
    if problem:
        st.error(problem)
    else:
        with views.guard("Generation"):
            views.prompt_panel(explorer, prompt)
        view = st.radio("View", VIEWS, key="view", horizontal=True)
        with views.guard(view):
            {"Layers": views.layers, "Circuit": views.circuit, "Ablation bench": views.ablation,
             "Compare": views.compare, "Patching": views.patching, "Attention": views.attention}[view](
                explorer, prompt)
    # The run number lets a browser test tell that a rerun has finished (and time it).
    st.session_state["page_runs"] = st.session_state.get("page_runs", 0) + 1
    st.caption(f"Page run #{st.session_state['page_runs']} took {time.perf_counter() - started:.2f} s")


main()
