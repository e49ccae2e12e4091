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

import numpy as np
import soundfile as sf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.audio import BYTES_PER_SAMPLE, SAMPLE_RATE, SAMPLES_PER_MS, parse_wav_header, wav_header
from pipeline.client import StreamInfo

CLIPS_DIR = "clips"
TMP_DIR = "_tmp"  # readers ignore names starting with "_"
SPILL_BYTES = 1 << 20  # audio held in memory per clip before it goes to a temporary file
_READ_BLOCK = 1 << 20


CLIP_FORMATS = ("wav", "flac")


def clip_path(output: str, clip_id: str, clip_format: str = "wav") -> str:
    return FileSystems.join(output, CLIPS_DIR, f"{clip_id}.{clip_format}")


def tmp_dir(output: str) -> str:
    return FileSystems.join(output, TMP_DIR)


def is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) in (None, "file")


def prepare_output(output: str, final_dir: str = CLIPS_DIR) -> None:
    """Create the local folders that writes and renames need (object stores have no folders)."""
    if is_local(output):
        os.makedirs(os.path.join(output, final_dir), exist_ok=True)
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
    """An AudioSink that writes one clip (WAV or FLAC); `publish` moves it to its final path.

    On a local disk the temporary file is `{output}/_tmp/...` itself (plain file calls: Beam's local
    filesystem makes the parent folder on every create, which costs a system call per clip); for an
    object store it is a local temporary file, uploaded to `_tmp/` and renamed when complete. A WAV clip
    is kept in memory up to SPILL_BYTES; a FLAC clip is encoded straight into its temporary file.
    """

    def __init__(self, output: str, clip_id: str, fingerprint: str, clip_format: str = "wav", staged: bool = False):
        """`staged`: publish under `_tmp/` for a later step (tar shards) rather than under `clips/`."""
        self.path = clip_path(output, clip_id, clip_format)
        if staged:
            self.path = FileSystems.join(tmp_dir(output), f"staged-{clip_id}.{clip_format}")
        self.fingerprint = fingerprint
        self.flac = clip_format == "flac"
        self._local = is_local(output)
        self._tmp = FileSystems.join(tmp_dir(output), f"{clip_id}.{uuid.uuid4().hex}.{clip_format}")
        self._local_path: str | None = None  # the temporary file on this machine, once there is one
        self._buffer = bytearray()
        self._file: BinaryIO | sf.SoundFile | None = None
        self._hash = hashlib.sha256()  # of a WAV clip's bytes as they leave the buffer
        self._bytes = 0
        self._expected = 0
        self.info: StreamInfo | None = None

    def begin(self, info: StreamInfo) -> None:
        self.info = info
        comment = _comment(self.fingerprint, info)
        self._expected = info.num_frames * info.frame_bytes
        if self.flac:
            self._file = sf.SoundFile(self._open_local(), "w", SAMPLE_RATE, info.channels, "PCM_16", format="FLAC")
            self._file.comment = comment
        else:
            header = wav_header(info.num_frames, info.channels, comment)
            self._expected += len(header)
            self._append(header)

    def write(self, pcm: bytes) -> None:
        if self.flac:
            self._file.write(np.frombuffer(pcm, "<i2").reshape(-1, self.info.channels))
            self._bytes += len(pcm)
        else:
            self._append(pcm)

    def _append(self, data: bytes) -> None:
        self._bytes += len(data)
        self._buffer += data
        if len(self._buffer) >= SPILL_BYTES:
            self._flush()

    def _open_local(self) -> str:
        if self._local_path is None:
            if self._local:
                self._local_path = self._tmp
            else:
                fd, self._local_path = tempfile.mkstemp(prefix="clip-", suffix=self.path[self.path.rfind(".") :])
                os.close(fd)
        return self._local_path

    def _flush(self) -> None:
        if self._file is None:
            self._file = open(self._open_local(), "wb")  # noqa: SIM115 - closed in publish/discard
        self._hash.update(self._buffer)
        self._file.write(self._buffer)
        self._buffer.clear()

    def publish(self) -> WrittenClip:
        """Put the complete file at its final path and describe it (size and sha256 of the file written)."""
        if self._bytes != self._expected:
            self.discard()
            raise OSError(f"clip {self.path} got {self._bytes} bytes, expected {self._expected}")
        if self.flac:
            digest, size = _hash_local(self._close())  # the encoder's bytes exist only in its file
        else:
            if self._local or self._file is not None:
                self._flush()
                self._close()
            else:  # a short clip for an object store: uploaded straight from memory
                self._hash.update(self._buffer)
            digest, size = self._hash.hexdigest(), self._bytes
        if self._local:
            os.replace(self._tmp, self.path)
        else:
            self._upload()
            FileSystems.rename([self._tmp], [self.path])
        return WrittenClip(self.path, self.info, self.info.num_frames, size, digest)

    def _close(self) -> str | None:
        if self._file is not None:
            self._file.close()
            self._file = None
        return self._local_path

    def _upload(self) -> None:
        out = FileSystems.create(self._tmp, mime_type=_MIME[self.flac], compression_type=CompressionTypes.UNCOMPRESSED)
        with out:
            if self._local_path is None:
                out.write(self._buffer)
            else:
                with open(self._local_path, "rb") as src:
                    shutil.copyfileobj(src, out, _READ_BLOCK)
                os.remove(self._local_path)

    def discard(self) -> None:
        """Drop a clip that will not be published."""
        self._buffer.clear()
        path = self._close()
        if path is not None and os.path.exists(path):
            os.remove(path)


_MIME = {False: "audio/wav", True: "audio/flac"}


def _comment(fingerprint: str, info: StreamInfo) -> str:
    """What the clip's header says about itself: the request, and what was served."""
    served = {
        "request": fingerprint,
        "clip_start_ms": info.start_ms,
        "clip_duration_ms": info.duration_ms,
        "object_duration_ms": info.total_duration_ms,
    }
    return json.dumps(served, separators=(",", ":"))


def _hash_local(path: str) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def existing_clip(output: str, clip_id: str, fingerprint: str, clip_format: str = "wav") -> WrittenClip | None:
    """The clip already at the final path, if it is complete and was made for the same request."""
    path = clip_path(output, clip_id, clip_format)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        described = _describe_flac(f) if clip_format == "flac" else _describe_wav(f)
        if described is None:
            return None
        meta, channels, frames = described
        if meta.get("request") != fingerprint or frames != meta["clip_duration_ms"] * SAMPLES_PER_MS:
            return None
        f.seek(0)
        digest, size = hashlib.sha256(), 0
        while block := f.read(_READ_BLOCK):
            digest.update(block)
            size += len(block)
    info = StreamInfo(
        fingerprint.split("/")[0], meta["clip_start_ms"], meta["clip_duration_ms"], meta["object_duration_ms"], channels
    )
    return WrittenClip(path, info, frames, size, digest.hexdigest())


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
