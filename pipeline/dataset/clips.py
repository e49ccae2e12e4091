"""Clip files: WAV or FLAC (one writer each) built as the audio arrives, then published whole at a deterministic path.

A crash or a retried bundle never leaves a partial file at a final path: the store publishes a clip in one
write (one upload to a bucket, write-then-rename on a local disk), and only once the writer has checked it
is complete. A writer whose write fails (a full disk, libsndfile) closes its scratch file and raises OSError,
which makes the row WRITE_FAILED. Audio is kept in memory up to `SPILL_BYTES` and then streamed to a local
scratch file, so a short clip costs one write and a one-hour clip never sits in memory.

Each clip says what was asked for and served, so that a rerun can tell a complete, current clip from a stale
one without downloading it when no table row describes it (a stopped run's; pipeline/graph/reconcile.py decides the
others from the tables): on a bucket in the object's metadata (with its sha256), read by one metadata request;
on a local disk in the header (a LIST/INFO comment, or FLAC's comment), read from disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import soundfile as sf

from pipeline.core.audio import BYTES_PER_SAMPLE, SAMPLE_RATE, SAMPLES_PER_MS, parse_wav_header, wav_header
from pipeline.core.messages import StreamInfo
from pipeline.dataset.storage import Scratch, Store, StoredObject

KEEP, MIX = "keep", "mix"
CHANNELS = (KEEP, MIX)  # --channels: a clip keeps the object's channels, or holds their mix in one
SPILL_BYTES = 1 << 20  # audio held in memory per clip before it goes to a scratch file
_READ_BLOCK = 1 << 20
_MIME = {"wav": "audio/wav", "flac": "audio/flac"}


@dataclass(frozen=True)
class WrittenClip:
    """A clip file at its final path, as the clips table describes it."""

    path: str
    info: StreamInfo
    num_frames: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class FinishedClip:
    """A complete clip's bytes, in memory (`data`) or in a local scratch file (`file`), not yet published."""

    data: bytes | None
    file: Scratch | None
    num_bytes: int
    sha256: str

    def close(self) -> None:
        """Remove its scratch file, once its bytes are published or in a shard (or of no use)."""
        if self.file is not None:
            self.file.close()


class ClipFile:
    """An AudioSink that builds one clip; `publish` puts it at its path in one write. What the formats
    share: the scratch file, the length check, the publish and the discard."""

    clip_format = ""

    def __init__(self, store: Store, path: str, fingerprint: str):
        self.store = store
        self.path = path
        self.fingerprint = fingerprint
        self._scratch: Scratch | None = None  # named on first use: a short WAV clip never has one
        self._bytes = 0  # PCM (and header) bytes received
        self._expected = 0
        self.info: StreamInfo | None = None

    def begin(self, info: StreamInfo) -> None:
        self.info = info
        self._expected = info.num_frames * info.frame_bytes

    def _comment(self) -> str:
        return json.dumps(_served(self.fingerprint, self.info), separators=(",", ":"))

    def _scratch_file(self) -> str:
        if self._scratch is None:
            self._scratch = self.store.scratch_file("." + self.clip_format)
        return self._scratch.path

    def finish(self) -> FinishedClip:
        """The complete clip, checked against the length the stream announced. A clip that cannot be
        finished (short, or its last write failed) is discarded and raises OSError: a WRITE_FAILED row."""
        try:
            if self._bytes != self._expected:
                raise OSError(f"clip {self.path} got {self._bytes} bytes, expected {self._expected}")
            return self._finish()
        except BaseException:
            self.discard()
            raise

    def _finish(self) -> FinishedClip:
        raise NotImplementedError

    def publish(self) -> WrittenClip:
        """Put the complete clip at its path, with what it is in the object's metadata (where the store keeps any)."""
        done = self.finish()
        written = WrittenClip(self.path, self.info, self.info.num_frames, done.num_bytes, done.sha256)
        mime = _MIME[self.clip_format]
        try:
            metadata = to_metadata(self.fingerprint, written)
            self.store.put(self.path, done.data, file=done.file, content_type=mime, metadata=metadata)
        finally:
            self.discard()  # the scratch file, published or not
        return written

    def _close(self) -> None:
        pass

    def discard(self) -> None:
        """Drop a clip that will not be published, and its scratch file, whatever closing it says."""
        try:
            with contextlib.suppress(OSError):  # a file that failed to write may fail to close (a full disk)
                self._close()
        finally:
            scratch, self._scratch = self._scratch, None
            if scratch is not None:
                scratch.close()


class WavClip(ClipFile):
    """A WAV clip: kept in memory up to SPILL_BYTES, then spilled to a scratch file; its sha256 is taken as
    bytes leave the buffer, so the file is never read back."""

    clip_format = "wav"

    def __init__(self, store: Store, path: str, fingerprint: str):
        super().__init__(store, path, fingerprint)
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._hash = hashlib.sha256()

    def begin(self, info: StreamInfo) -> None:
        super().begin(info)
        header = wav_header(info.num_frames, info.channels, self._comment())
        self._expected += len(header)
        self.write(header)

    def write(self, pcm: bytes) -> None:
        self._bytes += len(pcm)
        self._buffer += pcm
        if len(self._buffer) >= SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = open(self._scratch_file(), "wb")  # noqa: SIM115 - closed in finish/discard
        self._hash.update(self._buffer)
        self._file.write(self._buffer)
        self._buffer.clear()

    def _finish(self) -> FinishedClip:
        if self._file is not None:
            self._spill()
            self._close()
            return FinishedClip(None, self._scratch, self._bytes, self._hash.hexdigest())
        self._hash.update(self._buffer)
        return FinishedClip(bytes(self._buffer), None, self._bytes, self._hash.hexdigest())

    def _close(self) -> None:
        self._buffer.clear()
        file, self._file = self._file, None
        if file is not None:
            file.close()


class FlacClip(ClipFile):
    """A FLAC clip: encoded straight into a scratch file (the encoder's bytes exist only there), read back
    and hashed once it is closed. libsndfile's errors are raised as OSError, as a file's are."""

    clip_format = "flac"

    def __init__(self, store: Store, path: str, fingerprint: str):
        super().__init__(store, path, fingerprint)
        self._file: sf.SoundFile | None = None

    def begin(self, info: StreamInfo) -> None:
        super().begin(info)
        with _encoder_errors(self.path):
            self._file = sf.SoundFile(self._scratch_file(), "w", SAMPLE_RATE, info.channels, "PCM_16", format="FLAC")
            self._file.comment = self._comment()

    def write(self, pcm: bytes) -> None:
        with _encoder_errors(self.path):
            self._file.write(np.frombuffer(pcm, "<i2").reshape(-1, self.info.channels))
        self._bytes += len(pcm)

    def _finish(self) -> FinishedClip:
        self._close()
        self._check_complete()
        digest, size = _hash_file(self._scratch.path)
        return FinishedClip(None, self._scratch, size, digest)

    def _check_complete(self) -> None:
        """libsndfile's close ignores a write that fails as the encoder finishes (its last frame, then the
        STREAMINFO with the length) and reports success; such a file claims 2**63-1 frames. So the closed
        file's header is read back, and a clip that does not say it has all its frames is not published."""
        with _encoder_errors(self.path):
            frames = sf.info(self._scratch.path).frames
        if frames != self.info.num_frames:
            raise OSError(f"clip {self.path}: the FLAC file is incomplete ({frames} of {self.info.num_frames} frames)")

    def _close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with _encoder_errors(self.path):
                file.close()


@contextlib.contextmanager
def _encoder_errors(path: str) -> Iterator[None]:
    """libsndfile's errors as OSError, as a failed file write is (a full disk is its "System error."), so
    that the row becomes WRITE_FAILED instead of failing the bundle."""
    try:
        yield
    except sf.SoundFileRuntimeError as e:
        raise OSError(f"clip {path}: libsndfile: {e}") from e


class MixToMono:
    """An AudioSink that hands `sink` each frame's channels averaged into one (`--channels mix`): a mono clip of
    multi-channel audio, which a mono model trains on with its one transcript and no loader setting. The mean
    is rounded to the nearest integer (halves to even), so mono audio passes unchanged."""

    def __init__(self, sink: ClipFile):
        self.sink = sink
        self.channels = 1

    def begin(self, info: StreamInfo) -> None:
        self.channels = info.channels
        self.sink.begin(dataclasses.replace(info, channels=1))

    def write(self, pcm: bytes) -> None:
        if self.channels == 1:
            self.sink.write(pcm)
            return
        frames = np.frombuffer(pcm, "<i2").reshape(-1, self.channels)
        self.sink.write(np.rint(frames.mean(axis=1)).astype("<i2").tobytes())


class ClipFiles:
    """The `files` layout's writer: each clip published at its own path, in one write, once it is complete."""

    @staticmethod
    def finish(clip: ClipFile) -> tuple[WrittenClip, None]:
        return clip.publish(), None


CLIP_FILES = ClipFiles()


def fingerprint_of(request_fingerprint: str, channels: str) -> str:
    """What a clip was made for: the request, and a mix of its channels (so a rerun that changes --channels
    sees the other kind of clip as stale)."""
    return request_fingerprint if channels == KEEP else f"{request_fingerprint}/{channels}"


WRITERS: dict[str, type[ClipFile]] = {"wav": WavClip, "flac": FlacClip}  # one writer per clip format
CLIP_FORMATS = tuple(WRITERS)


def clip_file(store: Store, path: str, fingerprint: str, clip_format: str = "wav") -> ClipFile:
    """The writer of one clip in `clip_format`."""
    return WRITERS[clip_format](store, path, fingerprint)


def _served(fingerprint: str, info: StreamInfo) -> dict[str, int | str]:
    """What a clip says about itself: the request, and what was served."""
    return {
        "request": fingerprint,
        "clip_start_ms": info.start_ms,
        "clip_duration_ms": info.duration_ms,
        "object_duration_ms": info.total_duration_ms,
    }


def to_metadata(fingerprint: str, clip: WrittenClip) -> dict[str, str]:
    """A bucket object's metadata: enough to describe the clip without reading it. Keys use "-", not "_"
    (proxies drop header names with "_"); S3 lower-cases them."""
    described = {**_served(fingerprint, clip.info), "channels": clip.info.channels, "sha256": clip.sha256}
    return {k.replace("_", "-"): str(v) for k, v in described.items()}


def _hash_file(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def existing_clip(store: Store, path: str, fingerprint: str, clip_format: str = "wav") -> WrittenClip | None:
    """The clip already at `path`, if it is complete and was made for the same request.

    On a bucket: one metadata request, no audio read. On a local disk: the header, then the file's hash.
    An object without our metadata (written by an older version) counts as absent and is fetched again: on a
    bucket its header would cost a download per clip, which the metadata is there to spare.
    """
    found = store.head(path)
    if found is None:
        return None
    if found.metadata:
        return _from_metadata(found, fingerprint)
    return _from_local_file(path, fingerprint, clip_format) if store.local else None


def _from_metadata(found: StoredObject, fingerprint: str) -> WrittenClip | None:
    m = {k.lower(): v for k, v in found.metadata.items()}
    try:
        if m["request"] != fingerprint:
            return None
        info = StreamInfo(
            fingerprint.split("/")[0],
            int(m["clip-start-ms"]),
            int(m["clip-duration-ms"]),
            int(m["object-duration-ms"]),
            int(m["channels"]),
        )
        sha256 = m["sha256"]
    except (KeyError, ValueError):
        return None
    return WrittenClip(found.path, info, info.num_frames, found.size, sha256)


def _from_local_file(path: str, fingerprint: str, clip_format: str) -> WrittenClip | None:
    with open(path, "rb") as f:
        described = _describe_flac(f) if clip_format == "flac" else _describe_wav(f)
    if described is None:
        return None
    meta, channels, frames = described
    if meta.get("request") != fingerprint or frames != meta["clip_duration_ms"] * SAMPLES_PER_MS:
        return None
    info = StreamInfo(
        fingerprint.split("/")[0], meta["clip_start_ms"], meta["clip_duration_ms"], meta["object_duration_ms"], channels
    )
    digest, size = _hash_file(path)
    return WrittenClip(path, info, frames, size, digest)


def _describe_wav(f: BinaryIO) -> tuple[dict, int, int] | None:
    """(comment, channels, frames present) of a WAV clip, or None when it is not one of ours."""
    head = f.read(4096)
    try:
        header = parse_wav_header(head)
        meta = json.loads(header.comment) if header and header.comment else None
    except ValueError:
        return None
    if not meta or header.sample_rate != SAMPLE_RATE:
        return None
    f.seek(0, os.SEEK_END)
    present = min(header.data_bytes, f.tell() - header.data_offset)
    return meta, header.channels, present // (header.channels * BYTES_PER_SAMPLE)


def _describe_flac(f: BinaryIO) -> tuple[dict, int, int] | None:
    """(comment, channels, frames) of a FLAC clip, or None when it is not one of ours or cannot be read."""
    try:
        with sf.SoundFile(f) as clip:
            meta = json.loads(clip.comment) if clip.comment else None
            if not meta or clip.samplerate != SAMPLE_RATE:
                return None
            return meta, clip.channels, clip.frames
    except (RuntimeError, ValueError):  # soundfile's errors for a file it cannot decode
        return None
