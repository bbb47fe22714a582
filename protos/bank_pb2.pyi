from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT64: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("shard_id", "num_shards", "total_rows", "dim", "dtype", "rows_held", "updates_applied", "rows_updated", "last_snapshot_tag", "max_message_bytes")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_HELD_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    ROWS_UPDATED_FIELD_NUMBER: _ClassVar[int]
    LAST_SNAPSHOT_TAG_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    num_shards: int
    total_rows: int
    dim: int
    dtype: DType
    rows_held: int
    updates_applied: int
    rows_updated: int
    last_snapshot_tag: str
    max_message_bytes: int
    def __init__(self, shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., total_rows: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., rows_held: _Optional[int] = ..., updates_applied: _Optional[int] = ..., rows_updated: _Optional[int] = ..., last_snapshot_tag: _Optional[str] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("indices",)
    INDICES_FIELD_NUMBER: _ClassVar[int]
    indices: Tensor
    def __init__(self, indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("k", "seed")
    K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    k: int
    seed: int
    def __init__(self, k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("indices", "rows")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    indices: Tensor
    rows: Tensor
    def __init__(self, indices: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("indices", "features", "momentum", "client_id", "sequence")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    indices: Tensor
    features: Tensor
    momentum: float
    client_id: str
    sequence: int
    def __init__(self, indices: _Optional[_Union[Tensor, _Mapping]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., momentum: _Optional[float] = ..., client_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("applied", "updates_applied")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    updates_applied: int
    def __init__(self, applied: _Optional[bool] = ..., updates_applied: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("update", "lookup_indices", "sample_k", "sample_seed")
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_INDICES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SEED_FIELD_NUMBER: _ClassVar[int]
    update: UpdateRequest
    lookup_indices: Tensor
    sample_k: int
    sample_seed: int
    def __init__(self, update: _Optional[_Union[UpdateRequest, _Mapping]] = ..., lookup_indices: _Optional[_Union[Tensor, _Mapping]] = ..., sample_k: _Optional[int] = ..., sample_seed: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("update_applied", "rows", "sample_indices", "sample_rows")
    UPDATE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDICES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ROWS_FIELD_NUMBER: _ClassVar[int]
    update_applied: bool
    rows: Tensor
    sample_indices: Tensor
    sample_rows: Tensor
    def __init__(self, update_applied: _Optional[bool] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ..., sample_indices: _Optional[_Union[Tensor, _Mapping]] = ..., sample_rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PartitionSumRequest(_message.Message):
    __slots__ = ("queries", "temperature")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    queries: Tensor
    temperature: float
    def __init__(self, queries: _Optional[_Union[Tensor, _Mapping]] = ..., temperature: _Optional[float] = ...) -> None: ...

class PartitionSumResponse(_message.Message):
    __slots__ = ("max_logit", "sum_exp", "weighted_sum")
    MAX_LOGIT_FIELD_NUMBER: _ClassVar[int]
    SUM_EXP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_SUM_FIELD_NUMBER: _ClassVar[int]
    max_logit: Tensor
    sum_exp: Tensor
    weighted_sum: Tensor
    def __init__(self, max_logit: _Optional[_Union[Tensor, _Mapping]] = ..., sum_exp: _Optional[_Union[Tensor, _Mapping]] = ..., weighted_sum: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TopKRequest(_message.Message):
    __slots__ = ("queries", "k")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    queries: Tensor
    k: int
    def __init__(self, queries: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ...) -> None: ...

class TopKResponse(_message.Message):
    __slots__ = ("similarities", "indices")
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    similarities: Tensor
    indices: Tensor
    def __init__(self, similarities: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class SnapshotResponse(_message.Message):
    __slots__ = ("path", "bytes", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    seconds: float
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("tag", "path")
    TAG_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    tag: str
    path: str
    def __init__(self, tag: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...
