"""The registry's store on its own: its rules, concurrent writers, and its schema version, on a
real SQLite file."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest

from services.registry.schema import (
    MIGRATIONS,
    REPLICA_LEASE_S,
    SCHEMA_VERSION,
    ModelVersion,
    Operation,
    OperationBusy,
    OperationKind,
    OperationState,
    Progress,
    Replica,
    SpecialistState,
)
from services.registry.store import RegistryStore
from shiftable_lib.errors import AlreadyExists, Conflict, InvalidName, NotFound


def test_store_rules(db: Path) -> None:
    with RegistryStore(db) as store:
        with pytest.raises(ValueError, match="not a valid OperationKind"):
            store.create_operation("retrain_everything")
        with pytest.raises(InvalidName):
            store.add_specialist("Data Science")
        op = store.create_operation(OperationKind.INITIALIZE)
        with pytest.raises(OperationBusy) as busy:
            store.create_operation(OperationKind.ADD_SPECIALIST, "ds")
        assert busy.value.operation_id == op.id
        assert (
            str(busy.value) == f"operation {op.id} is pending (initialize); wait for it to finish"
        )
        store.update_operation(op.id, state=OperationState.CANCELLED)  # PENDING -> finished
        with pytest.raises(Conflict):
            store.update_operation(op.id, progress=Progress(step=1))
        second = store.create_operation(OperationKind.INITIALIZE)
        store.update_operation(second.id, state=OperationState.FAILED, error="no corpus")
        assert [o.id for o in store.list_operations(limit=1)] == [second.id]
        assert store.get_operation(second.id).error == "no corpus"
        assert store.list_operations(unfinished_only=True) == []
        with pytest.raises(ValueError):
            store.list_operations(limit=0)

        v1 = ModelVersion("v1", [], "artifacts/models/v1", "{}", "tiny")
        v2 = ModelVersion("v2", [], "artifacts/models/v2", "{}", "tiny")
        store.publish_version(v1)
        store.publish_version(v2)
        assert store.publish_version(v2).version == v2  # a retry changes nothing
        with pytest.raises(Conflict, match="serving it again is a rollback"):
            store.publish_version(v1)
        assert store.rollback_version("v1").version == v1  # going back only moves the pointer
        with pytest.raises(AlreadyExists):
            store.publish_version(ModelVersion("v1", ["dl"], "elsewhere", "{}", "tiny"))
        with pytest.raises(ValueError):
            store.publish_version(ModelVersion("v3", [], "x", "not json", "tiny"))
        with pytest.raises(NotFound):
            store.report_loaded("v3")


def test_store_creates_one_operation_when_writers_race(db: Path) -> None:
    """Separate connections (as separate processes would have): the check for an unfinished
    operation and the insert are one transaction, so exactly one writer wins."""
    stores = [RegistryStore(db) for _ in range(4)]
    start = threading.Barrier(len(stores))

    def create(store: RegistryStore) -> Operation | OperationBusy:
        start.wait()
        try:
            return store.create_operation(OperationKind.ADD_SPECIALIST, "ds")
        except OperationBusy as busy:
            return busy

    with ThreadPoolExecutor(len(stores)) as pool:
        results = list(pool.map(create, stores))
    for store in stores:
        store.close()
    (created,) = [r for r in results if isinstance(r, Operation)]
    assert [r.operation_id for r in results if isinstance(r, OperationBusy)] == [created.id] * 3


def test_store_schema_is_versioned(db: Path) -> None:
    RegistryStore(db).close()
    with closing(sqlite3.connect(db)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        RegistryStore(db)


def test_replicas_report_what_they_serve_and_drop_out_when_their_lease_runs_out(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RegistryStore(db) as store:
        store.publish_version(ModelVersion("v1", ["ds"], "artifacts/models/v1", "{}", "tiny"))
        with pytest.raises(ValueError, match="names the version served"):
            store.report_loaded("", "pod-a")
        with pytest.raises(NotFound):
            store.report_loaded("v9", "pod-a")
        store.report_loaded("v1", "pod-b")
        serving = store.report_loaded("", "pod-a", "cannot load v1: truncated file")
        assert serving.loaded_version_id == "v1"
        assert serving.replicas == [
            Replica("pod-a", "", "cannot load v1: truncated file"),
            Replica("pod-b", "v1", ""),
        ]
        later = time.time() + REPLICA_LEASE_S + 1
        monkeypatch.setattr(time, "time", lambda: later)
        assert store.get_serving().replicas == []  # neither has reported since
        assert store.report_loaded("v1", "pod-a").replicas == [Replica("pod-a", "v1", "")]


def test_one_gateway_drives_an_operation_until_its_lease_runs_out(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RegistryStore(db) as store:
        op = store.create_operation(OperationKind.ADD_SPECIALIST, "ds", owner="gw-a", lease_s=10)
        assert op.owner == "gw-a" and op.lease_expires > time.time() + 9
        assert store.claim_operation(op.id, "gw-b", 10).owner == "gw-a"  # refused: a live lease
        renewed = store.claim_operation(op.id, "gw-a", 10)
        assert renewed.owner == "gw-a" and renewed.updated_at == op.updated_at  # not a change
        with pytest.raises(Conflict, match="driven by gw-a, not gw-b"):
            store.update_operation(op.id, message="b was here", owner="gw-b")
        # a cancel request comes from any gateway, unfenced
        assert store.update_operation(op.id, cancel_requested=True).cancel_requested
        store.update_operation(op.id, state=OperationState.RUNNING, owner="gw-a")

        later = time.time() + 11
        monkeypatch.setattr(time, "time", lambda: later)  # gw-a stopped renewing
        assert store.claim_operation(op.id, "gw-b", 10).owner == "gw-b"  # taken over
        with pytest.raises(Conflict, match="driven by gw-b, not gw-a"):
            store.update_operation(op.id, progress=Progress("gate", 1, 2), owner="gw-a")
        done = store.update_operation(op.id, state=OperationState.SUCCEEDED, owner="gw-b")
        assert (done.owner, done.lease_expires, done.cancel_requested) == ("", 0.0, True)
        assert store.claim_operation(op.id, "gw-a", 10) == done  # finished: left as it is

        with pytest.raises(ValueError, match="owner is required"):
            store.claim_operation(op.id, "", 10)
        for lease in (0, -1, 1e9, float("nan")):
            with pytest.raises(ValueError, match="lease lasts"):
                store.claim_operation(op.id, "gw-a", lease)
        with pytest.raises(NotFound):
            store.claim_operation("op-nope", "gw-a", 10)


def test_store_grants_an_expired_lease_to_exactly_one_claimant(db: Path) -> None:
    with RegistryStore(db) as store:
        op_id = store.create_operation(OperationKind.INITIALIZE).id  # nobody holds it
    stores = [RegistryStore(db) for _ in range(4)]
    start = threading.Barrier(len(stores))

    def claim(index: int) -> str:
        start.wait()
        return stores[index].claim_operation(op_id, f"gw-{index}", 10).owner

    with ThreadPoolExecutor(len(stores)) as pool:
        owners = list(pool.map(claim, range(len(stores))))
    for store in stores:
        store.close()
    assert len(set(owners)) == 1 and owners[0].startswith("gw-")


def test_an_older_registry_is_migrated_and_its_unfinished_operation_is_free(db: Path) -> None:
    """A database written before leases existed: its unfinished operation has no owner, so the
    first gateway to claim it drives it."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, isolation_level=None)) as raw:
        for script in MIGRATIONS[:2]:
            raw.executescript(script)
        raw.execute("PRAGMA user_version = 2")
        raw.execute(
            "INSERT INTO operations VALUES ('op-1', 'initialize', '', 'running', ?, '', 'job-1',"
            " '', '', 0, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
            ('{"phase": "gate"}',),
        )
    with RegistryStore(db) as store:
        op = store.get_operation("op-1")
        assert (op.owner, op.cancel_requested, op.job_id) == ("", False, "job-1")
        assert store.claim_operation("op-1", "gw-a", 10).owner == "gw-a"


def test_a_version_that_fails_its_check_is_marked_and_never_published_again(db: Path) -> None:
    with RegistryStore(db) as store:
        old = ModelVersion("v1", [], "artifacts/models/v1", "{}", "tiny")
        new = ModelVersion("v2", [], "artifacts/models/v2", "{}", "tiny")
        store.publish_version(old)
        store.publish_version(new)
        with pytest.raises(ValueError, match="needs the reason"):
            store.report_loaded("v1", "pod-a", invalid_version_id="v2")
        reason = "cannot load v2: v2: model.safetensors is 1000 bytes, not the 9000"
        serving = store.report_loaded("v1", "pod-a", reason, invalid_version_id="v2")
        # what serves instead is the serving version now: nothing is pending on v2
        assert serving.version.id == "v1" and serving.loaded_version_id == "v1"
        assert store.get_version("v2").invalid_reason.endswith("9000")
        assert serving.replicas == [Replica("pod-a", "v1", reason)]
        with pytest.raises(Conflict, match="v2 is invalid: cannot load v2"):
            store.publish_version(new)
        with pytest.raises(Conflict, match="v2 is invalid: cannot load v2"):
            store.rollback_version("v2")
        assert store.get_serving().version.id == "v1"
        assert [v.invalid_reason != "" for v in store.list_versions()] == [True, False]


def test_falling_back_from_a_damaged_version_shows_in_the_specialists(db: Path) -> None:
    """The serving version cannot be loaded and a replica serves the one before it: the
    specialists it lacks are failed with the reason, and one deleted after it is listed
    again, since it serves again."""
    with RegistryStore(db) as store:
        store.publish_version(ModelVersion("v1", ["old", "ds"], "a/v1", "{}", "tiny"))
        store.publish_version(ModelVersion("v2", ["ds", "new"], "a/v2", "{}", "tiny"))
        for name in ("ds", "new", "gone"):
            store.add_specialist(name, f"data/{name}", state=SpecialistState.READY)
        store.update_specialist("gone", state=SpecialistState.FAILED, error="did not train")
        reason = "cannot load v2: model.safetensors is 1000 bytes; serving v1 instead"
        serving = store.report_loaded("v1", "pod-a", reason, invalid_version_id="v2")
        assert serving.version.id == "v1"
        records = {s.name: s for s in store.list_specialists()}
        assert records["ds"].state == SpecialistState.READY and records["ds"].error == ""
        assert records["new"].state == SpecialistState.FAILED
        assert records["new"].error.startswith("model version v2 cannot be loaded, v1 serves")
        assert records["new"].error.endswith(reason)
        assert records["old"].state == SpecialistState.READY  # v1 serves it again
        assert "v2 cannot be loaded" in records["old"].error
        assert records["gone"].error == "did not train"  # v1 never held it: untouched


def test_no_fall_back_of_the_pointer_while_an_operation_runs(db: Path) -> None:
    """The operation's driver restores what served before and fails it with its own reason."""
    with RegistryStore(db) as store:
        store.publish_version(ModelVersion("v1", ["ds"], "a/v1", "{}", "tiny"))
        store.add_specialist("ds", state=SpecialistState.READY)
        store.create_operation(OperationKind.ADD_SPECIALIST, "new")
        store.add_specialist("new")
        store.publish_version(ModelVersion("v2", ["ds", "new"], "a/v2", "{}", "tiny"))
        serving = store.report_loaded("v1", "pod-a", "damaged", invalid_version_id="v2")
        assert serving.version.id == "v2"
        assert store.get_specialist("new").state == SpecialistState.TRAINING
