"""A local GetAudio server: the Soniox SpeechService's GetAudio and GetObject over a directory of audio.

It is what the demo and the tests run against, and what a user runs to try the pipeline on their own
recordings. Store layout: one audio file per object named `{object_id}.wav` or `{object_id}.flac`
(any sample rate, resampled to 16 kHz when loaded; any channel count), and an optional
`{object_id}.json` sidecar with the transcript tokens: `{"tokens": [{"text", "start_ms", "duration_ms"}, ...]}`,
each token optionally with `speaker` (an int from 1) and `confidence` (0..1). An object with no sidecar has no
transcript: GetObject answers without one.

The unpublished parts of the real service are settings here (see `ServerSettings`), and faults can be
injected for tests (see `Faults`).
"""

from __future__ import annotations

import collections
import functools
import hmac
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import soundfile as sf

from pipeline.core.audio import BYTES_PER_SAMPLE, FORMATS, SAMPLE_RATE, SAMPLES_PER_MS, wav_header
from pipeline.core.ids import object_id_problem
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac")


@dataclass(frozen=True)
class Token:
    text: str
    start_ms: int
    duration_ms: int
    speaker: int | None = None
    confidence: float | None = None


@dataclass(frozen=True)
class StoredAudio:
    """One object of the store: its file, its shape at 16 kHz, and its transcript tokens."""

    object_id: str
    path: str
    source_rate: int
    frames: int  # at 16 kHz
    channels: int
    tokens: tuple[Token, ...] | None

    @property
    def duration_ms(self) -> int:
        return self.frames // SAMPLES_PER_MS


class AudioStore:
    """The directory of objects. Lookups go through a scanned index, never a path built from a request."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"audio store {root!r} is not a directory")
        self.root = root
        self._index: dict[str, str] = {}
        self._lock = threading.Lock()
        self._rescan()

    def _rescan(self) -> None:
        index = {}
        for entry in os.scandir(self.root):
            stem, suffix = os.path.splitext(entry.name)
            if suffix.lower() in AUDIO_SUFFIXES and entry.is_file():
                if object_id_problem(stem):
                    log.warning("store file %s skipped: its name is not a valid object ID", entry.name)
                    continue
                index[stem] = entry.path
        with self._lock:
            self._index = index

    def object_ids(self) -> list[str]:
        return sorted(self._index)

    def get(self, object_id: str) -> StoredAudio | None:
        """The object, or None when the store has no such object (rescanning once for new files)."""
        path = self._index.get(object_id)
        if path is None:
            self._rescan()
            path = self._index.get(object_id)
        if path is None:
            return None
        return _describe(object_id, path, os.stat(path).st_mtime_ns)

    def read(self, obj: StoredAudio, start: int, stop: int, block_frames: int) -> Iterator[np.ndarray]:
        """Frames [start, stop) at 16 kHz as int16 arrays of shape (frames, channels), block by block."""
        if obj.source_rate == SAMPLE_RATE:
            with sf.SoundFile(obj.path) as f:
                f.seek(start)
                for pos in range(start, stop, block_frames):
                    yield f.read(min(block_frames, stop - pos), dtype="int16", always_2d=True)
        else:
            audio = _resampled(obj.path, os.stat(obj.path).st_mtime_ns)
            for pos in range(start, stop, block_frames):
                yield audio[pos : min(pos + block_frames, stop)]


@functools.lru_cache(maxsize=4096)
def _describe(object_id: str, path: str, mtime_ns: int) -> StoredAudio:
    info = sf.info(path)
    frames = info.frames if info.samplerate == SAMPLE_RATE else len(_resampled(path, mtime_ns))
    sidecar = os.path.splitext(path)[0] + ".json"
    tokens = None
    if os.path.exists(sidecar):
        with open(sidecar, encoding="utf-8") as f:
            tokens = tuple(_token(t) for t in json.load(f)["tokens"])
    return StoredAudio(object_id, path, info.samplerate, frames, info.channels, tokens)


def _token(t: dict) -> Token:
    speaker, confidence = t.get("speaker"), t.get("confidence")
    return Token(
        str(t["text"]),
        int(t["start_ms"]),
        int(t["duration_ms"]),
        None if speaker is None else int(speaker),
        None if confidence is None else float(confidence),
    )


@functools.lru_cache(maxsize=8)
def _resampled(path: str, mtime_ns: int) -> np.ndarray:
    """The whole file at 16 kHz, int16 (linear interpolation: store 16 kHz files for exact audio)."""
    audio, rate = sf.read(path, dtype="float64", always_2d=True)
    n_out = round(len(audio) * SAMPLE_RATE / rate)
    t_out = np.arange(n_out) * (rate / SAMPLE_RATE)
    t_in = np.arange(len(audio))
    out = np.stack([np.interp(t_out, t_in, audio[:, c]) for c in range(audio.shape[1])], axis=1)
    return np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)


@dataclass
class Faults:
    """Injected faults, each a fraction of GetAudio calls (0..1), drawn from a seeded generator."""

    latency_s: float = 0.0  # added to every call before the first message
    fail_fraction: float = 0.0  # fail before any message with `fail_code`
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    break_fraction: float = 0.0  # break with UNAVAILABLE after half the data chunks
    throttle_fraction: float = 0.0  # fail before any message with RESOURCE_EXHAUSTED
    slow_fraction: float = 0.0  # wait `slow_s` before the first message (to outlast a deadline)
    slow_s: float = 30.0
    seed: int = 0


@dataclass
class ServerSettings:
    """The service's unpublished behaviour, made explicit."""

    api_key: str | None = None  # when set, every request must carry it
    token_padding_ms: int = 100  # a token range is widened by this much on each side
    chunk_bytes: int = 64 * 1024  # data bytes per message, well under the 6 MiB message limit
    clip_past_end: bool = False  # False: OUT_OF_RANGE for a time range past the end; True: clip it
    faults: Faults = field(default_factory=Faults)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class SpeechServicer(pb_grpc.SpeechServiceServicer):
    """GetAudio and GetObject over an `AudioStore`, with fault injection and per-object call counts."""

    def __init__(self, store: AudioStore, settings: ServerSettings):
        self.store = store
        self.settings = settings
        self.calls: collections.Counter[str] = collections.Counter()  # GetAudio calls per object
        self.object_calls: collections.Counter[str] = collections.Counter()  # GetObject calls per object
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.formats: collections.Counter[str] = collections.Counter()  # transfer formats of the calls served
        self._lock = threading.Lock()
        self._rng = random.Random(settings.faults.seed)

    # -- GetAudio ---------------------------------------------------------------------------------------
    def GetAudio(self, request: pb.GetAudioRequest, context: grpc.ServicerContext) -> Iterator[pb.GetAudioResponse]:
        with self._lock:
            self.calls[request.object_id] += 1
            draw = [self._rng.random() for _ in range(4)]
        try:
            self._check_key(request.api_key)
            obj = self._object(request.object_id)
            fmt = request.audio_bytes_format or "pcm_s16le"
            if fmt not in FORMATS:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"audio_bytes_format must be one of {FORMATS}")
            start_ms, duration_ms = self._segment(request, obj)
        except _Abort as e:
            self._count(e.code.name)
            context.abort(e.code, str(e))
        with self._lock:
            self.formats[fmt] += 1
        yield from self._stream(obj, start_ms, duration_ms, fmt, draw, context)

    def _stream(self, obj, start_ms, duration_ms, fmt, draw, context) -> Iterator[pb.GetAudioResponse]:
        faults = self.settings.faults
        _wait(context, faults.latency_s + (faults.slow_s if draw[0] < faults.slow_fraction else 0.0))
        if draw[1] < faults.fail_fraction:
            self._count(faults.fail_code.name)
            context.abort(faults.fail_code, "injected failure")
        if draw[2] < faults.throttle_fraction:
            self._count("RESOURCE_EXHAUSTED")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "injected throttling: too many requests")
        yield pb.GetAudioResponse(
            object_id=obj.object_id,
            start_ms=start_ms,
            duration_ms=duration_ms,
            total_duration_ms=obj.duration_ms,
            num_audio_channels=obj.channels,
        )
        start, stop = start_ms * SAMPLES_PER_MS, (start_ms + duration_ms) * SAMPLES_PER_MS
        block = max(1, self.settings.chunk_bytes // (obj.channels * BYTES_PER_SAMPLE))
        n_chunks = -(-(stop - start) // block)
        break_after = (n_chunks + 1) // 2 if draw[3] < faults.break_fraction and n_chunks >= 2 else None
        prefix = wav_header(stop - start, obj.channels) if fmt == "wav" else b""
        for i, frames in enumerate(self.store.read(obj, start, stop, block)):
            if i == break_after:
                self._count("BROKEN")
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure: stream broken")
            yield pb.GetAudioResponse(data=prefix + frames.tobytes())
            prefix = b""
        self._count("OK")

    def _segment(self, request: pb.GetAudioRequest, obj: StoredAudio) -> tuple[int, int]:
        """The served (start_ms, duration_ms) for the request's time or token range."""
        kind = request.WhichOneof("oneof_segment")
        total = obj.duration_ms
        if kind == "time_segment":
            start, duration = request.time_segment.start_ms, request.time_segment.duration_ms
            if start < 0 or duration <= 0:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "time segment needs start_ms >= 0 and duration_ms > 0")
            if start + duration > total:
                if not self.settings.clip_past_end or start >= total:
                    raise _Abort(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"time segment {start}+{duration} ms ends past the object's {total} ms",
                    )
                duration = total - start
            return start, duration
        if kind == "token_segment":
            first, end = request.token_segment.token_start, request.token_segment.token_end
            if first < 0 or end <= first:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "token segment needs 0 <= token_start < token_end")
            if obj.tokens is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "object has no transcript tokens")
            if end > len(obj.tokens):
                raise _Abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"token segment [{first}, {end}) ends past the transcript's {len(obj.tokens)} tokens",
                )
            pad = self.settings.token_padding_ms
            last = obj.tokens[end - 1]
            start = max(0, obj.tokens[first].start_ms - pad)
            stop = min(total, last.start_ms + last.duration_ms + pad)
            if stop <= start:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE, "token segment lies past the end of the audio")
            return start, stop - start
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request has neither a time nor a token segment")

    # -- GetObject --------------------------------------------------------------------------------------
    def GetObject(self, request: pb.GetObjectRequest, context: grpc.ServicerContext) -> pb.GetObjectResponse:
        with self._lock:
            self.object_calls[request.object_id] += 1
        try:
            self._check_key(request.api_key)
            obj = self._object(request.object_id)
        except _Abort as e:
            context.abort(e.code, str(e))
        return pb.GetObjectResponse(
            object=pb.StoredObject(
                object_id=obj.object_id,
                title=obj.object_id,
                duration_ms=obj.duration_ms,
                num_audio_channels=obj.channels,
                audio_stored=True,
                transcript=_transcript(obj.tokens) if obj.tokens is not None else None,
            )
        )

    # -- shared -----------------------------------------------------------------------------------------
    def _check_key(self, api_key: str) -> None:
        expected = self.settings.api_key
        if expected and not hmac.compare_digest(api_key.encode(), expected.encode()):
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")

    def _object(self, object_id: str) -> StoredAudio:
        problem = object_id_problem(object_id)
        if problem:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        obj = self.store.get(object_id)
        if obj is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"object {object_id!r} not found")
        return obj

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1


def _transcript(tokens: tuple[Token, ...]) -> pb.Transcript:
    """The sidecar's tokens as the service sends them (a speaker or confidence not given is sent as 0)."""
    transcript = pb.Transcript(text="".join(t.text for t in tokens))
    pos = 0
    for idx, t in enumerate(tokens):
        transcript.tokens.add(
            idx=idx,
            text=t.text,
            text_start=pos,
            text_end=pos + len(t.text),
            start_ms=t.start_ms,
            duration_ms=t.duration_ms,
            confidence=t.confidence or 0.0,
            speaker_id=t.speaker or 0,
        )
        pos += len(t.text)
    return transcript


def _wait(context: grpc.ServicerContext, seconds: float) -> None:
    """Sleep, but stop early when the client has gone (cancelled or past its deadline)."""
    end = time.monotonic() + seconds
    while context.is_active() and (left := end - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


class LocalServer:
    """A started gRPC server on loopback (by default) with a free port; use as a context manager."""

    def __init__(
        self,
        store_dir: str,
        settings: ServerSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 128,
    ):
        self.settings = settings or ServerSettings()
        self.servicer = SpeechServicer(AudioStore(store_dir), self.settings)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            options=[
                ("grpc.max_send_message_length", 6 << 20),
                ("grpc.max_receive_message_length", 6 << 20),
                ("grpc.so_reuseport", 0),  # a port already taken is an error, never silently shared
            ],
        )
        pb_grpc.add_SpeechServiceServicer_to_server(self.servicer, self._server)
        self.host = host
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot bind {host}:{port}")

    @property
    def address(self) -> str:
        """The address to give the client: plaintext, hence the http:// prefix."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def calls(self) -> collections.Counter[str]:
        """GetAudio calls made so far, per object ID."""
        return self.servicer.calls

    @property
    def formats(self) -> collections.Counter[str]:
        """GetAudio calls served so far, per transfer format (audio_bytes_format, the default filled in)."""
        return self.servicer.formats

    def start(self) -> LocalServer:
        self._server.start()
        log.debug("local GetAudio server on %s serving %s", self.address, self.servicer.store.root)  # callers print it
        return self

    def stop(self, grace: float | None = 0) -> None:
        self._server.stop(grace).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
