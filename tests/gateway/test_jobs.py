"""Which of a training job's progress reports the gateway writes onto the operation."""

from __future__ import annotations

from gateway.jobs import MIRROR_INTERVAL_S, ProgressMirror
from sma.v1 import common_pb2
from sma.v1 import training_pb2 as T


def report(phase: str, step: int, total: int, state: int = T.JOB_STATE_RUNNING) -> T.Job:
    return T.Job(
        state=state, progress=common_pb2.TrainingProgress(phase=phase, step=step, total=total)
    )


def test_a_phase_that_starts_right_after_another_ends_is_shown_however_soon() -> None:
    """The gate's last step, then evaluation a moment later, which reports nothing more while
    it runs: the operation must show the evaluation, not the gate's end, for all that time."""
    mirror = ProgressMirror()
    t = 100.0
    assert mirror.due(report("gate", 58, 60), t)
    assert not mirror.due(report("gate", 59, 60), t + 0.05)  # within the interval: skipped
    assert not mirror.due(report("gate", 60, 60), t + 0.10)
    assert mirror.due(report("evaluate", 0, 1), t + 0.11)  # a new phase: never skipped
    assert not mirror.due(report("evaluate", 0, 1), t + 0.12)
    assert mirror.due(report("evaluate", 0, 1), t + 0.12 + MIRROR_INTERVAL_S + 0.01)
    done = report("evaluate", 1, 1, T.JOB_STATE_SUCCEEDED)
    assert mirror.due(done, t + 0.12 + MIRROR_INTERVAL_S + 0.02)  # the end: never skipped
