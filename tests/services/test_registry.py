"""The registry service: the real servicer on a loopback port over a real SQLite file.

The server runs on its own event loop in a background thread, so the tests drive it with the
ordinary blocking stubs, as any client of the stack would. The same server hosts a real
training service over the home the registry's file lives in, which is what the registry asks
whether a version exists before it publishes it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.stack import free_port_block
from services.common import dial, start_server
from services.metrics import ServerMetrics
from services.registry.server import OPERATION_ID_KEY, RegistryCollector, RegistryServicer
from services.registry.versions import TrainingVersions
from services.training.core import JobManager
from services.training.server import training_service
from shiftable_lib.auth import NO_KEYS, Keys
from shiftable_lib.config import Settings
from sma.v1 import common_pb2, registry_pb2, registry_pb2_grpc

T = TypeVar("T")
pb = registry_pb2
TIMEOUT = 5.0


class Registry:
    """A `RegistryServicer` served on a free loopback port from an event loop of its own,
    started and stopped in the order `services.common.serve` uses (which cannot run here: it
    installs signal handlers, and only the main thread may)."""

    def __init__(
        self, db: Path, metrics: ServerMetrics | None = None, keys: Keys = NO_KEYS
    ) -> None:
        self.home = db.parent.parent
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        training = training_service(JobManager(Settings(home=self.home)))

        address = f"127.0.0.1:{free_port_block(1)}"

        async def start() -> tuple[RegistryServicer, Any]:
            self.training_channel = dial(address)  # channels connect on their first call
            servicer = RegistryServicer(db, TrainingVersions(self.training_channel))
            services = [servicer.service(), training]
            return servicer, await start_server(address, services, keys=keys, metrics=metrics)

        self.servicer, self.server = self.run(start())
        self.starter = asyncio.run_coroutine_threadsafe(self.servicer.start(self.server), self.loop)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        assert until(lambda: self.health() == health_pb2.HealthCheckResponse.SERVING)

    def health(self, service: str = "sma.v1.Registry") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(self.channel).Check(request, timeout=TIMEOUT).status

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT)

    def tasks(self, method: str) -> list[asyncio.Task]:
        """The server's tasks for calls of `method` (grpc.aio names them after it)."""

        async def find() -> list[asyncio.Task]:
            return [task for task in asyncio.all_tasks() if method in task.get_name()]

        return self.run(find())

    def shutdown(self) -> None:
        """As on SIGTERM: stop taking RPCs, give those in flight a grace period, close."""
        self.loop.call_soon_threadsafe(self.server.stopping.set)
        self.run(self.server.grpc_server.stop(grace=TIMEOUT))
        self.starter.result(TIMEOUT)
        self.run(self.servicer.stop())
        self.run(self.training_channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)
        self.loop.close()

    def close(self) -> None:
        self.shutdown()
        self.channel.close()


@pytest.fixture
def registry(db: Path) -> Iterator[Registry]:
    running = Registry(db)
    yield running
    running.close()


def failure(method: Callable[..., Any], request: object) -> grpc.RpcError:
    """The error `method(request)` fails with."""
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=TIMEOUT)
    return info.value


def until(check: Callable[[], bool]) -> bool:
    """Whether `check()` turns true within a few seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def add_ds(stub: registry_pb2_grpc.RegistryStub) -> registry_pb2.Operation:
    request = pb.CreateOperationRequest(kind=pb.OPERATION_KIND_ADD_SPECIALIST, target="ds")
    return stub.CreateOperation(request, timeout=TIMEOUT).operation


def update(stub: registry_pb2_grpc.RegistryStub, **fields: Any) -> registry_pb2.Operation:
    return stub.UpdateOperation(pb.UpdateOperationRequest(**fields), timeout=TIMEOUT).operation


def write_version(home: Path, version_id: str, specialists: tuple[str, ...] = ("ds",)) -> Path:
    """A version as the training service finds it on disk: its config and metrics (the
    registry never reads the weights, and these record none)."""
    folder = home / "artifacts" / "models" / version_id
    folder.mkdir(parents=True)
    config = {"model": {"specialists": list(specialists)}, "profile": {"name": "tiny"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.json").write_text('{"ppl": 12.5}')
    return folder


def version_pb(home: Path, version_id: str, specialists: tuple[str, ...] = ("ds",)):
    return common_pb2.ModelVersion(
        id=version_id,
        specialists=specialists,
        artifact_dir=str(home / "artifacts" / "models" / version_id),
        metrics_json='{"ppl": 12.5}',
        profile="tiny",
    )


def publish(
    registry: Registry, version_id: str, specialists: tuple[str, ...] = ("ds",)
) -> registry_pb2.ServingState:
    """Write `version_id` where training finds it, and publish it."""
    write_version(registry.home, version_id, specialists)
    request = pb.PublishVersionRequest(version=version_pb(registry.home, version_id, specialists))
    return registry.stub.PublishVersion(request, timeout=TIMEOUT).serving


# specialists


def test_specialist_lifecycle(registry: Registry) -> None:
    stub = registry.stub
    added = stub.AddSpecialist(
        pb.AddSpecialistRequest(name="ds", corpus_dir="data/ds", corpus_digest="d1")
    ).specialist
    assert (added.name, added.state, added.corpus_digest) == (
        "ds",
        pb.SPECIALIST_STATE_TRAINING,
        "d1",
    )
    assert added.created_at.seconds > 0
    stub.AddSpecialist(pb.AddSpecialistRequest(name="dl", state=pb.SPECIALIST_STATE_READY))
    listed = stub.ListSpecialists(pb.ListSpecialistsRequest()).specialists
    assert [(s.name, s.state) for s in listed] == [
        ("dl", pb.SPECIALIST_STATE_READY),
        ("ds", pb.SPECIALIST_STATE_TRAINING),
    ]

    failed = stub.UpdateSpecialist(
        pb.UpdateSpecialistRequest(name="ds", state=pb.SPECIALIST_STATE_FAILED, error="boom")
    ).specialist
    assert (failed.state, failed.error, failed.corpus_digest) == (
        pb.SPECIALIST_STATE_FAILED,
        "boom",
        "d1",
    )
    assert failed.updated_at.ToDatetime() >= failed.created_at.ToDatetime()
    # a digest alone leaves the state and the error alone; a new state clears the error
    stub.UpdateSpecialist(pb.UpdateSpecialistRequest(name="ds", corpus_digest="d2"))
    got = stub.GetSpecialist(pb.GetSpecialistRequest(name="ds")).specialist
    assert (got.state, got.error, got.corpus_digest) == (pb.SPECIALIST_STATE_FAILED, "boom", "d2")
    stub.UpdateSpecialist(pb.UpdateSpecialistRequest(name="ds", state=pb.SPECIALIST_STATE_READY))
    got = stub.GetSpecialist(pb.GetSpecialistRequest(name="ds")).specialist
    assert (got.state, got.error, got.corpus_dir) == (pb.SPECIALIST_STATE_READY, "", "data/ds")

    stub.DeleteSpecialist(pb.DeleteSpecialistRequest(name="ds"))
    for method, request in [
        (stub.GetSpecialist, pb.GetSpecialistRequest(name="ds")),
        (stub.DeleteSpecialist, pb.DeleteSpecialistRequest(name="ds")),
        (stub.UpdateSpecialist, pb.UpdateSpecialistRequest(name="ds", error="x")),
    ]:
        error = failure(method, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'ds'" in error.details()
    assert [s.name for s in stub.ListSpecialists(pb.ListSpecialistsRequest()).specialists] == ["dl"]


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../etc", "invalid specialist name"),
        ("General", "invalid"),
        ("general", "generalist"),
        ("", "name is required"),
    ],
)
def test_bad_specialist_names_change_nothing(registry: Registry, name: str, says: str) -> None:
    error = failure(registry.stub.AddSpecialist, pb.AddSpecialistRequest(name=name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()
    assert not registry.stub.ListSpecialists(pb.ListSpecialistsRequest()).specialists
    error = failure(registry.stub.GetSpecialist, pb.GetSpecialistRequest(name=name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_duplicate_specialist_is_already_exists(registry: Registry) -> None:
    registry.stub.AddSpecialist(pb.AddSpecialistRequest(name="ds", corpus_digest="first"))
    request = pb.AddSpecialistRequest(name="ds", corpus_digest="second")
    error = failure(registry.stub.AddSpecialist, request)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'ds' already exists" in error.details()
    kept = registry.stub.GetSpecialist(pb.GetSpecialistRequest(name="ds")).specialist
    assert kept.corpus_digest == "first"


# operations


def test_one_unfinished_operation_at_a_time(registry: Registry) -> None:
    stub = registry.stub
    first = add_ds(stub)
    assert first.id.startswith("op-") and len(first.id) == 15
    assert (first.state, first.target) == (pb.OPERATION_STATE_PENDING, "ds")
    update(stub, id=first.id, state=pb.OPERATION_STATE_RUNNING)

    request = pb.CreateOperationRequest(kind=pb.OPERATION_KIND_DELETE_SPECIALIST, target="dl")
    error = failure(stub.CreateOperation, request)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"operation {first.id} is running (add_specialist ds)" in error.details()
    assert (OPERATION_ID_KEY, first.id) in error.trailing_metadata()
    unfinished = stub.ListOperations(pb.ListOperationsRequest(unfinished_only=True)).operations
    assert [op.id for op in unfinished] == [first.id]

    update(stub, id=first.id, state=pb.OPERATION_STATE_SUCCEEDED)
    second = stub.CreateOperation(request).operation
    assert second.kind == pb.OPERATION_KIND_DELETE_SPECIALIST
    listed = stub.ListOperations(pb.ListOperationsRequest()).operations
    assert [op.id for op in listed] == [second.id, first.id]  # newest first


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.CreateOperationRequest(target="ds"), "kind is required"),
        (pb.CreateOperationRequest(kind=pb.OPERATION_KIND_ADD_SPECIALIST), "needs a target"),
        (
            pb.CreateOperationRequest(kind=pb.OPERATION_KIND_ADD_SPECIALIST, target="../x"),
            "invalid",
        ),
        (pb.CreateOperationRequest(kind=pb.OPERATION_KIND_INITIALIZE, target="ds"), "no target"),
    ],
)
def test_bad_operation_requests(
    registry: Registry, request_: registry_pb2.CreateOperationRequest, says: str
) -> None:
    error = failure(registry.stub.CreateOperation, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.details()
    assert not registry.stub.ListOperations(pb.ListOperationsRequest()).operations


def test_operation_updates_and_finished_operations_are_immutable(registry: Registry) -> None:
    stub = registry.stub
    op = add_ds(stub)
    progress = common_pb2.TrainingProgress(phase="gate", step=3, total=10, fraction=0.3, loss=2.5)
    running = update(
        stub, id=op.id, state=pb.OPERATION_STATE_RUNNING, progress=progress, job_id="j1"
    )
    assert (running.state, running.progress, running.job_id) == (
        pb.OPERATION_STATE_RUNNING,
        progress,
        "j1",
    )
    # unset fields stay: no progress, no state, no job id
    noted = update(stub, id=op.id, message="training the gate")
    assert (noted.state, noted.progress, noted.job_id, noted.message) == (
        pb.OPERATION_STATE_RUNNING,
        progress,
        "j1",
        "training the gate",
    )
    error = failure(
        stub.UpdateOperation, pb.UpdateOperationRequest(id=op.id, state=pb.OPERATION_STATE_PENDING)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION

    done = update(stub, id=op.id, state=pb.OPERATION_STATE_SUCCEEDED, version_id="v1")
    assert (done.state, done.version_id) == (pb.OPERATION_STATE_SUCCEEDED, "v1")
    for change in [
        {"message": "again"},
        {"state": pb.OPERATION_STATE_FAILED},
        {"progress": progress},
    ]:
        error = failure(stub.UpdateOperation, pb.UpdateOperationRequest(id=op.id, **change))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "succeeded" in error.details()
    assert stub.GetOperation(pb.GetOperationRequest(id=op.id)).operation == done
    error = failure(stub.GetOperation, pb.GetOperationRequest(id="op-000000000000"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_claim_operation_leases_and_fences_over_grpc(registry: Registry) -> None:
    stub = registry.stub
    request = pb.CreateOperationRequest(
        kind=pb.OPERATION_KIND_ADD_SPECIALIST, target="ds", owner="gw-a", lease_seconds=30
    )
    op = stub.CreateOperation(request, timeout=TIMEOUT).operation
    assert op.owner == "gw-a" and op.lease_expires_at.seconds > time.time() + 25
    watch = stub.WatchOperation(pb.WatchOperationRequest(id=op.id), timeout=TIMEOUT)
    assert next(watch).operation.owner == "gw-a"

    claim = pb.ClaimOperationRequest(id=op.id, owner="gw-b", lease_seconds=30)
    assert stub.ClaimOperation(claim, timeout=TIMEOUT).operation.owner == "gw-a"
    error = failure(stub.UpdateOperation, pb.UpdateOperationRequest(id=op.id, owner="gw-b"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "driven by gw-a" in error.details()
    assert update(stub, id=op.id, cancel_requested=True).cancel_requested
    assert next(watch).operation.cancel_requested

    # gw-a lets its lease lapse by renewing it for the shortest time there is
    short = pb.ClaimOperationRequest(id=op.id, owner="gw-a", lease_seconds=0.1)
    assert stub.ClaimOperation(short, timeout=TIMEOUT).operation.owner == "gw-a"
    time.sleep(0.2)
    assert stub.ClaimOperation(claim, timeout=TIMEOUT).operation.owner == "gw-b"
    assert next(watch).operation.owner == "gw-b"  # a takeover wakes the watchers
    done = update(stub, id=op.id, state=pb.OPERATION_STATE_FAILED, error="x", owner="gw-b")
    assert not done.owner and not done.HasField("lease_expires_at")

    for bad in [
        pb.ClaimOperationRequest(id=op.id, owner="", lease_seconds=30),
        pb.ClaimOperationRequest(id=op.id, owner="gw-a", lease_seconds=0),
        pb.ClaimOperationRequest(id="", owner="gw-a", lease_seconds=30),
        pb.CreateOperationRequest(kind=pb.OPERATION_KIND_INITIALIZE, owner="gw-a"),
    ]:
        method = stub.ClaimOperation if isinstance(bad, pb.ClaimOperationRequest) else None
        error = failure(method or stub.CreateOperation, bad)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    error = failure(
        stub.ClaimOperation, pb.ClaimOperationRequest(id="op-x", owner="a", lease_seconds=1)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ListOperations(pb.ListOperationsRequest(unfinished_only=True)).operations == []


def test_watch_operation_streams_progress_then_ends(registry: Registry) -> None:
    stub = registry.stub
    op = add_ds(stub)
    stream = stub.WatchOperation(pb.WatchOperationRequest(id=op.id), timeout=TIMEOUT)
    assert next(stream).operation.state == pb.OPERATION_STATE_PENDING
    update(stub, id=op.id, state=pb.OPERATION_STATE_RUNNING)
    assert next(stream).operation.state == pb.OPERATION_STATE_RUNNING
    for step in (1, 2):
        update(
            stub,
            id=op.id,
            progress=common_pb2.TrainingProgress(phase="branch:ds", step=step, total=2),
        )
        assert next(stream).operation.progress.step == step
    update(stub, id=op.id, state=pb.OPERATION_STATE_SUCCEEDED, version_id="v1")
    last = next(stream).operation
    assert (last.state, last.version_id) == (pb.OPERATION_STATE_SUCCEEDED, "v1")
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.code() == grpc.StatusCode.OK

    unknown = stub.WatchOperation(pb.WatchOperationRequest(id="op-nope"), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        next(unknown)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancelled_watch_stops_on_the_server(registry: Registry) -> None:
    op = add_ds(registry.stub)
    stream = registry.stub.WatchOperation(pb.WatchOperationRequest(id=op.id), timeout=60)
    next(stream)
    watching = registry.tasks("/sma.v1.Registry/WatchOperation")
    assert watching and not any(task.done() for task in watching)  # waiting for a change
    stream.cancel()
    assert until(lambda: all(task.done() for task in watching))


# versions and serving


def test_publish_watch_serving_and_report_loaded(registry: Registry) -> None:
    stub = registry.stub
    assert not stub.GetServing(pb.GetServingRequest()).serving.HasField("version")
    stream = stub.WatchServing(pb.WatchServingRequest(), timeout=TIMEOUT)
    assert next(stream).serving == pb.ServingState()

    serving = publish(registry, "v0001")
    assert (serving.version.id, serving.loaded_version_id) == ("v0001", "")
    assert next(stream).serving == serving
    assert (
        serving.version.metrics_json == '{"ppl": 12.5}' and serving.version.created_at.seconds > 0
    )

    loaded = stub.ReportLoaded(pb.ReportLoadedRequest(version_id="v0001")).serving
    assert loaded.loaded_version_id == "v0001"
    assert next(stream).serving == loaded
    publish(registry, "v0002")
    watched = next(stream).serving
    assert (watched.version.id, watched.loaded_version_id) == ("v0002", "v0001")  # not loaded yet
    stream.cancel()

    listed = stub.ListVersions(pb.ListVersionsRequest()).versions
    assert [v.id for v in listed] == ["v0002", "v0001"]
    error = failure(stub.ReportLoaded, pb.ReportLoadedRequest(version_id="v0009"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = failure(stub.PublishVersion, pb.PublishVersionRequest())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    changed = common_pb2.ModelVersion(id="v0001", specialists=["ds", "dl"])
    error = failure(stub.PublishVersion, pb.PublishVersionRequest(version=changed))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    again = pb.PublishVersionRequest(version=version_pb(registry.home, "v0002"))
    assert stub.PublishVersion(again, timeout=TIMEOUT).serving.version.id == "v0002"  # a retry
    assert stub.GetServing(pb.GetServingRequest()).serving.version.id == "v0002"


def test_state_survives_a_restart(db: Path) -> None:
    first = Registry(db)
    try:
        first.stub.AddSpecialist(pb.AddSpecialistRequest(name="ds", corpus_digest="d1"))
        op = add_ds(first.stub)
        update(first.stub, id=op.id, state=pb.OPERATION_STATE_RUNNING, message="half way")
        publish(first, "v0001")
        first.stub.ReportLoaded(pb.ReportLoadedRequest(version_id="v0001"))
    finally:
        first.close()

    second = Registry(db)
    try:
        stub = second.stub
        assert (
            stub.GetSpecialist(pb.GetSpecialistRequest(name="ds")).specialist.corpus_digest == "d1"
        )
        unfinished = stub.ListOperations(pb.ListOperationsRequest(unfinished_only=True)).operations
        assert [(o.id, o.state, o.message) for o in unfinished] == [
            (op.id, pb.OPERATION_STATE_RUNNING, "half way")
        ]
        serving = stub.GetServing(pb.GetServingRequest()).serving
        assert (serving.version.id, serving.loaded_version_id) == ("v0001", "v0001")
        request = pb.CreateOperationRequest(kind=pb.OPERATION_KIND_INITIALIZE)
        assert failure(stub.CreateOperation, request).code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        second.close()


def test_shutdown_ends_watch_streams_at_once(db: Path) -> None:
    registry = Registry(db)
    stream = registry.stub.WatchServing(pb.WatchServingRequest(), timeout=60)
    next(stream)
    started = time.monotonic()
    registry.shutdown()  # with a grace period of TIMEOUT seconds
    assert time.monotonic() - started < TIMEOUT / 2
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # so the client watches again
    assert "shutting down" in info.value.details()
    registry.channel.close()


def test_health_and_reflection(registry: Registry) -> None:
    for service in ("", "sma.v1.Registry"):
        assert registry.health(service) == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(registry.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = reflection.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)
    names = {s.name for s in response.list_services_response.service}
    assert {"sma.v1.Registry", "grpc.health.v1.Health"} <= names


def test_only_a_complete_version_training_holds_is_published(registry: Registry) -> None:
    stub = registry.stub
    publish(registry, "v0001")

    phantom = pb.PublishVersionRequest(version=version_pb(registry.home, "v0007"))
    error = failure(stub.PublishVersion, phantom)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "training service holds no model version 'v0007'" in error.details()

    folder = write_version(registry.home, "v0002")
    other = pb.PublishVersionRequest(version=version_pb(registry.home, "v0002", ("ds", "dl")))
    error = failure(stub.PublishVersion, other)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "differs from what the training service holds in specialists" in error.details()

    (folder / "model.safetensors").write_bytes(b"x" * 10)  # written with 100 bytes
    config = json.loads((folder / "config.json").read_text())
    config["files"] = {"model.safetensors": {"bytes": 100, "sha256": "0" * 64}}
    (folder / "config.json").write_text(json.dumps(config))
    error = failure(
        stub.PublishVersion, pb.PublishVersionRequest(version=version_pb(registry.home, "v0002"))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "v0002 is not complete: v0002: model.safetensors is 10 bytes" in error.details()

    serving = stub.GetServing(pb.GetServingRequest()).serving
    assert serving.version.id == "v0001"
    assert [v.id for v in stub.ListVersions(pb.ListVersionsRequest()).versions] == ["v0001"]


def test_going_back_is_an_explicit_rollback(registry: Registry) -> None:
    stub = registry.stub
    stub.AddSpecialist(pb.AddSpecialistRequest(name="ds", state=pb.SPECIALIST_STATE_READY))
    publish(registry, "v0001")
    publish(registry, "v0002")
    publish(registry, "v0003", ("ds", "dl"))  # a version from before "dl" was deleted, say

    # publishing an earlier version is not how to go back
    again = pb.PublishVersionRequest(version=version_pb(registry.home, "v0001"))
    error = failure(stub.PublishVersion, again)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serving it again is a rollback (RollbackVersion)" in error.details()

    for request, code, says in [
        (pb.RollbackVersionRequest(), grpc.StatusCode.INVALID_ARGUMENT, "version_id"),
        (pb.RollbackVersionRequest(version_id="v0009"), grpc.StatusCode.NOT_FOUND, "v0009"),
    ]:
        error = failure(stub.RollbackVersion, request)
        assert (error.code(), says in error.details()) == (code, True)
    assert stub.GetServing(pb.GetServingRequest()).serving.version.id == "v0003"

    serving = stub.RollbackVersion(pb.RollbackVersionRequest(version_id="v0001")).serving
    assert serving.version.id == "v0001"

    # a version whose specialists are not the registry's would serve what it does not list
    error = failure(stub.RollbackVersion, pb.RollbackVersionRequest(version_id="v0003"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds the specialists ['dl', 'ds'], the registry has ['ds']" in error.details()

    # nor while an operation runs, which would publish over it; unless it is that operation
    # going back to what served before it
    op = add_ds(stub)
    error = failure(stub.RollbackVersion, pb.RollbackVersionRequest(version_id="v0002"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"operation {op.id} (add_specialist) is unfinished" in error.details()
    request = pb.RollbackVersionRequest(version_id="v0002", operation_id=op.id)
    assert stub.RollbackVersion(request).serving.version.id == "v0002"
    update(stub, id=op.id, state=pb.OPERATION_STATE_FAILED, error="did not load")

    # never to a version a replica found damaged
    stub.ReportLoaded(
        pb.ReportLoadedRequest(
            version_id="v0002", invalid_version_id="v0001", load_error="v0001: damaged"
        )
    )
    error = failure(stub.RollbackVersion, pb.RollbackVersionRequest(version_id="v0001"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "v0001 is invalid: v0001: damaged" in error.details()
    assert stub.GetServing(pb.GetServingRequest()).serving.version.id == "v0002"

    # nor to one whose files have gone since it served
    publish(registry, "v0004")
    shutil.rmtree(registry.home / "artifacts" / "models" / "v0002")
    error = failure(stub.RollbackVersion, pb.RollbackVersionRequest(version_id="v0002"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "training service holds no model version 'v0002'" in error.details()
    assert stub.GetServing(pb.GetServingRequest()).serving.version.id == "v0004"


# metrics


def test_every_call_is_counted_by_method_and_code_and_the_records_by_state(db: Path) -> None:
    """The gRPC server series count each call once under the code it ended with (a call
    refused for its key, one the client cancelled, one that failed), and the registry's own
    series follow its records; both served over HTTP as Prometheus scrapes them."""
    metrics = ServerMetrics()
    admin = "admin-key-" + "x" * 16
    registry = Registry(db, metrics, Keys.parse("", admin))
    try:
        servicer = registry.servicer
        metrics.add(RegistryCollector(servicer))
        endpoint = metrics.serve("127.0.0.1", 0)
        key = (("authorization", f"Bearer {admin}"),)
        stub = registry.stub
        stub.ListSpecialists(pb.ListSpecialistsRequest(), timeout=TIMEOUT, metadata=key)
        refused = failure(stub.ListSpecialists, pb.ListSpecialistsRequest())  # no key
        assert refused.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetSpecialist(
                pb.GetSpecialistRequest(name="nobody"), timeout=TIMEOUT, metadata=key
            )
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        op = stub.CreateOperation(
            pb.CreateOperationRequest(kind=pb.OPERATION_KIND_ADD_SPECIALIST, target="ds"),
            timeout=TIMEOUT,
            metadata=key,
        ).operation
        watch = stub.WatchOperation(pb.WatchOperationRequest(id=op.id), timeout=60, metadata=key)
        next(watch)
        watch.cancel()

        def samples() -> dict[tuple[str, tuple], float]:
            text = httpx.get(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=TIMEOUT).text
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        def handled(method: str, code: str, kind: str = "unary") -> float:
            labels = {"grpc_type": kind, "grpc_service": "sma.v1.Registry"}
            labels |= {"grpc_method": method, "grpc_code": code}
            key = ("grpc_server_handled_total", tuple(sorted(labels.items())))
            return samples().get(key, 0.0)

        assert until(lambda: handled("WatchOperation", "CANCELLED", "server_stream") == 1)
        assert handled("ListSpecialists", "OK") == 1
        assert handled("ListSpecialists", "UNAUTHENTICATED") == 1
        assert handled("GetSpecialist", "NOT_FOUND") == 1
        assert handled("CreateOperation", "OK") == 1
        got = samples()
        watched = {"grpc_type": "server_stream", "grpc_service": "sma.v1.Registry"}
        watched["grpc_method"] = "WatchOperation"
        assert got[("grpc_server_msg_sent_total", tuple(sorted(watched.items())))] == 1
        pending = (("kind", "add_specialist"), ("state", "pending"))
        assert got[("sma_registry_operations", pending)] == 1
        assert got[("sma_registry_versions", ())] == 0
        endpoint.close()
    finally:
        registry.close()
