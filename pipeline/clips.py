"""Clip files: WAV streamed to a temporary object, then published whole at a deterministic final path.

A crash or a retried bundle never leaves a partial file at a final path: every clip is written under
`{output}/_tmp/` (a prefix readers ignore) and renamed to `{output}/clips/{clip_id}.wav` once complete:
an atomic rename on a local disk, a server-side copy on object stores. (Object stores publish a
writer's object when it is closed, even by an exception or the garbage collector, so the final path is
never written to directly.) Each clip's header carries what was asked for and served (a LIST/INFO
comment), so `--skip_existing` can tell a complete, current clip from a stale one without any other record.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.audio import SAMPLE_RATE, parse_wav_header, wav_header
from pipeline.client import StreamInfo

CLIPS_DIR = "clips"
TMP_DIR = "_tmp"  # readers ignore names starting with "_"
_READ_BLOCK = 1 << 20


def clip_path(output: str, clip_id: str) -> str:
    return FileSystems.join(output, CLIPS_DIR, f"{clip_id}.wav")


def tmp_dir(output: str) -> str:
    return FileSystems.join(output, TMP_DIR)


def prepare_output(output: str) -> None:
    """Create the local clip folder, which a rename needs (object stores have no folders)."""
    if FileSystems.get_scheme(output) in (None, "file"):
        os.makedirs(os.path.join(output, CLIPS_DIR), exist_ok=True)


def remove_tmp(output: str) -> None:
    """Delete what crashed or failed writers left under `_tmp/` (run after a pipeline has finished)."""
    left = FileSystems.match([FileSystems.join(tmp_dir(output), "*")])[0].metadata_list
    if left:
        FileSystems.delete([m.path for m in left])
    if FileSystems.get_scheme(output) in (None, "file") and os.path.isdir(tmp_dir(output)):
        os.rmdir(tmp_dir(output))


@dataclass(frozen=True)
class WrittenClip:
    """A clip file at its final path, as the clips table describes it."""

    path: str
    info: StreamInfo
    num_frames: int
    num_bytes: int
    sha256: str


class ClipFile:
    """An AudioSink that writes one WAV clip; `publish` moves it to its final path, `discard` drops it."""

    def __init__(self, output: str, clip_id: str, fingerprint: str):
        self.path = clip_path(output, clip_id)
        self.fingerprint = fingerprint
        self._tmp = FileSystems.join(tmp_dir(output), f"{clip_id}.{uuid.uuid4().hex}.wav")
        self._file = None
        self._hash = hashlib.sha256()
        self._bytes = 0
        self._expected = 0
        self.info: StreamInfo | None = None

    def begin(self, info: StreamInfo) -> None:
        self.info = info
        comment = json.dumps(
            {
                "request": self.fingerprint,
                "clip_start_ms": info.start_ms,
                "clip_duration_ms": info.duration_ms,
                "object_duration_ms": info.total_duration_ms,
            },
            separators=(",", ":"),
        )
        header = wav_header(info.num_frames, info.channels, comment)
        self._expected = len(header) + info.num_frames * info.frame_bytes
        self._file = FileSystems.create(
            self._tmp, mime_type="audio/wav", compression_type=CompressionTypes.UNCOMPRESSED
        )
        self.write(header)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def publish(self) -> WrittenClip:
        """Put the complete file at its final path and describe it."""
        if self._bytes != self._expected:
            self.discard()
            raise OSError(f"clip {self.path} has {self._bytes} bytes, expected {self._expected}")
        self._file.close()
        self._file = None
        FileSystems.rename([self._tmp], [self.path])
        return WrittenClip(self.path, self.info, self.info.num_frames, self._bytes, self._hash.hexdigest())

    def discard(self) -> None:
        """Drop a clip that will not be published (the temporary object is deleted)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            FileSystems.delete([self._tmp])


def existing_clip(output: str, clip_id: str, fingerprint: str) -> WrittenClip | None:
    """The clip already at the final path, if it is complete and was made for the same request."""
    path = clip_path(output, clip_id)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        head = f.read(4096)
        try:
            header = parse_wav_header(head)
            meta = json.loads(header.comment) if header and header.comment else None
        except ValueError:
            return None
        if not meta or meta.get("request") != fingerprint or header.sample_rate != SAMPLE_RATE:
            return None
        digest, size = hashlib.sha256(head), len(head)
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    if size != header.data_offset + header.data_bytes:
        return None
    info = StreamInfo(
        fingerprint.split("/")[0],
        meta["clip_start_ms"],
        meta["clip_duration_ms"],
        meta["object_duration_ms"],
        header.channels,
    )
    frames = header.data_bytes // info.frame_bytes
    return WrittenClip(path, info, frames, size, digest.hexdigest())
