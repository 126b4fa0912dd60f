import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingProgress(_message.Message):
    __slots__ = ("phase", "step", "total", "fraction", "loss", "tokens_per_s", "eta_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    total: int
    fraction: float
    loss: float
    tokens_per_s: float
    eta_s: float
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., fraction: _Optional[float] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eta_s: _Optional[float] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("id", "specialists", "artifact_dir", "metrics_json", "profile", "created_at", "invalid_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPECIALISTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_DIR_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    INVALID_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    specialists: _containers.RepeatedScalarFieldContainer[str]
    artifact_dir: str
    metrics_json: str
    profile: str
    created_at: _timestamp_pb2.Timestamp
    invalid_reason: str
    def __init__(self, id: _Optional[str] = ..., specialists: _Optional[_Iterable[str]] = ..., artifact_dir: _Optional[str] = ..., metrics_json: _Optional[str] = ..., profile: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., invalid_reason: _Optional[str] = ...) -> None: ...
