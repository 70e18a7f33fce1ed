"""The research report: report.html (self-contained, offline) and report.md of one run directory.

Render with ``python -m reports [RUN_DIR]`` (or ``./suite report``); pytest renders the
session's run at the end of every session unless ``--no-refusal-report``. Modules:
context (load a run), write_up/sections_*/methodology (the text), fig_* (figures), circuit_svg
and attention_view (inline SVG), templating and render (templates, atomic writes), cli,
session and plugin (pytest), validate (``./suite validate``), synthetic, browser, app (the
explorer); docs/architecture.md says what each holds.
"""
