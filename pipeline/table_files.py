"""The clips and errors tables as Parquet files: `{output}/metadata/{name}-SSSSS-of-NNNNN.parquet`.

Rows are spread over N shards by a hash of the clip (the same on every run), the shards are written in
parallel, each into a local scratch file and published in one write, and every shard is written even
when it holds no rows, so the N names of a run are always all there. Files of another shard count, left
by an earlier run, are removed by `remove_stale` once the new ones are in place.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import Store, StoreSettings, open_store

METADATA_DIR = "metadata"
ROWS_PER_SHARD = 1_000_000  # the default shard count gives each shard about this many rows
MAX_SHARDS = 1024
_BATCH = 10_000


def default_shards(rows: int) -> int:
    return max(1, min(MAX_SHARDS, math.ceil(rows / ROWS_PER_SHARD)))


def table_path(output: str, name: str, shard: int, shards: int) -> str:
    return f"{output.rstrip('/')}/{METADATA_DIR}/{name}-{shard:05d}-of-{shards:05d}.parquet"


def table_prefix(output: str, name: str) -> str:
    """What every file of the table starts with (a glob is this plus `*.parquet`)."""
    return f"{output.rstrip('/')}/{METADATA_DIR}/{name}-"


def _shard(row: dict[str, Any], shards: int) -> int:
    key = row.get("clip_id") or row.get("error_message") or ""
    return zlib.crc32(key.encode()) % shards


class WriteTable(beam.PTransform):
    """Rows (dicts) -> the paths of the table's N files, all written."""

    def __init__(self, output: str, name: str, schema: pa.Schema, shards: int, store: StoreSettings):
        super().__init__()
        self.output, self.name, self.schema, self.shards, self.store = output, name, schema, shards, store

    def expand(self, rows):
        n = self.shards
        keyed = rows | "KeyByShard" >> beam.Map(lambda row: (_shard(row, n), row))
        every = rows.pipeline | "EveryShard" >> beam.Create([(i, None) for i in range(n)])
        return (
            (keyed, every)
            | "Together" >> beam.Flatten()
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self.output, self.name, self.schema, n, self.store))
        )


class _WriteShard(beam.DoFn):
    def __init__(self, output: str, name: str, schema: pa.Schema, shards: int, store: StoreSettings):
        self.output, self.name, self.schema, self.shards, self.settings = output, name, schema, shards, store

    def setup(self) -> None:
        self.store = open_store(self.output, self.settings)

    def process(self, item: tuple[int, Iterable[dict[str, Any] | None]]) -> Iterator[str]:
        shard, rows = item
        path = table_path(self.output, self.name, shard, self.shards)
        scratch = self.store.scratch_file(".parquet")
        with pq.ParquetWriter(scratch, self.schema) as writer:
            for batch in _batches((r for r in rows if r is not None), _BATCH):
                writer.write_table(pa.Table.from_pylist(batch, self.schema))
        self.store.put(path, file=scratch, content_type="application/vnd.apache.parquet")
        yield path


def _batches(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def remove_stale(store: Store, output: str, name: str, written: Iterable[str]) -> list[str]:
    """Delete the table's files that this run did not write (an earlier run's other shard count)."""
    keep = set(written)
    stale = [o.path for o in store.list(table_prefix(output, name)) if o.path not in keep]
    if stale:
        store.delete(stale)
    return stale
