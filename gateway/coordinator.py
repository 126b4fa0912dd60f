"""The specialist lifecycle, coordinated across the services.

    add / delete / first start
      -> registry: an operation (one at a time; a second request gets FAILED_PRECONDITION)
      -> training: a job, whose progress is mirrored onto the operation
      -> registry: publish the version the job wrote
      -> inference: reports it loaded (it watches the registry and swaps between decode steps)
      -> registry: specialists updated, operation SUCCEEDED

Every step's outcome is recorded in the registry before the next starts, so after a restart of
any component `resume()` picks each unfinished operation up where the record says it was: it
re-attaches to its training job, restarts a job the training service no longer knows, or
publishes a version that was trained but not yet served. What cannot go on fails with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gateway.backends import RPC_TIMEOUT, Backends
from gateway.records import Records
from gateway.schemas import enum_name
from shiftable_lib.config import Settings
from shiftable_lib.errors import AlreadyExists, Conflict, NotFound
from sma.v1 import common_pb2, registry_pb2, training_pb2

log = logging.getLogger("sma.gateway.lifecycle")

R = registry_pb2
T = training_pb2
UNFINISHED = (R.OPERATION_STATE_PENDING, R.OPERATION_STATE_RUNNING)
TERMINAL_JOB = (T.JOB_STATE_SUCCEEDED, T.JOB_STATE_FAILED, T.JOB_STATE_CANCELLED)
LOAD_TIMEOUT = 600.0  # seconds for inference to load a published version


class OperationFailed(Exception):
    """A step of an operation failed; the message says why, for the operation's `error`."""


class OperationCancelled(Exception):
    """The user cancelled the operation before its version was published."""


class Coordinator:
    """Starts and drives lifecycle operations; one asyncio task per unfinished operation."""

    def __init__(self, settings: Settings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        self.records = Records(backends.registry)
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancelling: set[str] = set()  # operations whose cancel was asked for
        self.boot_error: str | None = None

    # ---- requests ----------------------------------------------------------------------------

    async def add(self, name: str, full_retrain: bool = False) -> R.Operation:
        """Validate, record the operation and the specialist, and start training it."""
        corpus = await self._corpus(name)  # INVALID_ARGUMENT: a bad name, or no corpus
        await self.records.require_serving()
        registry = self.backends.registry
        existing = await self.records.specialist(name)
        if existing is not None and existing.state != R.SPECIALIST_STATE_FAILED:
            raise AlreadyExists(f"specialist {name!r} already exists")
        op = await self.records.create(R.OPERATION_KIND_ADD_SPECIALIST, name, full_retrain)
        if existing is not None:  # a failed earlier attempt: this one replaces it
            await registry.DeleteSpecialist(R.DeleteSpecialistRequest(name=name))
        await registry.AddSpecialist(
            R.AddSpecialistRequest(
                name=name, corpus_dir=corpus.dir, state=R.SPECIALIST_STATE_TRAINING
            ),
            timeout=RPC_TIMEOUT,
        )
        self._spawn(op)
        return op

    async def delete(self, name: str) -> R.Operation:
        """Validate (known, not the last one), record the operation, start the removal."""
        serving = await self.records.require_serving()
        existing = await self.records.specialist(name)  # INVALID_ARGUMENT for a bad name
        if existing is None or name not in serving.specialists:
            raise NotFound(f"no specialist named {name!r}")
        if list(serving.specialists) == [name]:
            raise Conflict(f"{name!r} is the last specialist and cannot be deleted")
        op = await self.records.create(R.OPERATION_KIND_DELETE_SPECIALIST, name)
        await self.records.set_specialist(name, R.SPECIALIST_STATE_DELETING)
        self._spawn(op)
        return op

    async def cancel(self, op_id: str) -> R.Operation:
        """Stop an add while it trains: its job is cancelled, and the specialist is forgotten
        as if it had never been asked for. Too late once training has published a version.
        """
        op = await self.records.operation(op_id)
        if op.state not in UNFINISHED:
            state = enum_name(R.OperationState, op.state)
            raise Conflict(f"operation {op_id} has already ended ({state})")
        if op.kind != R.OPERATION_KIND_ADD_SPECIALIST:
            kind = enum_name(R.OperationKind, op.kind)
            raise Conflict(f"only an add can be cancelled, not {kind}")
        if op.version_id or op_id not in self.tasks:
            raise Conflict(f"operation {op_id} is past training; it cannot be cancelled now")
        self.cancelling.add(op_id)
        if op.job_id:  # else _start_job cancels the job as soon as it exists
            await self.backends.training.CancelJob(
                T.CancelJobRequest(id=op.job_id), timeout=RPC_TIMEOUT
            )
        op = await self.wait(op_id)
        if op.state != R.OPERATION_STATE_CANCELLED:
            state = enum_name(R.OperationState, op.state)
            raise Conflict(f"operation {op_id} finished training first and {state}")
        return op

    async def wait(self, op_id: str) -> R.Operation:
        """Block until the operation ends; return its final record."""
        task = self.tasks.get(op_id)
        if task is not None:
            await asyncio.shield(task)
        return await self.records.operation(op_id)

    # ---- start-up ----------------------------------------------------------------------------

    async def boot(self) -> None:
        """Resume unfinished operations; on a first start, serve what is on disk or train."""
        while True:
            try:
                await self._boot_once()
                self.boot_error = None
                return
            except grpc.aio.AioRpcError as exc:  # a service not up yet: try again shortly
                self.boot_error = f"waiting for services: {exc.details()}"
                await asyncio.sleep(0.5)

    async def _boot_once(self) -> None:
        registry = self.backends.registry
        wait = {"wait_for_ready": True, "timeout": RPC_TIMEOUT}
        unfinished = (
            await registry.ListOperations(R.ListOperationsRequest(unfinished_only=True), **wait)
        ).operations
        for op in unfinished:
            log.info("resuming operation %s (%s)", op.id, R.OperationKind.Name(op.kind))
            self._spawn(op)
        serving = (await registry.GetServing(R.GetServingRequest(), **wait)).serving
        if serving.version.id or any(op.kind == R.OPERATION_KIND_INITIALIZE for op in unfinished):
            return
        on_disk = await self._version("")
        if on_disk is not None:  # trained before (by `sma train`, or a lost registry)
            log.info("serving the model found on disk, %s", on_disk.version.id)
            await self._publish(on_disk.version)
            await self._sync_specialists(on_disk)
            return
        log.info("first start: no model yet, training one")
        self._spawn(await self.records.create(R.OPERATION_KIND_INITIALIZE, ""))

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    # ---- driving an operation ----------------------------------------------------------------

    def _spawn(self, op: R.Operation) -> None:
        if op.id not in self.tasks or self.tasks[op.id].done():
            self.tasks[op.id] = asyncio.create_task(self._drive(op), name=f"operation {op.id}")

    async def _drive(self, op: R.Operation) -> None:
        try:
            op = await self.records.update(op.id, state=R.OPERATION_STATE_RUNNING)
            version_id = op.version_id
            if not version_id:
                job = await self._run_job(op)
                version_id = job.version_id
                if not version_id:  # nothing needed doing: what is on disk stays current
                    current = await self._version("")
                    version_id = current.version.id if current else ""
                if not version_id:
                    raise OperationFailed("training finished but published no model")
                op = await self.records.update(op.id, version_id=version_id, message=job.message)
            version = await self._version(version_id)
            if version is None:
                raise OperationFailed(f"training reports no model version {version_id!r}")
            await self.records.update(op.id, message=f"publishing {version_id}")
            await self._publish(version.version)
            await self._wait_loaded(version_id)
            await self._finish(op, version)
        except asyncio.CancelledError:  # gateway shutdown: the operation resumes at next start
            raise
        except OperationCancelled:
            await self.records.forget_specialist(op.target)
            await self.records.update(
                op.id, state=R.OPERATION_STATE_CANCELLED, message="cancelled on request"
            )
        except Exception as exc:
            reason = _reason(exc)
            log.warning("operation %s failed: %s", op.id, reason)
            await self._fail(op, reason)
        finally:
            self.cancelling.discard(op.id)

    async def _run_job(self, op: R.Operation) -> training_pb2.Job:
        """Follow the operation's training job to its end, starting one when there is none.

        The training service keeps jobs in memory and its child dies with it: when it
        restarts mid-job the job is gone, and the operation starts it again (a job writes its
        version atomically and publishes nothing when it dies, so a rerun is safe).
        """
        job_id = op.job_id or await self._matching_job(op)
        while True:
            try:
                job = await self._attach(job_id) if job_id else None
                if job is None:
                    job = await self._start_job(op)
                    job_id = job.id
                job = await self._follow(op, job)
                if job.state in TERMINAL_JOB:
                    break
                await asyncio.sleep(1.0)  # the stream ended early (training stopping): re-attach
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.info("training service unavailable while following %s; retrying", job_id)
                await asyncio.sleep(1.0)
        if job.state == T.JOB_STATE_CANCELLED and op.id in self.cancelling:
            raise OperationCancelled
        if job.state != T.JOB_STATE_SUCCEEDED:
            state = enum_name(T.JobState, job.state)
            raise OperationFailed(f"training job {job.id} {state}: {job.error or 'no reason'}")
        return job

    async def _attach(self, job_id: str) -> training_pb2.Job | None:
        try:
            reply = await self.backends.training.GetJob(
                T.GetJobRequest(id=job_id), wait_for_ready=True, timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.info("job %s is gone (training restarted): starting it again", job_id)
            return None
        return reply.job

    async def _matching_job(self, op: R.Operation) -> str:
        """A job that a gateway which died before recording it started for this operation."""
        wanted = self._job_request(op)
        reply = await self.backends.training.ListJobs(
            T.ListJobsRequest(), wait_for_ready=True, timeout=RPC_TIMEOUT
        )
        started = op.created_at.ToDatetime()
        for job in reversed(reply.jobs):
            same = job.kind == wanted.kind and job.specialist == wanted.specialist
            if same and job.created_at.ToDatetime() >= started:
                return job.id
        return ""

    async def _start_job(self, op: R.Operation) -> training_pb2.Job:
        reply = await self.backends.training.StartJob(
            self._job_request(op), wait_for_ready=True, timeout=RPC_TIMEOUT
        )
        await self.records.update(
            op.id, job_id=reply.job.id, message=f"training job {reply.job.id}"
        )
        if op.id in self.cancelling:  # asked for while the job was being started
            await self.backends.training.CancelJob(
                T.CancelJobRequest(id=reply.job.id), timeout=RPC_TIMEOUT
            )
        return reply.job

    async def _follow(self, op: R.Operation, job: training_pb2.Job) -> training_pb2.Job:
        """Mirror the job's progress onto the operation (at most ~4 writes a second)."""
        last_update = 0.0
        stream = self.backends.training.WatchJob(T.WatchJobRequest(id=job.id), wait_for_ready=True)
        async for reply in stream:
            job = reply.job
            now = time.monotonic()
            if job.state in TERMINAL_JOB or now - last_update > 0.25:
                last_update = now
                await self.records.update(op.id, progress=job.progress)
        return job

    def _job_request(self, op: R.Operation) -> T.StartJobRequest:
        if op.kind == R.OPERATION_KIND_INITIALIZE:
            return T.StartJobRequest(kind=T.JOB_KIND_TRAIN_ALL, profile=self.settings.profile)
        if op.kind == R.OPERATION_KIND_ADD_SPECIALIST:
            if op.full_retrain:  # every specialist under data/, the new one included
                return T.StartJobRequest(kind=T.JOB_KIND_TRAIN_SPECIALISTS)
            return T.StartJobRequest(kind=T.JOB_KIND_ADD_SPECIALIST, specialist=op.target)
        return T.StartJobRequest(kind=T.JOB_KIND_REMOVE_SPECIALIST, specialist=op.target)

    async def _publish(self, version: common_pb2.ModelVersion) -> None:
        published = common_pb2.ModelVersion()
        published.CopyFrom(version)
        published.ClearField("created_at")  # the registry stamps when it was published
        await self.backends.registry.PublishVersion(
            R.PublishVersionRequest(version=published), timeout=RPC_TIMEOUT
        )

    async def _wait_loaded(self, version: str) -> None:
        """Until every live inference replica serves `version` (each follows the registry's
        serving pointer and reports to it); fails naming the replicas that cannot load it."""

        async def watch() -> None:
            stream = self.backends.registry.WatchServing(R.WatchServingRequest())
            async for reply in stream:
                serving = reply.serving
                if serving.version.id != version:
                    raise OperationFailed(
                        f"version {serving.version.id} was published while waiting for "
                        f"{version} to load"
                    )
                if loaded_everywhere(serving, version):
                    return
            raise OperationFailed("the registry ended the serving stream")

        try:
            await asyncio.wait_for(watch(), LOAD_TIMEOUT)
        except TimeoutError:
            raise OperationFailed(
                f"inference did not load {version} within {LOAD_TIMEOUT:.0f} s"
            ) from None

    async def _finish(self, op: R.Operation, version: T.GetVersionResponse) -> None:
        if op.kind == R.OPERATION_KIND_INITIALIZE:
            await self._sync_specialists(version)
            message = f"model {version.version.id} trained and serving"
        elif op.kind == R.OPERATION_KIND_ADD_SPECIALIST:
            digest = version.corpus_digests.get(op.target, "")
            await self.records.set_specialist(op.target, R.SPECIALIST_STATE_READY, digest=digest)
            message = f"Specialist '{op.target}' is now configured."
        else:
            await self.records.forget_specialist(op.target)
            message = f"Specialist '{op.target}' has been deleted."
        await self.records.update(op.id, state=R.OPERATION_STATE_SUCCEEDED, message=message)

    async def _fail(self, op: R.Operation, reason: str) -> None:
        try:
            if op.kind == R.OPERATION_KIND_ADD_SPECIALIST:
                await self.records.set_specialist(
                    op.target, R.SPECIALIST_STATE_FAILED, error=reason
                )
            elif op.kind == R.OPERATION_KIND_DELETE_SPECIALIST:
                await self.records.set_specialist(op.target, R.SPECIALIST_STATE_READY, error=reason)
            await self.records.update(op.id, state=R.OPERATION_STATE_FAILED, error=reason)
        except grpc.aio.AioRpcError as exc:  # registry down: resume() fails it at next start
            log.error("could not record the failure of %s: %s", op.id, exc.details())

    async def _sync_specialists(self, version: T.GetVersionResponse) -> None:
        """Make the registry's specialists those of `version` (first start, adopted model)."""
        names = list(version.version.specialists)
        listed = await self.backends.registry.ListSpecialists(
            R.ListSpecialistsRequest(), timeout=RPC_TIMEOUT
        )
        known = {s.name for s in listed.specialists}
        for name in names:
            digest = version.corpus_digests.get(name, "")
            if name in known:
                await self.records.set_specialist(name, R.SPECIALIST_STATE_READY, digest=digest)
            else:
                corpus = await self._corpus(name, missing_ok=True)
                await self.backends.registry.AddSpecialist(
                    R.AddSpecialistRequest(
                        name=name,
                        corpus_dir=corpus.dir if corpus else "",
                        corpus_digest=digest,
                        state=R.SPECIALIST_STATE_READY,
                    ),
                    timeout=RPC_TIMEOUT,
                )
        for name in known - set(names):
            await self.records.forget_specialist(name)

    # ---- training helpers: what is on the data volume ----------------------------------------

    async def _corpus(self, name: str, missing_ok: bool = False) -> T.Corpus | None:
        """The specialist's corpus as the training service sees it; INVALID_ARGUMENT for a bad
        name or a missing corpus (None instead, with `missing_ok`)."""
        try:
            reply = await self.backends.training.DescribeCorpus(
                T.DescribeCorpusRequest(name=name), wait_for_ready=True, timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if missing_ok and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return None
            raise
        return reply.corpus

    async def _version(self, version_id: str) -> T.GetVersionResponse | None:
        """A model version on disk and its corpus digests ("" = the current one); None when
        there is none."""
        try:
            return await self.backends.training.GetVersion(
                T.GetVersionRequest(id=version_id), wait_for_ready=True, timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise


def loaded_everywhere(serving: R.ServingState, version: str) -> bool:
    """Whether every live replica serves `version`; OperationFailed naming those that cannot
    load it. Without replica reports, the last report (`loaded_version_id`) decides."""
    if not serving.replicas:
        return serving.loaded_version_id == version
    broken = [f"{r.id}: {r.load_error}" for r in serving.replicas if version in r.load_error]
    if broken:
        raise OperationFailed(f"{version} did not load on every replica: {'; '.join(broken)}")
    return all(r.version_id == version for r in serving.replicas)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return str(exc) or type(exc).__name__
