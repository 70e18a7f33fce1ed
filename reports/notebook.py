"""Notebook helpers: the report's figures and tables, one result at a time (notebooks/results.ipynb).

The blocks are the very ones the report renders (reports/write_up.py), so a notebook and
report.html of the same run show the same numbers. Plotly figures are shown as Plotly
figures (interactive in Jupyter); SVG views and tables as HTML / Markdown.
"""

from __future__ import annotations

from typing import Any, Iterator

from reports.context import RunContext
from reports.document import Block, Figure
from reports.templating import block_markdown


def result_blocks(ctx: RunContext) -> Iterator[tuple[str, str, list[Block]]]:
    """(result name, title, blocks) for every result the report knows, present or missing."""
    from reports import fig_verification
    from reports.write_up import RESULT_GROUPS

    for _, _, _, members in RESULT_GROUPS:
        for name, title, build in members:
            yield name, title, build(ctx)
    yield "phase4/ablation", "Ablation conditions", fig_verification.ablation(ctx)


def verdict_markdown(ctx: RunContext) -> str:
    from reports.sections_front import verdict_section

    return "\n".join(block_markdown(b) for b in verdict_section(ctx).blocks)


def show(block: Block) -> None:
    """Display one block in Jupyter (Plotly figures interactive, the rest as HTML / Markdown)."""
    from IPython.display import HTML, Markdown, display

    if isinstance(block, Figure):
        if block.source is not None:
            block.source.show()
        else:
            display(HTML(str(block.html)))
        return
    display(Markdown(block_markdown(block)))
