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

from services.registry.store import (
    REPLICA_LEASE_S,
    ModelVersion,
    Operation,
    OperationBusy,
    OperationKind,
    OperationState,
    Progress,
    RegistryStore,
    Replica,
)
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

        v1 = ModelVersion("v1", ["ds"], "artifacts/models/v1", "{}", "tiny")
        store.publish_version(v1)
        store.publish_version(ModelVersion("v2", [], "artifacts/models/v2", "{}", "tiny"))
        assert store.publish_version(v1).version == v1  # rolling back only moves the pointer
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
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 2
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
