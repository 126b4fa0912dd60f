"""The training service's core: a FIFO of jobs, run one at a time, each in a child process.

The work itself is `shiftable_lib.jobs`; this module decides *where* it runs and what the rest of
the stack sees of it. A job runs in a `spawn`ed child process (child.py) so that a crash, an
out-of-memory kill or a cancel never takes the server down, and so that the server's event loop
never waits on PyTorch. The child reports over a pipe: throttled progress, then one outcome.
The parent keeps every job in memory (the registry, not this service, is the durable record of
operations) and notifies watchers on each change.

The server process never imports PyTorch (memory, start-up time): only the child does.

A job that does not succeed must leave the model store as it found it. `checkpoint.save_version`
only renames complete folders into place, but a child killed mid-write leaves its `.tmp-*`
folder, and one killed between publishing a version and moving CURRENT leaves a complete version
nobody points at; both are removed once the child is gone (no other job runs at that moment).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path

from services.training import child, ranks
from services.training.home import describe_version, no_generalist
from services.training.job import (
    Failed,
    Job,
    JobKind,
    JobProgress,
    JobState,
    Outcome,
    Published,
    Task,
    Written,
)
from shiftable_lib import logs, versions
from shiftable_lib.config import Settings, check_max_drift, get_profile
from shiftable_lib.corpus import require_corpus, validate_specialist_name
from shiftable_lib.errors import AlreadyExists, Conflict, NotFound, Unavailable

log = logging.getLogger("sma.training")

KILL_AFTER_S = 5.0  # a cancelled child gets SIGTERM, then SIGKILL after this long
MAX_FINISHED_JOBS = 1000  # finished jobs kept for Get/List; the oldest are forgotten first


@dataclass
class _Run:
    """The running job's child process and what the parent knows about it."""

    job: Job
    process: multiprocessing.process.BaseProcess
    versions_before: set[str]
    written: set[str] = field(default_factory=set)  # versions it named while it ran (Written)
    outcome: Outcome | None = None
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
        # jobs finished since the start, by kind and state; replaced, never changed in place,
        # so that another thread (a metrics scrape) may read it
        self.finished: dict[tuple[JobKind, JobState], int] = {}
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
        request_id: str = "",
        base_version: str = "",
        max_drift: float | None = None,
    ) -> Job:
        """Validate a request and queue it; raise (queueing nothing) when it cannot run. A
        `request_id` seen before returns the job it started (AlreadyExists if that job was
        for something else), so a caller that retries or takes over never starts a second."""
        if request_id and (started := self._started_for(request_id)) is not None:
            if (started.kind, started.specialist) != (kind, specialist):
                raise AlreadyExists(
                    f"request_id {request_id!r} started {started.id}, a {started.kind.name} job"
                )
            return replace(started)
        if self._closed:
            raise Unavailable("the training server is shutting down")
        if profile:
            get_profile(profile)  # ValueError naming the profiles there are
        if recalibrate_steps < 0:
            raise ValueError(f"recalibrate_steps must be >= 0, got {recalibrate_steps}")
        check_max_drift(max_drift)
        if kind in (JobKind.ADD_SPECIALIST, JobKind.REMOVE_SPECIALIST):
            validate_specialist_name(specialist)
        elif specialist:
            raise ValueError(f"a {kind.name} job takes no specialist (got {specialist!r})")
        if kind is JobKind.ADD_SPECIALIST:
            require_corpus(self.settings.data_dir, specialist)
        if base_version:
            if kind is JobKind.TRAIN_ALL:
                raise ValueError(
                    "a TRAIN_ALL job trains a new generalist: it takes no base_version"
                )
            describe_version(self.settings.models_dir, base_version)  # NotFound, VersionInvalid
        if kind is JobKind.TRAIN_SPECIALISTS and no_generalist(self.settings.models_dir):
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
            request_id=request_id,
            base_version=base_version,
            max_drift=max_drift,
            trace=logs.request_id.get(),
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

    def running(self) -> Job | None:
        run = self._running
        return replace(run.job) if run is not None else None

    def queued(self) -> int:
        return len(self._queue)

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

    def _started_for(self, request_id: str) -> Job | None:
        return next((j for j in self._jobs.values() if j.request_id == request_id), None)

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
            with logs.bound(job.trace):
                try:
                    self._launch(job)
                except Exception as exc:  # cannot start a process (fds, memory): this job fails
                    log.exception("cannot start %s", job.id)
                    error = f"cannot start training process: {exc}"
                    self._finish(job, JobState.FAILED, error=error)

    def _launch(self, job: Job) -> None:
        s = self.settings
        if job.base_version and _pointer(s.models_dir) != job.base_version:
            log.info("%s builds on %s: making it the current version", job.id, job.base_version)
            versions.set_current(s.models_dir, job.base_version)
        task = Task(
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
            max_drift=s.max_drift if job.max_drift is None else job.max_drift,
            trace=job.trace,
            log_format=s.log_format,
            log_level=s.log_level,
        )
        receiver, sender = self._mp.Pipe(duplex=False)
        run_job = ranks.relay if task.nproc > 1 else child.run_job
        process = self._mp.Process(
            target=child.main, args=(sender, task, run_job), name=f"sma-{job.id}", daemon=True
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

    def _on_message(self, run: _Run, message: JobProgress | Written | Outcome) -> None:
        if isinstance(message, Written):  # it serves while the job goes on
            with logs.bound(run.job.trace):
                log.info("%s: wrote %s and goes on", run.job.id, message.version)
            run.written.add(message.version)
            run.job.version_id = message.version
            self._notify(run.job)
        elif isinstance(message, JobProgress):
            if message.phase != run.job.progress.phase:
                with logs.bound(run.job.trace):
                    log.info("%s: %s", run.job.id, message.phase)
            run.job.progress = message  # monotonic already: FractionEstimate in the child
            self._notify(run.job)
        else:
            run.outcome = message

    def _on_exit(self, run: _Run) -> None:
        job, outcome = run.job, run.outcome
        with logs.bound(job.trace):  # its own lines, and a removal's
            self._running = None
            if isinstance(outcome, Published):  # it published, even if a cancel came too late
                job.version_id = outcome.version or ""
                job.message = outcome.message
                job.progress = JobProgress("done", 1, 1, 1.0)
                self._finish(job, JobState.SUCCEEDED)
            else:
                if run.cancel_reason:
                    state, error = JobState.CANCELLED, run.cancel_reason
                elif isinstance(outcome, Failed):
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
            with logs.bound(run.job.trace):
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
        key = (job.kind, state)
        self.finished = {**self.finished, key: self.finished.get(key, 0) + 1}
        with logs.bound(job.trace):
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
        specialists failed) is complete and may serve, so it stays and the job names it; so
        does one it named while it ran (`Written`), which may serve already though CURRENT has
        moved on."""
        models = self.settings.models_dir
        self._remove_temporaries()
        pointer = _pointer(models)
        for version in set(versions.version_ids(models)) - run.versions_before:
            if version == pointer:
                run.job.version_id = version
                run.job.message = f"published {version} before it stopped"
            elif version in run.written:
                log.info("keeping %s, which %s named while it ran", version, run.job.id)
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
