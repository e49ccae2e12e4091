"""WebDataset-style tar shards: `{key}.wav` (or .flac) and `{key}.json` per sample (key: the clip_id).

With `--shards N` each clip is first published under `{output}/_tmp/` (as a plain clip file would be),
then the clips are grouped by a hash of their clip_id into N shards. Each shard is streamed straight to
the output filesystem under `_tmp/` and renamed to `{output}/shards/shard-NNNNN.tar` when complete, so a
reader never sees half a shard. The clips table then points at the shard (`path`) and the `member`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipeline.clips import tmp_dir
from pipeline.elements import ClipRecord
from pipeline.tables import to_row

SHARDS_DIR = "shards"


def shard_of(clip_id: str, shards: int) -> int:
    """A stable shard for a clip (the same on every run and every worker)."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") % shards


def sample_key(clip_id: str) -> str:
    """The sample's key in a shard: WebDataset takes a member's name up to its first "." as the key, so the
    dots of a clip_id become "~" (a character clip_ids never hold, so keys stay distinct)."""
    return clip_id.replace(".", "~")


def shard_path(output: str, shard: int) -> str:
    return FileSystems.join(output, SHARDS_DIR, f"shard-{shard:05d}.tar")


class WriteShards(beam.PTransform):
    """ClipRecords of published clips -> the same records, pointing at their shard and member."""

    def __init__(self, output: str, shards: int):
        super().__init__()
        self.output = output
        self.shards = shards

    def expand(self, records):
        return (
            records
            | "KeyByShard" >> beam.Map(lambda r, n=self.shards: (shard_of(r.clip_id, n), r))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self.output))
        )


class _WriteShard(beam.DoFn):
    def __init__(self, output: str):
        self.output = output

    def process(self, item: tuple[int, Iterable[ClipRecord]]) -> Iterator[ClipRecord]:
        shard, records = item
        records = sorted(records, key=lambda r: r.clip_id)
        final = shard_path(self.output, shard)
        tmp = FileSystems.join(tmp_dir(self.output), f"shard-{shard:05d}.{uuid.uuid4().hex}.tar")
        out = []
        with (
            FileSystems.create(tmp, mime_type="application/x-tar", compression_type=CompressionTypes.UNCOMPRESSED) as f,
            tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            for record in records:
                key = sample_key(record.clip_id)
                member = key + record.path[record.path.rfind(".") :]
                placed = dataclasses.replace(record, path=final, member=member)
                _add(tar, member, record.path, record.num_bytes)
                _add_bytes(tar, f"{key}.json", json.dumps(to_row(placed), default=str).encode())
                out.append(placed)
        FileSystems.rename([tmp], [final])
        yield from out


def _add(tar: tarfile.TarFile, name: str, path: str, size: int) -> None:
    """Stream a published clip into the tar (it is read from the filesystem, never held whole)."""
    info = tarfile.TarInfo(name)
    info.size = size
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as src:
        tar.addfile(info, src)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
