"""A training job as the service sees it, and the messages its child process exchanges with the
server: the `Task` it is given, then `JobProgress` reports (and `Written`, for a version that
serves before the job ends) and one outcome, `Published` or `Failed`. Plain dataclasses, so that
they cross a pipe (pickled) or a rank's stdout (JSON)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path


class JobKind(enum.Enum):
    TRAIN_ALL = 1
    TRAIN_SPECIALISTS = 2
    ADD_SPECIALIST = 3
    REMOVE_SPECIALIST = 4


class JobState(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobProgress:
    """What a job does now; `fraction` is the share of the whole job's time done and `eta_s`
    the time left (see `progress.FractionEstimate`), the rest is the library's report of the
    current phase."""

    phase: str
    step: int = 0
    total: int = 0
    fraction: float = 0.0
    loss: float = math.nan
    tokens_per_s: float = 0.0
    eta_s: float = 0.0


@dataclass(frozen=True)
class Written:
    """The job wrote `version` and made it current, and goes on training: a first start's
    generalist, which may serve while the specialists train."""

    version: str


@dataclass
class Job:
    """One job as clients see it. `pid` is the child's process id while it runs (for logs and
    tests); `profile` and `recalibrate_steps` are the request's."""

    id: str
    kind: JobKind
    specialist: str = ""
    profile: str = ""
    recalibrate_steps: int = 0
    state: JobState = JobState.QUEUED
    progress: JobProgress = field(default_factory=lambda: JobProgress("queued"))
    error: str = ""
    version_id: str = ""
    message: str = ""
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None
    request_id: str = ""  # the caller's idempotency key, such as an operation's id
    base_version: str = ""  # the version it builds on; CURRENT when empty
    max_drift: float | None = None  # ADD, REMOVE: percent; None = the server's setting
    trace: str = "-"  # the id of the request that submitted it, for its log lines


@dataclass(frozen=True)
class Task:
    """Everything the child needs: the job's request and the server's settings that matter."""

    kind: JobKind
    specialist: str
    profile: str
    recalibrate_steps: int
    home: Path
    server_profile: str
    device: str
    train_threads: int
    parent_pid: int
    nproc: int = 1  # > 1: the job runs as that many data-parallel processes (ranks.py)
    max_drift: float | None = None  # ADD, REMOVE: percent; None = the server's setting
    trace: str = "-"  # the job's request id: the child's log lines carry it too
    log_format: str = "text"
    log_level: str = "INFO"


@dataclass(frozen=True)
class Published:
    """The job succeeded; `version` is the last version it published, None when there was
    nothing to do."""

    version: str | None
    message: str


@dataclass(frozen=True)
class Failed:
    error: str


Outcome = Published | Failed
