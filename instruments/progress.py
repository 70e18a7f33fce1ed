"""Named progress with an ETA that reaches the terminal even while pytest captures output.

It lives in instruments (it imports nothing of the project) so that an instrument's long loop
can report; it writes nothing but status lines, to whatever sink the caller installs.

A long step opens a task and advances it; the lines go to one sink. Outside pytest the sink
is stderr; the pytest plugin installs one that suspends capture and writes through the
terminal reporter, so ``./suite main`` shows the organism build and every long stage live.

    with progress.task("organism: fine-tuning", total=400, unit="step") as t:
        for step in range(400):
            ...
            t.advance()
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

# (line, final): final lines end a task; the others may be overwritten in place on a terminal
Sink = Callable[[str, bool], None]

# seconds between two lines of one task on a log (not a terminal), so CI logs stay short
LOG_EVERY_S = 30.0
TTY_EVERY_S = 1.0


def _stderr_sink(line: str, final: bool) -> None:
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
    else:
        stream.write(line + "\n")
    stream.flush()


_state: dict[str, object] = {"sink": _stderr_sink, "tty": None}


def set_sink(sink: Sink | None, *, tty: bool | None = None) -> None:
    """Route progress lines to ``sink`` (None: back to stderr); ``tty`` says whether it rewrites lines."""
    _state["sink"] = sink or _stderr_sink
    _state["tty"] = tty


def _is_tty() -> bool:
    tty = _state["tty"]
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) if tty is None else bool(tty)


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``: what a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Task:
    """One named step: ``advance`` it as units complete; the ETA is elapsed time per unit so far."""

    name: str
    total: int | None
    unit: str = "step"
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_line: float = 0.0

    def line(self, *, final: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        if final:
            return f"[refusal-circuits] {self.name}: done, {self.done} {self.unit}s in {duration(elapsed)}"
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        eta = ""
        if self.total and self.done:
            eta = f", ETA {duration(elapsed / self.done * max(0, self.total - self.done))}"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"[refusal-circuits] {self.name}: {count} {self.unit}s{share}, {duration(elapsed)} elapsed{eta}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last_line >= (TTY_EVERY_S if _is_tty() else LOG_EVERY_S):
            self._last_line = now
            _state["sink"](self.line(), False)


@contextmanager
def task(name: str, total: int | None, *, unit: str = "step") -> Iterator[Task]:
    """A named task: a first line at once, throttled updates with an ETA, and a closing line."""
    t = Task(name=name, total=total, unit=unit)
    t._last_line = time.monotonic()
    _state["sink"](t.line(), False)
    yield t
    _state["sink"](t.line(final=True), True)


def track(items, name: str, *, total: int | None = None, unit: str = "step"):
    """Iterate ``items`` inside a task of that name (a drop-in for a tqdm loop)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    with task(name, total, unit=unit) as t:
        for item in items:
            yield item
            t.advance()


def pytest_sink(config) -> tuple[Sink | None, bool]:
    """A sink that writes through pytest's terminal reporter with capture suspended (None under xdist workers)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if terminal is None:
        return None, False
    tty = bool(getattr(terminal, "isatty", False))

    own_line = [False]  # a status line of ours is the terminal's current line

    def emit(line: str, final: bool) -> None:
        if not own_line[0]:
            terminal.ensure_newline()
        if tty:
            terminal.rewrite(line, erase=True)
            own_line[0] = not final
            if final:
                terminal.write("\n")
        else:
            terminal.write_line(line)
        terminal.flush()

    def write(line: str, final: bool) -> None:
        if capman is not None:
            with capman.global_and_fixture_disabled():
                emit(line, final)
        else:
            emit(line, final)

    return write, tty
