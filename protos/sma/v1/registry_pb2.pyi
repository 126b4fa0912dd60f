import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from sma.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpecialistState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPECIALIST_STATE_UNSPECIFIED: _ClassVar[SpecialistState]
    SPECIALIST_STATE_TRAINING: _ClassVar[SpecialistState]
    SPECIALIST_STATE_READY: _ClassVar[SpecialistState]
    SPECIALIST_STATE_FAILED: _ClassVar[SpecialistState]
    SPECIALIST_STATE_DELETING: _ClassVar[SpecialistState]

class OperationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_KIND_UNSPECIFIED: _ClassVar[OperationKind]
    OPERATION_KIND_INITIALIZE: _ClassVar[OperationKind]
    OPERATION_KIND_ADD_SPECIALIST: _ClassVar[OperationKind]
    OPERATION_KIND_DELETE_SPECIALIST: _ClassVar[OperationKind]

class OperationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPERATION_STATE_UNSPECIFIED: _ClassVar[OperationState]
    OPERATION_STATE_PENDING: _ClassVar[OperationState]
    OPERATION_STATE_RUNNING: _ClassVar[OperationState]
    OPERATION_STATE_SUCCEEDED: _ClassVar[OperationState]
    OPERATION_STATE_FAILED: _ClassVar[OperationState]
    OPERATION_STATE_CANCELLED: _ClassVar[OperationState]
SPECIALIST_STATE_UNSPECIFIED: SpecialistState
SPECIALIST_STATE_TRAINING: SpecialistState
SPECIALIST_STATE_READY: SpecialistState
SPECIALIST_STATE_FAILED: SpecialistState
SPECIALIST_STATE_DELETING: SpecialistState
OPERATION_KIND_UNSPECIFIED: OperationKind
OPERATION_KIND_INITIALIZE: OperationKind
OPERATION_KIND_ADD_SPECIALIST: OperationKind
OPERATION_KIND_DELETE_SPECIALIST: OperationKind
OPERATION_STATE_UNSPECIFIED: OperationState
OPERATION_STATE_PENDING: OperationState
OPERATION_STATE_RUNNING: OperationState
OPERATION_STATE_SUCCEEDED: OperationState
OPERATION_STATE_FAILED: OperationState
OPERATION_STATE_CANCELLED: OperationState

class Specialist(_message.Message):
    __slots__ = ("name", "corpus_dir", "corpus_digest", "state", "error", "created_at", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CORPUS_DIR_FIELD_NUMBER: _ClassVar[int]
    CORPUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    corpus_dir: str
    corpus_digest: str
    state: SpecialistState
    error: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., corpus_dir: _Optional[str] = ..., corpus_digest: _Optional[str] = ..., state: _Optional[_Union[SpecialistState, str]] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("id", "kind", "target", "state", "progress", "error", "job_id", "version_id", "message", "created_at", "updated_at", "full_retrain", "owner", "lease_expires_at", "cancel_requested", "max_drift")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FULL_RETRAIN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    MAX_DRIFT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: OperationKind
    target: str
    state: OperationState
    progress: _common_pb2.TrainingProgress
    error: str
    job_id: str
    version_id: str
    message: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    full_retrain: bool
    owner: str
    lease_expires_at: _timestamp_pb2.Timestamp
    cancel_requested: bool
    max_drift: float
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[OperationKind, str]] = ..., target: _Optional[str] = ..., state: _Optional[_Union[OperationState, str]] = ..., progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ..., error: _Optional[str] = ..., job_id: _Optional[str] = ..., version_id: _Optional[str] = ..., message: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., full_retrain: _Optional[bool] = ..., owner: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_requested: _Optional[bool] = ..., max_drift: _Optional[float] = ...) -> None: ...

class ServingState(_message.Message):
    __slots__ = ("version", "loaded_version_id", "replicas")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    loaded_version_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[InferenceReplica]
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ..., loaded_version_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[InferenceReplica, _Mapping]]] = ...) -> None: ...

class InferenceReplica(_message.Message):
    __slots__ = ("id", "version_id", "load_error")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    version_id: str
    load_error: str
    def __init__(self, id: _Optional[str] = ..., version_id: _Optional[str] = ..., load_error: _Optional[str] = ...) -> None: ...

class ListSpecialistsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSpecialistsResponse(_message.Message):
    __slots__ = ("specialists",)
    SPECIALISTS_FIELD_NUMBER: _ClassVar[int]
    specialists: _containers.RepeatedCompositeFieldContainer[Specialist]
    def __init__(self, specialists: _Optional[_Iterable[_Union[Specialist, _Mapping]]] = ...) -> None: ...

class GetSpecialistRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetSpecialistResponse(_message.Message):
    __slots__ = ("specialist",)
    SPECIALIST_FIELD_NUMBER: _ClassVar[int]
    specialist: Specialist
    def __init__(self, specialist: _Optional[_Union[Specialist, _Mapping]] = ...) -> None: ...

class AddSpecialistRequest(_message.Message):
    __slots__ = ("name", "corpus_dir", "corpus_digest", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CORPUS_DIR_FIELD_NUMBER: _ClassVar[int]
    CORPUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    corpus_dir: str
    corpus_digest: str
    state: SpecialistState
    def __init__(self, name: _Optional[str] = ..., corpus_dir: _Optional[str] = ..., corpus_digest: _Optional[str] = ..., state: _Optional[_Union[SpecialistState, str]] = ...) -> None: ...

class AddSpecialistResponse(_message.Message):
    __slots__ = ("specialist",)
    SPECIALIST_FIELD_NUMBER: _ClassVar[int]
    specialist: Specialist
    def __init__(self, specialist: _Optional[_Union[Specialist, _Mapping]] = ...) -> None: ...

class UpdateSpecialistRequest(_message.Message):
    __slots__ = ("name", "state", "error", "corpus_digest", "corpus_dir")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CORPUS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CORPUS_DIR_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: SpecialistState
    error: str
    corpus_digest: str
    corpus_dir: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[SpecialistState, str]] = ..., error: _Optional[str] = ..., corpus_digest: _Optional[str] = ..., corpus_dir: _Optional[str] = ...) -> None: ...

class UpdateSpecialistResponse(_message.Message):
    __slots__ = ("specialist",)
    SPECIALIST_FIELD_NUMBER: _ClassVar[int]
    specialist: Specialist
    def __init__(self, specialist: _Optional[_Union[Specialist, _Mapping]] = ...) -> None: ...

class DeleteSpecialistRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteSpecialistResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateOperationRequest(_message.Message):
    __slots__ = ("kind", "target", "full_retrain", "owner", "lease_seconds", "max_drift")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    FULL_RETRAIN_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_DRIFT_FIELD_NUMBER: _ClassVar[int]
    kind: OperationKind
    target: str
    full_retrain: bool
    owner: str
    lease_seconds: float
    max_drift: float
    def __init__(self, kind: _Optional[_Union[OperationKind, str]] = ..., target: _Optional[str] = ..., full_retrain: _Optional[bool] = ..., owner: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., max_drift: _Optional[float] = ...) -> None: ...

class CreateOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class ListOperationsRequest(_message.Message):
    __slots__ = ("unfinished_only", "limit")
    UNFINISHED_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    unfinished_only: bool
    limit: int
    def __init__(self, unfinished_only: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListOperationsResponse(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ...) -> None: ...

class UpdateOperationRequest(_message.Message):
    __slots__ = ("id", "state", "progress", "error", "job_id", "version_id", "message", "owner", "cancel_requested")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: OperationState
    progress: _common_pb2.TrainingProgress
    error: str
    job_id: str
    version_id: str
    message: str
    owner: str
    cancel_requested: bool
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[OperationState, str]] = ..., progress: _Optional[_Union[_common_pb2.TrainingProgress, _Mapping]] = ..., error: _Optional[str] = ..., job_id: _Optional[str] = ..., version_id: _Optional[str] = ..., message: _Optional[str] = ..., owner: _Optional[str] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...

class UpdateOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class ClaimOperationRequest(_message.Message):
    __slots__ = ("id", "owner", "lease_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    owner: str
    lease_seconds: float
    def __init__(self, id: _Optional[str] = ..., owner: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class ClaimOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class WatchOperationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchOperationResponse(_message.Message):
    __slots__ = ("operation",)
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    operation: Operation
    def __init__(self, operation: _Optional[_Union[Operation, _Mapping]] = ...) -> None: ...

class PublishVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: _common_pb2.ModelVersion
    def __init__(self, version: _Optional[_Union[_common_pb2.ModelVersion, _Mapping]] = ...) -> None: ...

class PublishVersionResponse(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: ServingState
    def __init__(self, serving: _Optional[_Union[ServingState, _Mapping]] = ...) -> None: ...

class RollbackVersionRequest(_message.Message):
    __slots__ = ("version_id", "operation_id")
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPERATION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    operation_id: str
    def __init__(self, version_id: _Optional[str] = ..., operation_id: _Optional[str] = ...) -> None: ...

class RollbackVersionResponse(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: ServingState
    def __init__(self, serving: _Optional[_Union[ServingState, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[_common_pb2.ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[_common_pb2.ModelVersion, _Mapping]]] = ...) -> None: ...

class GetServingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServingResponse(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: ServingState
    def __init__(self, serving: _Optional[_Union[ServingState, _Mapping]] = ...) -> None: ...

class WatchServingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchServingResponse(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: ServingState
    def __init__(self, serving: _Optional[_Union[ServingState, _Mapping]] = ...) -> None: ...

class ReportLoadedRequest(_message.Message):
    __slots__ = ("version_id", "replica_id", "load_error", "invalid_version_id")
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    INVALID_VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    replica_id: str
    load_error: str
    invalid_version_id: str
    def __init__(self, version_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., load_error: _Optional[str] = ..., invalid_version_id: _Optional[str] = ...) -> None: ...

class ReportLoadedResponse(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: ServingState
    def __init__(self, serving: _Optional[_Union[ServingState, _Mapping]] = ...) -> None: ...
