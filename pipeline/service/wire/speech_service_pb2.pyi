import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetAudioRequest(_message.Message):
    __slots__ = ("api_key", "object_id", "time_segment", "token_segment", "audio_bytes_format")
    class TimeSegment(_message.Message):
        __slots__ = ("start_ms", "duration_ms")
        START_MS_FIELD_NUMBER: _ClassVar[int]
        DURATION_MS_FIELD_NUMBER: _ClassVar[int]
        start_ms: int
        duration_ms: int
        def __init__(self, start_ms: _Optional[int] = ..., duration_ms: _Optional[int] = ...) -> None: ...
    class TokenSegment(_message.Message):
        __slots__ = ("token_start", "token_end")
        TOKEN_START_FIELD_NUMBER: _ClassVar[int]
        TOKEN_END_FIELD_NUMBER: _ClassVar[int]
        token_start: int
        token_end: int
        def __init__(self, token_start: _Optional[int] = ..., token_end: _Optional[int] = ...) -> None: ...
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_BYTES_FORMAT_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    object_id: str
    time_segment: GetAudioRequest.TimeSegment
    token_segment: GetAudioRequest.TokenSegment
    audio_bytes_format: str
    def __init__(self, api_key: _Optional[str] = ..., object_id: _Optional[str] = ..., time_segment: _Optional[_Union[GetAudioRequest.TimeSegment, _Mapping]] = ..., token_segment: _Optional[_Union[GetAudioRequest.TokenSegment, _Mapping]] = ..., audio_bytes_format: _Optional[str] = ...) -> None: ...

class GetAudioResponse(_message.Message):
    __slots__ = ("object_id", "start_ms", "duration_ms", "total_duration_ms", "num_audio_channels", "data")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_AUDIO_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    start_ms: int
    duration_ms: int
    total_duration_ms: int
    num_audio_channels: int
    data: bytes
    def __init__(self, object_id: _Optional[str] = ..., start_ms: _Optional[int] = ..., duration_ms: _Optional[int] = ..., total_duration_ms: _Optional[int] = ..., num_audio_channels: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetObjectRequest(_message.Message):
    __slots__ = ("api_key", "object_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    object_id: str
    def __init__(self, api_key: _Optional[str] = ..., object_id: _Optional[str] = ...) -> None: ...

class GetObjectResponse(_message.Message):
    __slots__ = ("object",)
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    object: StoredObject
    def __init__(self, object: _Optional[_Union[StoredObject, _Mapping]] = ...) -> None: ...

class StoredObject(_message.Message):
    __slots__ = ("object_id", "metadata", "title", "datetime", "stored_datetime", "duration_ms", "num_audio_channels", "audio_stored", "transcript")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    DATETIME_FIELD_NUMBER: _ClassVar[int]
    STORED_DATETIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_AUDIO_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_STORED_FIELD_NUMBER: _ClassVar[int]
    TRANSCRIPT_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    metadata: _containers.ScalarMap[str, str]
    title: str
    datetime: _timestamp_pb2.Timestamp
    stored_datetime: _timestamp_pb2.Timestamp
    duration_ms: int
    num_audio_channels: int
    audio_stored: bool
    transcript: Transcript
    def __init__(self, object_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., title: _Optional[str] = ..., datetime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stored_datetime: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duration_ms: _Optional[int] = ..., num_audio_channels: _Optional[int] = ..., audio_stored: _Optional[bool] = ..., transcript: _Optional[_Union[Transcript, _Mapping]] = ...) -> None: ...

class Transcript(_message.Message):
    __slots__ = ("text", "tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("idx", "text_start", "text_end", "text", "start_ms", "duration_ms", "confidence", "speaker_id", "profane")
    IDX_FIELD_NUMBER: _ClassVar[int]
    TEXT_START_FIELD_NUMBER: _ClassVar[int]
    TEXT_END_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SPEAKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROFANE_FIELD_NUMBER: _ClassVar[int]
    idx: int
    text_start: int
    text_end: int
    text: str
    start_ms: int
    duration_ms: int
    confidence: float
    speaker_id: int
    profane: bool
    def __init__(self, idx: _Optional[int] = ..., text_start: _Optional[int] = ..., text_end: _Optional[int] = ..., text: _Optional[str] = ..., start_ms: _Optional[int] = ..., duration_ms: _Optional[int] = ..., confidence: _Optional[float] = ..., speaker_id: _Optional[int] = ..., profane: _Optional[bool] = ...) -> None: ...
