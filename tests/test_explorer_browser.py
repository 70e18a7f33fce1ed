"""End to end: the explorer served by `streamlit run` on loopback, driven in headless Chromium.

On the organism with a small run directory recorded here through the phases' own stages (a
study on 8 train, 4 val and 4 test pairs: the refusal direction, heads and neurons chosen as
the phases choose them), the test types a harmful prompt, sees a high refusal
probability and a refusal, ablates the run's top components and the direction, and sees
the probability the instruments compute for that ablation, lower than before. It measures
(never asserts) the latency of non-generating interactions and the time to the first
streamed token, prints them and writes them to .benchmarks/explorer_latency.json;
screenshots go to the test's tmp dir (and to docs/explorer.png with REFUSAL_UPDATE_DOCS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fixtures.config import RefusalConfig
from fixtures.data import load_prompts
from fixtures.recording import Recorder
from fixtures.storage import REPO_ROOT
from instruments import ablation, behavior, metrics
from instruments.components import from_json

# one intra-op thread here (restored afterwards), so the Streamlit server has the other core
pytestmark = [pytest.mark.explorer, pytest.mark.browser, pytest.mark.integration, pytest.mark.phase6,
              pytest.mark.usefixtures("one_torch_thread")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP = REPO_ROOT / "reports" / "app" / "explorer.py"
TOP = 10  # heads and neurons recorded in the run
APP_K = 5  # the ablation bench's default k (reports/app/views.py)


def _require_browser():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        pytest.skip("the python package playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")


# the study's sizes for this small run: one train pair per category, 4 val and 4 test pairs
SIZES = {"train": 8, "val": 4, "test": 4}
# records the explorer reads, each as its phase test saves it (hypotheses.phase_stages.PHASE_RECORDS)
EXPLORER_RECORDS = ("phase2/first_token", "phase2/logit_lens", "phase2/attention_entropy", "phase3/heads",
                    "phase3/neurons", "phase5/direction")


def build_run(handle, path: Path) -> dict:
    """A small run of the organism recorded through the phases' own path: a study on a few pairs of
    each split (refusal tokens from the train answers, as the phases find them), each record saved
    from the stage its phase test saves it from. Returns facts for the test."""
    from hypotheses import records
    from hypotheses.baseline import OPENING_TOKENS
    from hypotheses.phase_stages import PHASE_RECORDS
    from hypotheses.study import Study, StudyData, balanced

    dataset = load_prompts()
    splits = {split: balanced(dataset.split(split), n) for split, n in SIZES.items()}
    data = StudyData(**splits, categories=dataset.categories)
    cfg = RefusalConfig(model="organism", device="cpu", patch_pairs=SIZES["train"], sweep_pairs=2, neuron_pairs=2,
                        head_candidates=TOP, top_heads=TOP, top_neurons=TOP, n_bootstrap=200, direction_positions=1,
                        direction_val_pairs=SIZES["val"])
    answers = {side: behavior.generate(handle, [getattr(p, side) for p in data.train], max_new_tokens=OPENING_TOKENS,
                                       batch_size=cfg.batch_size) for side in ("harmful", "harmless")}
    tokens = metrics.tokens_from_generations(handle.tokenizer, answers["harmful"], answers["harmless"])
    study = Study(handle=handle, data=data, tokens=tokens, cfg=cfg)
    rec = Recorder(run_dir=path)
    rec.note(model=handle.describe(), config={"model": "organism"})
    for name in EXPLORER_RECORDS:
        records.save(rec, getattr(study, PHASE_RECORDS[name]).record(), name)
    sel = study.direction[1]
    return {"tokens": tokens, "meets_thresholds": sel.meets_thresholds, "layer": sel.layer, "direction": sel.direction,
            # as the explorer reads them: in the run's order
            "heads": [from_json(r["component"]) for r in rec.load("phase3/heads").numbers["ranking"]],
            "neurons": [from_json(n["component"]) for n in rec.load("phase3/neurons").numbers["catalogue"]]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"streamlit exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"streamlit did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


RUN_NUMBER = "() => { const m = document.body.innerText.match(/Page run #(\\d+) took/); return m ? Number(m[1]) : 0; }"
RUN_SECONDS = "() => { const m = document.body.innerText.match(/Page run #\\d+ took ([0-9.]+) s/); return m ? Number(m[1]) : null; }"


def _after(page, action, timings: dict, name: str, *, timeout_ms: int = 180_000) -> None:
    """Do ``action``, wait until the page has finished the rerun it causes, and record its seconds:
    in the browser (click to finished page) and on the server (the script's own run time)."""
    before = page.evaluate(RUN_NUMBER)
    start = time.perf_counter()
    action()
    page.wait_for_function(f"(n) => ({RUN_NUMBER})() > n", arg=before, timeout=timeout_ms, polling=20)
    timings[f"{name}.browser_s"] = time.perf_counter() - start
    timings[f"{name}.server_s"] = page.evaluate(RUN_SECONDS)


def _metric(page, name: str) -> list[str]:
    boxes = page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text(name, exact=True))
    return [v.strip() for v in boxes.locator('[data-testid="stMetricValue"]').all_inner_texts()]


def test_explorer_in_a_browser(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    from fixtures.models import load_model

    handle, _ = load_model(RefusalConfig(model="organism", device="cpu"))
    run_dir = tmp_path / "runs" / "organism" / "20260101T000000Z"
    built = build_run(handle, run_dir)
    # the harmful test prompt the organism is surest to refuse (among a few)
    # (not the first test pair: the page starts on it, and typing it again would change nothing)
    candidates = [p.harmful for p in load_prompts().split("test")[1:7]]
    p_ref = behavior.first_token_probs(handle, candidates, built["tokens"]).refusal
    prompt = candidates[int(p_ref.argmax())]
    first_piece = next(behavior.stream_generate(handle, prompt, max_new_tokens=4)).strip()
    # what the page must show after "Select top-k from the run" (k = APP_K) and ticking the
    # direction, computed here by the instruments themselves (zero ablation, the page's default)
    chosen = built["heads"][:APP_K] + built["neurons"][:APP_K] + [built["direction"]]
    with ablation.ablated(handle, chosen, spec=ablation.AblationSpec(method="zero")):
        expected = float(behavior.first_token_probs(handle, [prompt], built["tokens"]).refusal[0])
    del handle

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
               "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--", "--model", "organism", "--device", "cpu",
               "--run", str(run_dir)]
    timings: dict[str, float | None] = {}
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with open(log, "w") as out:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, server, log, timeout=120)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1700})
                start = time.perf_counter()
                page.goto(url)
                page.wait_for_function(f"() => ({RUN_NUMBER})() >= 1", timeout=300_000, polling=100)
                timings["first_page_load.browser_s"] = time.perf_counter() - start

                # a harmful prompt: high refusal probability
                box = page.get_by_label("Prompt", exact=True)
                box.fill(prompt)
                _after(page, lambda: box.press("Control+Enter"), timings, "new_prompt")
                clean = float(_metric(page, "P(refusal), first token")[0])
                assert clean > 0.5, f"the organism should be likely to refuse {prompt!r}: P = {clean}"
                page.screenshot(path=str(shots / "1-prompt.png"), full_page=True)

                # generation streams: time to the first streamed piece, seen in the page
                count = ("(p) => [...document.querySelectorAll('[data-testid=\"stMarkdownContainer\"]')]"
                         ".filter(e => e.innerText.trim().startsWith(p)).length")
                before, run_before = page.evaluate(count, first_piece), page.evaluate(RUN_NUMBER)
                start = time.perf_counter()
                page.get_by_role("button", name="Generate", exact=True).click()
                page.wait_for_function(f"([p, n]) => ({count})(p) > n", arg=[first_piece, before], polling=10,
                                       timeout=180_000)
                timings["generate.browser_time_to_first_token_s"] = time.perf_counter() - start
                page.wait_for_function(f"(n) => ({RUN_NUMBER})() > n", arg=run_before, timeout=300_000)
                timings["generate.browser_total_s"] = time.perf_counter() - start
                caption = page.get_by_text("first token after").first.inner_text()
                timings["generate.server_time_to_first_token_s"] = float(caption.split("after ")[1].split(" s")[0])
                assert _metric(page, "Classifier verdict") == ["refusal"]
                page.screenshot(path=str(shots / "2-generated.png"), full_page=True)

                # non-generating interactions
                page.screenshot(path=str(shots / "3-layers.png"), full_page=True)
                _after(page, lambda: page.get_by_text("Circuit", exact=True).click(), timings,
                       "switch_to_circuit_view")  # one forward pass (all heads' writes)
                page.screenshot(path=str(shots / "4-circuit.png"), full_page=True)
                _after(page, lambda: page.get_by_text("Attention", exact=True).click(), timings,
                       "switch_to_attention_view")  # one forward pass (a layer's patterns)
                head = page.get_by_label("Head", exact=True)
                head.fill("3")
                _after(page, lambda: head.press("Enter"), timings, "change_attention_head")  # memoised
                page.screenshot(path=str(shots / "5-attention.png"), full_page=True)
                _after(page, lambda: page.get_by_text("Layers", exact=True).click(), timings,
                       "back_to_layers_view")  # memoised

                # the ablation bench: top-k from the run, then the refusal direction
                _after(page, lambda: page.get_by_text("Ablation bench", exact=True).click(), timings,
                       "switch_to_ablation_bench")  # memoised
                _after(page, lambda: page.get_by_role("button", name="Select top-k from the run").click(), timings,
                       "select_top_k")  # one ablated forward pass
                _after(page, lambda: page.get_by_text("Refusal direction (from layer").click(), timings,
                       "tick_direction")  # one ablated forward pass
                ablated = float(_metric(page, "P(refusal), ablated")[0])
                assert float(_metric(page, "P(refusal), clean")[0]) == pytest.approx(clean, abs=1e-3)
                # the page ablated exactly those components, and it shows their effect
                assert ablated == pytest.approx(expected, abs=2e-3), (ablated, expected)
                assert ablated < clean, f"ablating the top components and the direction left P = {ablated}"
                _after(page, lambda: page.get_by_role("button", name="Regenerate with ablation").click(), timings,
                       "regenerate_ablated", timeout_ms=300_000)
                verdicts = _metric(page, "Classifier verdict")
                page.screenshot(path=str(shots / "6-ablation.png"), full_page=True)
            finally:
                browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    # The README's screenshot is a tracked file: refresh it only when asked, so a test run
    # never leaves the checkout modified.
    if os.environ.get("REFUSAL_UPDATE_DOCS"):
        docs = REPO_ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(shots / "6-ablation.png", docs / "explorer.png")
    report = {"model": "organism", "device": "cpu", "torch_threads": 1, "prompt": prompt,
              "direction_layer": built["layer"],
              "direction_meets_thresholds": built["meets_thresholds"],
              "p_refusal_clean": clean, "p_refusal_ablated": ablated, "verdicts_clean_then_ablated": verdicts,
              "seconds": {k: None if v is None else round(v, 3) for k, v in timings.items()},
              "screenshots": str(shots)}
    (REPO_ROOT / ".benchmarks").mkdir(exist_ok=True)
    for path in (REPO_ROOT / ".benchmarks" / "explorer_latency.json", tmp_path / "explorer_latency.json"):
        path.write_text(json.dumps(report, indent=2))
    print("\nexplorer latency (organism, CPU, 1 torch thread):\n" + json.dumps(report, indent=2))
