"""The study's machinery: its stage clock, the ``stage`` decorator, and its data splits.

A stage is a cached property whose compute time (exclusive of the stages it pulls in) is
kept in ``study.clock``; the clock also knows which stages are running, innermost last,
which is how the data-discipline test attributes each encoded prompt to a stage.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Sequence

from fixtures.data import Pair, PromptSet
from instruments import progress
from instruments.patching import PatchResult


@dataclass(eq=False)
class StageClock:
    """Seconds spent in each stage, exclusive of the stages it pulled in (where the time goes).

    Each stage also shows on the terminal: ``study: <stage>`` when it starts and its time when
    it ends (:mod:`instruments.progress`).
    """

    seconds: dict[str, float] = field(default_factory=dict)
    timer: Callable[[], float] = time.perf_counter
    _inner: list[float] = field(default_factory=list)  # time spent in nested stages, per open stage
    running: list[str] = field(default_factory=list)  # the open stages, innermost last

    def run(self, name: str, compute: Callable[[], Any]) -> Any:
        self._inner.append(0.0)
        self.running.append(name)
        start = self.timer()
        # the stage announces itself by name, and its time when it ends
        with progress.task(f"study: {name.replace('_', ' ')}", None) as shown:
            try:
                return compute()
            finally:
                self.running.pop()
                total = self.timer() - start
                own = total - self._inner.pop()
                self.seconds[name] = round(self.seconds.get(name, 0.0) + own, 3)
                if self._inner:
                    self._inner[-1] += total
                if total - own >= progress.SHORT_S:
                    shown.note = f"{progress.duration(own)} without the stages it pulled in"


def stage(fn: Callable[[Any], Any]) -> cached_property:
    """A study stage: computed on first use, then cached, its compute time kept in ``study.clock``."""
    @functools.wraps(fn)
    def timed(self):
        return self.clock.run(fn.__name__, lambda: fn(self))
    return cached_property(timed)


def balanced(pairs: Sequence[Pair], n: int) -> tuple[Pair, ...]:
    """The first n pairs taking categories in turn (file order within each), so no category dominates."""
    by_cat: dict[str, list[Pair]] = {}
    for p in pairs:
        by_cat.setdefault(p.category, []).append(p)
    out: list[Pair] = []
    while len(out) < min(n, len(pairs)):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(out) < n:
                out.append(by_cat[cat].pop(0))
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class StudyData:
    train: tuple[Pair, ...]
    val: tuple[Pair, ...]
    test: tuple[Pair, ...]
    categories: tuple[str, ...]

    @classmethod
    def from_prompt_set(cls, ps: PromptSet) -> "StudyData":
        from fixtures.data import require_size

        data = cls(train=ps.split("train"), val=ps.split("val"), test=ps.split("test"), categories=ps.categories)
        require_size(data.train, 4, what="train pairs for choosing components")
        require_size(data.val, 2, what="val pairs for selecting the refusal direction")
        require_size(data.test, 4, what="test pairs for evaluating the hypotheses")
        return data

    def category(self, cat: str, *splits: str) -> tuple[Pair, ...]:
        return tuple(p for s in splits for p in getattr(self, s) if p.category == cat)


Sweeper = Callable[[Callable[..., PatchResult], Sequence[int]], PatchResult]


def _direct(fn: Callable[..., PatchResult], layers: Sequence[int]) -> PatchResult:
    return fn(layers=tuple(layers))
