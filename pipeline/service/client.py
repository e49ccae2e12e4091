"""The GetAudio client: one shared channel, the API key kept secret, deadlines, retries and resume.

It knows nothing of Beam. Audio is handed to a caller's `AudioSink` as 16-bit interleaved PCM while it
arrives, whatever the transfer format, so memory does not grow with a clip's length. A stream that
breaks after some audio arrived is resumed with a time-range request for the rest, and the joined
audio is sample-identical to an unbroken call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import grpc.experimental

from pipeline.core.audio import SAMPLE_RATE, SAMPLES_PER_MS, WavHeaderError, parse_wav_header
from pipeline.core.messages import (
    BAD_STREAM,
    AudioResult,
    AudioSink,
    GetAudioError,
    ObjectInfo,
    ObjectToken,
    Secret,
    Segment,
    StreamInfo,
    TimeRange,
)
from pipeline.service.throttle import AdaptiveThrottler, WaitClock
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_API_HOST = "https://api.soniox.com:443"
MAX_MESSAGE_BYTES = 6 * 1024 * 1024  # as the official SDK
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        # The client never cancels its own calls (its deadline is DEADLINE_EXCEEDED): a CANCELLED comes from a
        # server shutting down or a proxy in between, as UNAVAILABLE would.
        grpc.StatusCode.CANCELLED,
    }
)


class _StreamBroken(Exception):
    """A stream ended early without an error status: resumable like UNAVAILABLE."""


class _BadStream(Exception):
    """The stream broke the contract: never retried, never written as a clip."""


def resolve_host(api_host: str | None = None) -> tuple[str, bool]:
    """(target, use_tls): argument, else SONIOX_API_HOST, else the public endpoint.

    TLS unless the host is given as http://...; a host with no scheme also gets TLS (stricter than
    the SDK, which treats it as plaintext) so that a key is never sent in the clear by mistake.
    """
    host = api_host or os.environ.get("SONIOX_API_HOST") or DEFAULT_API_HOST
    if host.startswith("http://"):
        return host[len("http://") :].rstrip("/"), False
    if host.startswith("https://"):
        host = host[len("https://") :]
    return host.rstrip("/"), True


def open_channel(target: str, tls: bool) -> grpc.Channel:
    """The client's channel, shared by every thread and call that uses the client."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Reconnect within seconds when a server comes back (gRPC's default backoff grows to 2 min,
        # longer than our retry budget).
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        # Each GetAudio stream is read by the thread that made the call, polling its own completion queue:
        # without this, gRPC's channel thread takes every message and wakes the reader, a thread hand-off
        # per message that cost about 7% of the pipeline's CPU per clip (docs/performance.md).
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]
    if tls:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter over a set of retryable codes, and a time floor under the budget.

    `max_attempts` bounds the attempts in a row that bring no new audio; a resumed stream that made
    progress starts the count again, so a long clip is not lost to a network that breaks it often.

    The last attempt of such a streak is not made before the streak has lasted `min_budget_s`, so that the
    budget measures the service, not the channel. While a server restarts every attempt fails at once
    (connection refused, then failed fast while gRPC's reconnect backoff runs): six attempts went in about 2 s,
    and a 2 s restart lost rows. Not counting attempts made while the channel reconnects would also need a time
    limit (for a server that never comes back), and the channel's state says nothing behind a proxy or load
    balancer, which stays connected while the service behind it answers UNAVAILABLE. Only the last attempt
    waits: a sporadic failure is still retried within a second, and `max_attempts` still counts every attempt.
    10 s covers a restart of a few seconds plus the channel's reconnect backoff (at most 5 s, `open_channel`);
    a service that stays down costs each row those 10 s before its error.
    """

    max_attempts: int = 6
    retry_codes: frozenset[grpc.StatusCode] = RETRYABLE
    backoff_base_s: float = 0.25
    backoff_max_s: float = 20.0
    min_budget_s: float = 10.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1)))

    def delay(self, failures: int, streak_s: float) -> float:
        """The wait after `failures` attempts in a row without progress, the first of them `streak_s` ago."""
        delay = self.backoff(failures)
        if failures == self.max_attempts - 1:  # the next attempt is the last
            delay = max(delay, self.min_budget_s - streak_s)
        return delay


@dataclass
class _Call:
    """One call's own record across its attempts, passed along (not kept per thread): what its result or its
    error reports, and the streak of attempts without progress that the retry policy counts."""

    object_id: str
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    held: int = 0  # times held back by client-side throttling
    failures: list[str] = field(default_factory=list)  # the status of each failed attempt, in order
    waited_s: float = 0.0  # held back, backing off or in `hooks.before_attempt`
    streak: int = 0  # failed attempts in a row that brought no audio
    streak_started: float = 0.0  # when the first of them failed

    def failed(self, code: str, progressed: bool) -> None:
        """Record a failed attempt; one that brought audio starts a new streak, so a long clip on a flaky
        network keeps going while each attempt makes progress."""
        self.failures.append(code)
        self.streak = 1 if progressed else self.streak + 1
        if self.streak == 1:
            self.streak_started = time.monotonic()


@dataclass(frozen=True)
class CallHooks:
    """What a caller adds around the client's calls without the client knowing of it (the Beam step's job-wide
    rate limit and throttling signal: the client knows nothing of Beam)."""

    # Called before every GetAudio attempt, retries included; it may block (a rate limit's go-ahead), and the
    # time it takes counts as waiting.
    before_attempt: Callable[[], object] | None = None
    # Every wait of every call (held back, backing off, in `before_attempt`), shown while it lasts.
    clock: WaitClock | None = None


class GetAudioClient:
    """GetAudio and GetObject with deadlines, retries, resume and client-side throttling."""

    def __init__(
        self,
        api_host: str | None = None,
        api_key: Secret | str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        rpc_timeout_s: float = 60.0,
        timeout_per_audio_s: float = 0.1,
    ):
        """`rpc_timeout_s` + `timeout_per_audio_s` x the clip's seconds is each attempt's deadline."""
        target, tls = resolve_host(api_host)
        self.target = target
        self.tls = tls
        self._key = api_key if isinstance(api_key, Secret) else Secret(api_key or "")
        self._channel = open_channel(target, tls)
        self._stub = pb_grpc.SpeechServiceStub(self._channel)
        self.retry = retry
        self.rpc_timeout_s = rpc_timeout_s
        self.timeout_per_audio_s = timeout_per_audio_s
        self.throttler = AdaptiveThrottler()
        self.hooks = CallHooks()  # set by the caller before its first call

    def __repr__(self) -> str:
        return f"GetAudioClient(target={self.target!r}, tls={self.tls})"

    def close(self) -> None:
        self._channel.close()

    def _deadline(self, duration_ms: int | None) -> float:
        return self.rpc_timeout_s + self.timeout_per_audio_s * (duration_ms or 0) / 1000

    # -- GetAudio ---------------------------------------------------------------------------------------
    def get_audio(
        self, object_id: str, segment: Segment, sink: AudioSink, audio_format: str = "pcm_s16le"
    ) -> AudioResult:
        """Stream one clip into `sink`; raises GetAudioError when it cannot be had. Both say how long the
        call waited (held back, backing off, or in `hooks.before_attempt`), for the run's record."""
        call, stream = _Call(object_id), _Stream(sink, audio_format)

        def attempt() -> AudioResult:
            request = self._request(object_id, segment, stream, audio_format)
            duration = stream.remaining_ms if stream.info else getattr(segment, "duration_ms", None)
            stream.consume(self._stub.GetAudio(request, timeout=self._deadline(duration)))
            return stream.result(call)

        def finished() -> AudioResult | None:  # every frame arrived before the error
            return stream.result(call) if stream.complete else None

        return self._retried(call, attempt, lambda: stream.frames_done, finished, hooked=True)

    def _request(self, object_id: str, segment: Segment, stream: _Stream, fmt: str) -> pb.GetAudioRequest:
        request = pb.GetAudioRequest(api_key=self._key.reveal(), object_id=object_id, audio_bytes_format=fmt)
        if stream.info is not None:  # resume from the first whole millisecond not yet received
            start_ms, duration_ms = stream.resume_range()
            request.time_segment.start_ms, request.time_segment.duration_ms = start_ms, duration_ms
        elif isinstance(segment, TimeRange):
            request.time_segment.start_ms, request.time_segment.duration_ms = segment.start_ms, segment.duration_ms
        else:
            request.token_segment.token_start, request.token_segment.token_end = segment.token_start, segment.token_end
        return request

    # -- GetObject --------------------------------------------------------------------------------------
    def get_object(self, object_id: str) -> ObjectInfo:
        """An object's duration, channels and transcript tokens, with the same retries as GetAudio."""
        request = pb.GetObjectRequest(api_key=self._key.reveal(), object_id=object_id)
        obj = self._retried(_Call(object_id), lambda: self._stub.GetObject(request, timeout=self.rpc_timeout_s).object)
        return ObjectInfo(obj.object_id, obj.duration_ms, obj.num_audio_channels, _tokens(obj))

    # -- retries, shared ----------------------------------------------------------------------------------
    def _retried(
        self,
        call: _Call,
        attempt: Callable[[], T],
        progress: Callable[[], int] = lambda: 0,
        finished: Callable[[], T | None] = lambda: None,
        hooked: bool = False,
    ) -> T:
        """`attempt` until it succeeds or a failure is final: one loop, so that GetAudio and GetObject retry,
        throttle, back off and keep their record alike. GetAudio's `progress` (frames received) starts a new
        streak when it grows, `finished` is its result when every frame arrived before an error, and its attempts
        are `hooked` (they wait for `hooks.before_attempt`)."""
        while True:
            call.attempts += 1
            before = progress()
            self._throttle_wait(call)
            if hooked:  # outside the try: a rate limit service's own RpcError is not GetAudio's
                self._before_attempt(call)
            try:
                result = attempt()
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            except _StreamBroken as e:
                code, details = grpc.StatusCode.UNAVAILABLE, str(e)
            except _BadStream as e:
                call.failures.append(BAD_STREAM)
                raise self._error(BAD_STREAM, str(e), call) from None
            else:
                self.throttler.accepted()
                return result
            call.failed(code.name, progress() > before)
            if (done := finished()) is not None:
                return done
            self._after_failure(code, details, call)

    def _throttle_wait(self, call: _Call) -> None:
        """Hold a call back while the server has been refusing many (client-side adaptive throttling)."""
        while self.throttler.should_hold():
            call.held += 1
            self._wait(self.retry.backoff(call.attempts), call)

    def _before_attempt(self, call: _Call) -> None:
        if self.hooks.before_attempt is not None:
            with self._waiting(call):
                self.hooks.before_attempt()

    def _wait(self, seconds: float, call: _Call) -> None:
        with self._waiting(call):
            time.sleep(seconds)

    @contextlib.contextmanager
    def _waiting(self, call: _Call) -> Iterator[None]:
        """The block's time is the current call's waiting, and on the hooks' clock while it lasts."""
        started = time.monotonic()
        try:
            with self.hooks.clock.waiting() if self.hooks.clock else contextlib.nullcontext():
                yield
        finally:
            call.waited_s += time.monotonic() - started

    def _after_failure(self, code: grpc.StatusCode, details: str, call: _Call) -> None:
        """Raise when the failure is final; otherwise back off before the next attempt. The policy counts the
        call's streak of attempts without progress; `call.attempts` is the total for the record."""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.throttler.rejected()
        if code not in self.retry.retry_codes or call.streak >= self.retry.max_attempts:
            raise self._error(code.name, details, call)
        delay = self.retry.delay(call.streak, time.monotonic() - call.streak_started)
        log.debug(  # `status` is the code's name, for a reader of the records (tests watch retries this way)
            "call for %s: %s on attempt %d, retrying in %.2fs",
            call.object_id,
            code.name,
            call.attempts,
            delay,
            extra={"status": code.name},
        )
        self._wait(delay, call)

    def _error(self, code: str, message: str, call: _Call) -> GetAudioError:
        """The final error, with the key and anything shaped like one masked in the server's words: a server may
        echo the request, and the message goes into the errors table and the log. The object ID stays."""
        message = self._key.mask(message, keep=(call.object_id,))
        return GetAudioError(code, message, call.attempts, tuple(call.failures), call.waited_s)


def _tokens(obj: pb.StoredObject) -> tuple[ObjectToken, ...] | None:
    """The transcript's tokens, or None for an object with no transcript (so a clip of it gets a null
    transcript, not the empty one of a range with no words). proto3 sends 0 for a speaker or confidence
    the service did not give: those become None."""
    if not obj.HasField("transcript"):
        return None
    return tuple(
        ObjectToken(t.idx, t.text, t.start_ms, t.duration_ms, t.speaker_id or None, t.confidence or None)
        for t in obj.transcript.tokens
    )


class _Stream:
    """One clip's progress across attempts: checks each stream and feeds whole frames to the sink."""

    def __init__(self, sink: AudioSink, audio_format: str):
        self.sink = sink
        self.wav = audio_format == "wav"
        self.info: StreamInfo | None = None
        self.frames_done = 0

    def result(self, call: _Call) -> AudioResult:
        elapsed = time.monotonic() - call.started
        failures = tuple(call.failures)
        return AudioResult(self.info, self.frames_done, call.attempts, elapsed, call.held, failures, call.waited_s)

    @property
    def complete(self) -> bool:
        return self.info is not None and self.frames_done == self.info.num_frames

    @property
    def remaining_ms(self) -> int:
        return self.resume_range()[1]

    def resume_range(self) -> tuple[int, int]:
        """(start_ms, duration_ms) of a time range that covers every frame not yet received."""
        done_ms = self.frames_done // SAMPLES_PER_MS
        return self.info.start_ms + done_ms, self.info.duration_ms - done_ms

    def consume(self, messages: Iterator[pb.GetAudioResponse]) -> None:
        """Read one attempt's stream to its end; progress survives an exception part-way, so a retry resumes."""
        resumed_at = self.frames_done - self.frames_done % SAMPLES_PER_MS  # the frame this attempt asked from
        info = self._begin(_stream_info(messages))
        expected = (info.num_frames - resumed_at) * info.frame_bytes
        chunks = _data(messages)
        if self.wav:
            chunks = self._without_wav_header(chunks, expected)
        chunks = _skipped(_counted(chunks, expected), (self.frames_done - resumed_at) * info.frame_bytes)
        self._write(chunks, info.frame_bytes)

    def _begin(self, info: StreamInfo) -> StreamInfo:
        """The clip's metadata: the first attempt's goes to the sink; a resumed stream must serve exactly the
        rest, or its audio would not join the frames already written."""
        if self.info is None:
            self.info = info
            self.sink.begin(info)
            return info
        start_ms, duration_ms = self.resume_range()
        if (info.start_ms, info.duration_ms, info.channels) != (start_ms, duration_ms, self.info.channels):
            raise _BadStream(f"resumed stream serves {info}, not {start_ms}+{duration_ms} ms")
        return self.info

    def _without_wav_header(self, chunks: Iterator[bytes], expected: int) -> Iterator[bytes]:
        """The audio after a WAV stream's header: the sink takes bare PCM whatever the transfer format, and the
        header (which may span messages) must agree with the metadata."""
        buf = b""
        for chunk in chunks:
            buf += chunk
            if (offset := self._wav_data_offset(buf, expected)) is not None:
                yield buf[offset:]
                break
        yield from chunks

    def _wav_data_offset(self, buf: bytes, expected: int) -> int | None:
        """Where the audio starts once the header is whole (None before), checked against the metadata."""
        try:
            header = parse_wav_header(buf)
        except WavHeaderError as e:
            raise _BadStream(str(e)) from None
        if header is None:
            return None
        channels = self.info.channels
        if (header.channels, header.sample_rate, header.data_bytes) != (channels, SAMPLE_RATE, expected):
            raise _BadStream(
                f"WAV header says {header.channels} ch, {header.sample_rate} Hz, {header.data_bytes} bytes; "
                f"metadata says {channels} ch, {SAMPLE_RATE} Hz, {expected} bytes"
            )
        return header.data_offset

    def _write(self, chunks: Iterator[bytes], frame_bytes: int) -> None:
        """Hand whole frames to the sink as they arrive, carrying a split frame over: progress is counted in
        frames, which a resumed request can ask for."""
        carry = b""
        for chunk in chunks:
            data = carry + chunk
            whole = len(data) - len(data) % frame_bytes
            if whole:
                self.sink.write(data[:whole])
                self.frames_done += whole // frame_bytes
            carry = data[whole:]


def _stream_info(messages: Iterator[pb.GetAudioResponse]) -> StreamInfo:
    """The first message's metadata, checked: it alone says which audio follows and how much."""
    msg = next(messages, None)
    if msg is None:
        raise _BadStream("stream ended before its metadata message")
    if msg.data:
        raise _BadStream("the first message carries audio data; it must carry metadata only")
    info = StreamInfo(msg.object_id, msg.start_ms, msg.duration_ms, msg.total_duration_ms, msg.num_audio_channels)
    if info.channels < 1 or info.duration_ms <= 0 or info.start_ms < 0:
        raise _BadStream(f"metadata is not a servable clip: {info}")
    return info


def _data(messages: Iterator[pb.GetAudioResponse]) -> Iterator[bytes]:
    """The audio of the messages after the first, which carry audio only: metadata in one is a server that
    does not keep the contract this reader relies on."""
    for msg in messages:
        if msg.object_id or msg.start_ms or msg.duration_ms or msg.total_duration_ms or msg.num_audio_channels:
            raise _BadStream("a data message carries metadata; only the first message may")
        yield msg.data


def _counted(chunks: Iterator[bytes], expected: int) -> Iterator[bytes]:
    """The audio, held to the byte count the metadata announced: more breaks the contract (never retried);
    fewer when the stream ends is a break without an error status, resumed like UNAVAILABLE."""
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > expected:
            raise _BadStream(f"stream sent more than the {expected} audio bytes its metadata announced")
        yield chunk
    if received < expected:
        raise _StreamBroken(f"stream ended after {received} of {expected} audio bytes")


def _skipped(chunks: Iterator[bytes], skip: int) -> Iterator[bytes]:
    """The audio without its first `skip` bytes: a resumed range starts on a whole millisecond, so it repeats
    the frames of that millisecond already written."""
    for chunk in chunks:
        if skip:
            cut = min(skip, len(chunk))
            chunk, skip = chunk[cut:], skip - cut
        yield chunk
