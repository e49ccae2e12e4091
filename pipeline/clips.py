"""Clip files: WAV built as the audio arrives, then published whole at a deterministic final path.

A crash or a retried bundle never leaves a partial file at a final path: every clip is written under
`{output}/_tmp/` (a prefix readers ignore) and renamed to `{output}/clips/{clip_id}.wav` once complete:
an atomic rename on a local disk, a server-side copy on object stores. (Object stores publish a
writer's object when it is closed, even by an exception or the garbage collector, so the final path is
never written to directly.) Audio is kept in memory up to `SPILL_BYTES` and then streamed to a temporary
file, so a short clip costs one write and a one-hour clip never sits in memory. Each clip's header
carries what was asked for and served (a LIST/INFO comment), so `--skip_existing` can tell a complete,
current clip from a stale one without any other record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.audio import SAMPLE_RATE, parse_wav_header, wav_header
from pipeline.client import StreamInfo

CLIPS_DIR = "clips"
TMP_DIR = "_tmp"  # readers ignore names starting with "_"
SPILL_BYTES = 1 << 20  # audio held in memory per clip before it goes to a temporary file
_READ_BLOCK = 1 << 20


def clip_path(output: str, clip_id: str) -> str:
    return FileSystems.join(output, CLIPS_DIR, f"{clip_id}.wav")


def tmp_dir(output: str) -> str:
    return FileSystems.join(output, TMP_DIR)


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def prepare_output(output: str) -> None:
    """Create the local clip folders, which writes and renames need (object stores have no folders)."""
    if is_local(output):
        os.makedirs(os.path.join(output, CLIPS_DIR), exist_ok=True)
        os.makedirs(os.path.join(output, TMP_DIR), exist_ok=True)


def remove_tmp(output: str) -> None:
    """Delete what crashed or failed writers left under `_tmp/` (run after a pipeline has finished)."""
    left = FileSystems.match([FileSystems.join(tmp_dir(output), "*")])[0].metadata_list
    if left:
        FileSystems.delete([m.path for m in left])
    if is_local(output) and os.path.isdir(tmp_dir(output)):
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
    """An AudioSink that writes one WAV clip; `publish` moves it to its final path, `discard` drops it.

    On a local disk the temporary file is `{output}/_tmp/...` itself (plain file calls: Beam's local
    filesystem makes the parent folder on every create, which costs a system call per clip); for an
    object store it is a local temporary file, uploaded to `_tmp/` and renamed when complete.
    """

    def __init__(self, output: str, clip_id: str, fingerprint: str):
        self.path = clip_path(output, clip_id)
        self.fingerprint = fingerprint
        self._local = is_local(output)
        self._tmp = FileSystems.join(tmp_dir(output), f"{clip_id}.{uuid.uuid4().hex}.wav")
        self._buffer = bytearray()
        self._spill: BinaryIO | None = None
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
        self.write(header)

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._bytes += len(data)
        self._buffer += data
        if len(self._buffer) >= SPILL_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._spill is None:
            if self._local:
                self._spill = open(self._tmp, "wb")  # noqa: SIM115 - closed in publish/discard
            else:
                self._spill = tempfile.NamedTemporaryFile(prefix="clip-", suffix=".wav", delete=False)  # noqa: SIM115
        self._spill.write(self._buffer)
        self._buffer.clear()

    def publish(self) -> WrittenClip:
        """Put the complete file at its final path and describe it."""
        if self._bytes != self._expected:
            self.discard()
            raise OSError(f"clip {self.path} has {self._bytes} bytes, expected {self._expected}")
        if self._local:
            self._flush()
            self._spill.close()
            os.replace(self._tmp, self.path)
        else:
            self._upload()
            FileSystems.rename([self._tmp], [self.path])
        return WrittenClip(self.path, self.info, self.info.num_frames, self._bytes, self._hash.hexdigest())

    def _upload(self) -> None:
        out = FileSystems.create(self._tmp, mime_type="audio/wav", compression_type=CompressionTypes.UNCOMPRESSED)
        with out:
            if self._spill is not None:
                self._flush()
                self._spill.close()
                with open(self._spill.name, "rb") as src:
                    shutil.copyfileobj(src, out, _READ_BLOCK)
                os.remove(self._spill.name)
            else:
                out.write(self._buffer)

    def discard(self) -> None:
        """Drop a clip that will not be published."""
        self._buffer.clear()
        if self._spill is not None:
            self._spill.close()
            if os.path.exists(self._spill.name):
                os.remove(self._spill.name)


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
