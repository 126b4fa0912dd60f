"""An operation's training job, followed to its end from the gateway.

The training service keeps jobs in memory, and its child process dies with it: a job it no
longer knows (it restarted) is started again, which is safe because a job writes its version
atomically and publishes nothing when it dies. Every start carries the operation's id as its
request id, so a gateway that died before recording its job, or one taking an operation over,
gets the job already started rather than a second one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from gateway.backends import RPC_TIMEOUT
from gateway.records import Records
from gateway.schemas import enum_name
from sma.v1 import registry_pb2, training_pb2, training_pb2_grpc

log = logging.getLogger("sma.gateway.lifecycle")

R = registry_pb2
T = training_pb2
TERMINAL_JOB = (T.JOB_STATE_SUCCEEDED, T.JOB_STATE_FAILED, T.JOB_STATE_CANCELLED)
MIRROR_INTERVAL_S = 0.25  # the least time between two writes of a job's progress


class ProgressMirror:
    """Which of a job's reports to write onto its operation: at most one every
    MIRROR_INTERVAL_S, except the first of a phase and the job's end, which are never skipped. A
    phase that sends no reports while it runs (an evaluation) then shows as itself, not as the
    end of the phase before it, however long it takes."""

    def __init__(self) -> None:
        self.written_at = -float("inf")
        self.phase: str | None = None

    def due(self, job: training_pb2.Job, now: float) -> bool:
        phase = job.progress.phase
        if (
            job.state in TERMINAL_JOB
            or phase != self.phase
            or now - self.written_at > MIRROR_INTERVAL_S
        ):
            self.written_at, self.phase = now, phase
            return True
        return False


class OperationFailed(Exception):
    """A step of an operation failed; the message says why, for the operation's `error`."""


class OperationCancelled(Exception):
    """The user cancelled the operation before its version was published."""


class TrainingRun:
    """Runs operations' training jobs for the gateway `owner`, mirroring their progress onto
    the operations (writes fenced by its lease)."""

    def __init__(
        self, training: training_pb2_grpc.TrainingStub, records: Records, owner: str, profile: str
    ) -> None:
        self.training = training
        self.records = records
        self.owner = owner
        self.profile = profile

    async def run(
        self, op: R.Operation, on_written: Callable[[str], None] | None = None
    ) -> training_pb2.Job:
        """Follow the operation's training job to its end, starting one when there is none
        (or none the training service still knows). `on_written` gets each version the job
        reports before it ends (a first start's generalist), which can serve meanwhile."""
        job_id = op.job_id
        while True:
            try:
                job = await self._attach(job_id) if job_id else None
                if job is None:
                    job = await self._start_job(op)
                    job_id = job.id
                job = await self._follow(op, job, on_written)
                if job.state in TERMINAL_JOB:
                    break
                await asyncio.sleep(1.0)  # the stream ended early (training stopping): re-attach
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.info("training service unavailable while following %s; retrying", job_id)
                await asyncio.sleep(1.0)
        cancelled = job.state == T.JOB_STATE_CANCELLED
        if cancelled and (await self.records.operation(op.id)).cancel_requested:
            raise OperationCancelled
        if job.state != T.JOB_STATE_SUCCEEDED:
            state = enum_name(T.JobState, job.state)
            raise OperationFailed(f"training job {job.id} {state}: {job.error or 'no reason'}")
        return job

    async def _attach(self, job_id: str) -> training_pb2.Job | None:
        try:
            reply = await self.training.GetJob(
                T.GetJobRequest(id=job_id), wait_for_ready=True, timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.info("job %s is gone (training restarted): starting it again", job_id)
            return None
        return reply.job

    async def _start_job(self, op: R.Operation) -> training_pb2.Job:
        """Start the operation's job; the operation's id makes a repeated start (a gateway that
        died before recording the job, a takeover) return the job already started."""
        request = self._job_request(op)
        if op.kind != R.OPERATION_KIND_INITIALIZE:  # build on what serves, after a rollback too
            request.base_version = (await self.records.require_serving()).id
        reply = await self.training.StartJob(request, wait_for_ready=True, timeout=RPC_TIMEOUT)
        op = await self.records.update(
            op.id, job_id=reply.job.id, message=f"training job {reply.job.id}", owner=self.owner
        )
        if op.cancel_requested:  # asked for before the job was recorded
            await self.training.CancelJob(T.CancelJobRequest(id=reply.job.id), timeout=RPC_TIMEOUT)
        return reply.job

    async def _follow(
        self, op: R.Operation, job: training_pb2.Job, on_written: Callable[[str], None] | None
    ) -> training_pb2.Job:
        """Mirror the job's progress onto the operation (`ProgressMirror` says when), and pass
        on a version it wrote while it still runs."""
        mirror = ProgressMirror()
        written = ""
        stream = self.training.WatchJob(T.WatchJobRequest(id=job.id), wait_for_ready=True)
        async for reply in stream:
            job = reply.job
            running = job.state == T.JOB_STATE_RUNNING
            if on_written and running and job.version_id and job.version_id != written:
                written = job.version_id
                on_written(written)
            if mirror.due(job, time.monotonic()):
                await self.records.update(op.id, progress=job.progress, owner=self.owner)
        return job

    def _job_request(self, op: R.Operation) -> T.StartJobRequest:
        key: dict = {"request_id": op.id}
        if op.HasField("max_drift"):
            key["max_drift"] = op.max_drift
        if op.kind == R.OPERATION_KIND_INITIALIZE:
            return T.StartJobRequest(kind=T.JOB_KIND_TRAIN_ALL, profile=self.profile, **key)
        if op.kind == R.OPERATION_KIND_ADD_SPECIALIST:
            if op.full_retrain:  # every specialist under data/, the new one included
                return T.StartJobRequest(kind=T.JOB_KIND_TRAIN_SPECIALISTS, **key)
            return T.StartJobRequest(kind=T.JOB_KIND_ADD_SPECIALIST, specialist=op.target, **key)
        return T.StartJobRequest(kind=T.JOB_KIND_REMOVE_SPECIALIST, specialist=op.target, **key)
