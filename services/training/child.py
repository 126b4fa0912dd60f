"""The job's child process: run one job, report its progress and one outcome, die with the server.

`main` is the process's entry point; `run_job` runs the job in this process (the child itself,
or each rank under torchrun, see ranks.py). PyTorch is imported only here, through
`shiftable_lib.jobs`, inside the functions that run in the child.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Protocol

from services.training.home import no_generalist
from services.training.job import (
    Failed,
    JobKind,
    JobProgress,
    Outcome,
    Published,
    Task,
    Written,
)
from services.training.progress import FractionEstimate
from shiftable_lib import logs
from shiftable_lib.config import Settings
from shiftable_lib.errors import Conflict, ShiftableError
from shiftable_lib.plan import PlannedPhase

if TYPE_CHECKING:
    from shiftable_lib import train

log = logging.getLogger("sma.training")

PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress reports a second (plus every phase change)


class Sender(Protocol):
    """Where the job's messages go: the pipe to the server, or a rank's marked stdout."""

    def send(self, message: object) -> None: ...


Runner = Callable[[Sender, Task], Outcome]


class Reporter:
    """The `progress` and `on_plan` callbacks given to the library: adds the whole-job fraction
    and sends a report at most every PROGRESS_INTERVAL_S, plus the first and last report of
    every phase."""

    def __init__(self, conn: Sender) -> None:
        self.conn = conn
        self.estimate = FractionEstimate(now=time.monotonic())
        self.phase = ""
        self.sent_at = 0.0

    def __call__(self, p: train.Progress) -> None:
        """The library's report of its phase; the ETA sent is the whole job's, not the
        phase's (`p.eta_s`)."""
        estimate = self.estimate
        estimate.update(p.phase, p.step, p.total, time.monotonic())
        edge = p.phase != self.phase or p.step >= p.total
        self.send(
            JobProgress(
                p.phase, p.step, p.total, estimate.fraction, p.loss, p.tokens_per_s, estimate.eta_s
            ),
            edge,
        )
        if p.step >= p.total:
            self.announce_unreported()

    def plan(self, phases: list[PlannedPhase]) -> None:
        """The library plans between phases: what comes next may be a phase it does not
        report (evaluation first, for a removal without recalibration)."""
        self.estimate.plan_rest(phases)
        self.announce_unreported()

    def written(self, version: str) -> None:
        self.conn.send(Written(version))

    def announce_unreported(self) -> None:
        estimate = self.estimate
        name = estimate.enter_unreported(time.monotonic())
        if name is not None:
            progress = JobProgress(name, 0, 1, estimate.fraction, eta_s=estimate.eta_s)
            self.send(progress, force=True)

    def send(self, progress: JobProgress, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.sent_at >= PROGRESS_INTERVAL_S:
            self.conn.send(progress)
            self.sent_at = now
            self.phase = progress.phase


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Ask Linux to SIGKILL this process when the server dies, so that no orphan keeps training
    (and writing) behind a restarted server. The signal follows the *thread* that started the
    child: the manager starts children from the event-loop thread, which lives as long as the
    server."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def main(conn: Connection, task: Task, run: Runner) -> None:
    """Entry point of the job's child process: `run` the job (`run_job` here, or
    `ranks.relay` over torchrun), then send its outcome."""
    die_with_parent(task.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which cancels us
    logs.configure(task.log_format, task.log_level)  # a spawned process starts with none
    logs.request_id.set(task.trace)
    conn.send(run(conn, task))
    conn.close()


def run_job(conn: Sender, task: Task) -> Outcome:
    """Run the job here, sending progress to `conn`; the outcome, failures included."""
    try:
        # jobs.configure_torch applies `threads`: the server's train_threads (0 = torch's default)
        settings = Settings(
            home=task.home,
            profile=task.server_profile,
            device=task.device,
            threads=task.train_threads,
        )
        return _run_task(task, settings, Reporter(conn))
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, ShiftableError):  # a bug or the platform: name the exception
            log.exception("training job failed")
            message = f"{type(exc).__name__}: {message}"
        return Failed(message)


def _run_task(task: Task, settings: Settings, reporter: Reporter) -> Published:
    from shiftable_lib import jobs

    if task.kind is JobKind.ADD_SPECIALIST:
        results = [
            jobs.add_specialist(
                settings, task.specialist, reporter, reporter.plan, max_drift=task.max_drift
            )
        ]
    elif task.kind is JobKind.REMOVE_SPECIALIST:
        results = [
            jobs.remove_specialist(
                settings,
                task.specialist,
                task.recalibrate_steps,
                reporter,
                reporter.plan,
                max_drift=task.max_drift,
            )
        ]
    else:
        if task.kind is JobKind.TRAIN_SPECIALISTS and no_generalist(settings.models_dir):
            raise Conflict("there is no generalist to train specialists on: run TRAIN_ALL first")
        demo = task.kind is JobKind.TRAIN_ALL  # first start: no general text -> demo corpus
        results = jobs.train_all(
            settings,
            task.profile or None,
            reporter,
            demo_if_empty=demo,
            on_plan=reporter.plan,
            on_version=reporter.written,
        )
    published = [r.version for r in results if r.version]
    return Published(published[-1] if published else None, "; ".join(r.message for r in results))
