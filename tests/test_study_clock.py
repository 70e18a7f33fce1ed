"""The study's stage clock: each stage's own time, nested stages counted once, results cached."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypotheses.study import StageClock, stage


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_stage_time_is_not_counted_twice():
    t = FakeTime()
    clock = StageClock(timer=t)

    def inner():
        t.now += 5.0
        return 1

    def outer():
        t.now += 2.0
        value = clock.run("inner", inner)
        t.now += 1.0
        return value + 1

    assert clock.run("outer", outer) == 2
    assert clock.seconds == {"inner": 5.0, "outer": 3.0}


def test_a_stage_is_computed_once_and_timed_once():
    t = FakeTime()

    @dataclass(eq=False)
    class Toy:
        clock: StageClock = field(default_factory=lambda: StageClock(timer=t))
        calls: int = 0

        @stage
        def base(self):
            self.calls += 1
            t.now += 4.0
            return 10

        @stage
        def derived(self):
            t.now += 1.0
            return self.base + 1

    toy = Toy()
    assert toy.derived == 11 and toy.derived == 11 and toy.base == 10
    assert toy.calls == 1
    assert toy.clock.seconds == {"base": 4.0, "derived": 1.0}


def test_a_failing_stage_still_closes_its_frame():
    t = FakeTime()
    clock = StageClock(timer=t)

    def boom():
        t.now += 2.0
        raise RuntimeError("broken instrument")

    try:
        clock.run("boom", boom)
    except RuntimeError:
        pass
    assert clock.seconds == {"boom": 2.0} and clock._inner == []
    t.now += 1.0
    clock.run("after", lambda: None)
    assert clock.seconds["after"] == 0.0
