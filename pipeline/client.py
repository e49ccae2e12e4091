"""The GetAudio client: one shared channel, the API key kept secret, deadlines, retries and resume.

It knows nothing of Beam. Audio is handed to a caller's `AudioSink` as 16-bit interleaved PCM while it
arrives, whatever the transfer format, so memory does not grow with a clip's length. A stream that
breaks after some audio arrived is resumed with a time-range request for the rest, and the joined
audio is sample-identical to an unbroken call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import grpc.experimental

from pipeline.audio import SAMPLE_RATE, SAMPLES_PER_MS, WavHeaderError, parse_wav_header
from pipeline.messages import (
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
from pipeline.throttle import AdaptiveThrottler, WaitClock
from pipeline.wire import speech_service_pb2 as pb
from pipeline.wire import speech_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

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
    """One call's own record across its attempts, passed along (not kept per thread): the seconds it waited,
    held back, backing off or in `hooks.before_attempt`, which its result or its error reports."""

    waited_s: float = 0.0


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
        call = _Call()
        result = self._get_audio(object_id, segment, sink, audio_format, call)
        return dataclasses.replace(result, waited_s=call.waited_s)

    def _get_audio(
        self, object_id: str, segment: Segment, sink: AudioSink, audio_format: str, call: _Call
    ) -> AudioResult:
        started = time.monotonic()
        stream = _Stream(sink, audio_format)
        attempt = failures = held = 0  # failures: consecutive attempts that brought no audio
        streak_started = started  # when the first of those failed
        seen: list[str] = []
        while True:
            attempt += 1
            frames_before = stream.frames_done
            request = self._request(object_id, segment, stream, audio_format)
            duration = stream.remaining_ms if stream.info else getattr(segment, "duration_ms", None)
            held += self._throttle_wait(attempt, call)
            self._before_attempt(call)  # outside the try: a rate limit service's own RpcError is not GetAudio's
            try:
                stream.consume(self._stub.GetAudio(request, timeout=self._deadline(duration)))
                self.throttler.accepted()
                return stream.result(attempt, time.monotonic() - started, held, seen)
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            except _StreamBroken as e:
                code, details = grpc.StatusCode.UNAVAILABLE, str(e)
            except _BadStream as e:
                raise self._error(BAD_STREAM, str(e), attempt, (*seen, BAD_STREAM), object_id, call) from None
            seen.append(code.name)
            if stream.complete:  # every frame arrived before the error
                return stream.result(attempt, time.monotonic() - started, held, seen)
            failures = 1 if stream.frames_done > frames_before else failures + 1
            if failures == 1:
                streak_started = time.monotonic()
            streak_s = time.monotonic() - streak_started
            self._after_failure(code, details, failures, object_id, call, attempt, tuple(seen), streak_s)

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

    def _throttle_wait(self, attempt: int, call: _Call) -> int:
        """Hold a call back while the server has been refusing many (client-side adaptive throttling);
        returns how many times it was held."""
        held = 0
        while self.throttler.should_hold():
            held += 1
            self._wait(self.retry.backoff(attempt), call)
        return held

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

    def _after_failure(
        self,
        code: grpc.StatusCode,
        details: str,
        failures: int,
        object_id: str,
        call: _Call,
        attempt: int | None = None,
        seen: tuple[str, ...] = (),
        streak_s: float = 0.0,
    ) -> None:
        """Raise when the failure is final; otherwise back off before the next attempt.

        `failures` counts consecutive attempts that brought no audio, the first of them `streak_s` ago: a long
        clip on a flaky network keeps going while each attempt makes progress, and `attempt` is the total for
        the record.
        """
        attempt = attempt or failures
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.throttler.rejected()
        if code not in self.retry.retry_codes or failures >= self.retry.max_attempts:
            raise self._error(code.name, details, attempt, seen, object_id, call)
        delay = self.retry.delay(failures, streak_s)
        log.debug("GetAudio %s: %s on attempt %d, retrying in %.2fs", object_id, code.name, attempt, delay)
        self._wait(delay, call)

    def _error(
        self, code: str, message: str, attempt: int, seen: tuple[str, ...], object_id: str, call: _Call
    ) -> GetAudioError:
        """The final error, with the key and anything shaped like one masked in the server's words: a server may
        echo the request, and the message goes into the errors table and the log. The object ID stays."""
        return GetAudioError(code, self._key.mask(message, keep=(object_id,)), attempt, seen, call.waited_s)

    # -- GetObject --------------------------------------------------------------------------------------
    def get_object(self, object_id: str) -> ObjectInfo:
        """An object's duration, channels and transcript tokens, with the same retries as GetAudio."""
        request = pb.GetObjectRequest(api_key=self._key.reveal(), object_id=object_id)
        attempt, first_failure, call = 0, None, _Call()
        while True:
            attempt += 1
            try:
                self._throttle_wait(attempt, call)
                obj = self._stub.GetObject(request, timeout=self.rpc_timeout_s).object
                self.throttler.accepted()
                break
            except grpc.RpcError as e:
                first_failure = first_failure or time.monotonic()
                streak_s = time.monotonic() - first_failure
                self._after_failure(e.code(), e.details() or "", attempt, object_id, call, streak_s=streak_s)
        return ObjectInfo(obj.object_id, obj.duration_ms, obj.num_audio_channels, _tokens(obj))


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

    def result(self, attempts: int, seconds: float, throttled: int, failures: list[str]) -> AudioResult:
        return AudioResult(self.info, self.frames_done, attempts, seconds, throttled, tuple(failures))

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

    def consume(self, call: Iterator[pb.GetAudioResponse]) -> None:
        """Read one attempt's stream to its end; progress survives an exception part-way."""
        resume_start = self.frames_done - self.frames_done % SAMPLES_PER_MS
        skip = (self.frames_done - resume_start) * (self.info.frame_bytes if self.info else 0)
        first = next(call, None)
        if first is None:
            raise _BadStream("stream ended before its metadata message")
        info = self._check_metadata(first)
        expected = (info.num_frames - resume_start) * info.frame_bytes
        header, received, carry = b"" if self.wav else None, 0, b""
        for msg in call:
            if msg.object_id or msg.start_ms or msg.duration_ms or msg.total_duration_ms or msg.num_audio_channels:
                raise _BadStream("a data message carries metadata; only the first message may")
            data = msg.data
            if header is not None:
                data, header = self._strip_wav_header(header + data, expected)
            received += len(data)
            if received > expected:
                raise _BadStream(f"stream sent more than the {expected} audio bytes its metadata announced")
            if skip:
                cut = min(skip, len(data))
                data, skip = data[cut:], skip - cut
            data = carry + data
            whole = len(data) - len(data) % info.frame_bytes
            if whole:
                self.sink.write(data[:whole])
                self.frames_done += whole // info.frame_bytes
            carry = data[whole:]
        if received < expected:
            raise _StreamBroken(f"stream ended after {received} of {expected} audio bytes")

    def _check_metadata(self, msg: pb.GetAudioResponse) -> StreamInfo:
        if msg.data:
            raise _BadStream("the first message carries audio data; it must carry metadata only")
        info = StreamInfo(msg.object_id, msg.start_ms, msg.duration_ms, msg.total_duration_ms, msg.num_audio_channels)
        if info.channels < 1 or info.duration_ms <= 0 or info.start_ms < 0:
            raise _BadStream(f"metadata is not a servable clip: {info}")
        if self.info is None:
            self.info = info
            self.sink.begin(info)
            return info
        start_ms, duration_ms = self.resume_range()
        if (info.start_ms, info.duration_ms, info.channels) != (start_ms, duration_ms, self.info.channels):
            raise _BadStream(f"resumed stream serves {info}, not {start_ms}+{duration_ms} ms")
        return self.info

    def _strip_wav_header(self, buf: bytes, expected: int) -> tuple[bytes, bytes | None]:
        """(audio after the header, None) once the header is whole and checked; else (b"", buf)."""
        try:
            header = parse_wav_header(buf)
        except WavHeaderError as e:
            raise _BadStream(str(e)) from None
        if header is None:
            return b"", buf
        channels = self.info.channels
        if (header.channels, header.sample_rate, header.data_bytes) != (channels, SAMPLE_RATE, expected):
            raise _BadStream(
                f"WAV header says {header.channels} ch, {header.sample_rate} Hz, {header.data_bytes} bytes; "
                f"metadata says {channels} ch, {SAMPLE_RATE} Hz, {expected} bytes"
            )
        return buf[header.data_offset :], None
