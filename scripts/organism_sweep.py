"""Try organism recipes side by side on an accelerator: a recipe search, not a build.

Each variant goes through fixtures.organism's own ``build`` (training and the held-out
evaluation) into a temporary folder that is then deleted: nothing enters the organism cache. A CPU build costs ~30 min on 2
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
