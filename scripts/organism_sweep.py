"""Try organism recipes side by side on an accelerator: a recipe search, not a build.

Each variant is trained from the base weights in memory with fixtures.organism's own code
(``training_examples``, ``train``), judged by its own ``evaluate`` on the held-out splits,
and then thrown away: nothing enters the organism cache. A CPU build costs ~30 min on 2
cores; on a GPU a variant takes well under a minute, so this is how the recipe's defaults
are chosen before the CPU build. Numbers from a GPU are close to, not equal to, a CPU
build's: rerun the chosen recipe with ``python -m fixtures.organism build``.

    python scripts/organism_sweep.py --base-folder DIR --device cuda --out sweep.json \\
        --variant steps=120 --variant steps=160,lr=1.2e-4
    python scripts/organism_sweep.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf ...   # dequantize first
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures import organism as O  # noqa: E402
from fixtures.builders import dequantize_gguf  # noqa: E402


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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.time()
    torch.manual_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(str(base_folder))
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32).to(device).eval()
    examples = O.training_examples(model, tok, recipe, base_folder)
    # tokens per step: what a CPU build's time scales with (padding aside)
    lengths = [len(O._encode_example(tok, e.prompt, e.answer, max_answer_tokens=recipe.max_answer_tokens)[0])
               for e in examples]
    t0 = time.time()
    losses = O.train(model, tok, examples, recipe)
    train_s = time.time() - t0
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        t0 = time.time()
        ev = O.evaluate(Path(tmp), base_folder, recipe, device=device)
    return {
        "n_examples": {"harmful": sum(e.harmful for e in examples), "harmless": sum(not e.harmful for e in examples)},
        "mean_tokens_per_example": round(sum(lengths) / len(lengths), 1),
        "loss_first_last": [losses[0], losses[-1]], "train_s": round(train_s, 1),
        "evaluate_s": round(time.time() - t0, 1), "total_s": round(time.time() - started, 1),
        "bar": {k: v["value"] for k, v in ev["bar"].items()},
        "bar_met": sum(v["met"] for v in ev["bar"].values()),
        "refusal_rate_everyday_test": ev["refusal_rate_everyday_test"],
        "examples": {k: v for k, v in ev.items() if k.startswith("examples_")},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-folder", type=Path, help="base model folder (float32 safetensors + tokenizer)")
    parser.add_argument("--gguf", type=Path, help="dequantize this GGUF into --base-folder first")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--variant", action="append", default=None,
                        help="recipe overrides 'k=v,k=v' (repeatable; default: the current recipe only)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new variant after this many seconds (default: no limit)")
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
        row = {"overrides": overrides, **run_variant(args.base_folder, recipe, args.device)}
        results.append(row)
        print(json.dumps({k: row[k] for k in ("overrides", "bar", "bar_met", "train_s", "total_s")}), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
