"""TransformerBridge names are spelled in one place: instruments/components.py.

:func:`hook_name`, :func:`writer_name` and :func:`layer_of` there map components to hook
names and residual-writer module paths and back; everything else asks them. The scan
below enforces it, and the table tests pin the names themselves against the bridge.

The scan's rule: every string literal (f-strings included) in the project's Python
files, except docstrings, is checked; it spells a name when its source text holds

* ``blocks.`` followed by a digit, ``{``, ``(`` or ``\\`` (a block index written,
  formatted or parsed, e.g. ``"blocks.3.attn.hook_z"``, ``f"blocks.{layer}.attn.o"``,
  ``r"blocks\\.(\\d+)\\."``) or by ``L.`` (the placeholder of a name in a message), or
* a TransformerLens hook-point name as a whole word (``hook_embed``, ``hook_resid_pre``,
  ``hook_z``, ``hook_pattern``, ``hook_in``, ...).

Docstrings (a string that is a statement by itself) are prose and may mention hooks;
comments are not string tokens. A bare ``"embed"`` cannot be told from the word and is
not flagged: :func:`writer_name` ``(Embed())`` is the name of that module.
"""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

import pytest

from instruments.components import (AttnOut, Direction, Embed, Head, MlpOut, Neuron, Pattern, Resid, ResidMid,
                                    ResidPost, UnknownComponentError, hook_name, layer_of, validate, writer_name)

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("instruments", "fixtures", "hypotheses", "reports", "scripts", "tests")
EXEMPT = {"instruments/components.py", Path(__file__).resolve().relative_to(ROOT).as_posix()}

_BLOCK_NAME = re.compile(r"blocks\\?\.(?:[\d{(\\]|L\.)")
_HOOK_POINT = re.compile(r"\bhook_(?:embed|pos_embed|unembed|tokens|resid_pre|resid_mid|resid_post|attn_out|mlp_out|"
                         r"attn_in|mlp_in|q_input|k_input|v_input|[qkvz]|rot_[qk]|pattern|attn_scores|result|"
                         r"post|pre|pre_linear|in|out|scale|normalized|hidden_states)\b")
_F_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+: an f-string is several tokens
_F_END = getattr(tokenize, "FSTRING_END", None)
_NOT_CODE = {tokenize.NL, tokenize.COMMENT}
_STATEMENT_START = {tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
_STATEMENT_END = {tokenize.NEWLINE, tokenize.ENDMARKER}


def _literal_end(tokens: list[tokenize.TokenInfo], i: int) -> int:
    """Index of the last token of the string literal starting at token ``i``."""
    if tokens[i].type == tokenize.STRING:
        return i
    depth, j = 1, i
    while depth:
        j += 1
        depth += {_F_START: 1, _F_END: -1}.get(tokens[j].type, 0)
    return j


def _source(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0:r1 - 1]) + lines[r1 - 1][:c1]


def _runs(tokens: list[tokenize.TokenInfo], lines: list[str]) -> list[tuple[int, int, list[tuple[int, str]]]]:
    """Adjacent string literals (they concatenate) as (first token, last token, [(line, text)])."""
    runs: list[tuple[int, int, list[tuple[int, str]]]] = []
    i = 0
    while i < len(tokens):
        if tokens[i].type != tokenize.STRING and tokens[i].type != _F_START:
            i += 1
            continue
        end = _literal_end(tokens, i)
        literal = (tokens[i].start[0], _source(lines, tokens[i].start, tokens[end].end))
        previous = _code_neighbour(tokens, i, -1)
        if runs and previous == runs[-1][1]:
            runs[-1] = (runs[-1][0], end, runs[-1][2] + [literal])
        else:
            runs.append((i, end, [literal]))
        i = end + 1
    return runs


def _code_neighbour(tokens: list[tokenize.TokenInfo], i: int, step: int) -> int | None:
    """Index of the nearest token before (step -1) or after (+1) ``i`` that is not a comment or blank line."""
    j = i + step
    while 0 <= j < len(tokens) and tokens[j].type in _NOT_CODE:
        j += step
    return j if 0 <= j < len(tokens) else None


def _is_docstring(tokens: list[tokenize.TokenInfo], first: int, last: int) -> bool:
    before, after = _code_neighbour(tokens, first, -1), _code_neighbour(tokens, last, +1)
    starts = before is None or tokens[before].type in _STATEMENT_START
    return starts and after is not None and tokens[after].type in _STATEMENT_END


def offenders(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every non-docstring string literal in ``source`` that spells a bridge name."""
    lines = source.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(iter(lines).__next__))
    return [(line, text) for first, last, literals in _runs(tokens, lines) if not _is_docstring(tokens, first, last)
            for line, text in literals if _BLOCK_NAME.search(text) or _HOOK_POINT.search(text)]


def _scanned_files() -> list[Path]:
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))] + [ROOT / "conftest.py"]
    return [p for p in files if p.relative_to(ROOT).as_posix() not in EXEMPT and ".venv" not in p.parts]


def test_no_hand_spelled_hook_or_module_names():
    hits = [f"{path.relative_to(ROOT)}:{line}: {text}"
            for path in _scanned_files() for line, text in offenders(path.read_text(encoding="utf-8"))]
    assert not hits, ("hook names and module paths are spelled only in instruments/components.py; use "
                      "hook_name(...), writer_name(...) or layer_of(...) instead of:\n" + "\n".join(hits))


@pytest.mark.parametrize("source", [
    'names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n)]\n',
    'hooks = [("hook_embed", feed)]\n',
    'cache["blocks.0.mlp.hook_post"]\n',
    'mods[f"blocks.{layer}.attn.o"] = module\n',
    '_BLOCK = re.compile(r"blocks\\.(\\d+)\\.")\n',
    'raise ValueError("known: embed, blocks.L.attn.o, "\n                 "blocks.L.mlp.out")\n',
    'final = "ln_final.hook_in"\n',
    'def f():\n    return "blocks.2.hook_resid_pre"\n',
])
def test_the_scan_flags_spelled_names(source):
    assert offenders(source), source


@pytest.mark.parametrize("source", [
    '"""The stream ``blocks.{i}.hook_resid_pre`` in prose."""\n',
    'def f():\n    """Reads ``mlp.hook_post``."""\n    return 1\n',
    'def f():\n    """Reads ``blocks.{L}`` and\n    ``hook_z``."""\n',
    'x = 1  # the comment may say blocks.0.hook_resid_pre\n',
    'template = get_template("blocks.md.j2")\n',
    'label = "embed"\n',
    'fwd_hooks = hooks_for("hook_name")\n',
])
def test_the_scan_ignores_prose_and_other_strings(source):
    assert not offenders(source), source


# ----------------------------------------------------------------------------- the names themselves

HOOKS = [(Resid(layer=2, pos=-1), "blocks.2.hook_resid_pre"), (AttnOut(layer=1), "blocks.1.hook_attn_out"),
         (MlpOut(layer=3), "blocks.3.hook_mlp_out"), (Head(layer=0, head=3), "blocks.0.attn.hook_z"),
         (Neuron(layer=2, index=127), "blocks.2.mlp.hook_post"),
         (Direction(layer=1, vector=tuple(float(i) for i in range(64))), "blocks.1.hook_resid_pre"),
         (ResidMid(layer=1), "blocks.1.hook_resid_mid"), (ResidPost(layer=2), "blocks.2.hook_resid_post"),
         (Pattern(layer=3), "blocks.3.attn.hook_pattern"), (Embed(), "hook_embed")]


@pytest.mark.parametrize(("component", "expected"), HOOKS, ids=[type(c).__name__ for c, _ in HOOKS])
def test_hook_name_of_each_kind(tiny, component, expected):
    assert hook_name(component) == expected
    assert expected in tiny.bridge.hook_dict, f"{expected} is not a hook of the bridge"
    validate(component, n_layers=tiny.n_layers, n_heads=tiny.n_heads, d_mlp=tiny.d_mlp, d_model=tiny.d_model)


@pytest.mark.parametrize(("component", "expected"), [(Embed(), "embed"), (AttnOut(layer=2), "blocks.2.attn.o"),
                                                     (MlpOut(layer=0), "blocks.0.mlp.out")],
                         ids=["Embed", "AttnOut", "MlpOut"])
def test_writer_name_is_a_bridge_module(tiny, component, expected):
    assert writer_name(component) == expected
    tiny.bridge.get_submodule(expected)  # raises if the bridge has no such module


@pytest.mark.parametrize("bad", [Head(layer=0, head=0), Resid(layer=1), Neuron(layer=0, index=0), "embed"])
def test_writer_name_rejects_what_writes_no_weights(bad):
    with pytest.raises(UnknownComponentError, match="does not write into the residual stream"):
        writer_name(bad)


def test_writer_name_rejects_a_bad_layer():
    with pytest.raises(UnknownComponentError, match="non-negative int"):
        writer_name(AttnOut(layer=-1))


def test_layer_of_reads_the_block_back():
    for component in (Resid(layer=3), Head(layer=12, head=1), Pattern(layer=0), ResidPost(layer=7)):
        assert layer_of(hook_name(component)) == component.layer
    assert layer_of(writer_name(MlpOut(layer=5))) == 5
    assert layer_of(hook_name(Embed())) is None and layer_of(writer_name(Embed())) is None
