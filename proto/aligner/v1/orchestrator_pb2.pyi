from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("run_id", "step", "max_steps", "phase", "policy_version", "last_step_unix_time", "stopping", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    max_steps: int
    phase: str
    policy_version: int
    last_step_unix_time: float
    stopping: bool
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., max_steps: _Optional[int] = ..., phase: _Optional[str] = ..., policy_version: _Optional[int] = ..., last_step_unix_time: _Optional[float] = ..., stopping: _Optional[bool] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("save_checkpoint",)
    SAVE_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    save_checkpoint: bool
    def __init__(self, save_checkpoint: _Optional[bool] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("accepted", "step")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    step: int
    def __init__(self, accepted: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...
