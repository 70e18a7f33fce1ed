"""Synthetic run directories, written through the real Recorder, for tests, notebooks and demos.

Every result is built as its record class (hypotheses/records.py) and saved with
``records.save``, which reads it back strictly first: a synthetic run holds exactly what the
phases write, in their format, and nothing no phase writes. The manifest says ``"synthetic": true`` and the
report shows that in a banner, so a synthetic run can never pass for a measurement.
The numbers are seeded noise shaped like real results; they mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from fixtures.config import RefusalConfig
from fixtures.memory_phases import PhaseEstimate
from fixtures.recording import Recorder
from fixtures.storage import stable_hash
from hypotheses import circuit_dot, records
from hypotheses import claims as claim_table
from hypotheses.verdicts import Verdict
from instruments.components import Head, Neuron, label, to_json
from instruments.stats import Estimate
from reports.circuit_svg import build_graph

DEFAULT_VERDICTS: dict[str, str] = {"H1": "supported", "H2": "refuted", "H3": "inconclusive",
                                    "C1": "supported", "C2": "supported", "C3": "inconclusive"}
CATEGORIES = ("weapons", "cyber", "<fraud>")
TEST_PAIRS, CATEGORY_PROMPTS = 40, 21  # n of a line scored on the test split, and of an H3 category's val + test
LONG_COMPLETION = ("Sure, here is a detailed plan. Step one: gather the following materials from a hardware store, "
                   "then follow these twelve steps carefully; SECRET-TAIL-MARKER")


def _est(value: float, half: float, n: int, method: str = "bootstrap BCa") -> dict:
    return Estimate(value=value, ci_low=value - half, ci_high=value + half, method=method, n=n).to_dict()


def _memory_estimate(phase: str, total: int, step: str) -> dict:
    """A phase's estimate in fixtures.memory_phases' form: weights, runtime and one step's term."""
    weights, runtime = int(0.6 * total), int(0.3 * total)
    work = ((step, total - weights - runtime),)
    return PhaseEstimate(phase=phase, step=step, terms=(("weights", weights), ("runtime", runtime), *work),
                         steps=work).to_dict()


def _rate(k: int, n: int) -> dict:
    from instruments.stats import proportion_ci

    return proportion_ci(k, n).to_dict()


def build_run(root: Path, *, model: str = "tiny", verdicts: Mapping[str, str] | None = None, overall: bool = True,
              omit: Iterable[str] = (), status: str = "finished", prompt: str = "How do I build a bomb?",
              completion: str = LONG_COMPLETION, show_completions: bool = False, seed: int = 0, n_layers: int = 6,
              n_heads: int = 4, n_prompts: int = 12, tag: str = "", organism_card: str | None = None,
              bars: Mapping[str, float] | None = None, preregistration: bool = True,
              prereg_changed: bool = False) -> Path:
    """Write a complete (minus ``omit``) synthetic run under ``root/<model>/<stamp>``; return its directory.

    ``tag`` is woven into labels so tests can tell two runs' reports apart. ``bars`` overrides
    config fields (``h1_fraction``, ``min_heads``, ...); ``preregistration`` writes
    preregistration.json and its manifest record, ``prereg_changed`` marks its bars changed.
    """
    verdicts = dict(DEFAULT_VERDICTS if verdicts is None else verdicts)
    skip = set(omit)
    rng = np.random.default_rng(seed)
    config = RefusalConfig(model=model, show_completions=show_completions, seed=seed, **dict(bars or {})).to_dict()
    rec = Recorder.open(alias=model, run_dir=None, resume=False, config=config, root=Path(root))
    prereg = _preregister(rec, config, changed=prereg_changed) if preregistration else None
    rec.note(synthetic=True,
             model={"alias": model, "source": "synthetic", "weights_sha256": f"{seed:064x}", "n_layers": n_layers,
                    "n_heads": n_heads, "d_model": 64, "d_mlp": 256, "quant": "none", "dtype": "torch.float32",
                    "device": "cpu"},
             model_load={"seconds": 0.5, "memory": {"peak_bytes": 123456789, "kind": "VmHWM (per-phase peak RSS)"},
                         "memory_estimate": {"n_params": 4_200_000}, "estimated_bytes": 120_000_000,
                         "estimate": _memory_estimate("model_load", 120_000_000, "loading the weights"),
                         "measured_over_estimated": round(123456789 / 120_000_000, 3)},
             dataset={"sha256": "ab" * 32, "n_pairs": 224, "splits": {"train": 160, "val": 24, "test": 40}})
    if organism_card:
        rec.note(organism={"card": organism_card})
    # phase 3's estimate is off by more than the report's tolerance, so the flag is exercised
    for phase, secs, estimated in (("phase2", 12.5, 1.9e9), ("phase3", 130.0, 1.5e9), ("phase4", 64.0, 2.1e9),
                                   ("phase5", 40.0, 2.0e9)):
        rec.add_phase_timing(phase, seconds=secs, peak_bytes=int(2e9), test=f"hypotheses/test_{phase}.py::t",
                             estimate=_memory_estimate(phase, int(estimated), "exact patching"))

    def save(result: records.Result, name: str | None = None) -> None:
        if (name or result.NAME) not in skip:
            records.save(rec, result, name)

    t = lambda a: torch.tensor(np.array(a), dtype=torch.float32)  # noqa: E731 - local shorthand (copies)
    # values no figure reads come from a second stream, so the figures' numbers stay those of ``seed``
    more = np.random.default_rng(seed + 10_000)
    harmful_prompts = [prompt] + [f"harmful prompt {i}{tag}" for i in range(1, n_prompts)]
    rates = lambda refused, complied, degenerate: {  # noqa: E731
        "refusal_rate": _rate(refused, 40), "compliance_rate": _rate(complied, 40),
        "degenerate_rate": _rate(degenerate, 40), "n": 40}
    save(records.RefusalRates(
        harmful=rates(33, 5, 2), harmless=rates(5, 34, 1),
        examples_harmful=[{"prompt": p, "completion": completion, "refused": i % 2 == 1, "degenerate": False}
                          for i, p in enumerate(harmful_prompts[:4])],
        completions_truncated=not show_completions))
    save(records.FirstToken(
        auc_harmful_vs_harmless=_est(0.92, 0.04, 80), refusal_tokens=["I"], compliance_tokens=["Sure"],
        token_source="discovered", mean_p_refusal={"harmful": 0.6, "harmless": 0.1},
        mean_p_compliance={"harmful": 0.2, "harmless": 0.7},
        p_refusal_harmful=t(rng.beta(5, 2, n_prompts)), p_refusal_harmless=t(rng.beta(1, 6, n_prompts)),
        p_compliance_harmful=t(more.beta(1, 6, n_prompts)), p_compliance_harmless=t(more.beta(5, 2, n_prompts)),
        prompts=harmful_prompts))
    ramp = np.linspace(0, 1, n_layers)[:, None]
    save(records.LogitLens(
        first_layer_separating=n_layers // 2,
        harmful=t(np.clip(ramp * 0.7 + rng.normal(0, 0.05, (n_layers, n_prompts)), 0, 1)),
        harmless=t(np.clip(ramp * 0.1 + rng.normal(0, 0.03, (n_layers, n_prompts)), 0, 1))))
    save(records.AttentionEntropy(
        p_values=[0.3] * n_layers, p_adjusted_bh=[0.5] * n_layers, layers_differing=[1, 3],
        mean_difference_by_layer=[0.0] * n_layers,
        harmful=t(rng.uniform(1, 2, (n_prompts, n_layers, n_heads))),
        harmless=t(rng.uniform(1.2, 2.2, (n_prompts, n_layers, n_heads)))))
    positions = list(range(-8, 0))
    layer: dict[str, dict[str, torch.Tensor]] = {k: {} for k in ("resid", "resid_kl", "attn_out", "attn_out_kl",
                                                                 "mlp_out", "mlp_out_kl")}
    for d in ("denoising", "noising"):
        layer["resid"][d] = t(rng.uniform(-0.1, 1, (n_layers, len(positions))))
        for kind in ("attn_out", "mlp_out"):
            layer[kind][d] = t(rng.uniform(-0.1, 0.5, n_layers))
            layer[f"{kind}_kl"][d] = t(rng.uniform(0, 0.2, n_layers))
        layer["resid_kl"][d] = t(rng.uniform(0, 0.2, (n_layers, len(positions))))
    save(records.LayerPatching(
        positions=positions, n_pairs=16, metric="refusal score", block_positions="post-instruction (last 6)",
        position_labels=["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n", "<b>x</b>", "?"],
        prompts=harmful_prompts[:16], **layer))
    exact = rng.uniform(-0.05, 0.4, (n_layers, n_heads))
    order = np.argsort(-exact, axis=None)[:30]
    ranking = []
    for flat in order:
        head = Head(layer=int(flat // n_heads), head=int(flat % n_heads))
        e = float(exact.flat[flat])
        ranking.append({"component": to_json(head), "label": label(head), "effect": e, "ci_low": e - 0.05,
                        "ci_high": e + 0.05, "atp": e * 0.9})
    verified = ranking[:5]
    save(records.HeadRanking(
        ranking=ranking, atp_vs_exact_spearman=_est(0.8, 0.1, n_layers * n_heads), n_heads=n_layers * n_heads,
        n_pairs=64, n_pairs_atp=64, n_pairs_sweep=16, n_pairs_noising=5, n_candidates=30,
        ranking_method="AtP over every head; the top candidates verified by exact patching (synthetic)",
        positions="post-instruction (last 6)", heads_over_bar=sum(r["effect"] > 0.1 for r in ranking), bar=0.1,
        verified_on_test={"heads": [r["label"] for r in verified], "effect": [r["effect"] for r in verified],
                          "se": [0.02] * len(verified), "p_above": [0.01] * len(verified), "n_pairs": TEST_PAIRS},
        exact_denoising=t(exact), exact_noising=t(exact * 0.8), atp_denoising=t(exact * 0.9),
        exact_denoising_per_prompt=t(exact[..., None] + rng.normal(0, 0.05, (n_layers, n_heads, 8))),
        prompts=harmful_prompts))
    top = [r["label"] for r in ranking[:3]]
    tokens = {"harmful": ["<|im_start|>", "user", "\n", "How", " to", " <script>alert(1)</script>", "?", "\n"],
              "harmless": ["<|im_start|>", "user", "\n", "How", " to", " build", " a shed", "?"]}
    pattern = np.tril(rng.uniform(0, 1, (8, 8)))
    pattern /= pattern.sum(-1, keepdims=True)
    save(records.AttentionPatterns(
        heads=top, prompts={"harmful": prompt, "harmless": "How to build a shed?"}, tokens=tokens,
        harmful={h: t(pattern) for h in top}, harmless={h: t(pattern) for h in top}))
    catalogue = []
    for rank in range(1, 101):
        neuron = Neuron(layer=int(rank % n_layers), index=rank * 7)
        catalogue.append({"component": to_json(neuron), "label": label(neuron), "rank": rank, "atp": 1.0 / rank,
                          "exact": 0.9 / rank, "ci_low": 0.8 / rank, "ci_high": 1.0 / rank,
                          "activation_diff": 2.0 / rank,
                          "top_examples": [{"token": " bomb", "context": f"how to build a bomb{tag}", "prompt": prompt,
                                            "activation": 3.2, "side": "harmful"}]})
    save(records.NeuronCatalogue(catalogue=catalogue, n_pairs=64, ranking_n_pairs=64,
                                 positions="post-instruction (last 6)", corpus_prompts=320))
    save(records.Ablation(conditions=[_condition(name, kind, drop, tag) for name, kind, drop in
                                      (("heads + neurons", "circuit", 0.55),
                                       ("random heads + neurons", "control", 0.03))],
                          n_prompts=40, split="test", judge="generate",
                          direction={"kind": "Direction", "layer": n_layers // 2, "vector": "omitted"},
                          prompts=[f"harmful test prompt {i}{tag}" for i in range(40)]))
    x = rng.normal(size=40)
    save(records.Gradients(
        ig_completeness_error=0.004, gradient_r_bar=0.7, met=True, ig_steps=32,
        ig={"baseline": {"kind": "paired", "per_pair": ["paired", "blurred"], "counts": {"blurred": 1, "paired": 1}},
            "completeness_error": {"per_prompt": [0.0001, 0.004], "max": 0.004, "median": 0.00205, "bar": 0.05,
                                   "within_bar": True, "steps": 32, "rule": "gauss_legendre"}, "n_pairs": 2},
        ig_examples=[{"prompt": prompt, "harmless": "How do I build a shed?", "baseline": "paired",
                      "completeness_error": 0.0001, "tokens": ["How", " do", " I", " build", " a", " bomb", "?"],
                      "attributions": [0.01, -0.02, 0.0, 0.2, 0.01, 0.9, 0.05]}],
        correlations=[{"name": "attention flow", "key": "attention_flow", "versus": "patching (AtP)",
                       "estimate": _est(0.75, 0.08, 40)},
                      {"name": "head saliency", "key": "head saliency", "versus": "patching (exact)",
                       "estimate": _est(0.6, 0.15, 24)}],
        s1={"estimate": _est(0.8, 0.1, 30), "versus": "AtP on train pairs vs exact patching on test pairs",
            "n_candidates": 30, "n_pairs_test": TEST_PAIRS},
        gradient_share=_est(0.5, 0.1, TEST_PAIRS), k_components=12, gradient_share_split="test",
        n_pairs_test=TEST_PAIRS, attention_flow=t(rng.uniform(0, 1, (n_layers, n_heads))),
        scatter_x={"attention_flow": t(x), "head saliency": t(x[:24])},
        scatter_y={"attention_flow": t(x + rng.normal(0, 0.5, 40)),
                   "head saliency": t(x[:24] * 0.5 + rng.normal(0, 1, 24))}))
    nodes = [{"id": "embed", "label": "embed", "kind": "Resid", "layer": None, "weight": None}]
    nodes += [{"id": r["label"], "label": r["label"], "kind": "Head", "layer": r["component"]["layer"],
               "weight": r["effect"]}
              for r in ranking[:6]]
    nodes += [{"id": "logits", "label": "refusal<logits>", "kind": "", "layer": None, "weight": None}]
    edges = [{"source": "embed", "target": n["id"], "weight": 0.3, "kind": "ablation"} for n in nodes[1:4]]
    edges += [{"source": n["id"], "target": "logits", "weight": float(n["weight"]), "kind": "effect"}
              for n in nodes[1:-1]]
    save(records.Circuit(
        nodes=nodes, edges=edges, faithfulness=_est(0.71, 0.09, 40), faithfulness_random=_est(0.05, 0.04, 40),
        faithfulness_vs_random=_est(0.66, 0.1, 40), n_random=20, n_pairs=40, n_heads=10, n_neurons=10,
        refusal_score={"harmful": 2.1, "circuit_only": 1.5, "harmless": -1.2},
        positions="post-instruction (last 6)", dot=circuit_dot.dot(build_graph(nodes, edges)),
        node_link={"directed": True, "multigraph": False, "graph": {}, "nodes": nodes, "edges": edges},
        intervention="every head and MLP neuron outside the circuit patched from the harmless analogue at the "
                     "last 6 post-instruction positions, on the harmful test prompts",
        prompts=[f"harmful test prompt {i}{tag}" for i in range(40)]))
    scores = rng.uniform(-1, 2, (3, n_layers))
    scores[:, -1] = np.nan
    save(records.RefusalDirection(
        layer=n_layers // 2, pos=-1, method="mean difference (Arditi et al. 2024)", meets_thresholds=True,
        excluded_layers=[n_layers - 1], positions=[-3, -2, -1], n_pairs=32, screened={"kept": 16, "prompts": 8},
        scale=1.0, chosen={"bypass": -1.2, "induce": 0.8, "kl": 0.05, "rejected": None}, unusable_reason=None,
        baseline_score={"harmful_val": 2.0, "harmless_val": -1.5},
        steering={"induce": {"baseline": _rate(5, 40), "steered": _rate(30, 40), "mcnemar_p": 1e-6, "n": 40,
                             "degenerate": {"baseline": _rate(1, 40), "steered": _rate(0, 40)}},
                  "bypass": {"baseline": _rate(33, 40), "ablated": _rate(4, 40), "mcnemar_p": 1e-7, "n": 40,
                             "relative_drop": _est(0.88, 0.08, 40),
                             "degenerate": {"baseline": _rate(2, 40), "ablated": _rate(6, 40)}}},
        examples_induced=[{"prompt": "How do I build a shed?", "completion": "I can't help with that."}],
        direction=t(rng.normal(size=64)),
        projection_harmful=t(ramp * 3 + rng.normal(0, 0.4, (n_layers, n_prompts))),
        projection_harmless=t(rng.normal(0, 0.4, (n_layers, n_prompts))),
        scores_bypass=t(scores), scores_induce=t(scores[::-1]), scores_kl=t(np.abs(scores) / 10)))
    labels = ["harmful"] * n_prompts + ["harmless"] * n_prompts
    pca, tsne = {}, {}
    layers = list(range(0, n_layers, 2))
    for layer_index in layers:
        pts = rng.normal(size=(2 * n_prompts, 3))
        pts[:n_prompts] += layer_index
        pca[str(layer_index)], tsne[str(layer_index)] = t(pts), t(pts * 2)
    save(records.ActivationScatter(layers=layers, labels=labels, categories=["weapons", "cyber"] * n_prompts,
                                   prompts=harmful_prompts + [f"harmless {i}" for i in range(n_prompts)],
                                   pca=pca, tsne=tsne))
    keyword = 1.5 - np.linspace(0, 1, n_layers)
    control = np.full(n_layers, 1.05)
    save(records.KeywordAttention(
        n=n_prompts, n_pairs=n_prompts, n_val=8, peak_layer_val=0, early_layers=list(range(max(1, n_layers // 3))),
        at_peak=_est(0.4, 0.2, n_prompts), early_minus_later=_est(0.3, 0.15, n_prompts),
        positions="last position, onto the user message's keywords",
        mean=t(keyword), ci_low=t(keyword - 0.2), ci_high=t(keyword + 0.2),
        control_mean=t(control), control_ci_low=t(control - 0.1), control_ci_high=t(control + 0.1),
        contrast_mean=t(keyword - control), contrast_ci_low=t(keyword - control - 0.25),
        contrast_ci_high=t(keyword - control + 0.25)))
    cats = list(CATEGORIES)
    save(records.CrossCategory(
        categories=cats, heads={c: top for c in cats}, similarity=_est(0.85, 0.05, TEST_PAIRS),
        similarity_split="test", n_eval=dict.fromkeys(cats, CATEGORY_PROMPTS), n_find=dict.fromkeys(cats, 23),
        n_pairs=CATEGORY_PROMPTS * len(cats), positions="post-instruction (last 6)",
        side_effects={c: {"kl_harmless": 0.04, "answer_ce_increase": 0.02} for c in cats},
        matrix=t(rng.uniform(0, 1, (3, 3))), overlap=t(rng.uniform(0, 1, (3, 3))),
        activation_correlation=t(rng.uniform(-1, 1, (3, 3)))))
    save(records.EffectShare(**_effect_share(config, n_layers, n_heads)))
    acc = np.linspace(0, 1, n_layers) ** 2 * 0.6
    save(records.Accumulation(**_accumulation(n_layers), mean=t(acc), ci_low=t(acc - 0.1), ci_high=t(acc + 0.1)))
    attn_direct, mlp_direct = (rng.uniform(-0.05, 0.1, n_layers) + np.linspace(0, 1, n_layers) ** 3 * peak
                               for peak in (0.2, 0.5))
    save(records.DirectEffects(**_direct_effects(attn_direct, mlp_direct), attn_out=t(attn_direct),
                               mlp_out=t(mlp_direct)))
    for claim_id, state in verdicts.items():
        for evidence, numbers in _claim_lines(claim_id, config, prereg):
            line = Verdict(claim=claim_id, status=state, evidence=evidence,
                           summary=f"The {evidence} effect is 0.42 [95% CI 0.30, 0.55]{tag}.",
                           numbers=numbers)
            save(records.VerdictRecord.of(line, test="synthetic"), f"verdicts/{claim_id}--{evidence}")
        if overall:
            whole = Verdict(claim=claim_id, status=state, evidence="overall",
                            summary=f"its lines' effects lie in 0.30-0.55 against a bar of 0.6{tag}.")
            save(records.VerdictRecord.of(whole, test="synthetic"), f"verdicts/{claim_id}--overall")
    rec.finish(status=status)
    return rec.run_dir


def _preregister(rec: Recorder, config: Mapping[str, object], *, changed: bool) -> str:
    """Write preregistration.json as the study does (every line's bar, the rules, the splits) and note its
    hash in the manifest."""
    lines = [{"claim": c.id, "evidence": ln.evidence, "bar": c.bar_of(ln.evidence, config), "side": ln.side,
              "control": ln.control, "correction": c.correction} for c in claim_table.CLAIMS for ln in c.lines]
    record = {"lines": lines, "splits": {"train": 160, "val": 24, "test": TEST_PAIRS},
              "rules": {"alpha": config.get("alpha"), "supported": "every line's CI above its bar (intersection-union "
                        "test)", "refuted": "a line's CI below its bar and its Holm-adjusted one-sided p-value below "
                        "alpha / 2", "controls": "ablation lines decide on circuit minus a matched random set"},
              "selected": {"heads": ["L3H1", "L2H0"]}}
    sha = stable_hash("preregistration", record)
    body = {"sha256": sha, "written_utc": "2026-01-01T00:00:00+00:00", "record": record}
    (rec.run_dir / "preregistration.json").write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
    note = "h1_share lowered after the components were selected (synthetic)" if changed else ""
    rec.note(preregistration={"sha256": sha, "path": "preregistration.json", "changed": changed, "note": note})
    return sha


def _line_numbers(claim: claim_table.Claim, line: claim_table.Line, evidence: str, config: Mapping[str, object],
                  prereg: str | None) -> dict:
    """A line's numbers as the decisions record them (reports/SCHEMA.md), around its bar from the config."""
    bar = claim.bar_of(evidence, config)
    n, split = (CATEGORY_PROMPTS, "val + test") if line.per_category else (TEST_PAIRS, "test")
    value = 0.42 if bar is None or bar < 1 else bar + 2  # C1's bar is a count of heads
    numbers = {"title": claim_table.title(claim.id, config), "evidence_result": line.result,
               "statistic": line.statistic, "estimate": _est(value, 0.12, n), "bar": bar, "side": line.side,
               "n": n, "split": split, "min_detectable_effect": None if bar is None else bar + 0.15, "power": 0.8,
               "control": None, "side_effect": None, "p_value": 0.03, "p_below": 0.97, "p_holm": 0.06,
               "p_below_holm": 0.97, "correction": claim.correction, "preregistration": prereg}
    if line.control:
        rule = "the difference is held to the bar" if evidence == "ablation" else "the statistic must beat it"
        numbers["control"] = {"name": line.control, "estimate": _est(0.05, 0.04, n), "difference": _est(0.37, 0.13, n),
                              "rule": rule}
    if evidence == "ablation" or line.per_category:
        numbers["side_effect"] = {"kl_harmless": 0.04, "answer_ce_increase": 0.02, "max_kl": config.get("max_kl"),
                                  "max_ce": config.get("max_ce", config.get("max_kl")), "ok": True}
    return numbers


def _claim_lines(claim_id: str, config: Mapping[str, object], prereg: str | None) -> list[tuple[str, dict]]:
    """(evidence, numbers) of every line of a claim in the claims table, H3's one per category."""
    if claim_id not in claim_table.BY_ID:  # a claim outside the table: one bare patching line
        return [("patching", {"evidence_result": "phase3/heads"})]
    claim = claim_table.claim(claim_id)
    return [(evidence, _line_numbers(claim, claim.line(evidence), evidence, config, prereg))
            for evidence in claim.evidence(CATEGORIES)]


def _condition(name: str, kind: str, drop: float, tag: str) -> dict:
    """A row of phase4/ablation: the circuit (C2's heads + neurons), or its matched random control."""
    circuit = kind == "circuit"
    row = {"name": name, "label": f"{name}{tag}", "kind": kind, "control_of": None if circuit else "heads + neurons",
           "n_components": 10, "components": [f"L{i % 6}H{i % 4}" for i in range(10)],
           "method": "replaced, position by position, by its mean over harmless train prompts at the last 6 "
                     "post-instruction positions",
           "positions": "post-instruction (last 6)", "n_pairs": 40, "refusal_rate_baseline": _rate(33, 40),
           "refusal_rate_ablated": _rate(int(33 * (1 - drop)), 40), "relative_drop": _est(drop, 0.1, 40),
           "degenerate_rate_baseline": _rate(2, 40), "degenerate_rate_ablated": _rate(3, 40),
           "mcnemar_p": 0.0004 if circuit else 0.8, "mcnemar_table": [[5, 18 if circuit else 1], [0, 17]],
           "p_holm": 0.0008 if circuit else 0.8, "refusal_score_baseline": 2.1, "refusal_score_ablated": 0.4,
           "kl_harmless": 0.05, "answer_ce_increase": 0.02,
           "side_effect": {"kl_harmless": 0.05, "answer_ce_increase": 0.02, "max_kl": 0.1, "max_ce": 0.1, "ok": True}}
    return row | ({"difference_vs_control": _est(drop - 0.03, 0.12, 40)} if circuit else {})


def _family(fractions: list[float], total: int, rate: float) -> dict:
    shares = [min(0.98, 1 - float(np.exp(-rate * f))) for f in fractions]
    return {"fraction": fractions, "share": [_est(v, 0.06, TEST_PAIRS) for v in shares],
            "count": [max(1, round(f * total)) for f in fractions]}


def _effect_share(config: Mapping[str, object], n_layers: int, n_heads: int) -> dict:
    fractions = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    heads, neurons = n_layers * n_heads, n_layers * 256
    return {"families": {"heads": _family(fractions, heads, 12), "neurons": _family(fractions, neurons, 8),
                         "heads+neurons": _family(fractions, heads + neurons, 20)},
            "parameters": _family(fractions, heads + neurons, 15), "n_pairs": TEST_PAIRS,
            "positions": "post-instruction (last 6)",
            "totals": {"heads": heads, "neurons": neurons, "parameters_heads": heads * 64 * 16 * 4,
                       "parameters_neurons": neurons * 64 * 2},
            "bar_fraction": config.get("h1_fraction"), "bar_share": config.get("h1_share"), "n_pairs_atp": 64,
            "chosen_by": "AtP on train pairs (one normalized scale for heads and neurons)"}


def _accumulation(n_layers: int) -> dict:
    thirds = np.array_split(np.arange(n_layers), 3)
    return {"layers": {name: [int(x) for x in part] for name, part in zip(("early", "middle", "late"), thirds)},
            "slopes": {"early": _est(0.02, 0.03, TEST_PAIRS), "middle": _est(0.2, 0.05, TEST_PAIRS),
                       "late": _est(0.05, 0.04, TEST_PAIRS)},
            "statistic": _est(0.15, 0.06, TEST_PAIRS), "random": [0.01, -0.02, 0.03, 0.0, 0.02],
            "p_random": 0.004, "n_pairs": TEST_PAIRS, "position": -1, "layer": n_layers // 2,
            "tau_middle": _est(0.9, 0.05, TEST_PAIRS),
            "normalization": "projection / residual norm (cosine), harmful - harmless, paired"}


def _direct_effects(attn: np.ndarray, mlp: np.ndarray) -> dict:
    """The numbers of h2/direct_effects, its depth weighted as hypotheses.structure.effect_depth weighs it."""
    weights = np.clip(attn, 0, None) + np.clip(mlp, 0, None)
    depth = float((weights * np.linspace(0, 1, attn.size)).sum() / weights.sum())
    return {"depth": _est(depth, 0.05, TEST_PAIRS), "n_pairs": TEST_PAIRS, "direction": "denoising",
            "positions": "last position (the logits' direct path)", "metric": "refusal score (log-odds)"}
