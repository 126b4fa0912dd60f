"""`sma up`'s first-start progress in the terminal, from /health answers as the gateway gives
them: a line per phase and tenth in a log, one line kept up to date on a terminal; the
generalist serving while the specialists train, then the whole model."""

from __future__ import annotations

import io

from shiftable.stack import FirstStart, duration, progress_line


def health(
    phase: str, step: int, total: int, percent: float, eta: float, serving: str | None = None
) -> dict:
    progress = {"phase": phase, "step": step, "total": total, "percent": percent, "eta_s": eta}
    op = {"progress": progress}
    return {
        "initialized": serving is not None,
        "ready": False,
        "first_start": op,
        "loaded_version": serving,
        "specialists": [],
    }


SERVING = {
    "initialized": True,
    "ready": True,
    "first_start": None,
    "serving_version": "v0002",
    "specialists": ["datascience", "deeplearning"],
}

START = [
    health("tokenizer", 0, 1, 1.0, 0),
    health("generalist", 100, 800, 12.0, 350),
    health("generalist", 130, 800, 14.5, 330),  # the same tenth: no line in a log
    health("generalist", 700, 800, 61.0, 150),
    # the generalist serves while the specialists train
    health("specialist:datascience", 50, 260, 70.0, 100, serving="v0001"),
    health("gate", 300, 300, 96.0, 12, serving="v0001"),
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_phase_and_tenth_then_the_model_that_serves() -> None:
    out = io.StringIO()
    watch = FirstStart(out)
    for answer in START:
        watch.show(answer)
    assert not watch.done
    watch.show(SERVING)
    assert watch.done
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sma: training the first model")
    assert lines[1:] == [
        "sma: first start: tokenizer · 1%",
        "sma: first start: generalist [###.....................] 100/800 · 12% · ETA 5m 50s",
        "sma: first start: generalist [#####################...] 700/800 · 61% · ETA 2m 30s",
        "sma: model v0001 serving while the first start goes on (specialists: none)",
        "sma: first start: specialist:datascience [#####...................] 50/260 · 70% "
        "· ETA 1m 40s",
        "sma: first start: gate [########################] 300/300 · 96% · ETA 12s",
        "sma: model v0002 serving (specialists: datascience, deeplearning)",
    ]


def test_a_terminal_gets_one_line_kept_up_to_date() -> None:
    out = Terminal()
    watch = FirstStart(out)
    for answer in START:
        watch.show(answer)
    watch.show(SERVING)
    text = out.getvalue()
    # the intro, the progress line ended by the generalist serving, that news, the progress
    # line when it ends, the model
    assert text.count("\n") == 5
    lines = text.split("\n")
    assert lines[2].startswith("sma: model v0001 serving while the first start goes on")
    progress = lines[1].split("\r")[1:] + lines[3].split("\r")[1:]
    assert len(progress) == len(START) and progress[-1].startswith("gate [####")


def test_a_stack_that_has_a_model_prints_nothing_more() -> None:
    out = io.StringIO()
    watch = FirstStart(out)
    watch.show(SERVING)
    assert watch.done and out.getvalue() == ""


def test_durations_read_as_people_write_them() -> None:
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7322)] == [
        "0s", "59s", "1m 01s", "59m 59s", "1h 00m", "2h 02m",
    ]  # fmt: skip
    assert progress_line({"phase": "", "step": 0, "total": 0, "percent": 0.0}) == "starting · 0%"


def test_a_restart_during_a_first_start_says_the_generalist_serves_and_goes_on() -> None:
    """Stopped after the generalist served, started again: it serves at once, and the start's
    specialists train on."""
    out = io.StringIO()
    watch = FirstStart(out)
    watch.show(health("specialist:datascience", 10, 260, 40.0, 300, serving="v0001"))
    watch.show(SERVING)
    assert out.getvalue().splitlines() == [
        "sma: model v0001 serving while the first start goes on (specialists: none)",
        "sma: first start: specialist:datascience [#.......................] 10/260 · 40% "
        "· ETA 5m 00s",
        "sma: model v0002 serving (specialists: datascience, deeplearning)",
    ]
