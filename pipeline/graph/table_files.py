"""The clips and errors tables as Parquet files: `{output}/metadata/{name}-{content hash}.parquet`.

Each bundle of rows is written as it comes, into a local scratch file, and published in one write when the
bundle ends: no shuffle of the rows, and no worker holds more than a batch of them (a GroupByKey of every
row would hold the whole table in the in-process runner's memory). A file is named for its content, so a
retried bundle that writes the same rows writes the same file again, not a second copy. The job's last
step keeps exactly the files of the bundles that committed: a retried bundle's abandoned file and an
earlier run's files are removed (`remove_stale`), and a table with no rows gets one empty file, so both
tables always exist.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.dataset.export import ManifestWriter
from pipeline.dataset.layout import export_part_name, path_of, table_prefix
from pipeline.dataset.storage import Scratch, Store, StoreSettings, open_store

log = logging.getLogger(__name__)
_BATCH = 10_000  # rows per Parquet row group


def content_digest(scratch: str) -> str:
    """A complete scratch file's name for its content: a retried bundle's file has the same one."""
    with open(scratch, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def table_path(output: str, name: str, scratch: str) -> str:
    """The path of a table file, named for the content of its complete scratch file."""
    return f"{table_prefix(output, name)}{content_digest(scratch)}.parquet"


class WriteTable(beam.PTransform):
    """Rows (dicts) -> the paths of the table files written, one per bundle that had rows."""

    def __init__(self, output: str, name: str, schema: pa.Schema, store: StoreSettings):
        super().__init__()
        self.output, self.name, self.schema, self.store = output, name, schema, store

    def expand(self, rows):
        return rows | "WriteFiles" >> beam.ParDo(_WriteFiles(self.output, self.name, self.schema, self.store))


class _WriteFiles(beam.DoFn):
    def __init__(self, output: str, name: str, schema: pa.Schema, store: StoreSettings):
        self.output, self.name, self.schema, self.settings = output, name, schema, store

    def setup(self) -> None:
        self.store = open_store(self.output, self.settings)

    def start_bundle(self) -> None:
        self.batch: list[dict[str, Any]] = []
        self.scratch: Scratch | None = None
        self.writer: pq.ParquetWriter | None = None

    def process(self, row: dict[str, Any]) -> Iterable[str]:
        """Nothing per row: a bundle's file path is output when the bundle ends (Beam types the output from here)."""
        self.batch.append(row)
        if len(self.batch) >= _BATCH:
            self._flush()
        return ()

    def _flush(self) -> None:
        if self.writer is None:
            self.scratch = self.store.scratch_file(".parquet")
            self.writer = pq.ParquetWriter(self.scratch.path, self.schema)
        self.writer.write_table(pa.Table.from_pylist(self.batch, self.schema))
        self.batch.clear()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self.batch:
            self._flush()
        if self.writer is None:
            return
        self.writer.close()
        with self.scratch:
            path = table_path(self.output, self.name, self.scratch.path)
            self.store.put(path, file=self.scratch, content_type="application/vnd.apache.parquet")
        yield WindowedValue(path, MIN_TIMESTAMP, [GlobalWindow()])


class WriteExportParts(beam.PTransform):
    """Clip rows -> the paths of the export manifests' parts, one per manifest per bundle that had rows: the
    workers write the manifests as they write the clips table, and the last step only joins the parts
    (`export.assemble_exports`, in the bucket)."""

    def __init__(self, output: str, formats: tuple[str, ...], sharded: bool, store: StoreSettings):
        super().__init__()
        self.output, self.formats, self.sharded, self.store = output, formats, sharded, store

    def expand(self, rows):
        return rows | "WriteParts" >> beam.ParDo(_WriteParts(self.output, self.formats, self.sharded, self.store))


class _WriteParts(beam.DoFn):
    def __init__(self, output: str, formats: tuple[str, ...], sharded: bool, store: StoreSettings):
        self.output, self.formats, self.sharded, self.settings = output, formats, sharded, store

    def setup(self) -> None:
        self.store = open_store(self.output, self.settings)

    def start_bundle(self) -> None:
        self.writer: ManifestWriter | None = None

    def process(self, row: dict[str, Any]) -> Iterable[str]:
        """Nothing per row: a bundle's part paths are output when the bundle ends."""
        if self.writer is None:
            self.writer = ManifestWriter(self.store, self.formats, self.sharded)
        self.writer.add(row)
        return ()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self.writer is None:
            return
        for path in self.writer.publish(self._part_path):
            yield WindowedValue(path, MIN_TIMESTAMP, [GlobalWindow()])

    def _part_path(self, name: str, scratch: str) -> str:
        """A part's path, named for its content: a retried bundle's part is the same file."""
        return path_of(self.output, export_part_name(name, content_digest(scratch)))


def write_empty(store: Store, output: str, name: str, schema: pa.Schema) -> str:
    """A table with no rows still gets a file, with its columns."""
    with store.scratch_file(".parquet") as scratch:
        pq.write_table(schema.empty_table(), scratch.path)
        path = table_path(output, name, scratch.path)
        store.put(path, file=scratch, content_type="application/vnd.apache.parquet")
    return path


def remove_stale(store: Store, output: str, name: str, written: Iterable[str]) -> list[str]:
    """Delete the table's files that no committed bundle of this run wrote."""
    keep = set(written)
    stale = [o.path for o in store.list(table_prefix(output, name)) if o.path not in keep]
    if stale:
        store.delete(stale)
    return stale


class ReadTable(beam.PTransform):
    """pbegin -> the rows (dicts) of the given table files, a row group at a time, the files spread over the
    workers first (`spread`: not on the in-process runner)."""

    def __init__(
        self, output: str, files: Iterable[str], store: StoreSettings, columns: Iterable[str] | None, spread: bool
    ):
        super().__init__()
        self.output, self.files, self.store, self.spread = output, list(files), store, spread
        self.columns = None if columns is None else list(columns)

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self.files)
        if self.spread:
            files = files | "Spread" >> beam.Reshuffle()
        return files | "ReadRows" >> beam.ParDo(_ReadRows(self.output, self.store, self.columns))


class _ReadRows(beam.DoFn):
    def __init__(self, output: str, store: StoreSettings, columns: list[str] | None):
        self.output, self.settings, self.columns = output, store, columns

    def setup(self) -> None:
        self.store = open_store(self.output, self.settings)

    def process(self, path: str) -> Iterator[dict[str, Any]]:
        try:
            table = pq.ParquetFile(io.BytesIO(self.store.read(path)))
        except (OSError, pa.ArrowException) as e:  # its clips are then looked at, or fetched, again
            log.warning("%s cannot be read as a table (%s); the rows it held are not used", path, e)
            return
        columns = None if self.columns is None else [c for c in self.columns if c in table.schema_arrow.names]
        for group in range(table.num_row_groups):
            yield from table.read_row_group(group, columns=columns).to_pylist()
