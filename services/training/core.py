"""The training service's core: a FIFO of jobs, run one at a time, each in a child process.

The work itself is `shiftable_lib.jobs`; this module decides *where* it runs and what the rest of
the stack sees of it. A job runs in a `spawn`ed child process so that a crash, an out-of-memory
kill or a cancel never takes the server down, and so that the server's event loop never waits on
PyTorch. The child reports over a pipe: throttled progress, then one outcome. The parent keeps
every job in memory (the registry, not this service, is the durable record of operations) and
notifies watchers on each change.

The server process never imports PyTorch (memory, start-up time): only the child does, through
`shiftable_lib.jobs` and `shiftable_lib.train`, imported inside the functions that run there.

A job that does not succeed must leave the model store as it found it. `checkpoint.save_version`
only renames complete folders into place, but a child killed mid-write leaves its `.tmp-*`
folder, and one killed between publishing a version and moving CURRENT leaves a complete version
nobody points at; both are removed once the child is gone (no other job runs at that moment).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import enum
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from shiftable_lib import versions
from shiftable_lib.config import Profile, Settings, get_profile
from shiftable_lib.corpus import (
    GENERAL,
    discover_specialists,
    domain_dir,
    text_files,
    validate_specialist_name,
)
from shiftable_lib.errors import Conflict, CorpusMissing, NotFound, ShiftableError, Unavailable

if TYPE_CHECKING:
    from shiftable_lib import train

log = logging.getLogger("sma.training")

KILL_AFTER_S = 5.0  # a cancelled child gets SIGTERM, then SIGKILL after this long
PROGRESS_INTERVAL_S = 0.25  # at most ~4 progress reports a second (plus every phase change)
MAX_FINISHED_JOBS = 1000  # finished jobs kept for Get/List; the oldest are forgotten first
FRACTION_CAP = 0.99  # the estimate stays below 1 until the job has actually succeeded
TOKENIZER_SHARE = 0.05  # tokenizer training, in generalist steps (see FractionEstimate)
DEMO_SHARE = 0.1  # building the demo corpus (first start), in generalist steps
DEMO_PHASE = "demo corpus"  # the phase jobs.train_all reports while it builds the demo corpus
EVALUATE_SHARE = 0.1  # evaluation + publishing, as a share of the stage's training steps
BYTES_PER_TOKEN = 4.0  # a branch's tokens from its bytes, until a model has measured it


class JobKind(enum.Enum):
    TRAIN_ALL = 1
    TRAIN_SPECIALISTS = 2
    ADD_SPECIALIST = 3
    REMOVE_SPECIALIST = 4


class JobState(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobProgress:
    """What a job does now; `fraction` is the share of the whole job done (see
    `FractionEstimate`), the rest is the library's report of the current phase."""

    phase: str
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    loss: float = math.nan
    tokens_per_s: float = 0.0
    eta_s: float = 0.0


@dataclass
class Job:
    """One job as clients see it. `pid` is the child's process id while it runs (for logs and
    tests); `profile` and `recalibrate_steps` are the request's."""

    id: str
    kind: JobKind
    specialist: str = ""
    profile: str = ""
    recalibrate_steps: int = 0
    state: JobState = JobState.QUEUED
    progress: JobProgress = field(default_factory=lambda: JobProgress("queued"))
    error: str = ""
    version_id: str = ""
    message: str = ""
    metrics_json: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None


# ---- progress as a share of the whole job ----------------------------------------------------


@dataclass
class PlannedPhase:
    """A phase the job is expected to run. `weight` is in training steps; `by_steps` phases
    replace their estimate with the total they report. `reported` is False for work the library
    does not report (evaluation and publishing): the child announces it when the phase before
    it ends."""

    name: str
    weight: float
    by_steps: bool = True
    reported: bool = True


class FractionEstimate:
    """The share of the whole job done, from a plan of the phases it will run.

    Each phase weighs its number of optimiser steps: the generalist's from the profile, a
    branch's from its corpus size (through the library's own `specialist_steps` rule, in bytes
    per token measured on the current model's corpora, else `BYTES_PER_TOKEN`) until the branch
    reports its real total, the gate's from the profile
    or the recalibration request. Work without steps weighs a share of the steps around it:
    building the demo corpus `DEMO_SHARE` and tokenizer training `TOKENIZER_SHARE` of the
    generalist's steps, evaluating and publishing a version `EVALUATE_SHARE` of its stage's
    training steps. Within a phase progress is linear in steps. When the plan learns more (the
    demo corpus brings specialists), the phases still to come are planned again. Steps of
    different phases do not cost the same time, so this is an estimate; it is kept monotonic (a
    corrected estimate never moves it back) and below `FRACTION_CAP` until the job succeeds,
    when the parent sets it to 1.
    """

    def __init__(self, phases: Iterable[PlannedPhase]) -> None:
        self.phases = list(phases)
        self.cursor = -1  # index of the phase running now; -1 before the first
        self.fraction = 0.0

    def update(self, phase: str, step: int, total: int) -> float:
        """Account for a report of `phase` at `step` of `total`; an unplanned phase changes
        nothing."""
        start = max(self.cursor, 0)
        index = next(
            (i for i in range(start, len(self.phases)) if self.phases[i].name == phase), None
        )
        if index is None:
            return self.fraction
        self.cursor = index
        planned = self.phases[index]
        if planned.by_steps and total > 0:
            planned.weight = float(total)
        within = min(1.0, step / total) if total > 0 else 0.0
        done = sum(p.weight for p in self.phases[:index]) + planned.weight * within
        whole = sum(p.weight for p in self.phases)
        if whole > 0:
            self.fraction = max(self.fraction, min(FRACTION_CAP, done / whole))
        return self.fraction

    def plan_rest(self, phases: Iterable[PlannedPhase]) -> None:
        """Replace the phases after the current one."""
        self.phases[self.cursor + 1 :] = phases

    def enter_unreported(self) -> str | None:
        """When the current phase has ended: enter the next phase if the library does not
        report it, and return its name (else None)."""
        following = self.cursor + 1
        if following < len(self.phases) and not self.phases[following].reported:
            name = self.phases[following].name
            self.update(name, 0, 1)
            return name
        return None


def _evaluate(stage_steps: float) -> PlannedPhase:
    return PlannedPhase(
        "evaluate", max(1.0, EVALUATE_SHARE * stage_steps), by_steps=False, reported=False
    )


def _training_bytes(settings: Settings, name: str) -> float:
    """Bytes of a domain's training split (the held-out split is about a tenth)."""
    return 0.9 * sum(p.stat().st_size for p in text_files(settings.data_dir / name))


def _bytes_per_token(settings: Settings, config: dict | None) -> float:
    """What the current model's tokenizer made of its corpora (`corpus_tokens`, recorded with
    every version), else the BYTES_PER_TOKEN guess."""
    counted = {n: t for n, t in (config or {}).get("corpus_tokens", {}).items() if t > 0}
    size = sum(_training_bytes(settings, n) for n in counted)
    tokens = sum(counted.values())
    return size / tokens if size > 0 and tokens > 0 else BYTES_PER_TOKEN


def _branch(
    settings: Settings, name: str, profile: Profile, bytes_per_token: float
) -> PlannedPhase:
    from shiftable_lib.train import specialist_steps

    tokens = round(_training_bytes(settings, name) / bytes_per_token)
    return PlannedPhase(f"specialist:{name}", specialist_steps(tokens, profile))


def plan_phases(
    settings: Settings, kind: JobKind, specialist: str, profile: str, recalibrate_steps: int
) -> list[PlannedPhase]:
    """The phases a job of `kind` will run on the home as it is now (see FractionEstimate)."""
    current = versions.current_version(settings.models_dir)
    config = versions.version_config(settings.models_dir, current) if current else None
    prof = (
        Profile.from_dict(config["profile"]) if config else get_profile(profile or settings.profile)
    )
    bytes_per_token = _bytes_per_token(settings, config)
    phases: list[PlannedPhase] = []
    if kind is JobKind.ADD_SPECIALIST:
        branch = _branch(settings, specialist, prof, bytes_per_token)
        gate = PlannedPhase("gate", prof.add_gate_steps)
        return [branch, gate, _evaluate(branch.weight + gate.weight)]
    if kind is JobKind.REMOVE_SPECIALIST:
        if recalibrate_steps:
            phases.append(PlannedPhase("gate", recalibrate_steps))
        return [*phases, _evaluate(recalibrate_steps)]
    if current is None:  # TRAIN_ALL on an empty home: the generalist comes first
        steps = prof.generalist_steps
        if kind is JobKind.TRAIN_ALL and not text_files(settings.data_dir / GENERAL):
            phases.append(PlannedPhase(DEMO_PHASE, DEMO_SHARE * steps, by_steps=False))
        phases += [
            PlannedPhase("tokenizer", TOKENIZER_SHARE * steps, by_steps=False),
            PlannedPhase("generalist", steps),
            _evaluate(steps),
        ]
    names = discover_specialists(settings.data_dir)
    if names:
        branches = [_branch(settings, n, prof, bytes_per_token) for n in names]
        gate = PlannedPhase("gate", prof.gate_steps)
        stage = sum(p.weight for p in branches) + gate.weight
        phases += [*branches, gate, _evaluate(stage)]
    return phases


# ---- the child process -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """Everything the child needs: the job's request and the server's settings that matter."""

    kind: JobKind
    specialist: str
    profile: str
    recalibrate_steps: int
    home: Path
    server_profile: str
    device: str
    train_threads: int
    parent_pid: int
    nproc: int = 1  # > 1: the job runs as that many data-parallel processes (ranks.py)


@dataclass(frozen=True)
class _Published:
    version: str | None  # None when there was nothing to do
    message: str
    metrics_json: str  # metrics.json of `version`, verbatim


@dataclass(frozen=True)
class _Failed:
    error: str


class _Reporter:
    """The `progress` callback given to the library: adds the whole-job fraction and sends a
    report at most every PROGRESS_INTERVAL_S, plus the first and last report of every phase.
    `replan` gives the plan of the home as it is now, for when the demo corpus is in place."""

    def __init__(
        self,
        conn: Connection,
        estimate: FractionEstimate,
        replan: Callable[[], list[PlannedPhase]],
    ) -> None:
        self.conn = conn
        self.estimate = estimate
        self.replan = replan
        self.phase = ""
        self.sent_at = 0.0

    def __call__(self, p: train.Progress) -> None:
        fraction = self.estimate.update(p.phase, p.step, p.total)
        edge = p.phase != self.phase or p.step >= p.total
        self.send(
            JobProgress(p.phase, p.step, p.total, fraction, p.loss, p.tokens_per_s, p.eta_s), edge
        )
        if p.step >= p.total:
            if p.phase == DEMO_PHASE:
                self.estimate.plan_rest(self.replan())
            self.announce_unreported()

    def announce_unreported(self) -> None:
        name = self.estimate.enter_unreported()
        if name is not None:
            self.send(JobProgress(name, 0, 1, self.estimate.fraction), force=True)

    def send(self, progress: JobProgress, force: bool) -> None:
        now = time.monotonic()
        if force or now - self.sent_at >= PROGRESS_INTERVAL_S:
            self.conn.send(progress)
            self.sent_at = now
            self.phase = progress.phase


def _die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
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


def _run_task(task: _Task, settings: Settings, progress: train.ProgressFn) -> _Published:
    from shiftable_lib import jobs

    if task.kind is JobKind.ADD_SPECIALIST:
        results = [jobs.add_specialist(settings, task.specialist, progress)]
    elif task.kind is JobKind.REMOVE_SPECIALIST:
        results = [
            jobs.remove_specialist(settings, task.specialist, task.recalibrate_steps, progress)
        ]
    else:
        if task.kind is JobKind.TRAIN_SPECIALISTS and _no_generalist(settings):
            raise Conflict("there is no generalist to train specialists on: run TRAIN_ALL first")
        demo = task.kind is JobKind.TRAIN_ALL  # first start: no general text -> demo corpus
        results = jobs.train_all(settings, task.profile or None, progress, demo_if_empty=demo)
    published = [r.version for r in results if r.version]
    version = published[-1] if published else None
    metrics = (settings.models_dir / version / "metrics.json").read_text() if version else ""
    return _Published(version, "; ".join(r.message for r in results), metrics)


def _child_main(conn: Connection, task: _Task) -> None:
    """Entry point of the job's child process: run the job, send progress and one outcome.
    With `task.nproc` > 1 the child runs the job's ranks under torchrun and relays rank 0."""
    _die_with_parent(task.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which cancels us
    if task.nproc > 1:
        from services.training import ranks

        outcome = ranks.relay(task, conn)
    else:
        outcome = _run_job(conn, task)
    conn.send(outcome)
    conn.close()


def _run_job(conn, task: _Task) -> _Published | _Failed:
    """Run the job here, sending progress to `conn`; the outcome, failures included."""
    try:
        # jobs.configure_torch applies `threads`: the server's train_threads (0 = torch's default)
        settings = Settings(
            home=task.home,
            profile=task.server_profile,
            device=task.device,
            threads=task.train_threads,
        )

        def plan() -> list[PlannedPhase]:
            return plan_phases(
                settings, task.kind, task.specialist, task.profile, task.recalibrate_steps
            )

        reporter = _Reporter(conn, FractionEstimate(plan()), plan)
        reporter.announce_unreported()  # a job whose first phase is unreported (REMOVE)
        outcome: _Published | _Failed = _run_task(task, settings, reporter)
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, ShiftableError):  # a bug or the platform: name the exception
            log.exception("training job failed")
            message = f"{type(exc).__name__}: {message}"
        outcome = _Failed(message)
    return outcome


def _no_generalist(settings: Settings) -> bool:
    return versions.current_version(settings.models_dir) is None


# ---- the manager -----------------------------------------------------------------------------


@dataclass
class _Run:
    """The running job's child process and what the parent knows about it."""

    job: Job
    process: multiprocessing.process.BaseProcess
    versions_before: set[str]
    outcome: _Published | _Failed | None = None
    cancel_reason: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _pointer(models_dir: Path) -> str | None:
    """What CURRENT says, verbatim (not versions.current_version's newest-version fallback)."""
    with contextlib.suppress(FileNotFoundError):
        return (models_dir / versions.CURRENT).read_text().strip() or None
    return None


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            name = ""
        return f"training process killed by signal {-exitcode}{name}"
    return f"training process exited with code {exitcode} without a result"


class JobManager:
    """Queues jobs, runs one at a time in a child process and tells watchers about each change.

    Use it from one asyncio event loop (every method must be called on that loop's thread).
    """

    def __init__(self, settings: Settings, kill_after_s: float = KILL_AFTER_S) -> None:
        self.settings = settings
        self.kill_after_s = kill_after_s
        self._jobs: dict[str, Job] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._running: _Run | None = None
        self._closed = False
        self._mp = multiprocessing.get_context("spawn")

    def start(self) -> None:
        """Get ready to run jobs: remove what a job killed with a previous server left behind
        (a previous server's child dies with it)."""
        self._remove_temporaries()

    # ---- requests ----

    def submit(
        self,
        kind: JobKind,
        specialist: str = "",
        profile: str = "",
        recalibrate_steps: int = 0,
    ) -> Job:
        """Validate a request and queue it; raise (queueing nothing) when it cannot run."""
        if self._closed:
            raise Unavailable("the training server is shutting down")
        if profile:
            get_profile(profile)  # ValueError naming the profiles there are
        if recalibrate_steps < 0:
            raise ValueError(f"recalibrate_steps must be >= 0, got {recalibrate_steps}")
        if kind in (JobKind.ADD_SPECIALIST, JobKind.REMOVE_SPECIALIST):
            validate_specialist_name(specialist)
        elif specialist:
            raise ValueError(f"a {kind.name} job takes no specialist (got {specialist!r})")
        if kind is JobKind.ADD_SPECIALIST:
            folder = domain_dir(self.settings.data_dir, specialist)
            if not text_files(folder):
                raise CorpusMissing(
                    f"no corpus for {specialist!r}: create {folder}/ and put one or more "
                    "non-empty .txt files in it"
                )
        if kind is JobKind.TRAIN_SPECIALISTS and _no_generalist(self.settings):
            pending = [j for j in self._queue if j.kind is JobKind.TRAIN_ALL]
            if self._running and self._running.job.kind is JobKind.TRAIN_ALL:
                pending.append(self._running.job)
            if not pending:
                raise Conflict("there is no generalist to train specialists on: run TRAIN_ALL")
        job = Job(
            id=f"job-{secrets.token_hex(6)}",
            kind=kind,
            specialist=specialist,
            profile=profile,
            recalibrate_steps=recalibrate_steps,
        )
        self._jobs[job.id] = job
        self._changed[job.id] = asyncio.Event()
        self._queue.append(job)
        log.info("queued %s: %s %s", job.id, kind.name, specialist)
        self._pump()
        return replace(job)

    def get(self, job_id: str) -> Job:
        return replace(self._find(job_id))

    def list_jobs(self) -> list[Job]:
        """Every job kept, oldest first."""
        return [replace(job) for job in self._jobs.values()]

    async def cancel(self, job_id: str) -> Job:
        """Drop a queued job, or stop a running one's child (SIGTERM, then SIGKILL after
        `kill_after_s`) and return once it is gone. A finished job is returned unchanged."""
        job = self._find(job_id)
        if job.state is JobState.QUEUED:
            self._queue.remove(job)
            self._finish(job, JobState.CANCELLED, error="cancelled before it started")
        elif self._running is not None and self._running.job is job:
            await self._stop(self._running, "cancelled")
        return replace(job)

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then again after every change, ending with its final state. A slow
        reader skips intermediate states but always sees the latest."""
        job = self._find(job_id)
        while True:
            changed = self._changed[job.id]
            yield replace(job)
            if job.state.finished:
                return
            await changed.wait()

    async def close(self) -> None:
        """Cancel every job (the server is shutting down) and wait for the child to be gone."""
        self._closed = True
        while self._queue:
            job = self._queue.popleft()
            self._finish(job, JobState.CANCELLED, error="cancelled: the training server stopped")
        if self._running is not None:
            await self._stop(self._running, "cancelled: the training server stopped")

    # ---- running ----

    def _find(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"no training job {job_id!r}") from None

    def _notify(self, job: Job) -> None:
        self._changed[job.id].set()
        self._changed[job.id] = asyncio.Event()

    def _pump(self) -> None:
        """Start the next queued job if none runs."""
        while self._running is None and self._queue and not self._closed:
            job = self._queue.popleft()
            try:
                self._launch(job)
            except Exception as exc:  # cannot start a process (fds, memory): fail this job only
                log.exception("cannot start %s", job.id)
                self._finish(job, JobState.FAILED, error=f"cannot start training process: {exc}")

    def _launch(self, job: Job) -> None:
        s = self.settings
        task = _Task(
            kind=job.kind,
            specialist=job.specialist,
            profile=job.profile,
            recalibrate_steps=job.recalibrate_steps,
            home=s.home.resolve(),
            server_profile=s.profile,
            device=s.device,
            train_threads=s.train_threads,
            parent_pid=os.getpid(),
            nproc=s.nproc_per_node,
        )
        receiver, sender = self._mp.Pipe(duplex=False)
        process = self._mp.Process(
            target=_child_main, args=(sender, task), name=f"sma-{job.id}", daemon=True
        )
        run = _Run(
            job=job,
            process=process,
            versions_before=set(versions.version_ids(s.models_dir)),
        )
        try:
            process.start()
        except BaseException:
            receiver.close()
            raise
        finally:
            sender.close()  # the child holds the only writer: its exit ends our reads
        self._running = run
        job.state = JobState.RUNNING
        job.started_at = datetime.now(UTC)
        job.pid = process.pid
        job.progress = JobProgress("starting")
        log.info("started %s in process %s", job.id, process.pid)
        self._notify(job)
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._read, args=(run, receiver, loop), name=f"read-{job.id}", daemon=True
        ).start()

    def _read(self, run: _Run, receiver: Connection, loop: asyncio.AbstractEventLoop) -> None:
        """Reader thread: pass the child's messages to the loop, then its exit."""

        def deliver(callback: Callable[..., None], *args: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(callback, *args)

        with receiver:
            while True:
                try:
                    message = receiver.recv()
                except (EOFError, OSError):
                    break
                deliver(self._on_message, run, message)
        run.process.join()
        deliver(self._on_exit, run)

    def _on_message(self, run: _Run, message: JobProgress | _Published | _Failed) -> None:
        if isinstance(message, JobProgress):
            run.job.progress = message  # monotonic already: FractionEstimate in the child
            self._notify(run.job)
        else:
            run.outcome = message

    def _on_exit(self, run: _Run) -> None:
        job, outcome = run.job, run.outcome
        self._running = None
        if isinstance(outcome, _Published):  # it published, even if a cancel came too late
            job.version_id = outcome.version or ""
            job.message = outcome.message
            job.metrics_json = outcome.metrics_json
            job.progress = JobProgress("done", 1, 1, 1.0)
            self._finish(job, JobState.SUCCEEDED)
        else:
            if run.cancel_reason:
                state, error = JobState.CANCELLED, run.cancel_reason
            elif isinstance(outcome, _Failed):
                state, error = JobState.FAILED, outcome.error
            else:
                state, error = JobState.FAILED, _exit_reason(run.process.exitcode)
            self._discard(run)
            self._finish(job, state, error=error)
        run.done.set()
        self._pump()

    async def _stop(self, run: _Run, reason: str) -> None:
        if not run.cancel_reason:
            run.cancel_reason = reason
            log.info("stopping %s (process %s): %s", run.job.id, run.process.pid, reason)
            run.process.terminate()
        try:
            async with asyncio.timeout(self.kill_after_s):
                await run.done.wait()
        except TimeoutError:
            log.warning("%s ignored SIGTERM; killing it", run.job.id)
            run.process.kill()
            await run.done.wait()

    def _finish(self, job: Job, state: JobState, error: str = "") -> None:
        job.state = state
        job.error = error
        job.finished_at = datetime.now(UTC)
        log.info("%s %s%s", job.id, state.name, f": {error}" if error else "")
        self._notify(job)
        self._forget_old_jobs()

    def _forget_old_jobs(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state.finished]
        for job_id in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self._jobs[job_id]
            del self._changed[job_id]

    def _discard(self, run: _Run) -> None:
        """After a job that did not succeed: remove its temporaries and any version it wrote but
        did not make CURRENT. A version it did make CURRENT (TRAIN_ALL's generalist, before the
        specialists failed) is complete and served, so it stays and the job names it."""
        models = self.settings.models_dir
        self._remove_temporaries()
        pointer = _pointer(models)
        for version in set(versions.version_ids(models)) - run.versions_before:
            if version == pointer:
                run.job.version_id = version
                run.job.message = f"published {version} before it stopped"
            else:
                log.warning(
                    "removing %s, written by %s but never made current", version, run.job.id
                )
                shutil.rmtree(models / version, ignore_errors=True)

    def _remove_temporaries(self) -> None:
        """Folders of a version being written, and a CURRENT being replaced, by a dead child."""
        models = self.settings.models_dir
        if not models.is_dir():
            return
        for path in [*models.glob(".tmp-*"), *models.glob(f".{versions.CURRENT}.tmp-*")]:
            log.warning("removing %s, left by a stopped training job", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
