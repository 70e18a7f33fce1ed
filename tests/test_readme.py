"""The README stays a true user guide: short, its table generated, its example runnable, its links live.

- The configuration table between the ``config-table`` marker comments is exactly what
  :func:`fixtures.config.config_table_markdown` renders from ``RefusalConfig``;
  ``.venv/bin/python -m tests.test_readme`` rewrites it in place.
- The Python block after the ``library-example`` marker runs as written (on ``tiny``).
- Every relative link in README.md and docs/*.md points to a file that exists, and every
  ``#anchor`` to a heading of its target (GitHub's heading slugs).
- Every ``./suite`` command they show is one the ``suite`` script accepts.
- The README stays at most 220 lines; history and detail belong in docs/.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from fixtures.config import config_table_markdown
from fixtures.storage import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
MAX_LINES = 220
TABLE_START = re.compile(r"^<!-- config-table:.*-->$", re.M)
TABLE_END = "<!-- /config-table -->"
REGENERATE = ".venv/bin/python -m tests.test_readme"
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def with_config_table(text: str) -> str:
    """``text`` with the configuration table between its markers replaced by the current one."""
    start = list(TABLE_START.finditer(text))
    if len(start) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(f"README.md needs exactly one '<!-- config-table: ... -->' line and one {TABLE_END!r} "
                         f"line around the configuration table (found {len(start)} and {text.count(TABLE_END)})")
    head, end = text[:start[0].end()], text.index(TABLE_END)
    if end < start[0].end():
        raise ValueError(f"{TABLE_END!r} comes before the config-table start marker in README.md")
    return f"{head}\n{config_table_markdown()}\n{text[end:]}"


def _prose(text: str) -> str:
    """Markdown without fenced code blocks or inline code, where nothing is a link or a heading."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes on repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.resolve().is_relative_to(REPO_ROOT) else str(path)


def broken_links(path: Path) -> list[str]:
    """Each relative link of a markdown file whose file is missing, or whose #anchor no heading has."""
    problems = []
    for target in LINK.findall(_prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: are not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        name = f"{_shown(path)}: ({target})"
        if not dest.exists():
            problems.append(f"{name} points to {_shown(dest)}, which does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{name}: no heading of {dest.name} has the anchor #{anchor}; "
                            f"its anchors are {', '.join(sorted(anchors(dest)))}")
    return problems


def test_the_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, (f"README.md has {n} lines (at most {MAX_LINES}): it is the user guide; move "
                            "history, measurements and method detail to docs/ and link them")


def test_the_config_table_is_the_current_one():
    text = README.read_text()
    assert with_config_table(text) == text, (
        "README.md's configuration table differs from fixtures.config.RefusalConfig (a field, default or help "
        f"changed). Regenerate it with: {REGENERATE}")


def test_the_config_table_has_every_field_once():
    from fixtures.config import RefusalConfig

    table = config_table_markdown().splitlines()
    assert len(table) == 2 + len(RefusalConfig.fields())
    for f in RefusalConfig.fields():
        assert sum(row.startswith(f"| `{f.metadata['flag']}`") for row in table) == 1, f.metadata["flag"]
    assert all(row.count(" | ") == 2 for row in table[2:]), "a help text broke a row into more columns"


def test_a_stale_table_is_replaced_and_the_rest_kept():
    stale = "intro\n<!-- config-table: any note -->\n| old | table |\n<!-- /config-table -->\nafter\n"
    assert with_config_table(stale) == (f"intro\n<!-- config-table: any note -->\n{config_table_markdown()}\n"
                                        "<!-- /config-table -->\nafter\n")


def test_rewriting_the_table_needs_its_markers():
    with pytest.raises(ValueError, match="config-table"):
        with_config_table("# a README without the markers\n")


def test_the_library_example_runs(capsys):
    match = re.search(r"<!-- library-example[^>]*-->\s*```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert match, "README.md lost its '<!-- library-example -->' marker before the ```python block"
    code = match.group(1)
    assert "tiny" in code, "the example must run on the in-process tiny model, so CI needs no download"
    exec(compile(code, "README.md (library example)", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"^L\d+H\d+ .*95% CI", out, re.M), f"the example printed no head with its CI:\n{out}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_and_anchors_resolve(path):
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


def test_a_missing_file_or_anchor_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-section-with-code) [gone](missing.md) [bad](other.md#nowhere) "
                    "[web](https://example.org/x) `[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n")
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert "missing.md" in problems[0] and "does not exist" in problems[0]
    assert "#nowhere" in problems[1] and "a-section-with-code" in problems[1]


def test_slugs_follow_github():
    assert slug("The latest `./suite main`, phase by phase") == "the-latest-suite-main-phase-by-phase"
    assert slug("How often the suite is right: the validation card") == "how-often-the-suite-is-right-the-validation-card"
    assert slug("The explorer's numbers") == "the-explorers-numbers"


def test_suite_commands_exist():
    script = (REPO_ROOT / "suite").read_text()
    accepted = set(re.findall(r"^\s+([a-z]+)\)", script, re.M))
    assert {"main", "test"} <= accepted, f"could not read the suite script's commands: {accepted}"
    for path in [README, *DOCS]:
        used = set(re.findall(r"\./suite ([a-z]+)", path.read_text()))
        assert used <= accepted, (f"{path.relative_to(REPO_ROOT)} shows ./suite {', '.join(sorted(used - accepted))}, "
                                  f"which the suite script does not accept (it takes {', '.join(sorted(accepted))})")


if __name__ == "__main__":
    README.write_text(with_config_table(README.read_text()))
    print(f"rewrote the configuration table in {README}", file=sys.stderr)
