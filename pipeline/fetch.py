"""The fetch transform: up to `max_in_flight` GetAudio streams at once per worker process.

A Python DoFn sees one element at a time per thread, so each element is handed to a process-wide
thread pool and its result emitted when done; the bundle ends when all of its calls have. It knows the
client's interface, not gRPC: retries, resume and throttling happen inside GetAudioClient.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.audio import SAMPLE_RATE
from pipeline.client import GetAudioClient, RetryPolicy
from pipeline.clips import ClipFile, FinishedClip, WrittenClip, clip_path, existing_clip, relative_path
from pipeline.elements import WRITE_FAILED, CallStats, ClipError, ClipRecord, ClipRequest
from pipeline.messages import GetAudioError
from pipeline.shards import ShardWriter, shard_path
from pipeline.storage import StoreSettings, open_store
from pipeline.transcripts import MOSTLY_INSIDE, clip_tokens, tokens_for

log = logging.getLogger(__name__)
NAMESPACE = "clips"
FAILED_ATTEMPTS = "failed_attempts"  # one counter per status code of a failed (and maybe retried) attempt


@dataclass(frozen=True)
class FetchSettings:
    """What the fetch step needs from the options; picklable, and holding no secret."""

    output: str
    api_host: str | None
    api_key_file: str | None
    audio_format: str
    max_in_flight: int
    max_attempts: int
    rpc_timeout_s: float
    skip_existing: bool
    with_transcripts: bool = False
    clip_format: str = "wav"
    shards: int = 0
    total_rows: int = 0
    edge_words: str = MOSTLY_INSIDE
    store: StoreSettings = field(default_factory=StoreSettings)


def read_api_key(api_key_file: str | None) -> str | None:
    """The key in `api_key_file`, on any Beam filesystem (a gs:// object on Dataflow workers); None without
    one, and the client falls back to its own sources (SONIOX_API_KEY)."""
    if not api_key_file:
        return None
    with FileSystems.open(api_key_file) as f:
        return f.read().decode().strip()


def check_key(s: FetchSettings, object_id: str) -> str | None:
    """One GetObject attempt with the configured key: the error code, or None when it was answered."""
    client = GetAudioClient(s.api_host, api_key=read_api_key(s.api_key_file), retry=RetryPolicy(max_attempts=1))
    try:
        client.get_object(object_id)
    except GetAudioError as e:
        return e.code
    return None


_shared: dict[FetchSettings, tuple[GetAudioClient, futures.ThreadPoolExecutor]] = {}
_shared_lock = threading.Lock()


def _client_and_pool(s: FetchSettings) -> tuple[GetAudioClient, futures.ThreadPoolExecutor]:
    """One client (so one channel and one throttler) and one pool per process, for all DoFn instances."""
    with _shared_lock:
        if s not in _shared:
            client = GetAudioClient(
                s.api_host,
                api_key=read_api_key(s.api_key_file),
                retry=RetryPolicy(max_attempts=s.max_attempts),
                rpc_timeout_s=s.rpc_timeout_s,
            )
            _shared[s] = (client, futures.ThreadPoolExecutor(s.max_in_flight, thread_name_prefix="getaudio"))
        return _shared[s]


class AttachTranscripts(beam.DoFn):
    """(object_id, requests) -> each request with the object's tokens, from one GetObject call per object;
    a ClipError for each request when the object's transcript cannot be had."""

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self.calls = Metrics.counter(NAMESPACE, "get_object_calls")

    def setup(self) -> None:
        self.client, _ = _client_and_pool(self.settings)

    def process(self, item: tuple[str, Iterable[ClipRequest]]) -> Iterator[ClipRequest | ClipError]:
        object_id, requests = item
        self.calls.inc()
        try:
            tokens = self.client.get_object(object_id).tokens
        except GetAudioError as e:
            for r in requests:
                yield _error(r, e.code, f"GetObject: {e.message}", e.attempts)
            return
        for r in requests:
            yield dataclasses.replace(r, tokens=tokens_for(tokens, r.segment))


class _Fetch(beam.DoFn):
    """What both fetch steps share: the process's client, pool and store, one clip's fetch, the counters."""

    def __init__(self, settings: FetchSettings):
        self.settings = settings
        self.written = Metrics.counter(NAMESPACE, "written")
        self.skipped = Metrics.counter(NAMESPACE, "skipped")
        self.retries = Metrics.counter(NAMESPACE, "retries")
        self.throttled = Metrics.counter(NAMESPACE, "throttled")
        self.bytes = Metrics.counter(NAMESPACE, "bytes")
        self.audio_ms = Metrics.counter(NAMESPACE, "audio_ms")
        self.latency = Metrics.distribution(NAMESPACE, "call_latency_ms")
        self.duration = Metrics.distribution(NAMESPACE, "clip_duration_ms")
        # Seconds that calls were held back or backed off: a runner that autoscales (Dataflow) reads this
        # counter and does not add workers while the API pushes back.
        self.throttling = ThrottlingSignaler(NAMESPACE)

    def setup(self) -> None:
        self.client, self.pool = _client_and_pool(self.settings)
        self.store = open_store(self.settings.output, self.settings.store)
        self.progress = _Progress(self.settings.total_rows)
        self.waited_s = 0.0  # not yet signalled: the counter takes whole seconds

    def _count(self, out: ClipRecord | ClipError) -> None:
        """Count one result, in the DoFn's own thread: Beam metrics are kept per thread, so the pool's
        threads cannot update them."""
        stats = out.stats
        self.progress.tick()
        self.waited_s += stats.waited_s
        if self.waited_s >= 1:
            self.throttling.signal_throttled(int(self.waited_s))
            self.waited_s -= int(self.waited_s)
        self.retries.inc(max(0, out.attempts - 1))
        self.throttled.inc(stats.held)
        for code in stats.failures:
            Metrics.counter(FAILED_ATTEMPTS, code).inc()
        if isinstance(out, ClipError):
            return
        if out.attempts == 0:
            self.skipped.inc()
            return
        self.written.inc()
        self.bytes.inc(out.num_bytes)
        self.audio_ms.inc(out.clip_duration_ms)
        self.latency.update(int(stats.seconds * 1000))
        self.duration.update(out.clip_duration_ms)

    def _fetch(self, request: ClipRequest, publish: bool = True) -> _Done:
        """One clip, start to finish: skip it, or fetch it and publish it (or, for a shard, keep its bytes),
        or say why not. Runs in the pool's threads."""
        started = time.monotonic()
        s = self.settings
        path = clip_path(s.output, request.clip_id, s.clip_format)
        if s.skip_existing:
            try:
                existing = existing_clip(self.store, path, request.fingerprint, s.clip_format)
            except OSError as e:  # the check failed (StorageError among them): fetch the clip again
                log.warning("skip_existing: cannot check %s (%s); fetching it", path, e)
                existing = None
            if existing is not None:
                return _Done(_record(request, existing, attempts=0, stats=CallStats(), settings=s))
        sink = ClipFile(self.store, path, request.fingerprint, s.clip_format)
        try:
            result = self.client.get_audio(request.object_id, request.segment, sink, s.audio_format)
            finished = None
            if publish:
                written = sink.publish()
            else:
                finished = sink.finish()
                written = WrittenClip(path, sink.info, sink.info.num_frames, finished.num_bytes, finished.sha256)
        except GetAudioError as e:
            sink.discard()
            stats = CallStats(time.monotonic() - started, 0, e.waited_s, e.failures)
            return _Done(_error(request, e.code, e.message, e.attempts, stats))
        except OSError as e:  # a StorageError among them: the store's own retries are spent
            sink.discard()
            stats = CallStats(time.monotonic() - started)
            return _Done(_error(request, WRITE_FAILED, str(e), 1, stats))
        except BaseException:  # anything else fails the bundle; its scratch file goes first
            sink.discard()
            raise
        stats = CallStats(time.monotonic() - started, result.throttled, result.waited_s, result.failures)
        return _Done(_record(request, written, result.attempts, stats, s), finished)


class FetchClips(_Fetch):
    """ClipRequest -> ClipRecord | ClipError, with the calls of a bundle running concurrently."""

    def start_bundle(self) -> None:
        self.pending = 0
        self.done: queue.SimpleQueue[futures.Future] = queue.SimpleQueue()

    def process(self, request: ClipRequest) -> Iterator[ClipRecord | ClipError]:
        self.pool.submit(self._fetch, request).add_done_callback(self.done.put)
        self.pending += 1
        yield from self._collect(block=self.pending >= self.settings.max_in_flight)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        while self.pending:
            for out in self._collect(block=True):
                yield WindowedValue(out, MIN_TIMESTAMP, [GlobalWindow()])

    def _collect(self, block: bool) -> Iterator[ClipRecord | ClipError]:
        """Emit the results of finished calls (waiting for one if `block`)."""
        while self.pending:
            try:
                future = self.done.get(block=block)
            except queue.Empty:
                return
            block = False
            self.pending -= 1
            done = future.result()  # an unexpected exception fails the bundle, as it should
            self._count(done.out)
            yield done.out


class FetchShard(_Fetch):
    """(shard, requests) -> ClipRecord | ClipError: the shard's clips fetched concurrently, each added to a
    tar in a local scratch file as it completes, and the tar uploaded once. No clip is staged in the output."""

    def process(self, item: tuple[int, Iterable[ClipRequest]]) -> Iterator[ClipRecord | ClipError]:
        shard, requests = item
        writer = ShardWriter(self.store, shard_path(self.settings.output, shard))
        done: queue.SimpleQueue[futures.Future] = queue.SimpleQueue()
        pending, results = 0, []
        for request in requests:
            self.pool.submit(self._fetch, request, False).add_done_callback(done.put)
            pending += 1
            while pending >= self.settings.max_in_flight or (pending and not done.empty()):
                results.append(self._add(writer, done.get().result()))
                pending -= 1
        while pending:
            results.append(self._add(writer, done.get().result()))
            pending -= 1
        if writer.failure is None:
            writer.publish()
        if writer.failure is not None:  # the shard could not be written: none of its clips was
            writer.discard()
            results = [_shard_failed(out, writer.failure) for out in results]
        for out in results:
            self._count(out)
            yield out

    @staticmethod
    def _add(writer: ShardWriter, done: _Done) -> ClipRecord | ClipError:
        """The row of one finished call, its clip added to the shard (unless the shard has failed)."""
        if isinstance(done.out, ClipRecord):
            return writer.add(done.out, done.finished)
        return done.out


def _shard_failed(out: ClipRecord | ClipError, e: OSError) -> ClipError:
    if isinstance(out, ClipError):
        return out
    message = f"shard {out.path}: {e}"
    return ClipError(out.clip_id, out.object_id, WRITE_FAILED, message, out.attempts, out.columns, out.stats)


@dataclass(frozen=True)
class _Done:
    """One clip's outcome, handed back from the pool: the row (with its numbers), and a shard clip's bytes."""

    out: ClipRecord | ClipError
    finished: FinishedClip | None = None


def _record(
    request: ClipRequest, clip: WrittenClip, attempts: int, stats: CallStats, settings: FetchSettings
) -> ClipRecord:
    info = clip.info
    text, tokens = None, None
    if request.tokens is not None:
        served = (info.start_ms, info.duration_ms)
        text, tokens = clip_tokens(request.tokens, request.segment, *served, settings.edge_words)
    return ClipRecord(
        clip_id=request.clip_id,
        object_id=request.object_id,
        path=relative_path(settings.output, clip.path),
        clip_start_ms=info.start_ms,
        clip_duration_ms=info.duration_ms,
        object_duration_ms=info.total_duration_ms,
        num_channels=info.channels,
        sample_rate=SAMPLE_RATE,
        num_samples=clip.num_frames,
        num_bytes=clip.num_bytes,
        sha256=clip.sha256,
        attempts=attempts,
        columns=request.columns,
        transcript_text=text,
        transcript_tokens=tokens,
        stats=stats,
    )


def _error(request: ClipRequest, code: str, message: str, attempts: int, stats: CallStats | None = None) -> ClipError:
    where = f"{request.source}: {message}"
    return ClipError(request.clip_id, request.object_id, code, where, attempts, request.columns, stats or CallStats())


class _Progress:
    """Logs done / total and clips per second every few seconds (per worker process)."""

    _lock = threading.Lock()
    _done = 0
    _started = 0.0
    _last = 0.0

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.every_s = total, every_s

    def tick(self) -> None:
        cls = type(self)
        with cls._lock:
            now = time.monotonic()
            if cls._started == 0.0:
                cls._started = cls._last = now
            cls._done += 1
            if now - cls._last < self.every_s:
                return
            cls._last = now
            done, rate = cls._done, cls._done / max(now - cls._started, 1e-9)
        log.info("progress: %d / %d rows fetched, %.1f clips/s", done, self.total, rate)
