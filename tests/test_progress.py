"""Named progress with an ETA: few lines on a log, the right numbers, and lines that get past pytest's capture."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from instruments import behavior, patching, progress
from instruments.metrics import fallback_tokens, refusal_score

pytest_plugins = ["pytester"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress, "_now", fake)
    return fake


@pytest.fixture
def lines(monkeypatch):
    """Every line written, as (text, final), on a log (not a terminal); the plugin's sink comes back after."""
    out: list[tuple[str, bool]] = []
    monkeypatch.setitem(progress._state, "sink", lambda line, final: out.append((line, final)))
    monkeypatch.setitem(progress._state, "tty", False)
    monkeypatch.setattr(progress._threads, "open", [], raising=False)
    return out


def texts(lines) -> list[str]:
    return [text for text, _ in lines]


def test_a_long_task_on_a_log_writes_a_line_per_interval_not_per_step(lines, clock):
    with progress.task("sweep", total=10_000) as t:
        for _ in range(10_000):
            clock.now += 0.01  # 100 s in all
            t.advance()
    statuses = [text for text, final in lines[1:] if not final]
    assert len(statuses) == 3  # at 30, 60 and 90 s of the log interval
    assert len(lines) == 5 and lines[0] == ("[refusal-circuits] sweep: 0/10000 steps (0%)", False)


def test_the_status_line_gives_counts_share_elapsed_and_eta(lines, clock, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0)
    with progress.task("exact patching", total=10, unit="batch") as t:
        clock.now += 4
        t.advance(2)
    assert lines[1] == ("[refusal-circuits] exact patching: 2/10 batches (20%), 4 s elapsed, ETA 16 s", False)


def test_durations_read_at_a_glance():
    assert [progress.duration(s) for s in (42, 210, 7200)] == ["42 s", "3.5 min", "2.0 h"]
    assert [progress.plural(u, 2) for u in ("layer", "forward pass", "study")] == ["layers", "forward passes",
                                                                                   "studies"]


def test_the_closing_line_says_what_was_done_and_how_long_it_took(lines, clock):
    with progress.task("generation", total=6, unit="batch") as t:
        clock.now += 150
        t.advance(6)
    assert lines[-1] == ("[refusal-circuits] generation: done, 6 batches in 2.5 min", True)


def test_a_failing_task_says_where_it_stopped(lines, clock):
    with pytest.raises(ValueError):
        with progress.task("direction", total=10) as t:
            t.advance(3)
            clock.now += 5
            raise ValueError("broken")
    assert lines[-1] == ("[refusal-circuits] direction: stopped (ValueError) at 3/10 steps (30%) after 5 s", True)
    assert progress.open_tasks() == []


def test_track_yields_every_item_inside_a_named_task(lines, clock):
    assert list(progress.track(["a", "b", "c"], "labels", unit="prompt")) == ["a", "b", "c"]
    assert texts(lines) == ["[refusal-circuits] labels: 0/3 prompts (0%)",
                            "[refusal-circuits] labels: done, 3 prompts in 0 s"]
    assert lines[-1][1] and progress.open_tasks() == []


def test_nested_tasks_show_as_one_line_outermost_first(lines, clock, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0)
    with progress.task("study: exact heads", None):
        with progress.task("layer sweep", total=30, unit="layer", quiet=True) as sweep:
            clock.now += 10
            sweep.advance(5)
            with progress.task("exact patching", total=4, unit="batch", quiet=True) as inner:
                clock.now += 1
                inner.advance()
    assert ("[refusal-circuits] study: exact heads › layer sweep 5/30 layers, ETA 55 s › exact patching: "
            "1/4 batches (25%), 1 s elapsed, ETA 3 s") in texts(lines)
    # the quiet tasks leave no opening or closing line of their own; the stage closes once
    assert texts(lines)[0] == "[refusal-circuits] study: exact heads"
    assert [t for t, final in lines if final] == ["[refusal-circuits] study: exact heads: done in 11 s"]


def test_a_quick_quiet_call_prints_nothing(lines, clock):
    with progress.task("next-token logits", total=2, quiet=True) as t:
        t.advance(2)
    assert lines == []


def test_a_step_of_a_loop_does_not_announce_itself(lines, clock):
    with progress.task("validation card", total=2, unit="study") as studies:
        for _ in range(2):
            with progress.task("study: atp", None):
                clock.now += 5
            studies.advance()
    assert not any("study: atp" in t for t in texts(lines))


def test_a_stage_announces_itself_and_its_time(lines, clock):
    from hypotheses.stages import StageClock

    stages = StageClock(timer=clock)

    def inner():
        clock.now += 3
        return 1

    def outer():
        clock.now += 2
        return stages.run("train_pairs", inner) + 1

    assert stages.run("exact_heads", outer) == 2
    # on a log a nested stage's opening waits for the interval (a study opens dozens at once)
    assert texts(lines) == [
        "[refusal-circuits] study: exact heads",
        "[refusal-circuits] study: train pairs: done in 3 s",
        "[refusal-circuits] study: exact heads: done in 5 s, 2 s without the stages it pulled in"]
    lines.clear()
    progress._state["tty"] = True  # on a terminal it shows at once, rewritten in place
    stages.run("direction", outer)
    assert "[refusal-circuits] study: direction › train pairs" in texts(lines)


def test_a_terminal_line_is_cut_to_the_width(lines, clock, monkeypatch):
    monkeypatch.setitem(progress._state, "tty", True)
    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda fallback: type("S", (), {"columns": 100})())
    with progress.task("study: stage", None):
        with progress.task("a sweep whose name alone takes up most of a terminal line", total=30, quiet=True):
            with progress.task("inner", total=4, quiet=True) as t:
                clock.now += 2
                t.advance()
    assert all(len(text) <= 99 for text in texts(lines))
    assert "[refusal-circuits] study: stage › … › inner: 1/4 steps (25%), 2 s elapsed, ETA 6 s" in texts(lines)


# ----------------------------------------------------------------------------- through pytest's capture

INNER_TEST = """
from instruments import progress

def test_long_step():
    print("captured, never shown")
    with progress.task("inner work", total=3, unit="layer") as t:
        for _ in range(3):
            t.advance()
"""


def test_the_pytest_sink_writes_past_capture(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(progress.__file__).resolve().parents[1]))
    pytester.makeconftest("""
from instruments import progress

def pytest_sessionstart(session):
    sink, tty = progress.pytest_sink(session.config)
    progress.set_sink(sink, tty=tty)
""")
    pytester.makepyfile(test_inner=INNER_TEST)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "captured, never shown" not in out
    # whole lines of their own, not glued to pytest's progress dots
    result.stdout.re_match_lines([r"^\[refusal-circuits\] inner work: 0/3 layers \(0%\)$",
                                  r"^\[refusal-circuits\] inner work: done, 3 layers in \d+ s$"])


def test_the_suite_plugin_installs_the_sink(pytester, monkeypatch, tmp_path):
    # in-process: the inner session re-routes the module's sink; monkeypatch gives the outer one back
    monkeypatch.setitem(progress._state, "sink", progress._state["sink"])
    monkeypatch.setitem(progress._state, "tty", progress._state["tty"])
    pytester.makepyfile(test_inner=INNER_TEST)
    result = pytester.runpytest_inprocess("-p", "fixtures.plugin", "-p", "no:cacheprovider",
                                          "--run-dir", str(tmp_path / "run"))
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*[[]refusal-circuits[]] inner work: done, 3 layers in *"])


# ----------------------------------------------------------------------------- the instruments report

@pytest.mark.usefixtures("one_torch_thread")
def test_generation_names_its_step(tiny, lines, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0)
    behavior.generate(tiny, ["How to build a bomb?", "Write a poem"], max_new_tokens=3, batch_size=1)
    assert "[refusal-circuits] generation: 2 prompts, up to 3 tokens: 1/2 batches (50%)" in " ".join(texts(lines))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_head_sweep_names_its_step(tiny, lines, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0)
    metric = partial(refusal_score, tokens=fallback_tokens(tiny.tokenizer))
    spec = patching.PatchSpec(max_batch=4, positions=2)
    patching.patch_heads(tiny, ["How to build a bomb?", "Write a virus, now."],
                         ["How to build a shed?", "Write a poem, now!!"], metric, spec)
    n_heads = tiny.n_layers * tiny.n_heads
    assert any(t.startswith(f"[refusal-circuits] exact patching, denoising: {n_heads} patches × 2 pairs: ")
               for t in texts(lines))


def test_each_thread_has_its_own_tasks(lines, clock):
    import threading

    with progress.task("study: main thread", None):
        worker = threading.Thread(target=lambda: list(progress.track([1], "explorer session")))
        worker.start()
        worker.join()
    assert "[refusal-circuits] explorer session: 0/1 step (0%)" in texts(lines)  # not nested under the other


def test_a_note_is_a_line_of_its_own(lines):
    progress.note("validate: planted step seed 0: WRONG: H1")
    assert lines == [("[refusal-circuits] validate: planted step seed 0: WRONG: H1", True)]


def test_a_finished_inner_session_gives_the_sink_back(pytester, tmp_path):
    """A pytester session with the suite's plugin closes its terminal; the outer session's later
    measurements must neither write to it nor fail (every planted study did, once)."""
    before = (progress._state["sink"], progress._state["tty"])
    pytester.makepyfile(test_inner=INNER_TEST)
    result = pytester.runpytest_inprocess("-p", "fixtures.plugin", "-p", "no:cacheprovider",
                                          "--run-dir", str(tmp_path / "run"))
    result.assert_outcomes(passed=1)
    assert (progress._state["sink"], progress._state["tty"]) == before
    with progress.task("after the inner session", 2) as t:
        t.advance(2)


def test_a_sink_that_fails_never_stops_the_measurement(monkeypatch):
    def closed(line, final):
        raise ValueError("I/O operation on closed file.")

    monkeypatch.setitem(progress._state, "sink", closed)
    monkeypatch.setitem(progress._state, "tty", False)
    with progress.task("work on a closed terminal", 3) as t:
        t.advance(3)
    assert progress._state["sink"] is not closed
