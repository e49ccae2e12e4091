"""The audio facts shared by client, server and clip writer: 16 kHz, 16-bit PCM, WAV headers."""

from __future__ import annotations

import struct
from dataclasses import dataclass

SAMPLE_RATE = 16_000
SAMPLES_PER_MS = SAMPLE_RATE // 1000
BYTES_PER_SAMPLE = 2
WAV_HEADER_BYTES = 44
FORMATS = ("wav", "pcm_s16le")


def pcm_bytes(duration_ms: int, channels: int) -> int:
    """Bytes of 16-bit PCM in `duration_ms` of audio with `channels` interleaved channels."""
    return duration_ms * SAMPLES_PER_MS * channels * BYTES_PER_SAMPLE


def wav_header(num_frames: int, channels: int, comment: str | None = None) -> bytes:
    """The header of a 16 kHz 16-bit PCM WAV file holding `num_frames` frames.

    Without a comment it is the canonical 44 bytes; a comment goes in a LIST/INFO/ICMT chunk, which
    every WAV reader skips or shows as the file's comment.
    """
    data_bytes = num_frames * channels * BYTES_PER_SAMPLE
    block_align = channels * BYTES_PER_SAMPLE
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, channels, SAMPLE_RATE, SAMPLE_RATE * block_align, block_align, 16)
    info = b""
    if comment is not None:
        text = comment.encode() + b"\0"
        text += b"\0" * (len(text) & 1)
        info = struct.pack("<4sI4s4sI", b"LIST", 12 + len(text), b"INFO", b"ICMT", len(text)) + text
    body = fmt + info + struct.pack("<4sI", b"data", data_bytes)
    return struct.pack("<4sI4s", b"RIFF", 4 + len(body) + data_bytes, b"WAVE") + body


@dataclass(frozen=True)
class WavHeader:
    """What a WAV header says: enough to check it against the stream's metadata."""

    channels: int
    sample_rate: int
    bits_per_sample: int
    data_offset: int
    data_bytes: int
    comment: str | None = None


class WavHeaderError(ValueError):
    """The bytes are not a 16-bit PCM WAV header."""


def parse_wav_header(buf: bytes) -> WavHeader | None:
    """Parse a PCM WAV header at the start of `buf`; None while more bytes are needed."""
    if len(buf) < 12:
        return None
    riff, _, wave = struct.unpack_from("<4sI4s", buf, 0)
    if riff != b"RIFF" or wave != b"WAVE":
        raise WavHeaderError("data does not start with a RIFF/WAVE header")
    pos, fmt, comment = 12, None, None
    while len(buf) >= pos + 8:
        chunk_id, size = struct.unpack_from("<4sI", buf, pos)
        if chunk_id == b"data":
            return _data_header(fmt, pos + 8, size, comment)
        needed = 16 if chunk_id == b"fmt " else size if chunk_id == b"LIST" else 0  # the body bytes we read
        if len(buf) < pos + 8 + needed:
            return None
        if chunk_id == b"fmt ":
            fmt = struct.unpack_from("<HHIIHH", buf, pos + 8)
        elif chunk_id == b"LIST":
            comment = _info_comment(buf[pos + 8 : pos + 8 + size]) or comment
        pos += 8 + size + (size & 1)
    return None


def _data_header(fmt: tuple | None, data_offset: int, data_bytes: int, comment: str | None) -> WavHeader:
    """The header, once the data chunk is reached: the fmt chunk must have come first and say 16-bit PCM."""
    if fmt is None:
        raise WavHeaderError("WAV data chunk comes before its fmt chunk")
    audio_format, channels, rate, _, _, bits = fmt
    if audio_format not in (1, 0xFFFE) or bits != 16:
        raise WavHeaderError(f"WAV is not 16-bit PCM (format {audio_format}, {bits} bits)")
    return WavHeader(channels, rate, bits, data_offset, data_bytes, comment)


def _info_comment(chunk: bytes) -> str | None:
    """The ICMT text of a LIST/INFO chunk's body, if it has one."""
    if chunk[:4] != b"INFO":
        return None
    pos = 4
    while pos + 8 <= len(chunk):
        sub_id, size = struct.unpack_from("<4sI", chunk, pos)
        if sub_id == b"ICMT":
            return chunk[pos + 8 : pos + 8 + size].rstrip(b"\0").decode(errors="replace")
        pos += 8 + size + (size & 1)
    return None
