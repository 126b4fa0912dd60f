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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from services.registry.schema import (
    MIGRATIONS,
    REPLICA_LEASE_S,
    SCHEMA_VERSION,
    TABLES,
    UNFINISHED,
    ModelVersion,
    Operation,
    OperationBusy,
    OperationKind,
    OperationState,
    Progress,
    Replica,
    ServingState,
    Specialist,
    SpecialistState,
    utc_now,
)
from shiftable_lib.config import check_max_drift
from shiftable_lib.corpus import validate_specialist_name
from shiftable_lib.errors import AlreadyExists, Conflict, NotFound


@dataclass(frozen=True)
class Census:
    specialists: dict[tuple[str, ...], int]  # (state,) -> how many
    operations: dict[tuple[str, ...], int]  # (kind, state) -> how many
    versions: int
    serving: ServingState


R = TypeVar("R")  # a record: Specialist, Operation or ModelVersion
MAX_LEASE_S = 3600.0


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
            for script in MIGRATIONS[version:]:
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
        now = utc_now()
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
        self,
        kind: OperationKind | str,
        target: str = "",
        full_retrain: bool = False,
        owner: str = "",
        lease_s: float = 0.0,
        max_drift: float | None = None,
    ) -> Operation:
        """Record a PENDING operation, or raise OperationBusy while another is unfinished. With
        an `owner`, the creator holds the lease on driving it for `lease_s` from the start."""
        kind = OperationKind(kind)
        if kind is OperationKind.INITIALIZE and target:
            raise ValueError("an initialize operation takes no target")
        if kind is not OperationKind.INITIALIZE and not target:
            raise ValueError(f"an {kind.value} operation needs a target specialist")
        if target:
            validate_specialist_name(target)
        op_id = f"op-{secrets.token_hex(6)}"
        record = Operation(
            op_id, kind, target, OperationState.PENDING, full_retrain=full_retrain,
            max_drift=check_max_drift(max_drift),
        )  # fmt: skip
        record.updated_at = record.created_at
        if owner:
            record.owner, record.lease_expires = owner, time.time() + _lease(lease_s)
        with self._tx() as db:
            if unfinished := _select(db, Operation, f"WHERE {UNFINISHED} LIMIT 1"):
                raise OperationBusy(unfinished[0])
            return _save(db, record)

    def claim_operation(self, op_id: str, owner: str, lease_s: float) -> Operation:
        """Take or renew the lease on driving an unfinished operation when nobody holds it, when
        it has run out, or when `owner` holds it already. The operation comes back either way;
        its `owner` says whether the claim was granted. A finished one is left as it is."""
        if not owner:
            raise ValueError("owner is required")
        lease_s = _lease(lease_s)
        with self._tx() as db:
            current = _get(db, Operation, op_id)
            now = time.time()
            free = current.owner in ("", owner) or current.lease_expires < now
            if current.state.finished or not free:
                return current
            # a renewal is not a change anyone watches for: updated_at stays
            return _save(db, replace(current, owner=owner, lease_expires=now + lease_s))

    def get_operation(self, op_id: str) -> Operation:
        with self._tx() as db:
            return _get(db, Operation, op_id)

    def list_operations(self, unfinished_only: bool = False, limit: int = 100) -> list[Operation]:
        """Newest first."""
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        where = f"WHERE {UNFINISHED}" if unfinished_only else ""
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
        cancel_requested: bool | None = None,
        owner: str = "",
    ) -> Operation:
        """Change the fields given. A finished operation never changes (Conflict), and the state
        only moves forward: PENDING -> RUNNING -> a finished state, or PENDING -> finished.
        With an `owner`, only the holder of the operation's lease may write (Conflict)."""
        changes = dict(state=state, progress=progress, error=error, job_id=job_id)
        changes |= dict(version_id=version_id, message=message, cancel_requested=cancel_requested)
        with self._tx() as db:
            current = _get(db, Operation, op_id)
            if current.state.finished:
                raise Conflict(f"operation {op_id} has {current.state.value}; it cannot change")
            if state is OperationState.PENDING and current.state is OperationState.RUNNING:
                raise Conflict(f"operation {op_id} is running; it cannot go back to pending")
            if owner and current.owner != owner:
                holder = current.owner or "nobody"
                raise Conflict(f"operation {op_id} is driven by {holder}, not {owner}")
            if state is not None and state.finished:  # nobody drives a finished operation
                changes |= dict(owner="", lease_expires=0.0)
            return _save(db, _changed(current, changes))

    # model versions

    def publish_version(self, version: ModelVersion) -> ServingState:
        """Record a new `version` and make it the serving one. Publishing the serving version
        again (a retry) changes nothing; other content under a taken id is AlreadyExists, and a
        version published before that no longer serves is a rollback: `rollback_version`."""
        if not version.id:
            raise ValueError("a model version needs an id")
        for name in version.specialists:
            validate_specialist_name(name)
        if version.metrics_json:
            json.loads(version.metrics_json)  # ValueError if it is not JSON
        with self._tx() as db:
            known = _select(db, ModelVersion, "WHERE id = ?", version.id)
            if known:
                if _content(known[0]) != _content(version):
                    raise AlreadyExists(f"model version {version.id!r} exists with other content")
                _check_servable(known[0])
                serving = _serving(db)
                if serving.version is None or serving.version.id != version.id:
                    raise Conflict(
                        f"model version {version.id} was published before; serving it again is"
                        " a rollback (RollbackVersion)"
                    )
                return serving
            _save(db, replace(version, invalid_reason=""))
            db.execute("UPDATE serving SET version_id = ?", (version.id,))
            return _serving(db)

    def get_version(self, version_id: str) -> ModelVersion:
        with self._tx() as db:
            return _get(db, ModelVersion, version_id)

    def is_recorded(self, version_id: str) -> bool:
        with self._tx() as db:
            return bool(_select(db, ModelVersion, "WHERE id = ?", version_id))

    def rollback_version(self, version_id: str, operation_id: str = "") -> ServingState:
        """Serve `version_id` again: a version published before, not marked invalid, whose
        specialists are the registry's. Refused while an operation other than `operation_id`
        (one going back to what served before it) is unfinished, since it would publish over
        the rollback."""
        with self._tx() as db:
            version = _get(db, ModelVersion, version_id)
            _check_servable(version)
            for op in _select(db, Operation, f"WHERE {UNFINISHED}"):
                if op.id != operation_id:
                    raise Conflict(f"operation {op.id} ({op.kind.value}) is unfinished")
            names = {
                s.name
                for s in _select(db, Specialist)
                if s.state in (SpecialistState.READY, SpecialistState.DELETING)
            }
            if set(version.specialists) != names:
                raise Conflict(
                    f"model version {version_id} holds the specialists "
                    f"{sorted(version.specialists)}, the registry has {sorted(names)}: "
                    "add or delete specialists to match it first"
                )
            db.execute("UPDATE serving SET version_id = ?", (version_id,))
            return _serving(db)

    def list_versions(self) -> list[ModelVersion]:
        """Newest first."""
        with self._tx() as db:
            return _select(db, ModelVersion, "ORDER BY rowid DESC")

    def get_serving(self) -> ServingState:
        with self._tx() as db:
            return _serving(db)

    def census(self) -> Census:
        """How many records of each kind there are, by state, and what serves."""
        with self._tx() as db:

            def count(sql: str) -> dict[tuple[str, ...], int]:
                return {tuple(row[:-1]): row[-1] for row in db.execute(sql)}

            return Census(
                specialists=count("SELECT state, COUNT(*) FROM specialists GROUP BY state"),
                operations=count(
                    "SELECT kind, state, COUNT(*) FROM operations GROUP BY kind, state"
                ),
                versions=db.execute("SELECT COUNT(*) FROM versions").fetchone()[0],
                serving=_serving(db),
            )

    def report_loaded(
        self,
        version_id: str,
        replica_id: str = "",
        load_error: str = "",
        invalid_version_id: str = "",
    ) -> ServingState:
        """Record what an inference replica serves now, and why it cannot load the serving
        version if it cannot; each report renews the replica's lease. `invalid_version_id`
        failed its check on loading (`load_error` says why): it is marked invalid, and if it
        was the serving version while no operation runs, the version served instead becomes
        the serving one (see `_fall_back`)."""
        if not version_id and not load_error:
            raise ValueError("a report names the version served, or why none could be loaded")
        if invalid_version_id and not load_error:
            raise ValueError("an invalid version needs the reason, in load_error")
        now = time.time()
        with self._tx() as db:
            if invalid_version_id:  # one the registry does not know has nothing to mark
                db.execute(
                    "UPDATE versions SET invalid_reason = ? WHERE id = ?",
                    (load_error, invalid_version_id),
                )
            if version_id:
                served = _get(db, ModelVersion, version_id)
                db.execute("UPDATE serving SET loaded_version_id = ?", (version_id,))
                if invalid_version_id and invalid_version_id != version_id:
                    _fall_back(db, invalid_version_id, served, load_error)
            if replica_id:
                db.execute(
                    "INSERT INTO replicas VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
                    " version_id = excluded.version_id, load_error = excluded.load_error,"
                    " reported_at = excluded.reported_at",
                    (replica_id, version_id, load_error, now),
                )
            db.execute("DELETE FROM replicas WHERE reported_at < ?", (now - REPLICA_LEASE_S,))
            return _serving(db)


def _fall_back(db: sqlite3.Connection, invalid: str, served: ModelVersion, load_error: str) -> None:
    """`invalid`, the serving version, cannot be loaded and a replica serves `served`, the
    last good one, instead: that is what serves from now on, and the specialists' records say
    so. Those it lacks are failed with the reason (an add makes them again); those it holds
    that were deleted after it are listed again, since it serves them. While an operation
    runs, its driver restores what served before it and records the failure itself."""
    (pointer,) = db.execute("SELECT version_id FROM serving").fetchone()
    if pointer != invalid or _select(db, Operation, f"WHERE {UNFINISHED} LIMIT 1"):
        return
    db.execute("UPDATE serving SET version_id = ?", (served.id,))
    reason = f"model version {invalid} cannot be loaded, {served.id} serves instead: {load_error}"
    known = {s.name: s for s in _select(db, Specialist)}
    for name, record in known.items():
        if name not in served.specialists and record.state == SpecialistState.READY:
            _save(db, _changed(record, {"state": SpecialistState.FAILED, "error": reason}))
    now = utc_now()
    for name in served.specialists:
        if name not in known:
            _save(db, Specialist(name, "", "", SpecialistState.READY, reason, now, now))
        elif known[name].state == SpecialistState.FAILED:  # failed before, but served again
            _save(db, _changed(known[name], {"state": SpecialistState.READY, "error": reason}))


def _select(db: sqlite3.Connection, cls: type[R], clause: str = "", *args: object) -> list[R]:
    table = TABLES[cls]
    convert = {"created_at": datetime.fromisoformat, "updated_at": datetime.fromisoformat}
    convert |= table.decode
    rows = db.execute(f"SELECT * FROM {table.name} {clause}", args).fetchall()
    return [
        cls(**{k: convert[k](v) if k in convert else v for k, v in dict(row).items()})
        for row in rows
    ]


def _get(db: sqlite3.Connection, cls: type[R], key: str) -> R:
    table = TABLES[cls]
    found = _select(db, cls, f"WHERE {table.key} = ?", key)
    if not found:
        raise NotFound(f"no {table.noun} {key!r}")
    return found[0]


def _save(db: sqlite3.Connection, record: R) -> R:
    """Insert `record`, or update the row with its key in place (keeping its rowid, the order
    lists go by)."""
    table = TABLES[type(record)]
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
    return replace(
        record, **{k: v for k, v in changes.items() if v is not None}, updated_at=utc_now()
    )


def _lease(seconds: float) -> float:
    if not 0.1 <= seconds <= MAX_LEASE_S:
        raise ValueError(f"a lease lasts 0.1 to {MAX_LEASE_S:.0f} seconds, not {seconds}")
    return seconds


def _column(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value)
    return value


def _check_servable(version: ModelVersion) -> None:
    if version.invalid_reason:
        raise Conflict(f"model version {version.id} is invalid: {version.invalid_reason}")


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
