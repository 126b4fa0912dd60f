"""`sma.v1.Registry`: a thin gRPC layer over `RegistryStore`.

It only translates between proto messages and the store's dataclasses, validates what the
store cannot see (required fields, UNSPECIFIED enums) and wakes the watch streams after every
change. Store calls run in a worker thread, so an fsync never stalls the event loop that
carries the watch streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, fields
from datetime import UTC
from pathlib import Path
from typing import ParamSpec, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client.core import GaugeMetricFamily, Metric

from services.common import (
    EnumMap,
    Server,
    Service,
    dial,
    key_metadata,
    rpc,
    run,
    serve,
    timestamp,
)
from services.metrics import ServerMetrics, expose
from services.registry.schema import (
    REPLICA_LEASE_S,
    ModelVersion,
    Operation,
    OperationBusy,
    OperationKind,
    OperationState,
    Progress,
    ServingState,
    Specialist,
    SpecialistState,
)
from services.registry.store import RegistryStore
from services.registry.versions import TrainingVersions
from shiftable_lib.config import Settings
from shiftable_lib.errors import Unavailable
from sma.v1 import common_pb2, registry_pb2, registry_pb2_grpc

SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name
OPERATION_ID_KEY = "sma-operation-id"  # trailing metadata of a FAILED_PRECONDITION on create
DEFAULT_LIST_LIMIT = 100
# what changes the registry: an admin key's only (the gateway's and inference's own calls)
ADMIN_METHODS = frozenset(
    {
        "AddSpecialist",
        "UpdateSpecialist",
        "DeleteSpecialist",
        "CreateOperation",
        "UpdateOperation",
        "ClaimOperation",
        "PublishVersion",
        "RollbackVersion",
        "ReportLoaded",
    }
)

Context = grpc.aio.ServicerContext
M = TypeVar("M", bound=Message)
P = ParamSpec("P")
T = TypeVar("T")


SPECIALIST_STATES = EnumMap(SpecialistState, registry_pb2.SpecialistState)
OPERATION_KINDS = EnumMap(OperationKind, registry_pb2.OperationKind)
OPERATION_STATES = EnumMap(OperationState, registry_pb2.OperationState)


class _Changes:
    """A change counter that every write bumps and watch streams wait past. Watchers read the
    count before the state, so a change between the two still wakes them."""

    def __init__(self) -> None:
        self.count = 0
        self.closed = False
        self._changed = asyncio.Event()  # a fresh one per change: set means "count moved"

    def bump(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def write(self, method: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store write in a thread and bump once it is done, even if the caller has left
        by then: the thread finishes the write regardless, and a watcher must not miss it."""
        task = asyncio.ensure_future(asyncio.to_thread(method, *args, **kwargs))
        task.add_done_callback(self._written)
        return await asyncio.shield(task)

    def _written(self, task: asyncio.Future) -> None:
        self.bump()
        if not task.cancelled():
            task.exception()  # retrieved here too, for when nobody awaits it any more

    async def wait_past(self, seen: int) -> None:
        """Return once `count` exceeds `seen`; Unavailable once the server shuts down."""
        while self.count <= seen and not self.closed:
            await self._changed.wait()
        if self.closed:
            raise Unavailable("the registry is shutting down; watch again")


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Serves the store at `path`, which `start` opens and `stop` closes. A version it has not
    recorded is published only once `versions` (the training service) holds it, complete."""

    def __init__(self, path: Path, versions: TrainingVersions) -> None:
        self.path = path
        self.versions = versions
        self._store: RegistryStore | None = None
        self._operations = _Changes()
        self._serving = _Changes()

    def service(self) -> Service:
        return Service(
            SERVICE_NAME, registry_pb2_grpc.add_RegistryServicer_to_server, self, ADMIN_METHODS
        )

    async def start(self, server: Server) -> None:
        """Open the store and report SERVING. On shutdown, end the watch streams (UNAVAILABLE,
        so that clients watch again) rather than hold the server for its whole grace period."""
        self._store = await asyncio.to_thread(RegistryStore, self.path)
        await server.ready()
        leases = asyncio.create_task(self._expire_replicas())
        try:
            await server.stopping.wait()
        finally:
            leases.cancel()
            self._operations.close()
            self._serving.close()

    async def _expire_replicas(self) -> None:
        """Wake the serving watchers now and then: a replica whose lease ran out has left the
        serving state without any write (a watch skips a state that did not change)."""
        while True:
            await asyncio.sleep(REPLICA_LEASE_S / 3)
            self._serving.bump()

    async def stop(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            await asyncio.to_thread(store.close)

    @property
    def store(self) -> RegistryStore:
        if self._store is None:
            raise Unavailable("the registry store is not open")
        return self._store

    # specialists

    @rpc
    async def ListSpecialists(
        self, request: registry_pb2.ListSpecialistsRequest, context: Context
    ) -> registry_pb2.ListSpecialistsResponse:
        specialists = await asyncio.to_thread(self.store.list_specialists)
        return registry_pb2.ListSpecialistsResponse(specialists=map(_specialist_pb, specialists))

    @rpc
    async def GetSpecialist(
        self, request: registry_pb2.GetSpecialistRequest, context: Context
    ) -> registry_pb2.GetSpecialistResponse:
        specialist = await asyncio.to_thread(
            self.store.get_specialist, _required(request.name, "name")
        )
        return registry_pb2.GetSpecialistResponse(specialist=_specialist_pb(specialist))

    @rpc
    async def AddSpecialist(
        self, request: registry_pb2.AddSpecialistRequest, context: Context
    ) -> registry_pb2.AddSpecialistResponse:
        specialist = await asyncio.to_thread(
            self.store.add_specialist,
            _required(request.name, "name"),
            request.corpus_dir,
            request.corpus_digest,
            SPECIALIST_STATES.from_proto(request.state) or SpecialistState.TRAINING,
        )
        return registry_pb2.AddSpecialistResponse(specialist=_specialist_pb(specialist))

    @rpc
    async def UpdateSpecialist(
        self, request: registry_pb2.UpdateSpecialistRequest, context: Context
    ) -> registry_pb2.UpdateSpecialistResponse:
        """An UNSPECIFIED state and empty strings leave fields as they are, except that a new
        state always replaces the error, so that READY clears an earlier failure."""
        state = SPECIALIST_STATES.from_proto(request.state)
        specialist = await asyncio.to_thread(
            self.store.update_specialist,
            _required(request.name, "name"),
            state=state,
            error=request.error if request.error or state is not None else None,
            corpus_digest=request.corpus_digest or None,
            corpus_dir=request.corpus_dir or None,
        )
        return registry_pb2.UpdateSpecialistResponse(specialist=_specialist_pb(specialist))

    @rpc
    async def DeleteSpecialist(
        self, request: registry_pb2.DeleteSpecialistRequest, context: Context
    ) -> registry_pb2.DeleteSpecialistResponse:
        await asyncio.to_thread(self.store.delete_specialist, _required(request.name, "name"))
        return registry_pb2.DeleteSpecialistResponse()

    # operations

    @rpc
    async def CreateOperation(
        self, request: registry_pb2.CreateOperationRequest, context: Context
    ) -> registry_pb2.CreateOperationResponse:
        kind = OPERATION_KINDS.required(request.kind, "kind")
        try:
            operation = await self._operations.write(
                self.store.create_operation,
                kind,
                request.target,
                request.full_retrain,
                owner=request.owner,
                lease_s=request.lease_seconds,
                max_drift=request.max_drift if request.HasField("max_drift") else None,
            )
        except OperationBusy as busy:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                str(busy),
                trailing_metadata=((OPERATION_ID_KEY, busy.operation_id),),
            )
        return registry_pb2.CreateOperationResponse(operation=_operation_pb(operation))

    @rpc
    async def GetOperation(
        self, request: registry_pb2.GetOperationRequest, context: Context
    ) -> registry_pb2.GetOperationResponse:
        operation = await asyncio.to_thread(self.store.get_operation, _required(request.id, "id"))
        return registry_pb2.GetOperationResponse(operation=_operation_pb(operation))

    @rpc
    async def ListOperations(
        self, request: registry_pb2.ListOperationsRequest, context: Context
    ) -> registry_pb2.ListOperationsResponse:
        operations = await asyncio.to_thread(
            self.store.list_operations, request.unfinished_only, request.limit or DEFAULT_LIST_LIMIT
        )
        return registry_pb2.ListOperationsResponse(operations=map(_operation_pb, operations))

    @rpc
    async def UpdateOperation(
        self, request: registry_pb2.UpdateOperationRequest, context: Context
    ) -> registry_pb2.UpdateOperationResponse:
        given = ("error", "job_id", "version_id", "message", "cancel_requested")
        operation = await self._operations.write(
            self.store.update_operation,
            _required(request.id, "id"),
            state=OPERATION_STATES.from_proto(request.state),
            progress=_progress(request.progress) if request.HasField("progress") else None,
            owner=request.owner,
            **{name: getattr(request, name) for name in given if request.HasField(name)},
        )
        return registry_pb2.UpdateOperationResponse(operation=_operation_pb(operation))

    @rpc
    async def ClaimOperation(
        self, request: registry_pb2.ClaimOperationRequest, context: Context
    ) -> registry_pb2.ClaimOperationResponse:
        op_id = _required(request.id, "id")
        claim = (op_id, request.owner, request.lease_seconds)
        before = await asyncio.to_thread(self.store.get_operation, op_id)
        operation = await asyncio.to_thread(self.store.claim_operation, *claim)
        if operation.owner != before.owner:  # a takeover, which watchers see; renewals are not
            self._operations.bump()
        return registry_pb2.ClaimOperationResponse(operation=_operation_pb(operation))

    @rpc
    async def WatchOperation(
        self, request: registry_pb2.WatchOperationRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchOperationResponse]:
        op_id = _required(request.id, "id")

        async def read() -> registry_pb2.WatchOperationResponse:
            operation = await asyncio.to_thread(self.store.get_operation, op_id)
            return registry_pb2.WatchOperationResponse(operation=_operation_pb(operation))

        async for response in _watch(self._operations, read):
            yield response
            if OPERATION_STATES.from_proto(response.operation.state).finished:
                return

    # model versions

    @rpc
    async def PublishVersion(
        self, request: registry_pb2.PublishVersionRequest, context: Context
    ) -> registry_pb2.PublishVersionResponse:
        if not request.HasField("version"):
            raise ValueError("version is required")
        version = _version(request.version)
        if not version.id:
            raise ValueError("a model version needs an id")
        if not await asyncio.to_thread(self.store.is_recorded, version.id):
            await self.versions.check(version)
        serving = await self._serving.write(self.store.publish_version, version)
        return registry_pb2.PublishVersionResponse(serving=_serving_pb(serving))

    @rpc
    async def RollbackVersion(
        self, request: registry_pb2.RollbackVersionRequest, context: Context
    ) -> registry_pb2.RollbackVersionResponse:
        if not request.version_id:
            raise ValueError("version_id is required")
        # its files may have gone since it served (a volume lost or pruned): ask, as for a new one
        recorded = await asyncio.to_thread(self.store.get_version, request.version_id)
        await self.versions.check(recorded)
        serving = await self._serving.write(
            self.store.rollback_version, request.version_id, request.operation_id
        )
        return registry_pb2.RollbackVersionResponse(serving=_serving_pb(serving))

    @rpc
    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: Context
    ) -> registry_pb2.ListVersionsResponse:
        versions = await asyncio.to_thread(self.store.list_versions)
        return registry_pb2.ListVersionsResponse(versions=map(_version_pb, versions))

    @rpc
    async def GetServing(
        self, request: registry_pb2.GetServingRequest, context: Context
    ) -> registry_pb2.GetServingResponse:
        serving = await asyncio.to_thread(self.store.get_serving)
        return registry_pb2.GetServingResponse(serving=_serving_pb(serving))

    @rpc
    async def WatchServing(
        self, request: registry_pb2.WatchServingRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchServingResponse]:

        async def read() -> registry_pb2.WatchServingResponse:
            serving = await asyncio.to_thread(self.store.get_serving)
            return registry_pb2.WatchServingResponse(serving=_serving_pb(serving))

        async for response in _watch(self._serving, read):
            yield response

    @rpc
    async def ReportLoaded(
        self, request: registry_pb2.ReportLoadedRequest, context: Context
    ) -> registry_pb2.ReportLoadedResponse:
        serving = await self._serving.write(
            self.store.report_loaded,
            request.version_id,
            request.replica_id,
            request.load_error,
            request.invalid_version_id,
        )
        return registry_pb2.ReportLoadedResponse(serving=_serving_pb(serving))


async def _watch(changes: _Changes, read: Callable[[], Awaitable[M]]) -> AsyncIterator[M]:
    """`read()` now and again after every change, skipping repeats, until the client leaves."""
    last = b""
    while True:
        seen = changes.count
        message = await read()
        if (current := message.SerializeToString(deterministic=True)) != last:
            yield message
            last = current
        await changes.wait_past(seen)


def _required(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} is required")
    return value


def _specialist_pb(specialist: Specialist) -> registry_pb2.Specialist:
    return registry_pb2.Specialist(
        name=specialist.name,
        corpus_dir=specialist.corpus_dir,
        corpus_digest=specialist.corpus_digest,
        state=SPECIALIST_STATES.to_proto(specialist.state),
        error=specialist.error,
        created_at=timestamp(specialist.created_at),
        updated_at=timestamp(specialist.updated_at),
    )


def _progress(message: common_pb2.TrainingProgress) -> Progress:
    return Progress(**{f.name: getattr(message, f.name) for f in fields(Progress)})


def _operation_pb(operation: Operation) -> registry_pb2.Operation:
    return registry_pb2.Operation(
        id=operation.id,
        kind=OPERATION_KINDS.to_proto(operation.kind),
        target=operation.target,
        state=OPERATION_STATES.to_proto(operation.state),
        progress=common_pb2.TrainingProgress(**asdict(operation.progress)),
        error=operation.error,
        job_id=operation.job_id,
        version_id=operation.version_id,
        message=operation.message,
        created_at=timestamp(operation.created_at),
        updated_at=timestamp(operation.updated_at),
        full_retrain=operation.full_retrain,
        owner=operation.owner,
        lease_expires_at=_unix_timestamp(operation.lease_expires) if operation.owner else None,
        cancel_requested=operation.cancel_requested,
        max_drift=operation.max_drift,
    )


def _unix_timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _version(message: common_pb2.ModelVersion) -> ModelVersion:
    """The store's record of a published version; stamped now unless the publisher did."""
    version = ModelVersion(
        id=message.id,
        specialists=list(message.specialists),
        artifact_dir=message.artifact_dir,
        metrics_json=message.metrics_json,
        profile=message.profile,
    )
    if message.HasField("created_at"):
        version.created_at = message.created_at.ToDatetime(tzinfo=UTC)
    return version


def _version_pb(version: ModelVersion) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(
        id=version.id,
        specialists=version.specialists,
        artifact_dir=version.artifact_dir,
        metrics_json=version.metrics_json,
        profile=version.profile,
        created_at=timestamp(version.created_at),
        invalid_reason=version.invalid_reason,
    )


def _serving_pb(serving: ServingState) -> registry_pb2.ServingState:
    return registry_pb2.ServingState(
        version=_version_pb(serving.version) if serving.version else None,
        loaded_version_id=serving.loaded_version_id,
        replicas=[registry_pb2.InferenceReplica(**asdict(r)) for r in serving.replicas],
    )


class RegistryCollector:
    """The registry's records by state and what serves, read from the store at scrape time
    (the store takes calls from any thread, one at a time)."""

    def __init__(self, servicer: RegistryServicer) -> None:
        self.servicer = servicer

    def collect(self) -> list[Metric]:
        try:
            census = self.servicer.store.census()
        except Unavailable:  # not open yet, or closed
            return []
        specialists = GaugeMetricFamily(
            "sma_registry_specialists", "specialists by state", labels=["state"]
        )
        for labels, n in census.specialists.items():
            specialists.add_metric(list(labels), n)
        operations = GaugeMetricFamily(
            "sma_registry_operations",
            "operations recorded, by kind and state",
            labels=["kind", "state"],
        )
        for labels, n in census.operations.items():
            operations.add_metric(list(labels), n)
        versions = GaugeMetricFamily(
            "sma_registry_versions", "model versions recorded", census.versions
        )
        serving = GaugeMetricFamily(
            "sma_registry_serving_version",
            "1 for the version the registry serves",
            labels=["version"],
        )
        if census.serving.version is not None:
            serving.add_metric([census.serving.version.id], 1)
        replicas = GaugeMetricFamily(
            "sma_registry_replicas",
            "live inference replicas, by the version each serves",
            labels=["version"],
        )
        by_version: dict[str, int] = {}
        for replica in census.serving.replicas:
            by_version[replica.version_id] = by_version.get(replica.version_id, 0) + 1
        for version, n in by_version.items():
            replicas.add_metric([version], n)
        return [specialists, operations, versions, serving, replicas]


def main(settings: Settings) -> None:
    """`sma serve registry`: serve `<home>/state/registry.db` until SIGTERM."""
    tls, keys = settings.tls(), settings.keys()

    async def main() -> None:
        async with dial(settings.grpc_target("training"), tls) as training:
            servicer = RegistryServicer(
                settings.state_dir / "registry.db",
                TrainingVersions(training, key_metadata(keys)),
            )
            metrics = ServerMetrics()
            metrics.add(RegistryCollector(servicer))
            expose(metrics, settings, "registry")
            await serve(
                settings.grpc_bind("registry"),
                [servicer.service()],
                start=servicer.start,
                stop=servicer.stop,
                keys=keys,
                tls=tls,
                metrics=metrics,
            )

    run(main())
