"""WebDataset-style tar shards: `{key}.wav` (or .flac) and `{key}.json` per sample (key: the clip_id).

With `--shards N` the requests are grouped by a hash of their clip_id into N shards before the fetch; each
shard's clips are written into a tar in a local scratch file as they arrive, and the tar is published in
one write at `{output}/shards/shard-NNNNN.tar`, so a reader never sees half a shard and no clip is staged
in the output. The clips table then points at the shard (`path`, relative to the output) and the `member`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

from pipeline.clips import ClipFile, FinishedClip, WrittenClip
from pipeline.elements import ClipError, ClipRecord
from pipeline.layout import path_of, shard_name
from pipeline.storage import Store
from pipeline.tables import to_row


def shard_of(clip_id: str, shards: int) -> int:
    """A stable shard for a clip (the same on every run and every worker)."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") % shards


def sample_key(clip_id: str) -> str:
    """The sample's key in a shard: WebDataset takes a member's name up to its first "." as the key, so the
    dots of a clip_id become "~" (a character clip_ids never hold, so keys stay distinct)."""
    return clip_id.replace(".", "~")


class ShardWriter:
    """One tar shard, built in a local scratch file and published whole."""

    def __init__(self, store: Store, output: str, shard: int):
        self.store = store
        self.name = shard_name(shard)  # as the tables name it: relative to the root
        self.path = path_of(output, self.name)
        self.failure: OSError | None = None  # once set, clips are dropped and the shard is not published
        self._scratch: str | None = None
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        try:
            self._scratch = store.scratch_file(".tar")
            self._file = open(self._scratch, "wb")  # noqa: SIM115 - closed in publish/discard
            self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        except OSError as e:  # no scratch to write the shard into: each of its rows becomes WRITE_FAILED
            self.failure = e

    def finish(self, clip: ClipFile) -> tuple[WrittenClip, FinishedClip]:
        """A complete clip's bytes, kept (in memory or a scratch file) until `place` adds them to the tar."""
        done = clip.finish()
        return WrittenClip(clip.path, clip.info, clip.info.num_frames, done.num_bytes, done.sha256), done

    def place(self, out: ClipRecord | ClipError, finished: FinishedClip | None) -> ClipRecord | ClipError:
        """The row of one finished call, its clip added to the shard (unless the shard has failed)."""
        return self.add(out, finished) if isinstance(out, ClipRecord) else out

    def add(self, record: ClipRecord, clip: FinishedClip) -> ClipRecord:
        """Add a clip and its JSON; the record as the table will hold it (the shard's path, the member).
        A failed write is kept in `failure` (every row of the shard becomes an error), never raised, so
        that the calls still running are all collected."""
        key = sample_key(record.clip_id)
        member = record.member or key + record.path[record.path.rfind(".") :]  # a copied clip keeps its name
        placed = dataclasses.replace(record, path=self.name, member=member)
        try:
            if self.failure is None:
                self._add_clip(member, clip)
                body = json.dumps(to_row(placed), default=str).encode()
                _add(self._tar, f"{key}.json", io.BytesIO(body), len(body))
        except OSError as e:
            self.failure = e
        finally:
            if clip.file is not None and os.path.exists(clip.file):
                os.remove(clip.file)
        return placed

    def _add_clip(self, member: str, clip: FinishedClip) -> None:
        if clip.file is None:
            _add(self._tar, member, io.BytesIO(clip.data), clip.num_bytes)
            return
        with open(clip.file, "rb") as f:
            _add(self._tar, member, f, clip.num_bytes)

    def publish(self) -> None:
        """Close the tar and put it at its path in one write; a failure is kept in `failure`."""
        try:
            self._tar.close()
            self._file.close()
            self.store.put(self.path, file=self._scratch, content_type="application/x-tar")
        except OSError as e:
            self.failure = e

    def discard(self) -> None:
        """Drop the shard and its scratch file, whatever closing it says."""
        try:
            for stream in (self._tar, self._file):  # the tar first, or it writes its buffer when collected
                if stream is not None:
                    with contextlib.suppress(OSError):  # a full disk fails the buffered bytes' write again
                        stream.close()
        finally:
            if self._scratch is not None and os.path.exists(self._scratch):
                os.remove(self._scratch)


def _add(tar: tarfile.TarFile, name: str, data, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    tar.addfile(info, data)


def read_members(store: Store, path: str, names: set[str]) -> Iterator[tuple[str, bytes]]:
    """The members of the shard at `path` named in `names`, with their bytes, in the tar's order (one pass:
    a local shard read in place, a bucket's in one download)."""
    with _opened(store, path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.name in names:
                yield member.name, tar.extractfile(member).read()


def _opened(store: Store, path: str) -> BinaryIO:
    return open(path, "rb") if store.local else io.BytesIO(store.read(path))
