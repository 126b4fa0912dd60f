"""The specialist lifecycle, coordinated across the services.

    add / delete / first start
      -> registry: an operation (one at a time; a second request gets FAILED_PRECONDITION)
      -> training: a job, whose progress is mirrored onto the operation
      -> registry: publish the version the job wrote
      -> inference: reports it loaded (it watches the registry and swaps between decode steps)
      -> registry: specialists updated, operation SUCCEEDED

Every step's outcome is recorded in the registry before the next starts, so after a restart of
any component the operation is picked up where the record says it was: it re-attaches to its
training job, restarts a job the training service no longer knows, or publishes a version that
was trained but not yet served. What cannot go on fails with a reason.

Any number of gateways may run. Exactly one drives each operation: the one holding its lease in
the registry, renewed every few seconds. Every gateway looks for unfinished operations whose
lease has run out (their gateway died or was cut off) and takes them over. The registry refuses
an operation's writes from a gateway that no longer holds it, and the training service starts
one job per operation however often it is asked, so a takeover never runs anything twice.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from gateway.backends import RPC_TIMEOUT, Backends
from gateway.jobs import OperationCancelled, OperationFailed, TrainingRun
from gateway.records import LeaseLost, Records
from gateway.schemas import enum_name
from shiftable_lib.config import Settings
from shiftable_lib.errors import AlreadyExists, Conflict, NotFound, Unavailable
from sma.v1 import common_pb2, registry_pb2, training_pb2

log = logging.getLogger("sma.gateway.lifecycle")

R = registry_pb2
T = training_pb2
UNFINISHED = (R.OPERATION_STATE_PENDING, R.OPERATION_STATE_RUNNING)
LOAD_TIMEOUT = 600.0  # seconds for inference to load a published version
PUBLISH_ATTEMPTS = 5  # a second apart: the registry or training restarting
ROLLBACK_WAIT_S = 60.0  # a rollback answers once loaded: a version loaded before loads quickly
# a gateway drives an operation this long past its last renewal; then another may take it over
LEASE_S = 10.0
RENEW_S = LEASE_S / 4  # how often the driver renews, and the others look for orphans
MIN_LEASE_S = 0.1  # the shortest lease the registry grants: a hand-over


class Coordinator:
    """Starts and drives lifecycle operations; one asyncio task per unfinished operation."""

    def __init__(self, settings: Settings, backends: Backends) -> None:
        self.settings = settings
        self.backends = backends
        self.records = Records(backends.registry)
        self.tasks: dict[str, asyncio.Task] = {}  # the operations this gateway drives
        self.preparing: set[str] = set()  # created here, driven once their records are written
        self.boot_error: str | None = None
        # unique among live gateways (no two bind one address), and the same again after a
        # restart, which so resumes its own operations at once rather than when the lease ends
        self.owner = f"{settings.replica()}@{settings.host}:{settings.port}"
        self.jobs = TrainingRun(backends.training, self.records, self.owner, settings.profile)

    # ---- requests ----------------------------------------------------------------------------

    async def add(
        self, name: str, full_retrain: bool = False, max_drift: float | None = None
    ) -> tuple[R.Operation, T.Corpus]:
        """Validate, record the operation and the specialist, and start training it; the
        operation, and the corpus as the training service read it."""
        corpus = await self._corpus(name)  # INVALID_ARGUMENT: a bad name, or no corpus
        await self.records.require_serving()
        registry = self.backends.registry
        existing = await self.records.specialist(name)
        if existing is not None and existing.state != R.SPECIALIST_STATE_FAILED:
            raise AlreadyExists(f"specialist {name!r} already exists")
        op = await self._create(R.OPERATION_KIND_ADD_SPECIALIST, name, full_retrain, max_drift)
        try:
            if existing is not None:  # a failed earlier attempt: this one replaces it
                await registry.DeleteSpecialist(R.DeleteSpecialistRequest(name=name))
            await registry.AddSpecialist(
                R.AddSpecialistRequest(
                    name=name, corpus_dir=corpus.dir, state=R.SPECIALIST_STATE_TRAINING
                ),
                timeout=RPC_TIMEOUT,
            )
        finally:  # driven from here on, whatever happened: a failure is its to record
            self._spawn(op)
        return op, corpus

    async def delete(self, name: str, max_drift: float | None = None) -> R.Operation:
        """Validate (known, not the last one), record the operation, start the removal."""
        serving = await self.records.require_serving()
        existing = await self.records.specialist(name)  # INVALID_ARGUMENT for a bad name
        if existing is None or name not in serving.specialists:
            raise NotFound(f"no specialist named {name!r}")
        if list(serving.specialists) == [name]:
            raise Conflict(f"{name!r} is the last specialist and cannot be deleted")
        op = await self._create(R.OPERATION_KIND_DELETE_SPECIALIST, name, max_drift=max_drift)
        try:
            await self.records.set_specialist(name, R.SPECIALIST_STATE_DELETING)
        finally:
            self._spawn(op)
        return op

    async def cancel(self, op_id: str) -> R.Operation:
        """Stop an add while it trains: its job is cancelled, and the specialist is forgotten
        as if it had never been asked for. Too late once training has published a version.
        Any gateway may ask; the one driving the operation sees the request in the registry.
        """
        op = await self.records.operation(op_id)
        if op.state not in UNFINISHED:
            state = enum_name(R.OperationState, op.state)
            raise Conflict(f"operation {op_id} has already ended ({state})")
        if op.kind != R.OPERATION_KIND_ADD_SPECIALIST:
            kind = enum_name(R.OperationKind, op.kind)
            raise Conflict(f"only an add can be cancelled, not {kind}")
        if op.version_id:
            raise Conflict(f"operation {op_id} is past training; it cannot be cancelled now")
        op = await self.records.update(op_id, cancel_requested=True)
        if op.job_id:  # else the driver cancels the job as soon as it has started it
            await self.backends.training.CancelJob(
                T.CancelJobRequest(id=op.job_id), timeout=RPC_TIMEOUT
            )
        op = await self.wait(op_id)
        if op.state != R.OPERATION_STATE_CANCELLED:
            state = enum_name(R.OperationState, op.state)
            raise Conflict(f"operation {op_id} finished training first and {state}")
        return op

    async def wait(self, op_id: str) -> R.Operation:
        """Block until the operation ends, whichever gateway drives it; return its final record."""
        while True:
            try:
                stream = self.backends.registry.WatchOperation(
                    R.WatchOperationRequest(id=op_id), wait_for_ready=True
                )
                async for reply in stream:
                    if reply.operation.state not in UNFINISHED:
                        return reply.operation
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            await asyncio.sleep(0.5)  # the registry restarted: watch again

    # ---- start-up ----------------------------------------------------------------------------

    async def boot(self) -> None:
        """Serve what is on disk or train on a first start; then, for as long as the gateway
        runs, drive every unfinished operation that no live gateway drives."""
        while True:
            try:
                await self._boot_once()
                self.boot_error = None
                break
            except grpc.aio.AioRpcError as exc:  # a service not up yet: try again shortly
                self.boot_error = f"waiting for services: {exc.details()}"
                await asyncio.sleep(0.5)
        await self._adopt_orphans()

    async def _boot_once(self) -> None:
        registry = self.backends.registry
        wait = {"wait_for_ready": True, "timeout": RPC_TIMEOUT}
        unfinished = (
            await registry.ListOperations(R.ListOperationsRequest(unfinished_only=True), **wait)
        ).operations
        serving = (await registry.GetServing(R.GetServingRequest(), **wait)).serving
        if serving.version.id or unfinished:
            return
        if await self._serve_on_disk():  # trained before (by `sma train`, or a lost registry)
            return
        try:
            op = await self._create(R.OPERATION_KIND_INITIALIZE, "")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.info("another gateway has started the first training")
            return
        log.info("first start: no model yet, training one")
        self._spawn(op)

    async def _serve_on_disk(self) -> bool:
        """Publish the current version on disk and make the registry's specialists its own;
        False where there is none."""
        on_disk = await self._version("")
        if on_disk is None:
            return False
        log.info("serving the model found on disk, %s", on_disk.version.id)
        await self._publish(on_disk.version)
        await self._sync_specialists(on_disk)
        return True

    async def _adopt_orphans(self) -> None:
        """Every RENEW_S, claim each unfinished operation this gateway does not drive; the
        registry grants it only when no other gateway holds a live lease on it."""
        while True:
            try:
                listed = await self.backends.registry.ListOperations(
                    R.ListOperationsRequest(unfinished_only=True), timeout=RPC_TIMEOUT
                )
                for op in listed.operations:
                    if op.id in self.tasks or op.id in self.preparing:
                        continue
                    claimed = await self.records.claim(op.id, self.owner, LEASE_S)
                    if claimed.owner == self.owner:
                        since = f" (its lease by {op.owner} ran out)" if op.owner else ""
                        log.info("driving operation %s%s", op.id, since)
                        self._spawn(claimed)
            except grpc.aio.AioRpcError as exc:
                log.debug("looking for unfinished operations: %s", exc.details())
            await asyncio.sleep(RENEW_S)

    async def close(self) -> None:
        """Stop driving, and hand each operation on: its lease is cut to a moment, so another
        gateway takes it over at its next look rather than when the lease would have ended."""
        driven = list(self.tasks)
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for op_id in driven:
            try:
                await self.records.claim(op_id, self.owner, MIN_LEASE_S)
            except grpc.aio.AioRpcError as exc:
                log.debug("could not hand %s on: %s", op_id, exc.details())

    # ---- driving an operation ----------------------------------------------------------------

    async def _create(
        self, kind: int, target: str, full_retrain: bool = False, max_drift: float | None = None
    ) -> R.Operation:
        """Record an operation that this gateway holds the lease on from the start; the caller
        writes what else it needs, then `_spawn`s it."""
        op = await self.records.create(kind, target, full_retrain, self.owner, LEASE_S, max_drift)
        self.preparing.add(op.id)
        return op

    def _spawn(self, op: R.Operation) -> None:
        self.preparing.discard(op.id)
        if op.id in self.tasks:
            return
        task = asyncio.create_task(self._drive(op), name=f"operation {op.id}")
        self.tasks[op.id] = task
        task.add_done_callback(lambda _: self.tasks.pop(op.id, None))

    async def _drive(self, op: R.Operation) -> None:
        """Drive `op` to its end while holding its lease; stop, writing nothing, once lost."""
        holding = asyncio.create_task(self._hold(op.id, asyncio.current_task()))
        try:
            await self._steps(op)
        except asyncio.CancelledError:  # gateway shutdown, or the lease lost (see _hold)
            raise
        except LeaseLost as exc:
            log.warning("stopped driving operation %s: %s", op.id, exc)
        finally:
            holding.cancel()

    async def _hold(self, op_id: str, driver: asyncio.Task | None) -> None:
        """Renew the lease on `op_id` every RENEW_S; cancel `driver` once another gateway holds
        it, or once it may have run out unrenewed (the registry unreachable)."""
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                op = await self.records.claim(op_id, self.owner, LEASE_S)
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() - renewed < LEASE_S - RENEW_S:
                    continue
                reason = f"its lease could not be renewed ({exc.details()})"
            else:
                if op.owner in (self.owner, ""):  # "" = finished meanwhile
                    renewed = time.monotonic()
                    continue
                reason = f"{op.owner} holds its lease now"
            log.warning("stopped driving operation %s: %s", op_id, reason)
            if driver is not None:
                driver.cancel()
            return

    async def _claim(self, op_id: str) -> None:
        """Renew the lease now, before writes that are not fenced (LeaseLost if it is gone)."""
        op = await self.records.claim(op_id, self.owner, LEASE_S)
        if op.owner != self.owner:
            raise LeaseLost(f"{op.owner or 'nobody'} holds its lease now")

    async def _steps(self, op: R.Operation) -> None:
        mine = {"owner": self.owner}
        try:
            op = await self.records.update(op.id, state=R.OPERATION_STATE_RUNNING, **mine)
            version_id = op.version_id
            if not version_id:
                early: list[asyncio.Task[None]] = []
                try:
                    job = await self.jobs.run(
                        op, lambda v: early.append(asyncio.create_task(self._serve_early(op, v)))
                    )
                except asyncio.CancelledError:  # shutdown, or the lease lost: stop them too
                    for task in early:
                        task.cancel()
                    raise
                finally:  # a publish is short: let it end before the job's own
                    await asyncio.gather(*early, return_exceptions=True)
                version_id = job.version_id
                if not version_id:  # nothing needed doing: what is on disk stays current
                    current = await self._version("")
                    version_id = current.version.id if current else ""
                if not version_id:
                    raise OperationFailed("training finished but published no model")
                op = await self.records.update(
                    op.id, version_id=version_id, message=job.message, **mine
                )
            version = await self._version(version_id)
            if version is None:
                raise OperationFailed(f"training reports no model version {version_id!r}")
            await self.records.update(op.id, message=f"publishing {version_id}", **mine)
            try:
                await self._publish(version.version)
                await self._wait_loaded(version_id)
            except (OperationFailed, grpc.aio.AioRpcError):
                # what served before serves on: the version this one was trained from, which
                # the version itself records, so a gateway that takes over knows it too
                await self._restore(version.parent, version_id, op.id)
                raise
            await self._claim(op.id)
            await self._finish(op, version)
        except (asyncio.CancelledError, LeaseLost):
            raise
        except OperationCancelled:
            await self._claim(op.id)
            await self.records.forget_specialist(op.target)
            await self.records.update(
                op.id, state=R.OPERATION_STATE_CANCELLED, message="cancelled on request", **mine
            )
        except Exception as exc:
            reason = _reason(exc)
            log.warning("operation %s failed: %s", op.id, reason)
            await self._fail(op, reason)
            if op.kind == R.OPERATION_KIND_INITIALIZE:
                await self._serve_after_failed_start()

    async def _serve_after_failed_start(self) -> None:
        """A first start that failed after writing its generalist (its specialists failed)
        leaves that version current on disk. Serve it if nothing serves: the job may have
        ended before this gateway saw it named (`_serve_early`)."""
        try:
            serving = await self.backends.registry.GetServing(
                R.GetServingRequest(), timeout=RPC_TIMEOUT
            )
            if not serving.serving.version.id:
                await self._serve_on_disk()
        except grpc.aio.AioRpcError as exc:
            log.error("cannot serve what the failed first start left: %s", exc.details())

    async def _serve_early(self, op: R.Operation, version_id: str) -> None:
        """Publish a version the operation's job wrote before its end (a first start's
        generalist, while the specialists train), so that it serves meanwhile. Nothing waits
        for it to load, and a failure only costs the wait: the job's last version is published
        at its end all the same."""
        try:
            version = await self._version(version_id)
            if version is None:
                return
            await self._claim(op.id)
            await self._publish(version.version)
            log.info("operation %s: serving %s while its training goes on", op.id, version_id)
        except (LeaseLost, grpc.aio.AioRpcError) as exc:
            log.warning("could not serve %s before operation %s ends: %s", version_id, op.id, exc)

    async def _publish(self, version: common_pb2.ModelVersion) -> None:
        """Publish `version`, retrying while the registry (or the training service it asks
        whether the version exists) is briefly unavailable: a publish is idempotent."""
        published = common_pb2.ModelVersion()
        published.CopyFrom(version)
        published.ClearField("created_at")  # the registry stamps when it was published
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self.backends.registry.PublishVersion(
                    R.PublishVersionRequest(version=published), timeout=RPC_TIMEOUT
                )
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(1.0)

    async def _restore(self, previous: str, failed: str, op_id: str = "") -> None:
        """Serve `previous` again if `failed` is the serving version. A rollback that cannot
        be made is logged: the caller's own error says what went wrong first."""
        if not previous or previous == failed:
            return
        registry = self.backends.registry
        try:
            serving = await registry.GetServing(R.GetServingRequest(), timeout=RPC_TIMEOUT)
            if serving.serving.version.id == failed:
                await registry.RollbackVersion(
                    R.RollbackVersionRequest(version_id=previous, operation_id=op_id),
                    timeout=RPC_TIMEOUT,
                )
                log.info("%s did not load: serving %s again", failed, previous)
        except grpc.aio.AioRpcError as exc:
            log.error("cannot serve %s again after %s failed: %s", previous, failed, exc.details())

    async def rollback(self, version_id: str) -> R.ServingState:
        """Serve `version_id`, published before, again; returns once every live replica serves
        it. The registry refuses (FAILED_PRECONDITION) a version marked invalid, one whose
        specialists are not the registry's, and any rollback while an operation runs. Fails
        (OperationFailed) when a replica cannot load it: the replicas then mark it invalid and
        keep serving the last version they could load."""
        registry = self.backends.registry
        previous = (await registry.GetServing(R.GetServingRequest(), timeout=RPC_TIMEOUT)).serving
        reply = await registry.RollbackVersion(
            R.RollbackVersionRequest(version_id=version_id), timeout=RPC_TIMEOUT
        )
        if reply.serving.version.id == version_id:
            try:
                if not loaded_everywhere(reply.serving, version_id):
                    await asyncio.wait_for(self._wait_loaded(version_id), ROLLBACK_WAIT_S)
            except OperationFailed:
                await self._restore(previous.version.id, version_id)
                raise
            except TimeoutError:
                raise Unavailable(
                    f"{version_id} is the serving version now, but not every inference replica "
                    f"has loaded it within {ROLLBACK_WAIT_S:.0f} s"
                ) from None
        return (
            await self.backends.registry.GetServing(R.GetServingRequest(), timeout=RPC_TIMEOUT)
        ).serving

    async def _wait_loaded(self, version: str) -> None:
        """Until every live inference replica serves `version` (each follows the registry's
        serving pointer and reports to it); fails naming the replicas that cannot load it."""

        async def watch() -> None:
            stream = self.backends.registry.WatchServing(R.WatchServingRequest())
            async for reply in stream:
                serving = reply.serving
                # first: a replica that found `version` damaged serves the last good one, and
                # the registry may have made that the serving version already
                if loaded_everywhere(serving, version) and serving.version.id == version:
                    return
                if serving.version.id != version:
                    raise OperationFailed(
                        f"version {serving.version.id} was published while waiting for "
                        f"{version} to load"
                    )
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
        await self.records.update(
            op.id, state=R.OPERATION_STATE_SUCCEEDED, message=message, owner=self.owner
        )

    async def _fail(self, op: R.Operation, reason: str) -> None:
        try:
            await self._claim(op.id)
            if op.kind == R.OPERATION_KIND_ADD_SPECIALIST:
                await self.records.set_specialist(
                    op.target, R.SPECIALIST_STATE_FAILED, error=reason
                )
            elif op.kind == R.OPERATION_KIND_DELETE_SPECIALIST:
                await self.records.set_specialist(op.target, R.SPECIALIST_STATE_READY, error=reason)
            await self.records.update(
                op.id, state=R.OPERATION_STATE_FAILED, error=reason, owner=self.owner
            )
        except grpc.aio.AioRpcError as exc:  # registry down: the operation is driven again
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
                try:
                    await self.backends.registry.AddSpecialist(
                        R.AddSpecialistRequest(
                            name=name,
                            corpus_dir=corpus.dir if corpus else "",
                            corpus_digest=digest,
                            state=R.SPECIALIST_STATE_READY,
                        ),
                        timeout=RPC_TIMEOUT,
                    )
                except grpc.aio.AioRpcError as exc:  # another gateway booting at the same time
                    if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise
                    await self.records.set_specialist(name, R.SPECIALIST_STATE_READY, digest=digest)
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
            if exc.code() == grpc.StatusCode.DATA_LOSS and not version_id:
                log.warning("the current version on disk is damaged: %s", exc.details())
                return None  # as if there were none: a first start trains again
            raise


def loaded_everywhere(serving: R.ServingState, version: str) -> bool:
    """Whether every live replica serves `version`; OperationFailed naming those that cannot
    load it."""
    if broken := cannot_load(serving, version):
        raise OperationFailed(f"{version} did not load on every replica: {'; '.join(broken)}")
    return serves_everywhere(serving, version)


def serves_everywhere(serving: R.ServingState, version: str) -> bool:
    """Whether every live replica reports serving `version`. Without replica reports, the
    last report (`loaded_version_id`) decides."""
    if not serving.replicas:
        return serving.loaded_version_id == version
    return all(r.version_id == version for r in serving.replicas)


def cannot_load(serving: R.ServingState, version: str) -> list[str]:
    """The replicas that report they cannot load `version`, each with its reason."""
    return [f"{r.id}: {r.load_error}" for r in serving.replicas if version in r.load_error]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name.lower()}: {exc.details()}"
    return str(exc) or type(exc).__name__
