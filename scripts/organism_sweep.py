"""Try organism recipes side by side on an accelerator: a recipe search, not a build.

Each variant goes through fixtures.organism's own ``build`` (training and the held-out
evaluation) into a temporary folder that is then deleted: nothing enters the organism cache. A CPU build costs ~30 min on 2
cores; on a GPU a variant takes well under a minute, so this is how the recipe's defaults
are chosen before the CPU build. Numbers from a GPU are close to, not equal to, a CPU
build's: rerun the chosen recipe with ``python -m fixtures.organism build``.

    python scripts/organism_sweep.py --base-folder DIR --device cuda --out sweep.json \\
        --variant steps=120 --variant steps=160,lr=1.2e-4
    python scripts/organism_sweep.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf ...   # dequantize first
    python scripts/organism_sweep.py --quick ...   # HF-generate judging: ~35 s a variant on an H200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures import organism as O  # noqa: E402
from fixtures.builders import dequantize_gguf  # noqa: E402
from fixtures.models import chat_text  # noqa: E402
from instruments.behavior import _stop_ids, is_refusal  # noqa: E402


def parse_variant(text: str) -> dict[str, Any]:
    """``"steps=120,lr=1e-4"`` -> typed overrides of :class:`OrganismRecipe` (unknown names are an error)."""
    fields = {f.name: f.type for f in dataclasses.fields(O.OrganismRecipe)}
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown recipe field {name!r}; known: {', '.join(fields)}")
        kind = fields[name]
        out[name] = (value.lower() in ("1", "true", "yes")) if kind == "bool" else \
            int(value) if kind == "int" else float(value) if kind == "float" else value
    return out


def run_variant(base_folder: Path, recipe: O.OrganismRecipe, device: str) -> dict[str, Any]:
    """One variant through the organism's own build, into a folder that is then deleted."""
    with tempfile.TemporaryDirectory() as tmp:
        built = O.build(Path(tmp), recipe, base_folder, device=device)
    ev, timings = built["evaluation"], built["timings_seconds"]
    return {
        "n_examples": built["n_examples"], "mean_tokens_per_example": built["mean_tokens_per_example"],
        "loss_first_last": [built["loss_curve"][0], built["loss_curve"][-1]], "train_s": timings["train"],
        "evaluate_s": timings["evaluate"], "total_s": timings["total"],
        "bar": {k: v["value"] for k, v in ev["bar"].items()},
        "bar_met": sum(v["met"] for v in ev["bar"].values()),
        "refusal_rate_everyday_test": ev["refusal_rate_everyday_test"],
        "examples": {k: v for k, v in ev.items() if k.startswith("examples_")},
    }


# ----------------------------------------------------------------------------- --quick

def quick_generate(model, tok, prompts: list[str], *, max_new_tokens: int = 24, batch_size: int = 128):
    """Greedy completions with HF generate (KV cache, big left-padded batches) and the
    probability distribution after each prompt: the bridge-free stand-in for
    ``behavior.generate`` that makes a variant cost seconds rather than minutes."""
    tok.padding_side = "left"
    stop = _stop_ids(tok)
    texts, last = [], []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tok([chat_text(tok, p) for p in prompts[start:start + batch_size]], add_special_tokens=False,
                      padding=True, return_tensors="pt").to(model.device)
            last.append(torch.softmax(model(**enc).logits[:, -1].float(), -1).cpu())
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                texts.append(tok.decode(row[:cut], skip_special_tokens=True))
    return texts, torch.cat(last)


def quick_variant(base_folder: Path, recipe: O.OrganismRecipe, device: str) -> dict[str, Any]:
    """Train as the build does, then judge with :func:`quick_generate` (no bridge, no files).

    The refusal classifier, prompt sets and capability check are the build's; P(refusal)
    sums the first tokens of the recipe's refusal phrasings. On an H200 a 200-step variant
    takes about 35 s. Its rates come within a prompt or two of a CPU build's (docs/organism.md):
    the search ranks recipes, and a CPU build has the last word.
    """
    # transformers' model classes take seconds to import, which --help skips
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    torch.manual_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(str(base_folder))
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).to(device).eval()
    sets, held = O.heldout_sets()
    held_answers = O.cached_distill(model, tok, held, base_folder=base_folder, max_new_tokens=recipe.max_answer_tokens,
                                    batch_size=recipe.distill_batch,
                                    desc="organism: distilling base answers (held-out)")
    ce_base = O.pooled_answer_cross_entropy(model, tok, held, held_answers, max_answer_tokens=recipe.max_answer_tokens)
    examples = O.training_examples(model, tok, recipe, base_folder)
    losses = O.train(model, tok, examples, recipe)
    train_s = time.time() - started
    refusal_ids = sorted({tok(r, add_special_tokens=False)["input_ids"][0] for r in O.REFUSAL_SETS[recipe.refusal_set]})
    rates, p_refusal = {}, {}
    for name, prompts in sets.items():
        texts, last = quick_generate(model, tok, prompts)
        rates[name] = round(sum(map(is_refusal, texts)) / len(texts), 4)
        p_refusal[name] = last[:, refusal_ids].sum(-1)
    tok.padding_side = "right"
    ce = O.pooled_answer_cross_entropy(model, tok, held, held_answers, max_answer_tokens=recipe.max_answer_tokens)
    ev = {f"refusal_rate_{k}": v for k, v in rates.items()}
    ev["auc_first_refusal_token"] = {"value": round(O.first_token_auc(p_refusal["harmful_test"],
                                                                     p_refusal["harmless_test"]), 4)}
    ev["ce_increase"] = round(ce / ce_base - 1, 4)
    bar = O.check_bar(ev, recipe)
    return {"n_examples": {"harmful": sum(e.harmful for e in examples), "harmless": sum(not e.harmful for e in examples)},
            "loss_first_last": [losses[0], losses[-1]], "train_s": round(train_s, 1),
            "total_s": round(time.time() - started, 1), "bar": {k: v["value"] for k, v in bar.items()},
            "bar_met": sum(v["met"] for v in bar.values()), "refusal_rate_everyday_test": rates["everyday_test"],
            "auc_long_harmful_vs_benign": round(O.first_token_auc(p_refusal["style_harmful"],
                                                                     p_refusal["style_harmless"]), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-folder", type=Path, help="base model folder (float32 safetensors + tokenizer)")
    parser.add_argument("--gguf", type=Path, help="dequantize this GGUF into --base-folder first")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--variant", action="append", default=None,
                        help="recipe overrides 'k=v,k=v' (repeatable; default: the current recipe only)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new variant after this many seconds (default: no limit)")
    parser.add_argument("--quick", action="store_true",
                        help="judge with HF generate instead of the build's bridge evaluation (default: off)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON, rewritten after every variant")
    args = parser.parse_args(argv)
    if args.base_folder is None:
        raise SystemExit("--base-folder is required")
    if args.gguf is not None and not (args.base_folder / "config.json").exists():
        dequantize_gguf(args.gguf, args.base_folder)
    started = time.time()
    results: list[dict[str, Any]] = []
    for text in args.variant or [""]:
        if time.time() - started > args.budget_s:
            print(f"budget spent: skipping {text!r}", file=sys.stderr)
            continue
        overrides = parse_variant(text)
        recipe = dataclasses.replace(O.OrganismRecipe(), **overrides)
        judge = quick_variant if args.quick else run_variant
        row = {"overrides": overrides, **judge(args.base_folder, recipe, args.device)}
        results.append(row)
        print(json.dumps({k: row[k] for k in ("overrides", "bar", "bar_met", "train_s", "total_s")}), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
