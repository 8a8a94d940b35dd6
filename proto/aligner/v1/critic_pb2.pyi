from aligner.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValuesRequest(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.RaggedTensor
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ...) -> None: ...

class ValuesResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _tensor_pb2.RaggedTensor
    def __init__(self, values: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("tokens", "mask", "returns", "old_values", "rollout_id")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    tokens: _tensor_pb2.RaggedTensor
    mask: _tensor_pb2.RaggedTensor
    returns: _tensor_pb2.RaggedTensor
    old_values: _tensor_pb2.RaggedTensor
    rollout_id: str
    def __init__(self, tokens: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., mask: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., returns: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., old_values: _Optional[_Union[_tensor_pb2.RaggedTensor, _Mapping]] = ..., rollout_id: _Optional[str] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("step", "metrics", "replayed", "rollout_id")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    step: int
    metrics: _containers.ScalarMap[str, float]
    replayed: bool
    rollout_id: str
    def __init__(self, step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., replayed: _Optional[bool] = ..., rollout_id: _Optional[str] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("path", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("path", "initial")
    PATH_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    path: str
    initial: bool
    def __init__(self, path: _Optional[str] = ..., initial: _Optional[bool] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CriticInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CriticInfoResponse(_message.Message):
    __slots__ = ("step", "incarnation", "last_rollout_id", "initial", "checkpoint_path", "remembered_rollouts")
    STEP_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LAST_ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    INITIAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    REMEMBERED_ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    step: int
    incarnation: str
    last_rollout_id: str
    initial: bool
    checkpoint_path: str
    remembered_rollouts: int
    def __init__(self, step: _Optional[int] = ..., incarnation: _Optional[str] = ..., last_rollout_id: _Optional[str] = ..., initial: _Optional[bool] = ..., checkpoint_path: _Optional[str] = ..., remembered_rollouts: _Optional[int] = ...) -> None: ...
