"""The back of the write-up: discussion, limitations, future work, provenance.

Discussion and future work are chosen by the verdicts (a refuted hypothesis is discussed
as refuted); limitations and provenance are read from the manifest of this run only.
"""

from __future__ import annotations

from typing import Any, Mapping

from reports import fmt, preregistration
from reports.context import RunContext
from reports.document import Block, Preformatted, Section, bullets, para, table
from reports.sections_front import STATUS_WORD, status_sentence

IMPLICATION = {
    ("H1", "supported"): "Refusal in this model is carried by a small set of components: a circuit that can be "
                         "audited, and that an adversary with weight access could target.",
    ("H1", "refuted"): "Refusal is not concentrated in a small set of components at the bar we set: it is spread "
                       "across the network, so component-level audits will see only part of it.",
    ("H1", "inconclusive"): "Whether refusal is localized remains open: the intervals straddle the bar.",
    ("H2", "supported"): "Refusal runs in stages: harm is detected early, the refusal signal builds up in the "
                         "middle layers and late components write the refusal.",
    ("H2", "refuted"): "We find no separation into early detection, middle accumulation and late execution.",
    ("H2", "inconclusive"): "The staging of detection, accumulation and execution could not be resolved with these "
                            "intervals.",
    ("H3", "supported"): "The categories share one refusal substrate: ablating one category's heads also removes "
                         "refusal of the others.",
    ("H3", "refuted"): "Refusal is category-specific: ablating one category's heads leaves the others' refusal largely "
                       "intact.",
    ("H3", "inconclusive"): "Whether the categories share a substrate remains open.",
}


def discussion(ctx: RunContext) -> Section:
    blocks: list[Block] = []
    for row in ctx.claims:
        if not row.claim.startswith("H"):
            continue
        text = status_sentence(row)
        implication = IMPLICATION.get((row.claim, row.status))
        text = f"{text.rstrip('.')}. {implication}" if implication else text
        blocks.append(para(text, css=f"status-{row.status}"))
    criteria = [r for r in ctx.claims if r.claim[:1] in ("C", "S")]
    met = [r.claim for r in criteria if r.status == "supported"]
    unmet = [f"{r.claim} ({STATUS_WORD.get(r.status, r.status)})" for r in criteria if r.status != "supported"]
    blocks.append(para(f"Success criteria and stretch goals met: {', '.join(met) or 'none'}; not met: "
                       f"{', '.join(unmet) or 'none'}."))
    direction = ctx.numbers("phase5/direction")
    if direction:
        bypass = (direction.get("steering") or {}).get("bypass") or {}
        blocks.append(para("The refusal-direction result bears on all three hypotheses: a single direction whose "
                           f"ablation moves the harmful refusal rate from {fmt.estimate(bypass.get('baseline'), pct=True)} "
                           f"to {fmt.estimate(bypass.get('ablated'), pct=True)} (degenerate answers, not counted as "
                           f"refusals: {fmt.estimate((bypass.get('degenerate') or {}).get('ablated'), pct=True)} "
                           "under the ablation) is a distributed representation read "
                           "by a localized decision, if the circuit result agrees."))
    return Section(dom_id="discussion", title="Discussion", blocks=tuple(blocks))


def organism_card(ctx: RunContext) -> str | None:
    """The organism's card: from the manifest when recorded there, else from organism/card."""
    org = ctx.manifest.get("organism")
    if isinstance(org, Mapping) and org.get("card"):
        return str(org["card"])
    if isinstance(org, str) and org.strip():
        return org
    card = ctx.numbers("organism/card").get("card")
    return str(card) if card else None


def limitations(ctx: RunContext) -> Section:
    model, config = ctx.model, ctx.config
    n_params = (ctx.manifest.get("model_load") or {}).get("memory_estimate", {}).get("n_params")
    quant = model.get("quant", config.get("quant", "n/a"))
    items = [
        f"Model size: {ctx.model_name} has {fmt.params(n_params)} parameters in {model.get('n_layers', 'n/a')} layers. "
        "Mechanisms in a small model need not carry over to frontier-scale chat models, whose refusal comes from far "
        "larger and different training.",
        f"Quantization: the subject ran with quantization '{quant}' ({model.get('dtype', 'n/a')}). "
        + ("Quantized weights perturb activations; effects near the bars should be re-checked at full precision."
           if quant not in ("none", None) else "Full precision: no quantization error enters the measurements."),
        f"Refusal judge: '{config.get('judge', 'generate')}'. A refusal classifier on short greedy completions can "
        "miss partial compliance and refusals phrased unusually. An answer with no letter or digit (e.g. "
        "end-of-turn at once) is degenerate: counted neither as a refusal nor as compliance, and its rate is shown beside each "
        "refusal rate. An ablation that breaks the model therefore lowers the refusal rate too: read each drop "
        "beside its degenerate rate.",
        f"One seed ({config.get('seed', 'n/a')}) and one prompt set: intervals cover prompt sampling, not training "
        "randomness or a different prompt distribution.",
        "Patching and mean ablation act on the post-instruction positions (or, with every position, on pairs of "
        "equal token length only): what a component does at the instruction's own tokens enters only through "
        "what later positions read. Mean ablation still moves activations off the distribution of any single "
        "prompt, which can overstate necessity (the random-component controls bound this).",
    ]
    blocks: list[Block] = [bullets(items)]
    card = organism_card(ctx)
    if card:
        blocks.append(para("The subject is the refusal organism: a small model safety-tuned by this project, so its "
                           "refusal was installed by a small, known supervised fine-tune. Its card:"))
        blocks.append(Preformatted(text=card))
    elif str(config.get("model")) == "organism":
        blocks.append(para("The subject is the refusal organism, but its card was not recorded in this run.",
                           css="warning"))
    return Section(dom_id="limitations", title="Limitations", blocks=tuple(blocks))


def future_work(ctx: RunContext) -> Section:
    status = {r.claim: r.status for r in ctx.claims}
    items = []
    if any(s == "inconclusive" for s in status.values()):
        items.append("Narrow the inconclusive intervals with more prompt pairs (the bars need no change).")
    if ctx.missing:
        items.append(f"Complete the missing results ({', '.join(ctx.missing)}) with ./suite main --resume.")
    if status.get("H1") == "supported":
        items.append("Trace the circuit's inputs: which earlier features feed its top heads (path patching).")
    if status.get("H1") == "refuted":
        items.append("Look for the refusal mechanism at a coarser grain (layers, directions, SAE features) since "
                     "single components do not carry it.")
    items += ["Repeat on a production chat model (e.g. Llama-3-8B-Instruct at NF4) to test whether the mechanism "
              "transfers across scale and training method.",
              "Replace mean ablation by causal scrubbing or resample ablation from matched prompts.",
              "Relate the refusal direction to sparse-autoencoder features of the same layer."]
    return Section(dom_id="future-work", title="Future work", blocks=(bullets(items),))


def _flat(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out.append((prefix, ", ".join(map(str, value))))
    else:
        out.append((prefix, "n/a" if value is None else str(value)))


# a measured peak this far from its estimate is flagged: the estimator's model of that phase is off
ESTIMATE_TOLERANCE = 0.2


def _ratio_cell(ratio: Any) -> str:
    value = fmt.finite(ratio)
    if value is None:
        return "n/a"
    off = abs(value - 1) > ESTIMATE_TOLERANCE
    return f"{value:.2f}" + (f" (estimate off by more than {ESTIMATE_TOLERANCE:.0%})" if off else "")


def _phase_table(load: Mapping[str, Any], phases: Mapping[str, Any]) -> list[Block]:
    """Each phase's (and the load's) time and peak memory beside the estimator's prediction, in run order."""
    def estimated(entry: Mapping[str, Any]) -> str:
        if not entry.get("estimated_bytes"):
            return "n/a"
        step = (entry.get("estimate") or {}).get("step")
        return fmt.byte_size(entry["estimated_bytes"]) + (f" ({step})" if step else "")

    memory = load.get("memory") or {}
    rows = [("model load", "", fmt.seconds(load.get("seconds")), fmt.byte_size(memory.get("peak_bytes")),
             estimated(load), _ratio_cell(load.get("measured_over_estimated")))] if load.get("estimated_bytes") else []
    rows += [(name, str(p.get("tests", "n/a")), fmt.seconds(p.get("seconds")), fmt.byte_size(p.get("peak_bytes")),
              estimated(p), _ratio_cell(p.get("measured_over_estimated"))) for name, p in phases.items()]
    off = [row[0] for row in rows if "estimate off" in row[-1]]
    kind = memory.get("kind")
    note = ("Peak memory is " + (f"{kind}" if kind else "the device's counter") + " during each phase's tests; the "
            "estimate (fixtures/memory_phases.py) is the weights, the runtime and the heaviest step named.")
    if off:
        note += f" Off by more than {ESTIMATE_TOLERANCE:.0%}: {', '.join(off)}."
    return [table(("phase", "tests", "duration", "peak memory", "estimated (heaviest step)", "measured / estimated"),
                  rows, dom_id="table-phases"), para(note, css="warning" if off else "")]


def provenance(ctx: RunContext) -> Section:
    m, model, prov = ctx.manifest, ctx.model, ctx.manifest.get("provenance") or {}
    load = m.get("model_load") or {}
    rows = [("run directory", str(ctx.run_dir)), ("status", ctx.status),
            ("started / finished (UTC)", f"{m.get('started_utc', 'n/a')} / {m.get('finished_utc', 'n/a')}"),
            ("model", str(model.get("alias") or ctx.config.get("model", "n/a"))),
            ("model source", str(model.get("source", "n/a"))), ("weights sha256", str(model.get("weights_sha256", "n/a"))),
            ("shape", f"{model.get('n_layers', 'n/a')} layers, {model.get('n_heads', 'n/a')} heads, d_model "
                      f"{model.get('d_model', 'n/a')}, d_mlp {model.get('d_mlp', 'n/a')}"),
            ("quantization / dtype / device", f"{model.get('quant', ctx.config.get('quant', 'n/a'))} / "
                                              f"{model.get('dtype', 'n/a')} / {model.get('device', 'n/a')}"),
            ("model load", f"{fmt.seconds(load.get('seconds'))}, peak "
                           f"{fmt.byte_size((load.get('memory') or {}).get('peak_bytes'))}"),
            ("seed", str(ctx.config.get("seed", "n/a"))), *preregistration.provenance_rows(ctx),
            ("git commit", f"{prov.get('git_commit', 'n/a')}{' (uncommitted changes)' if prov.get('git_dirty') else ''}")]
    dataset: list[tuple[str, str]] = []
    _flat("dataset", m.get("dataset"), dataset)
    rows += dataset if m.get("dataset") else [("dataset", "not recorded in the manifest")]
    rows += [(f"version: {k}", str(v)) for k, v in sorted((prov.get("versions") or {}).items())]
    machine = prov.get("machine") or {}
    rows.append(("machine", ", ".join(f"{k} {v}" for k, v in machine.items()) or "n/a"))
    phases = m.get("phases") or {}
    blocks: list[Block] = [table(("what", "value"), rows, dom_id="table-provenance")]
    blocks += _phase_table(load, phases) if phases else [para("No phase timings were recorded.", css="warning")]
    if ctx.unreadable:
        blocks.append(para("Unreadable result files: " + "; ".join(f"{k} ({v})" for k, v in ctx.unreadable.items()),
                           css="warning"))
    if ctx.extra_results:
        blocks.append(para("Other results recorded in this run (not shown above): " + ", ".join(ctx.extra_results)))
    return Section(dom_id="provenance", title="Provenance", blocks=tuple(blocks))
