"""Sharded layouts: a shard's clips written into one local scratch file as they arrive, and the shard published
in one write, so a reader never sees half a shard and no clip is staged in the output. One writer per layout,
sharing the scratch file, the failure and the publish step (the shape of lhotse's `shar/writers/`):

- `webdataset`: a tar, `shards/audio_NNNNN.tar`, with `{key}.wav` (or .flac) and `{key}.json` (the clip's row)
  per sample (key: the clip_id, its dots as `~`).
- `hf-parquet`: a Parquet file, `data/train-NNNNN.parquet`, one row per clip: every clips-table column, the
  duration in seconds, and `audio` in Hugging Face's Audio encoding ({bytes, path}) declared in the file's
  schema metadata, so `datasets.load_dataset(root)` decodes it with no cast.
- `lhotse-shar`: Lhotse's Shar, `shar/recording.NNNNNN.tar` (each clip's audio, `{clip_id}.wav`, and its
  recording's JSON) and `shar/cuts.NNNNNN.jsonl.gz` beside it, the cuts in the tar's order.

The requests are grouped by a hash of their clip_id into N shards before the fetch (the same shard on every
run); the clips table then points at the shard (`path`, relative to the root) and the clip in it (`member`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.audio import SAMPLE_RATE
from pipeline.core.elements import ClipError, ClipRecord
from pipeline.core.tables import to_row
from pipeline.dataset.clips import ClipFile, FinishedClip, WrittenClip
from pipeline.dataset.export import lhotse_cut, lhotse_recording
from pipeline.dataset.layout import HF_PARQUET, LHOTSE_SHAR, WEBDATASET, path_of, shard_names
from pipeline.dataset.storage import Scratch, StorageError, Store

log = logging.getLogger(__name__)

ROW_GROUP_BYTES = 64 << 20  # audio held for a Parquet shard before a row group is written


def shard_of(clip_id: str, shards: int) -> int:
    """A stable shard for a clip (the same on every run and every worker)."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") % shards


def sample_key(clip_id: str) -> str:
    """The sample's key in a shard: WebDataset takes a member's name up to its first "." as the key, so the
    dots of a clip_id become "~" (a character clip_ids never hold, so keys stay distinct)."""
    return clip_id.replace(".", "~")


class Shard:
    """What every sharded layout's writer does: a shard built in a local scratch file and published whole. A
    failed write is kept in `failure` (every row of the shard becomes an error), never raised, so that the
    calls still running are all collected."""

    layout = ""
    suffix = ""
    content_type = ""

    def __init__(self, store: Store, output: str, shard: int):
        self.store = store
        self.output = output
        self.names = shard_names(shard, self.layout)  # its files, relative to the root: the tables name the first
        self.name = self.names[0]
        self.path = path_of(output, self.name)
        self.failure: OSError | None = None  # once set, clips are dropped and the shard is not published
        self._scratch: Scratch | None = None
        try:
            self._scratch = store.scratch_file(self.suffix)
            self._open(self._scratch.path)
        except OSError as e:  # no scratch to write the shard into: each of its rows becomes WRITE_FAILED
            self.failure = e

    def finish(self, clip: ClipFile) -> tuple[WrittenClip, FinishedClip]:
        """A complete clip's bytes, kept (in memory or a scratch file) until `place` adds them to the shard."""
        done = clip.finish()
        return WrittenClip(clip.path, clip.info, clip.info.num_frames, done.num_bytes, done.sha256), done

    def place(self, out: ClipRecord | ClipError, finished: FinishedClip | None) -> ClipRecord | ClipError:
        """The row of one finished call, its clip added to the shard (unless the shard has failed)."""
        return self.add(out, finished) if isinstance(out, ClipRecord) else out

    def member(self, record: ClipRecord) -> str:
        """A clip's name in the shard (a copied clip keeps its own)."""
        return record.member or sample_key(record.clip_id) + record.path[record.path.rfind(".") :]

    def add(self, record: ClipRecord, clip: FinishedClip) -> ClipRecord:
        """Add a clip; the record as the table will hold it (the shard's path, the member)."""
        member = self.member(record)
        placed = dataclasses.replace(record, path=self.name, member=member)
        try:
            if self.failure is None:
                self._add(placed, clip)
        except OSError as e:
            self.failure = e
        finally:
            clip.close()
        return placed

    def publish(self) -> None:
        """Close the shard and put it at its path in one write; a failure is kept in `failure`."""
        try:
            self._close()
            with self._scratch:
                self.store.put(self.path, file=self._scratch, content_type=self.content_type)
        except OSError as e:
            self.failure = e

    def discard(self) -> None:
        """Drop the shard and its scratch file, whatever closing it says."""
        try:
            with contextlib.suppress(OSError):  # a full disk fails the buffered bytes' write again
                self._close()
        finally:
            if self._scratch is not None:
                self._scratch.close()

    def _open(self, scratch: str) -> None:
        raise NotImplementedError

    def _add(self, placed: ClipRecord, clip: FinishedClip) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def members(store: Store, path: str, names: set[str]) -> Iterator[tuple[str, bytes]]:
        """The clips of the shard at `path` named in `names`, with their bytes (a rebuild copies them)."""
        raise NotImplementedError


def _clip_bytes(clip: FinishedClip) -> bytes:
    if clip.file is None:
        return clip.data
    with open(clip.file.path, "rb") as f:
        return f.read()


class TarShard(Shard):
    """A WebDataset tar: each clip's audio, then its row as JSON."""

    layout = WEBDATASET
    suffix = ".tar"
    content_type = "application/x-tar"

    def _open(self, scratch: str) -> None:
        self._file: BinaryIO | None = open(scratch, "wb")  # noqa: SIM115 - closed in publish/discard
        self._tar: tarfile.TarFile | None = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def _add(self, placed: ClipRecord, clip: FinishedClip) -> None:
        self._add_audio(placed.member, clip)
        self._add_json(f"{sample_key(placed.clip_id)}.json", json.dumps(to_row(placed), default=str))

    def _add_audio(self, member: str, clip: FinishedClip) -> None:
        if clip.file is None:
            _add(self._tar, member, io.BytesIO(clip.data), clip.num_bytes)
        else:
            with open(clip.file.path, "rb") as f:
                _add(self._tar, member, f, clip.num_bytes)

    def _add_json(self, member: str, text: str) -> None:
        body = text.encode()
        _add(self._tar, member, io.BytesIO(body), len(body))

    def _close(self) -> None:
        """The tar first, or it writes its buffer when collected; then the file, even when the tar's last write
        fails: a removed scratch file still open holds its space on a full disk until it is collected."""
        tar, file = getattr(self, "_tar", None), getattr(self, "_file", None)
        self._tar = self._file = None
        try:
            if tar is not None:
                tar.close()
        finally:
            if file is not None:
                file.close()

    @staticmethod
    def members(store: Store, path: str, names: set[str]) -> Iterator[tuple[str, bytes]]:
        """In the tar's order, in one pass: a local shard read in place, a bucket's in one download."""
        with store.open_for_read(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if member.name in names:
                    yield member.name, tar.extractfile(member).read()


class SharShard(TarShard):
    """A Lhotse Shar shard: `recording.NNNNNN.tar` with each clip's audio as it is (`{clip_id}.wav`) and its
    recording's JSON (Lhotse's placeholder, a "shar" source), and beside it `cuts.NNNNNN.jsonl.gz`, the cuts in
    the tar's order, each with its supervision when the clip has a transcript (Lhotse's `shar/writers/`). Read
    by `CutSet.from_shar(in_dir=f"{root}/shar")`."""

    layout = LHOTSE_SHAR

    def _open(self, scratch: str) -> None:
        super()._open(scratch)
        self._cuts: list[str] = []

    def member(self, record: ClipRecord) -> str:
        """Shar pairs a member with its cut by the name without its last suffix: the clip_id itself."""
        return record.member or record.clip_id + record.path[record.path.rfind(".") :]

    def _add(self, placed: ClipRecord, clip: FinishedClip) -> None:
        row = to_row(placed)
        recording = lhotse_recording(row)
        recording["sources"] = [{"type": "shar", "channels": recording["channel_ids"], "source": ""}]
        self._add_audio(placed.member, clip)
        self._add_json(f"{placed.clip_id}.json", json.dumps(recording) + "\n")
        cut = lhotse_cut(row, supervised=False, with_recording=False)
        self._cuts.append(json.dumps(cut, ensure_ascii=False))

    def publish(self) -> None:
        """The recordings' tar, then the cuts (Lhotse reads a shard once both are there). When the cuts cannot be
        written, the tar just published goes again, and any earlier cuts: a shard is both files or neither, as a
        tar without its cuts, or beside another run's, stops Lhotse's reader."""
        super().publish()
        if self.failure is not None:
            return
        cuts = path_of(self.output, self.names[1])
        body = gzip.compress("".join(f"{cut}\n" for cut in self._cuts).encode())
        try:
            self.store.put(cuts, body, content_type="application/gzip")
        except StorageError as e:
            self.failure = e
            self._unpublish([self.path, cuts])

    def _unpublish(self, paths: list[str]) -> None:
        for path in paths:
            try:
                if self.store.head(path) is not None:
                    self.store.delete([path])
            except StorageError as e:
                log.warning("%s could not be removed (%s); Lhotse's reader stops there until a rerun", path, e)


def hf_schema(clips: pa.Schema) -> pa.Schema:
    """A Parquet shard's columns: the clips table's, `duration` in seconds (unless the manifest has one), and
    `audio` ({bytes, path}), declared an Audio feature at 16 kHz in the metadata `datasets` reads."""
    fields = list(clips)
    if "duration" not in clips.names:
        fields.append(pa.field("duration", pa.float64()))
    fields.append(pa.field("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
    features = {"audio": {"_type": "Audio", "sampling_rate": SAMPLE_RATE}}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


class ParquetShard(Shard):
    """A Hugging Face Parquet shard: one row per clip, its audio's bytes in the row."""

    layout = HF_PARQUET
    suffix = ".parquet"
    content_type = "application/vnd.apache.parquet"

    def __init__(self, store: Store, output: str, shard: int, clips_schema: pa.Schema):
        self.schema = hf_schema(clips_schema)
        self._rows: list[dict[str, Any]] = []
        self._held = 0
        super().__init__(store, output, shard)

    def _open(self, scratch: str) -> None:
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(scratch, self.schema)

    def _add(self, placed: ClipRecord, clip: FinishedClip) -> None:
        row = to_row(placed)
        row.setdefault("duration", placed.num_samples / placed.sample_rate)
        row["audio"] = {"bytes": _clip_bytes(clip), "path": placed.member}
        self._rows.append(row)
        self._held += clip.num_bytes
        if self._held >= ROW_GROUP_BYTES:
            self._flush()

    def discard(self) -> None:
        self._rows = []  # not written into a file about to be removed
        super().discard()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, self.schema))
        self._rows, self._held = [], 0

    def _close(self) -> None:
        if getattr(self, "_writer", None) is None:
            return
        try:
            self._flush()
        finally:
            writer, self._writer, self._rows = self._writer, None, []
            writer.close()

    @staticmethod
    def members(store: Store, path: str, names: set[str]) -> Iterator[tuple[str, bytes]]:
        with store.open_for_read(path) as f:
            table = pq.read_table(f, columns=["member", "audio"])
        for member, audio in zip(table.column("member").to_pylist(), table.column("audio").to_pylist(), strict=True):
            if member in names:
                yield member, audio["bytes"]


def _add(tar: tarfile.TarFile, name: str, data, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    tar.addfile(info, data)


SHARDS: dict[str, type[Shard]] = {WEBDATASET: TarShard, HF_PARQUET: ParquetShard, LHOTSE_SHAR: SharShard}
