"""The dependency direction and the handle instruments may use.

``lint-imports`` checks the contracts in pyproject.toml's ``[tool.importlinter]``:
reports > hypotheses > fixtures > instruments, instruments import nothing of the project,
and no package's modules import each other in a cycle. Imports inside functions count.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.storage import REPO_ROOT
from instruments.handle import ModelHandle

PROTOCOL_MEMBERS = frozenset(name for name in vars(ModelHandle) if not name.startswith("_"))


def _lint_imports() -> Path:
    script = Path(sys.executable).parent / "lint-imports"
    if not script.exists():
        pytest.fail(f"import-linter is not installed beside {sys.executable}. Fix: "
                    f"{Path(sys.executable).parent / 'pip'} install -r requirements.txt (or rerun ./suite test)",
                    pytrace=False)
    return script


def test_import_contracts_are_kept():
    # wide columns: rich wraps the report to the terminal's width otherwise
    out = subprocess.run([str(_lint_imports()), "--no-cache", "--no-logo"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    report = out.stdout + out.stderr
    assert "Contracts:" in report, report
    if out.returncode != 0:
        broken = report[report.find("Broken contracts"):] if "Broken contracts" in report else report
        pytest.fail(f"lint-imports found imports against the layering (pyproject.toml [tool.importlinter]):\n"
                    f"{broken.strip()}", pytrace=False)


def test_the_concrete_handle_has_every_member_of_the_protocol(tiny):
    missing = sorted(name for name in PROTOCOL_MEMBERS if not hasattr(tiny, name))
    assert not missing, f"fixtures.models.ModelHandle lacks {missing} of instruments.handle.ModelHandle"
    assert isinstance(tiny, ModelHandle)
    for name in PROTOCOL_MEMBERS:
        declared = inspect.getattr_static(ModelHandle, name)
        if inspect.isfunction(declared):  # a method: the same parameters, the same kinds
            want = [(p.name, p.kind) for p in inspect.signature(declared).parameters.values()][1:]
            have = [(p.name, p.kind) for p in inspect.signature(getattr(tiny, name)).parameters.values()]
            assert have == want, f"ModelHandle.{name}{inspect.signature(getattr(tiny, name))} != protocol's {want}"


def test_instruments_use_only_what_the_protocol_names():
    """Every ``handle.<name>`` in instruments/ is a member of the protocol, so a new handle knows what to provide."""
    used: dict[str, list[str]] = {}
    for path in sorted((REPO_ROOT / "instruments").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "handle":
                used.setdefault(node.attr, []).append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    outside = {name: where for name, where in used.items() if name not in PROTOCOL_MEMBERS}
    assert used and not outside, (f"instruments use handle members that instruments/handle.py does not name: "
                                  f"{outside}; add them to the protocol")
