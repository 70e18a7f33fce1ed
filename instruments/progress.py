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

Tasks nest, per thread (a study stage holds a sweep, the sweep one instrument call per
layer): a status line shows the open tasks outermost first, ``study: exact heads › layer
sweep heads-denoising 5/30 layers, ETA 2.1 min › exact patching, denoising: 9 patches × 6
pairs: 1/2 batches (50%), 3 s elapsed, ETA 3 s``. Which lines appear:

- A task *announces* itself (a line when it opens, one when it closes) unless it is
  ``quiet`` or runs inside a task with a total, whose loop it is one step of (so a study of
  the validation card, or an instrument call per layer, never floods the log). A nested
  announced task that took under ``SHORT_S`` leaves no closing line, and on a log its opening
  line waits for the root's interval like a status line.
- Status lines come at most every ``TTY_EVERY_S`` on a terminal (rewritten in place) and
  every ``LOG_EVERY_S`` on a log; a quiet task is first seen one interval after it opens, so
  a quick instrument call prints nothing at all, and a slow one closes with a line.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

# (line, final): final lines end a task; the others may be overwritten in place on a terminal
Sink = Callable[[str, bool], None]
T = TypeVar("T")

# seconds between two status lines on a log (not a terminal), so CI logs stay short
LOG_EVERY_S = 30.0
TTY_EVERY_S = 1.0
# a nested announced task quicker than this closes silently (its opening line said enough)
SHORT_S = 1.0
PREFIX = "[refusal-circuits] "
SEPARATOR = " › "
_now = time.monotonic  # the clock every task reads (tests replace it)


def _stderr_sink(line: str, final: bool) -> None:
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
    else:
        stream.write(line + "\n")
    stream.flush()


_state: dict[str, object] = {"sink": _stderr_sink, "tty": None}
_threads = threading.local()  # each thread its own tasks (the explorer serves sessions on threads)


def open_tasks() -> list["Task"]:
    """This thread's open tasks, outermost first."""
    if not hasattr(_threads, "open"):
        _threads.open = []
    return _threads.open


def set_sink(sink: Sink | None, *, tty: bool | None = None) -> tuple[Sink, bool | None]:
    """Route progress lines to ``sink`` (None: back to stderr); ``tty`` says whether it rewrites lines.

    Returns the sink and tty it replaces, so a caller (a nested pytest session) can put them back.
    """
    previous = (_state["sink"], _state["tty"])
    _state["sink"] = sink or _stderr_sink
    _state["tty"] = tty
    return previous  # type: ignore[return-value]


def _is_tty() -> bool:
    tty = _state["tty"]
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) if tty is None else bool(tty)


def _emit(line: str, final: bool) -> None:
    try:
        _state["sink"](line, final)  # type: ignore[operator]
    except (OSError, ValueError):  # a closed terminal (a finished pytest session) must never stop a measurement
        _state["sink"], _state["tty"] = _stderr_sink, None


def duration(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``: what a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plural(unit: str, n: int | None) -> str:
    """``1 layer``, ``2 layers``, ``3 passes``, ``4 studies``."""
    if n == 1:
        return unit
    if unit.endswith(("s", "x", "ch", "sh")):
        return unit + "es"
    if unit.endswith("y") and unit[-2:-1] not in tuple("aeiou"):
        return unit[:-1] + "ies"
    return unit + "s"


def count(n: int, unit: str) -> str:
    """``1 prompt``, ``88 prompts``: for task names."""
    return f"{n} {plural(unit, n)}"


@dataclass(eq=False)
class Task:
    """One named step: ``advance`` it as units complete; the ETA is elapsed time per unit so far."""

    name: str
    total: int | None
    unit: str = "step"
    quiet: bool = False
    done: int = 0
    note: str = ""  # added to the closing line (e.g. a stage's own time beside the stages it pulled in)
    started: float = field(default_factory=lambda: _now())
    announced: bool = False  # it printed an opening line and owes a closing one
    shown: bool = False  # some line has named it
    _last_line: float = 0.0  # of a root task: when any line of its tree was last written

    @property
    def elapsed(self) -> float:
        return _now() - self.started

    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first unit or without a total)."""
        if not self.total or not self.done:
            return None
        return self.elapsed / self.done * max(0, self.total - self.done)

    def _counts(self) -> str:
        if self.total:
            return f"{self.done}/{self.total} {plural(self.unit, self.total)} ({100 * self.done / self.total:.0f}%)"
        return f"{self.done} {plural(self.unit, self.done)}" if self.done else ""

    def status(self, *, inner: bool = True) -> str:
        """This task's part of a status line; ``inner=False``: the short form a parent shows."""
        eta = self.eta()
        if not inner:
            if not self.total:
                return self.name
            return (f"{self.name} {self.done}/{self.total} {plural(self.unit, self.total)}"
                    + (f", ETA {duration(eta)}" if eta is not None else ""))
        elapsed = self.elapsed
        parts = [p for p in (self._counts(), f"{duration(elapsed)} elapsed" if elapsed >= 1 else "") if p]
        if not parts:
            return self.name
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        return f"{self.name}: {', '.join(parts)}"

    def line(self, *, final: bool = False) -> str:
        """This task alone, as a full line (``final``: its closing line)."""
        if not final:
            return PREFIX + self.status()
        done = f", {self.done} {plural(self.unit, self.done)}" if self.total or self.done else ""
        return PREFIX + f"{self.name}: done{done} in {duration(self.elapsed)}" + (f", {self.note}" if self.note else "")

    def advance(self, n: int = 1) -> None:
        self.done += n
        stack = open_tasks()
        chain = stack if self in stack else [self]
        root = chain[0]
        now = _now()
        if now - (root._last_line or root.started) >= (TTY_EVERY_S if _is_tty() else LOG_EVERY_S):
            root._last_line = now
            for t in chain:
                t.shown = True
            _emit(_fit(chain), False)


def _fit(chain: list[Task]) -> str:
    """The status line of ``chain``; on a terminal cut to its width (outer middle parts first)."""
    parts = [t.status(inner=False) for t in chain[:-1]] + [chain[-1].status()]
    for i in range(len(parts) - 1, 0, -1):  # "study: a › study: b" reads "study: a › b"
        kind = chain[i - 1].name.partition(": ")[0] + ": "
        if chain[i - 1].name.startswith(kind) and parts[i].startswith(kind):
            parts[i] = parts[i][len(kind):]
    line = PREFIX + SEPARATOR.join(parts)
    if not _is_tty():
        return line
    width = shutil.get_terminal_size((120, 24)).columns - 1
    middle = parts[1:-1]
    while len(line) > width and middle:
        middle = middle[1:]
        line = PREFIX + SEPARATOR.join([parts[0], "…", *middle, parts[-1]])
    return line if len(line) <= width else line[: width - 1] + "…"


@contextmanager
def task(name: str, total: int | None, *, unit: str = "step", quiet: bool = False) -> Iterator[Task]:
    """A named task: an opening line, throttled status lines with an ETA, and a closing line.

    ``quiet``: no opening or closing line; the task shows in status lines once it has run one
    interval (instruments use it, so that a quick call prints nothing).
    """
    stack = open_tasks()
    t = Task(name=name, total=total, unit=unit, quiet=quiet)
    t.announced = not (quiet or any(outer.total for outer in stack))
    stack.append(t)
    is_root = stack[0] is t
    try:
        # on a log a nested opening waits for the root's interval: its chain shows in the next status line
        if t.announced and (is_root or _is_tty() or _now() - stack[0]._last_line >= LOG_EVERY_S):
            stack[0]._last_line = _now()
            for named in stack:
                named.shown = True
            _emit(_fit(stack), False)
        try:
            yield t
        except BaseException as exc:
            if t.announced or (t.shown and is_root):
                # a consumer leaving a track() loop early is no error
                why = "" if isinstance(exc, GeneratorExit) else f" ({type(exc).__name__})"
                counts = f" at {t._counts()}" if t._counts() else ""
                _emit(PREFIX + f"{t.name}: stopped{why}{counts} after {duration(t.elapsed)}", True)
            raise
        if (t.announced and (is_root or t.elapsed >= SHORT_S)) or (is_root and t.shown):
            _emit(t.line(final=True), True)
    finally:
        stack.remove(t)


def track(items: Iterable[T], name: str, *, total: int | None = None, unit: str = "step",
          quiet: bool = False) -> Iterator[T]:
    """Iterate ``items`` inside a task of that name (a drop-in for a tqdm loop)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(name, total, unit=unit, quiet=quiet) as t:
        for item in items:
            yield item
            t.advance()


def note(text: str) -> None:
    """One line that stays (e.g. a finding worth seeing while a long loop runs on)."""
    _emit(PREFIX + text, True)


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
            # -q progress dots leave the line open without a file name ensure_newline knows of
            if getattr(terminal._tw, "width_of_current_line", 0):
                terminal._tw.line()
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
