"""The registry's records (plain dataclasses, no SQL, no gRPC) and the SQLite schema that
holds them, one migration per schema version."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from shiftable_lib.errors import Busy


def utc_now() -> datetime:
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
    created_at: datetime = field(default_factory=utc_now)
    updated_at: datetime = field(default_factory=utc_now)
    owner: str = ""  # who drives it while unfinished (a gateway's id)
    lease_expires: float = 0.0  # until when (Unix time), unless renewed
    cancel_requested: bool = False
    max_drift: float | None = None  # percent; None: the training service's setting


@dataclass
class ModelVersion:
    id: str
    specialists: list[str]
    artifact_dir: str
    metrics_json: str
    profile: str
    created_at: datetime = field(default_factory=utc_now)
    invalid_reason: str = ""  # why it failed its check on loading; never served again


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
MIGRATIONS = [
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
    """
    ALTER TABLE operations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE operations ADD COLUMN lease_expires REAL NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    """,
    """
    ALTER TABLE versions ADD COLUMN invalid_reason TEXT NOT NULL DEFAULT '';
    """,
    """
    ALTER TABLE operations ADD COLUMN max_drift REAL;
    """,
]
# a replica that has not reported for this long is gone (it reports every few seconds)
REPLICA_LEASE_S = 15.0
SCHEMA_VERSION = len(MIGRATIONS)
UNFINISHED = "state IN ('pending', 'running')"


@dataclass(frozen=True)
class Table:
    """Where a record type lives, and how its non-text columns read back."""

    name: str
    key: str
    noun: str
    decode: dict[str, Callable[[Any], Any]]


TABLES: dict[type, Table] = {
    Specialist: Table("specialists", "name", "specialist", {"state": SpecialistState}),
    Operation: Table(
        "operations",
        "id",
        "operation",
        {
            "kind": OperationKind,
            "state": OperationState,
            "progress": lambda text: Progress(**json.loads(text)),
            "full_retrain": bool,
            "cancel_requested": bool,
        },
    ),
    ModelVersion: Table("versions", "id", "model version", {"specialists": json.loads}),
}
