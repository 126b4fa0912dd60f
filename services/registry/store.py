"""The registry's state in one SQLite file: specialists, operations, model versions and the
serving pointer.

Plain dataclasses in and out and no gRPC here, so the servicer stays a thin translation layer
and the rules (valid names, one unfinished operation at a time, immutable finished operations)
hold whoever calls. One connection behind a lock; every mutation is one `BEGIN IMMEDIATE`
transaction, so a check and the write it guards can never interleave with another writer.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from shiftable_lib.corpus import validate_specialist_name
from shiftable_lib.errors import AlreadyExists, Busy, Conflict, NotFound

R = TypeVar("R")  # a record: Specialist, Operation or ModelVersion


def _now() -> datetime:
    return datetime.now(UTC)


class SpecialistState(StrEnum):
    TRAINING = "training"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


class OperationKind(StrEnum):
    INITIALIZE = "initialize"
    ADD_SPECIALIST = "add_specialist"
    DELETE_SPECIALIST = "delete_specialist"


class OperationState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (OperationState.PENDING, OperationState.RUNNING)


@dataclass
class Specialist:
    name: str
    corpus_dir: str
    corpus_digest: str
    state: SpecialistState
    error: str
    created_at: datetime
    updated_at: datetime


@dataclass
class Progress:
    """Where an operation's training job is, as the training service last reported it."""

    phase: str = ""
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    loss: float = 0.0
    tokens_per_s: float = 0.0
    eta_s: float = 0.0


@dataclass
class Operation:
    id: str
    kind: OperationKind
    target: str
    state: OperationState
    progress: Progress = field(default_factory=Progress)
    error: str = ""
    job_id: str = ""
    version_id: str = ""
    message: str = ""
    full_retrain: bool = False
    created_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)


@dataclass
class ModelVersion:
    id: str
    specialists: list[str]
    artifact_dir: str
    metrics_json: str
    profile: str
    created_at: datetime = field(default_factory=_now)


@dataclass(frozen=True)
class Replica:
    """One inference replica as it last reported."""

    id: str
    version_id: str  # "" before its first load
    load_error: str  # why it cannot load the serving version; "" when it can


@dataclass
class ServingState:
    version: ModelVersion | None  # None before the first version is published
    loaded_version_id: str  # "" before an inference server reports
    replicas: list[Replica] = field(default_factory=list)  # the live ones, by id


class OperationBusy(Busy):
    """Busy because of an unfinished operation, whose id callers can point at."""

    def __init__(self, operation: Operation) -> None:
        what = " ".join(filter(None, (operation.kind.value, operation.target)))
        super().__init__(
            f"operation {operation.id} is {operation.state.value} ({what}); wait for it to finish"
        )
        self.operation_id = operation.id


# one entry per schema version: migration i takes `PRAGMA user_version` from i to i + 1
_MIGRATIONS = [
    """
    CREATE TABLE specialists (
        name TEXT PRIMARY KEY, corpus_dir TEXT NOT NULL, corpus_digest TEXT NOT NULL,
        state TEXT NOT NULL, error TEXT NOT NULL, created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL);
    CREATE TABLE operations (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, state TEXT NOT NULL,
        progress TEXT NOT NULL, error TEXT NOT NULL, job_id TEXT NOT NULL,
        version_id TEXT NOT NULL, message TEXT NOT NULL, full_retrain INTEGER NOT NULL,
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
    CREATE TABLE versions (
        id TEXT PRIMARY KEY, specialists TEXT NOT NULL, artifact_dir TEXT NOT NULL,
        metrics_json TEXT NOT NULL, profile TEXT NOT NULL, created_at TEXT NOT NULL);
    CREATE TABLE serving (
        one INTEGER PRIMARY KEY CHECK (one = 1), version_id TEXT REFERENCES versions(id),
        loaded_version_id TEXT NOT NULL);
    INSERT INTO serving VALUES (1, NULL, '');
    """,
    """
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY, version_id TEXT NOT NULL, load_error TEXT NOT NULL,
        reported_at REAL NOT NULL);
    """,
]
# a replica that has not reported for this long is gone (it reports every few seconds)
REPLICA_LEASE_S = 15.0
SCHEMA_VERSION = len(_MIGRATIONS)
_UNFINISHED = "state IN ('pending', 'running')"


@dataclass(frozen=True)
class _Table:
    """Where a record type lives, and how its non-text columns read back."""

    name: str
    key: str
    noun: str
    decode: dict[str, Callable[[Any], Any]]


_TABLES: dict[type, _Table] = {
    Specialist: _Table("specialists", "name", "specialist", {"state": SpecialistState}),
    Operation: _Table(
        "operations",
        "id",
        "operation",
        {
            "kind": OperationKind,
            "state": OperationState,
            "progress": lambda text: Progress(**json.loads(text)),
            "full_retrain": bool,
        },
    ),
    ModelVersion: _Table("versions", "id", "model version", {"specialists": json.loads}),
}


class RegistryStore:
    """The registry's tables in the SQLite file at `path` (created, with its folder, if absent)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are explicit, see _tx
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        try:
            self._db.execute("PRAGMA busy_timeout = 5000")  # wait for another process's write
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")  # a commit survives a power cut
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"registry schema v{version} is newer than this code's")
            for script in _MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RegistryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # specialists

    def list_specialists(self) -> list[Specialist]:
        with self._tx() as db:
            return _select(db, Specialist, "ORDER BY name")

    def get_specialist(self, name: str) -> Specialist:
        with self._tx() as db:
            return _get(db, Specialist, validate_specialist_name(name))

    def add_specialist(
        self,
        name: str,
        corpus_dir: str = "",
        corpus_digest: str = "",
        state: SpecialistState = SpecialistState.TRAINING,
    ) -> Specialist:
        now = _now()
        name = validate_specialist_name(name)
        record = Specialist(name, corpus_dir, corpus_digest, SpecialistState(state), "", now, now)
        with self._tx() as db:
            if _select(db, Specialist, "WHERE name = ?", name):
                raise AlreadyExists(f"specialist {name!r} already exists")
            _save(db, record)
        return record

    def update_specialist(
        self,
        name: str,
        *,
        state: SpecialistState | None = None,
        error: str | None = None,
        corpus_digest: str | None = None,
        corpus_dir: str | None = None,
    ) -> Specialist:
        """Change the fields given; the others keep their values."""
        changes = dict(state=state, error=error, corpus_digest=corpus_digest, corpus_dir=corpus_dir)
        with self._tx() as db:
            current = _get(db, Specialist, validate_specialist_name(name))
            return _save(db, _changed(current, changes))

    def delete_specialist(self, name: str) -> None:
        with self._tx() as db:
            _get(db, Specialist, validate_specialist_name(name))
            db.execute("DELETE FROM specialists WHERE name = ?", (name,))

    # operations

    def create_operation(
        self, kind: OperationKind | str, target: str = "", full_retrain: bool = False
    ) -> Operation:
        """Record a PENDING operation, or raise OperationBusy while another is unfinished."""
        kind = OperationKind(kind)
        if kind is OperationKind.INITIALIZE and target:
            raise ValueError("an initialize operation takes no target")
        if kind is not OperationKind.INITIALIZE and not target:
            raise ValueError(f"an {kind.value} operation needs a target specialist")
        if target:
            validate_specialist_name(target)
        op_id = f"op-{secrets.token_hex(6)}"
        record = Operation(op_id, kind, target, OperationState.PENDING, full_retrain=full_retrain)
        record.updated_at = record.created_at
        with self._tx() as db:
            if unfinished := _select(db, Operation, f"WHERE {_UNFINISHED} LIMIT 1"):
                raise OperationBusy(unfinished[0])
            return _save(db, record)

    def get_operation(self, op_id: str) -> Operation:
        with self._tx() as db:
            return _get(db, Operation, op_id)

    def list_operations(self, unfinished_only: bool = False, limit: int = 100) -> list[Operation]:
        """Newest first."""
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        where = f"WHERE {_UNFINISHED}" if unfinished_only else ""
        with self._tx() as db:
            return _select(db, Operation, f"{where} ORDER BY rowid DESC LIMIT ?", limit)

    def update_operation(
        self,
        op_id: str,
        *,
        state: OperationState | None = None,
        progress: Progress | None = None,
        error: str | None = None,
        job_id: str | None = None,
        version_id: str | None = None,
        message: str | None = None,
    ) -> Operation:
        """Change the fields given. A finished operation never changes (Conflict), and the state
        only moves forward: PENDING -> RUNNING -> a finished state, or PENDING -> finished."""
        changes = dict(state=state, progress=progress, error=error, job_id=job_id)
        changes |= dict(version_id=version_id, message=message)
        with self._tx() as db:
            current = _get(db, Operation, op_id)
            if current.state.finished:
                raise Conflict(f"operation {op_id} has {current.state.value}; it cannot change")
            if state is OperationState.PENDING and current.state is OperationState.RUNNING:
                raise Conflict(f"operation {op_id} is running; it cannot go back to pending")
            return _save(db, _changed(current, changes))

    # model versions

    def publish_version(self, version: ModelVersion) -> ServingState:
        """Record `version` and make it the serving one. Publishing a recorded version again
        (a retry, or a rollback) only moves the pointer; other content under a taken id is
        AlreadyExists."""
        if not version.id:
            raise ValueError("a model version needs an id")
        for name in version.specialists:
            validate_specialist_name(name)
        if version.metrics_json:
            json.loads(version.metrics_json)  # ValueError if it is not JSON
        with self._tx() as db:
            known = _select(db, ModelVersion, "WHERE id = ?", version.id)
            if not known:
                _save(db, version)
            elif _content(known[0]) != _content(version):
                raise AlreadyExists(f"model version {version.id!r} exists with other content")
            db.execute("UPDATE serving SET version_id = ?", (version.id,))
            return _serving(db)

    def list_versions(self) -> list[ModelVersion]:
        """Newest first."""
        with self._tx() as db:
            return _select(db, ModelVersion, "ORDER BY rowid DESC")

    def get_serving(self) -> ServingState:
        with self._tx() as db:
            return _serving(db)

    def report_loaded(
        self, version_id: str, replica_id: str = "", load_error: str = ""
    ) -> ServingState:
        """Record what an inference replica serves now, and why it cannot load the serving
        version if it cannot; each report renews the replica's lease."""
        if not version_id and not load_error:
            raise ValueError("a report names the version served, or why none could be loaded")
        now = time.time()
        with self._tx() as db:
            if version_id:
                _get(db, ModelVersion, version_id)
                db.execute("UPDATE serving SET loaded_version_id = ?", (version_id,))
            if replica_id:
                db.execute(
                    "INSERT INTO replicas VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                    " version_id = excluded.version_id, load_error = excluded.load_error,"
                    " reported_at = excluded.reported_at",
                    (replica_id, version_id, load_error, now),
                )
            db.execute("DELETE FROM replicas WHERE reported_at < ?", (now - REPLICA_LEASE_S,))
            return _serving(db)


def _select(db: sqlite3.Connection, cls: type[R], clause: str = "", *args: object) -> list[R]:
    table = _TABLES[cls]
    convert = {"created_at": datetime.fromisoformat, "updated_at": datetime.fromisoformat}
    convert |= table.decode
    rows = db.execute(f"SELECT * FROM {table.name} {clause}", args).fetchall()
    return [
        cls(**{k: convert[k](v) if k in convert else v for k, v in dict(row).items()})
        for row in rows
    ]


def _get(db: sqlite3.Connection, cls: type[R], key: str) -> R:
    table = _TABLES[cls]
    found = _select(db, cls, f"WHERE {table.key} = ?", key)
    if not found:
        raise NotFound(f"no {table.noun} {key!r}")
    return found[0]


def _save(db: sqlite3.Connection, record: R) -> R:
    """Insert `record`, or update the row with its key in place (keeping its rowid, the order
    lists go by)."""
    table = _TABLES[type(record)]
    row = {k: _column(v) for k, v in asdict(record).items()}
    columns, marks = ", ".join(row), ", ".join("?" * len(row))
    updates = ", ".join(f"{c} = excluded.{c}" for c in row)
    db.execute(
        f"INSERT INTO {table.name} ({columns}) VALUES ({marks})"
        f" ON CONFLICT({table.key}) DO UPDATE SET {updates}",
        tuple(row.values()),
    )
    return record


def _changed(record: R, changes: dict[str, Any]) -> R:
    """`record` with the changes that are not None, and a new `updated_at`."""
    return replace(record, **{k: v for k, v in changes.items() if v is not None}, updated_at=_now())


def _column(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


def _content(version: ModelVersion) -> tuple:
    return version.specialists, version.artifact_dir, version.metrics_json, version.profile


def _serving(db: sqlite3.Connection) -> ServingState:
    version_id, loaded = db.execute("SELECT version_id, loaded_version_id FROM serving").fetchone()
    version = _get(db, ModelVersion, version_id) if version_id else None
    live = db.execute(
        "SELECT id, version_id, load_error FROM replicas WHERE reported_at >= ? ORDER BY id",
        (time.time() - REPLICA_LEASE_S,),
    ).fetchall()
    return ServingState(version, loaded, [Replica(*row) for row in live])
