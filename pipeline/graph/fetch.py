"""The fetch transform: up to `max_in_flight` GetAudio streams at once per worker process.

A Python DoFn sees one element at a time per thread, so each element is handed to the worker process's
thread pool and its result emitted when done (`InFlight`, the one loop of every layout); the bundle ends when
all of its calls have. What becomes of a complete clip is its layout's writer's: a clip file published at
its path (`clips.ClipFiles`), or a clip kept for its shard (`shards.SHARDS`: tar, Parquet, Lhotse Shar). The steps of a
run share one client and one pool per process, built when the first step is set up and closed when the
last is torn down. They know the client's interface, not gRPC: retries, resume and throttling happen
inside GetAudioClient (and any client with its methods, such as a test's fake, can be passed in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.core.audio import SAMPLE_RATE
from pipeline.core.elements import (
    EARLIER,
    NO_TRANSCRIPT,
    WRITE_FAILED,
    CallStats,
    ClipError,
    ClipRecord,
    ClipRequest,
    ShardCopy,
)
from pipeline.core.messages import AudioResult, AudioSink, GetAudioError, ObjectInfo, Segment
from pipeline.dataset.clips import (
    CLIP_FILES,
    MIX,
    ClipFile,
    FinishedClip,
    MixToMono,
    WrittenClip,
    clip_file,
    existing_clip,
    fingerprint_of,
)
from pipeline.dataset.layout import HF_PARQUET, LHOTSE_SHAR, clip_path, name_of, path_of
from pipeline.dataset.shards import SHARDS, ParquetShard, Shard
from pipeline.dataset.storage import StorageError, open_store
from pipeline.dataset.transcripts import clip_tokens, tokens_for
from pipeline.graph.settings import ClientSettings, FetchSettings
from pipeline.service.client import CallHooks
from pipeline.service.throttle import WaitClock

log = logging.getLogger(__name__)
NAMESPACE = "clips"
FAILED_ATTEMPTS = "failed_attempts"  # one counter per status code of a failed (and maybe retried) attempt
SIGNAL_EVERY_S = 1.0  # while calls are in flight, their waiting reaches Beam's throttling counter this often
COUNTERS = ("written", "skipped", "retries", "throttled", "bytes", "audio_ms", "get_object_calls")


class Fetcher(Protocol):
    """What the fetch steps call: GetAudioClient, or a fake in a test."""

    def get_audio(self, object_id: str, segment: Segment, sink: AudioSink, audio_format: str) -> AudioResult: ...

    def get_object(self, object_id: str) -> ObjectInfo: ...


class LayoutWriter(Protocol):
    """A layout's writer (one per layout): what becomes of a complete clip, in the pool's thread that fetched it."""

    def finish(self, clip: ClipFile) -> tuple[WrittenClip, FinishedClip | None]: ...


class _Resources:
    """What the steps of one worker process that call the service share: one client (so one channel and one
    throttler), one pool of `max_in_flight` threads, and the process's progress."""

    def __init__(self, client: Fetcher, max_in_flight: int, total_rows: int, limiter=None):
        self.client = client
        self.limiter = limiter  # Beam's RateLimiter, or None
        self.clock = WaitClock()  # every call's waiting, read by the steps for Beam's throttling counter
        if hasattr(client, "hooks"):  # GetAudioClient (a test's fake takes none): the limit is asked per attempt
            client.hooks = CallHooks(limiter.allow if limiter else None, self.clock)
        self.pool = futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="getaudio")
        self.progress = Progress(total_rows)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if hasattr(self.client, "close"):
            self.client.close()


class _Held:
    """The fetch steps' one process-wide state, and its owner: the resources the steps of a worker process
    share, by what they are built from, with the number of steps holding them. The first step set up builds
    them, the last torn down closes them, so nothing of a finished run stays in the process.

    Not Beam's `utils.shared.Shared`: it keeps the object acquired last alive until another is acquired (so a
    finished run's channel and pool threads would stay open), and its handle is one step's, where
    AttachTranscripts and the fetch step share one client."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple, tuple[_Resources, int]] = {}

    def hold(self, key: tuple, build: Callable[[], _Resources]) -> _Resources:
        """The resources for `key`, built if no step holds them yet."""
        with self._lock:
            resources, holders = self._held.get(key) or (build(), 0)
            self._held[key] = resources, holders + 1
        return resources

    def let_go(self, key: tuple) -> None:
        """One step is done with the resources for `key`: the last one closes them."""
        with self._lock:
            resources, holders = self._held.pop(key)
            if holders > 1:
                self._held[key] = resources, holders - 1
                return
        resources.close()

    def count(self) -> int:
        with self._lock:
            return len(self._held)


_HELD = _Held()


def held() -> int:
    """How many clients (each with its pool) the fetch steps hold in this process: 0 once a run's steps are
    torn down, which a test can check after an in-process run."""
    return _HELD.count()


class _Step(beam.DoFn):
    """A step that calls the service: it takes the process's shared client (built by `make_client`, a fake
    in tests) when it is set up, and the last step to be torn down closes it."""

    def __init__(
        self, settings: FetchSettings, make_client: Callable[[ClientSettings], Fetcher] = ClientSettings.client
    ):
        self.settings = settings
        self.make_client = make_client
        self.counters = {name: Metrics.counter(NAMESPACE, name) for name in COUNTERS}

    def setup(self) -> None:
        s = self.settings
        self.key = (s.client, s.max_in_flight, s.rate_limit_service, s.rate_limit_domain, self.make_client)
        self.resources = _HELD.hold(self.key, self._build)
        self.client = self.resources.client

    def _build(self) -> _Resources:
        s = self.settings
        return _Resources(self.make_client(s.client), s.max_in_flight, s.total_rows, s.rate_limiter())

    def teardown(self) -> None:
        if getattr(self, "resources", None) is None:  # setup did not get as far
            return
        _HELD.let_go(self.key)
        self.resources = self.client = None


class AttachTranscripts(_Step):
    """(object_id, requests) -> each request with the object's tokens, from one GetObject call per object;
    a ClipError for each request when the object's transcript cannot be had, or (`lhotse-shar`) when the object
    has none: a Shar dataset is its own training manifest, where a cut with no supervision would be trained on
    as an empty target (NeMo's `shar_path`), so such a clip is not fetched."""

    def process(self, item: tuple[str, Iterable[ClipRequest]]) -> Iterator[ClipRequest | ClipError]:
        object_id, requests = item
        self.counters["get_object_calls"].inc()
        try:
            tokens = self.client.get_object(object_id).tokens
        except GetAudioError as e:
            for r in requests:
                yield _error(r, e.code, f"GetObject: {e.message}", e.attempts)
            return
        if tokens is None and self.settings.layout == LHOTSE_SHAR:
            for r in requests:
                yield _error(
                    r, NO_TRANSCRIPT, "the object has no transcript: a lhotse-shar dataset holds transcribed clips", 1
                )
            return
        for r in requests:
            yield dataclasses.replace(r, tokens=tokens_for(tokens, r.segment))


class _Fetch(_Step):
    """What both fetch steps share: the process's client, pool and store, one clip's fetch, the counters."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.latency = Metrics.distribution(NAMESPACE, "call_latency_ms")
        self.duration = Metrics.distribution(NAMESPACE, "clip_duration_ms")
        # Seconds that calls were held back or backed off: a runner that autoscales (Dataflow) reads this
        # counter and does not add workers while the API pushes back.
        self.throttling = ThrottlingSignaler(NAMESPACE)

    def setup(self) -> None:
        super().setup()
        self.pool = self.resources.pool
        self.store = open_store(self.settings.output, self.settings.store)

    def teardown(self) -> None:
        self.pool = None
        super().teardown()

    def _count(self, out: ClipRecord | ClipError) -> None:
        """Count one result, in the DoFn's own thread: Beam metrics are kept per thread, so the pool's
        threads cannot update them."""
        stats = out.stats
        self.resources.progress.tick()
        self._signal_waits()
        self.counters["retries"].inc(max(0, out.attempts - 1))
        self.counters["throttled"].inc(stats.held)
        for code in stats.failures:
            Metrics.counter(FAILED_ATTEMPTS, code).inc()
        if isinstance(out, ClipError):
            return
        if out.attempts == 0:
            self.counters["skipped"].inc()
            return
        self.counters["written"].inc()
        self.counters["bytes"].inc(out.num_bytes)
        self.counters["audio_ms"].inc(out.clip_duration_ms)
        self.latency.update(int(stats.seconds * 1000))
        self.duration.update(out.clip_duration_ms)

    def _fetch(self, request: ClipRequest, layout: LayoutWriter) -> _Done:
        """One clip, start to finish: skip it, or fetch it and hand it to the layout's writer (which publishes
        a clip file, or keeps a shard's clip), or say why not. Runs in the pool's threads."""
        started = time.monotonic()
        s = self.settings
        path = clip_path(s.output, request.clip_id, s.clip_format)
        fingerprint = fingerprint_of(request.fingerprint, s.channels)
        if request.listed:  # a file no table row describes (a stopped run's): one look at it may spare the fetch
            try:
                existing = existing_clip(self.store, path, fingerprint, s.clip_format)
            except OSError as e:  # the check failed (StorageError among them): fetch the clip again
                log.warning("cannot check %s (%s); fetching it", path, e)
                existing = None
            if existing is not None:
                return _Done(_record(request, existing, attempts=0, stats=CallStats(), settings=s))
        sink = clip_file(self.store, path, fingerprint, s.clip_format)
        fed = MixToMono(sink) if s.channels == MIX else sink
        try:
            result = self.client.get_audio(request.object_id, request.segment, fed, s.audio_format)
            written, finished = layout.finish(sink)
        except GetAudioError as e:
            sink.discard()
            stats = CallStats(time.monotonic() - started, 0, e.waited_s, e.failures)
            return _Done(_error(request, e.code, e.message, e.attempts, stats))
        except OSError as e:  # a full disk, the FLAC encoder's error, or a StorageError (its retries spent)
            sink.discard()
            stats = CallStats(time.monotonic() - started)
            return _Done(_error(request, WRITE_FAILED, str(e), 1, stats))
        except BaseException:  # anything else fails the bundle; its scratch file goes first
            sink.discard()
            raise
        stats = CallStats(time.monotonic() - started, result.throttled, result.waited_s, result.failures)
        return _Done(_record(request, written, result.attempts, stats, s), finished)

    def _signal_waits(self) -> None:
        """Add the whole seconds this process's calls have waited (waits under way included) to Beam's throttling
        counter, so an autoscaler hears of a long backoff while it lasts. In the DoFn's thread: Beam's metrics
        are per thread, and the limiter's own counter, in a pool thread, is lost."""
        seconds = self.resources.clock.unreported()
        if seconds:
            self.throttling.signal_throttled(seconds)


class FetchClips(_Fetch):
    """ClipRequest -> ClipRecord | ClipError, with the calls of a bundle running concurrently; each clip a file."""

    def start_bundle(self) -> None:
        self.calls = InFlight(self)

    def process(self, request: ClipRequest) -> Iterator[ClipRecord | ClipError]:
        for done in self.calls.submit(self._fetch, request, CLIP_FILES):
            self._count(done.out)
            yield done.out

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for done in self.calls.drain():
            self._count(done.out)
            yield WindowedValue(done.out, MIN_TIMESTAMP, [GlobalWindow()])


class FetchShard(_Fetch):
    """(shard, {fetch: requests, copy: ShardCopy}) -> ClipRecord | ClipError (and, on EARLIER, the earlier rows
    --append carries): the clips a shard keeps are copied from its earlier version, the others fetched
    concurrently, each added to a tar in a local scratch file as it completes, and the tar uploaded once. No
    clip is staged in the output. A shard whose copies all verify and that gains or loses nothing is left as
    it was."""

    def __init__(self, *args, clips_schema: pa.Schema | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clips_schema = clips_schema  # a Parquet shard's columns (--layout hf-parquet)

    def _writer(self, shard: int) -> Shard:
        """The layout's writer of one shard."""
        if self.settings.layout == HF_PARQUET:
            return ParquetShard(self.store, self.settings.output, shard, self.clips_schema)
        return SHARDS[self.settings.layout](self.store, self.settings.output, shard)

    def process(self, item: tuple[int, dict[str, Iterable]]) -> Iterator[Any]:
        shard, groups = item
        writer = self._writer(shard)
        copies = list(groups["copy"])
        kept, refetch = self._copy(writer, copies)
        requests = [*groups["fetch"], *refetch]
        if not requests and not any(c.rebuild for c in copies):  # verified, and nothing else changes
            writer.discard()
            yield from self._emit([(copy, copy.record) for copy, _ in kept])
            return
        calls = InFlight(self)
        results = []
        try:
            for request in requests:
                results += [writer.place(d.out, d.finished) for d in calls.submit(self._fetch, request, writer)]
            results += [writer.place(d.out, d.finished) for d in calls.drain()]
        except BaseException:  # an unexpected error fails the bundle, which is retried: leave no scratch behind
            writer.discard()
            calls.abandon()
            raise
        if writer.failure is None:
            writer.publish()
        if writer.failure is not None:  # the shard could not be written: none of its new clips was
            writer.discard()
            results = [_shard_failed(out, writer.failure) for out in results]
        elif kept and kept[0][0].record.path != writer.name:  # published under its name: the earlier name goes
            self._remove_earlier(path_of(self.settings.output, kept[0][0].record.path))
        for out in results:
            self._count(out)
            yield out
        published = writer.failure is None  # or the copied clips stay in the shard as it was, at their path
        yield from self._emit([(copy, placed if published else copy.record) for copy, placed in kept])

    def _copy(
        self, writer: Shard, copies: list[ShardCopy]
    ) -> tuple[list[tuple[ShardCopy, ClipRecord]], list[ClipRequest]]:
        """Copy the kept clips from the shard's earlier version into the new one (each with its row there);
        those missing from it (or, verified, differing) are to be fetched again."""
        if not copies:
            return [], []
        wanted = {c.record.member: c for c in copies}
        earlier = path_of(self.settings.output, copies[0].record.path)  # the shard's, under an earlier name maybe
        kept = []
        try:
            for member, data in writer.members(self.store, earlier, set(wanted)):
                copy = wanted[member]
                if copy.verify and hashlib.sha256(data).hexdigest() != copy.record.sha256:
                    continue
                placed = writer.add(copy.record, FinishedClip(data, None, len(data), copy.record.sha256))
                kept.append((wanted.pop(member), placed))
        except (OSError, tarfile.TarError) as e:  # what was not copied yet is fetched again
            log.warning("shard %s cannot be read (%s); fetching its clips again", earlier, e)
        return kept, [c.request for c in wanted.values() if c.request is not None]

    def _emit(self, kept: list[tuple[ShardCopy, ClipRecord]]) -> Iterator[Any]:
        """The copied clips' rows (--append's earlier ones on EARLIER)."""
        for copy, record in kept:
            if copy.earlier:
                yield beam.pvalue.TaggedOutput(EARLIER, record)
            else:
                self._count(record)
                yield record

    def _remove_earlier(self, path: str) -> None:
        """The shard's file under an earlier version's name, once its clips are published under the new one;
        one that cannot be removed is left (a next rerun removes it) and said."""
        try:
            self.store.delete([path])
        except StorageError as e:
            log.warning("cannot remove %s, the shard's earlier name (%s); a rerun removes it", path, e)


class InFlight:
    """The one bounded-concurrency loop of every layout: a step's calls in the process's pool, at most
    `max_in_flight` at once, each result taken (in the step's thread) as soon as it is done."""

    def __init__(self, step: _Fetch):
        self.step = step
        self.done: queue.SimpleQueue[futures.Future] = queue.SimpleQueue()
        self.pending = 0

    def submit(self, fn: Callable[..., _Done], *args: Any) -> Iterator[_Done]:
        """Start a call; the results of calls done by now (waiting for one while `max_in_flight` are running)."""
        self.step.pool.submit(fn, *args).add_done_callback(self.done.put)
        self.pending += 1
        yield from self._take(block=self.pending >= self.step.settings.max_in_flight)

    def drain(self) -> Iterator[_Done]:
        """Every result still to come."""
        while self.pending:
            yield from self._take(block=True)

    def _take(self, block: bool) -> Iterator[_Done]:
        """The results of the calls done (after waiting for one, if `block`)."""
        while self.pending:
            future = self._next(block)
            if future is None:
                return
            block = False
            self.pending -= 1
            yield future.result()  # an unexpected exception fails the bundle, as it should

    def _next(self, block: bool) -> futures.Future | None:
        """The next finished call (None when none has and not `block`), signalling waits every second meanwhile."""
        while True:
            self.step._signal_waits()
            try:
                return self.done.get(block=block, timeout=SIGNAL_EVERY_S if block else None)
            except queue.Empty:
                if not block:
                    return None

    def abandon(self) -> None:
        """After a failure: wait for the calls still running and delete the clips they left in scratch files."""
        for _ in range(self.pending):
            future = self.done.get()
            finished = None if future.exception() else future.result().finished
            if finished is not None:
                finished.close()
        self.pending = 0


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
        path=name_of(settings.output, clip.path),
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


class Progress:
    """Logs one worker process's rows done and clips per second, every few seconds, for one run."""

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.every_s = total, every_s
        self._lock = threading.Lock()
        self._done = 0
        self._started = self._last = time.monotonic()

    def tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._done += 1
            if now - self._last < self.every_s:
                return
            self._last = now
            done, rate = self._done, self._done / max(now - self._started, 1e-9)
        log.info("progress: this worker has fetched %d rows (of %d in the run), %.1f clips/s", done, self.total, rate)
