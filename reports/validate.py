"""``./suite validate``: run the validation card's studies, write its JSON and its page.

The studies and the counts are hypotheses/validation.py's; the page (``.md``) is the report's
own rendering of the card (reports/validation_card.py), so the two never disagree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from fixtures.storage import atomic_write_bytes, unwritable_reason
from hypotheses import validation as val
from instruments import progress
from reports import validation_card


def write_page(js: Path, read: validation_card.CardRead | None = None) -> Path:
    """The card's page beside its JSON, atomically: the report's blocks for it, then its designs."""
    md = js.with_suffix(".md")
    atomic_write_bytes(md, validation_card.markdown(read or validation_card.read_card(js)).encode())
    return md


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./suite validate", description=val.__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one seed per design, 5 nulls, 2 label shuffles (what CI runs; default: the full card)")
    parser.add_argument("--out", metavar="DIR", type=Path, default=val.DOCS,
                        help=f"folder the card is written to (default: {val.DOCS})")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    problem = unwritable_reason(args.out)
    if problem:  # checked before minutes of studies, not after
        print(f"./suite validate: cannot write the card to {args.out} ({problem}); pass --out a writable folder",
              file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, val.cores()))

    def report_wrong(run: val.Run) -> None:  # seen at once, not only in the card minutes later
        if run.wrong:
            progress.note(f"validate: {run.kind} {run.member} seed {run.seed}: WRONG: "
                          f"{', '.join(dict.fromkeys(run.wrong))}")

    start = time.time()
    cfg = val.family_config()
    runs = val.run_all(mode, cfg, on_run=report_wrong)
    card = val.summarize(runs, mode=mode, seconds=time.time() - start, cfg=cfg)
    js = val.write_card(card, args.out)
    read = validation_card.read_card(js)  # read once: the page and the summary line show the same card
    md = write_page(js, read)
    nf = card["null_fpr"]
    n_wrong = sum(len(r.wrong) for r in runs)
    rate = validation_card.rate_text(read.card.null_fpr.rate)
    print(f"validation card ({mode}): {n_wrong} wrong verdicts; null false-positive rate {rate}; "
          f"written to {js} and {md}", file=sys.stderr)
    return 0 if n_wrong == 0 and (nf["rate"] or 0) <= val.MAX_NULL_FPR else 1


if __name__ == "__main__":
    sys.exit(main())
