"""The types the GetAudio client and its callers share: ranges, what a stream serves, results, errors.

Kept apart from the client so that validating a manifest or writing a clip does not import gRPC (the
shape of Beam's `io/aws/clients/s3/messages.py` beside its clients).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from pipeline.core.audio import BYTES_PER_SAMPLE, SAMPLES_PER_MS

BAD_STREAM = "BAD_STREAM"  # the error code of a stream that breaks the GetAudio contract
MASK = "***"  # what stands for a key in a message
# Shaped like a key: 32 or more characters of A-Z a-z 0-9 _ - with a letter and a digit among them (hex keys,
# URL-safe base64 tokens, UUIDs). The words, host names and status names of a message are shorter or all letters.
_KEY_SHAPED = re.compile(
    r"(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_-]*[0-9])(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])"
)


@dataclass(frozen=True)
class TimeRange:
    start_ms: int
    duration_ms: int


@dataclass(frozen=True)
class TokenRange:
    token_start: int
    token_end: int  # exclusive


Segment = TimeRange | TokenRange


@dataclass(frozen=True)
class StreamInfo:
    """What the server says it serves, from the stream's first message."""

    object_id: str
    start_ms: int
    duration_ms: int
    total_duration_ms: int
    channels: int

    @property
    def num_frames(self) -> int:
        return self.duration_ms * SAMPLES_PER_MS

    @property
    def frame_bytes(self) -> int:
        return self.channels * BYTES_PER_SAMPLE


class AudioSink(Protocol):
    """Receives one clip: `begin` once before any audio, then `write` with whole PCM frames."""

    def begin(self, info: StreamInfo) -> None: ...

    def write(self, pcm: bytes) -> None: ...


@dataclass(frozen=True)
class AudioResult:
    """What was served and what it took."""

    info: StreamInfo
    num_frames: int  # samples per channel written to the sink
    attempts: int
    seconds: float
    throttled: int = 0  # times a call was held back by client-side throttling
    failures: tuple[str, ...] = ()  # the status of each failed attempt, in order
    waited_s: float = 0.0  # held back by throttling or backing off after failures


@dataclass(frozen=True)
class ObjectToken:
    idx: int
    text: str
    start_ms: int
    duration_ms: int
    speaker: int | None = None  # the service's speaker_id; None when it gave none (0)
    confidence: float | None = None  # None when the service gave none (0)


@dataclass(frozen=True)
class ObjectInfo:
    object_id: str
    duration_ms: int
    channels: int
    tokens: tuple[ObjectToken, ...] | None  # None: the object has no transcript


class GetAudioError(Exception):
    """A call that failed for good: `code` is the gRPC status name (or BAD_STREAM)."""

    def __init__(self, code: str, message: str, attempts: int, failures: tuple[str, ...] = (), waited_s: float = 0.0):
        super().__init__(f"{code}: {message} (after {attempts} attempt{'s' if attempts != 1 else ''})")
        self.code = code
        self.message = message
        self.attempts = attempts
        self.failures = failures or (code,)  # the status of each failed attempt, in order
        self.waited_s = waited_s  # held back by throttling or backing off after failures


class Secret:
    """A string that never shows itself in a repr, a log line or an exception."""

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def mask(self, text: str, keep: tuple[str, ...] = ()) -> str:
        """`text` (a server's words) with this key and anything shaped like a key masked: a server may echo the
        request it was sent, and its words go into the errors table and the log. `keep`: tokens to leave as
        they are (the object ID the request named, which the row holds anyway)."""
        if self._value:
            text = text.replace(self._value, MASK)
        return mask_key_shaped(text, keep)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):  # pickling would write the key into Beam's serialized graph
        raise TypeError("a Secret is not picklable; pass an api_key_file or SONIOX_API_KEY instead")


def mask_key_shaped(text: str, keep: tuple[str, ...] = ()) -> str:
    """`text` with every token shaped like a key (another project's, a token a proxy adds) masked, but `keep`."""
    return _KEY_SHAPED.sub(lambda m: m.group() if m.group() in keep else MASK, text)
