"""The manifest in the job: its row groups spread over the workers and read, each row checked (the row rules of
pipeline/core/rows.py), clip IDs that several rows use refused; the errors routed to their own output."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.core import elements as el
from pipeline.core.errors import RunError
from pipeline.core.rows import ID_COLUMNS, validate_row
from pipeline.core.tables import RANGE_COLUMNS
from pipeline.graph.batches import batched, unbatched


class ManifestReadError(RunError):
    """A row group that a worker cannot read although the file passed the launch checks (garbled pages past the
    first row group, a file changed or removed since): found late, so the run fails rather than stops."""


@dataclass(frozen=True)
class Piece:
    """One row group of a manifest file: the unit that workers read in parallel."""

    path: str
    row_group: int
    first_row: int  # the file's row number of the group's first row, for "file row N" in messages


@dataclass(frozen=True)
class Manifest:
    files: tuple[str, ...]
    schema: pa.Schema
    num_rows: int
    pieces: tuple[Piece, ...] = ()
    key_object_id: str | None = None  # the first valid object_id of a first row group, for the key check


def float_ranges(schema: pa.Schema) -> list[str]:
    """The range columns that are floating point: their values are read as integers."""
    return [n for n in RANGE_COLUMNS if n in schema.names and pa.types.is_floating(schema.field(n).type)]


def _as_integers(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Float range columns as int64, NaN as null: the values were checked at launch (check_float_ranges)."""
    for name in float_ranges(batch.schema):
        i = batch.schema.get_field_index(name)
        x = pc.cast(batch.column(i), pa.float64())
        x = pc.if_else(pc.is_nan(x), pa.scalar(None, pa.float64()), x)
        batch = batch.set_column(i, name, pc.cast(x, pa.int64()))  # a safe cast: a fraction would raise
    return batch


class ReadManifestRows(beam.DoFn):
    """Reads one row group of a manifest file: (where, row) for each row, where = "file row N".

    Each file's footer is parsed once for the life of the DoFn, not once per row group: a file of 10,000 one-row
    groups has a footer of megabytes (7.8 MB took 120 ms to parse), and parsing it for every group made each of
    the job's two reads take 20 minutes."""

    def __init__(self, columns: list[str]):
        self.columns = columns  # the manifest's columns (an errors table's own are left out)
        self._footers: dict[str, pq.FileMetaData] = {}  # path -> its parsed footer

    def setup(self) -> None:
        self._footers = {}

    def teardown(self) -> None:
        self._footers = {}

    def process(self, piece: Piece) -> Iterator[tuple[str, dict[str, Any]]]:
        index = piece.first_row
        for batch in self._batches(piece):
            for row in _as_integers(batch).to_pylist():
                yield f"{piece.path} row {index}", row
                index += 1

    def _batches(self, piece: Piece) -> Iterator[pa.RecordBatch]:
        """The row group's batches; a failure to read them as a ManifestReadError naming file and row group."""
        try:
            with FileSystems.open(piece.path, compression_type="uncompressed") as f:
                parquet = pq.ParquetFile(f, metadata=self._footers.get(piece.path))
                self._footers[piece.path] = parquet.metadata
                columns = [c for c in parquet.schema_arrow.names if c in self.columns]
                yield from parquet.iter_batches(row_groups=[piece.row_group], columns=columns)
        except Exception as e:
            where = f"row group {piece.row_group} (from file row {piece.first_row})"
            raise ManifestReadError(f"manifest {piece.path}: {where} cannot be read ({e})") from None


class ReadManifest(beam.PTransform):
    """The manifest's rows, its row groups spread over the workers before they are read: a one-file
    manifest of 10M rows is read by as many workers as it has row groups, not by one thread."""

    def __init__(self, manifest: Manifest, columns: Iterable[str] | None = None, spread: bool = True):
        """`columns`: only these (of those the manifest has); None for every column. `spread`: not on the
        in-process runner, where the shuffle only adds steps."""
        super().__init__()
        self.manifest = manifest
        names = manifest.schema.names
        self.columns = names if columns is None else [c for c in names if c in set(columns)]
        self.spread = spread

    def expand(self, pbegin):
        pieces = pbegin | "RowGroups" >> beam.Create(self.manifest.pieces)
        if self.spread:
            pieces = pieces | "Spread" >> beam.Reshuffle()
        return pieces | "ReadRows" >> beam.ParDo(ReadManifestRows(self.columns))


def _route_error(element):
    yield beam.pvalue.TaggedOutput("errors", element) if isinstance(element, el.ClipError) else element


def split_errors(main: type, main_tag: str) -> beam.PTransform:
    """A ParDo with `main` elements on the main output (named `main_tag`) and ClipErrors on "errors".

    Both outputs' types are declared: Beam's inference of a generator's outputs changes between releases
    (2.78 typed the main output as including TaggedOutput, which broke the graph)."""
    routed = beam.ParDo(_route_error).with_output_types(main, errors=el.ClipError)
    return routed.with_outputs("errors", main=main_tag)


class ValidateRows(beam.PTransform):
    """pbegin -> requests (main) and errors: row checks, then clip IDs used by more than one row.

    `read(columns)` makes a read of the (where, row) pairs, with only `columns` (None: all); the rows are read
    twice, the first time with only the columns that decide a row's clip ID. The first read finds the
    clip IDs that several rows use: the IDs cross the shuffle in batches per bucket of IDs (`buckets`,
    pipeline/graph/batches.py), each bucket counted apart. The second checks each row and refuses those IDs. No
    step holds every row: a GroupByKey of all requests would hold the whole manifest in the in-process
    runner's memory.
    """

    def __init__(self, read: Callable[[Iterable[str] | None], beam.PTransform], buckets: int = 1):
        super().__init__()
        self.read, self.buckets = read, buckets

    def expand(self, pbegin):
        shared = (
            pbegin
            | "ReadForClipIds" >> self.read(ID_COLUMNS)
            | "ClipIds" >> beam.FlatMap(_clip_id_and_place)
            | "BatchClipIds" >> batched(self.buckets)
            | "GroupClipIds" >> beam.GroupByKey()
            | "Shared" >> beam.FlatMap(_shared_in)
        )
        checked = (
            pbegin
            | "Read" >> self.read(None)
            | "Validate"
            >> beam.ParDo(_validate, beam.pvalue.AsDict(shared))
            .with_output_types(el.ClipRequest, errors=el.ClipError)
            .with_outputs("errors", main="requests")
        )
        return {"requests": checked.requests, "errors": checked.errors}


def _clip_id_and_place(item: tuple[str, dict[str, Any]]) -> Iterator[tuple[str, str]]:
    checked = validate_row(item)
    if isinstance(checked, el.ClipRequest):
        yield checked.clip_id, checked.source


MAX_PLACES = 5  # rows named in a DUPLICATE_CLIP_ID error: enough to find the others


def _shared_in(bucket: tuple[int, Iterable[bytes]]) -> Iterator[tuple[str, tuple[int, tuple[str, ...]]]]:
    """A bucket's clip IDs that more than one row uses: (ID, (rows, the first MAX_PLACES places in order))."""
    places: dict[str, list[str]] = defaultdict(list)
    for clip_id, place in unbatched(bucket[1]):
        places[clip_id].append(place)
    for clip_id, where in places.items():
        if len(where) > 1:
            yield clip_id, (len(where), tuple(sorted(where)[:MAX_PLACES]))


def _validate(item: tuple[str, dict[str, Any]], shared: dict[str, tuple[int, tuple[str, ...]]]):
    """A request, or an error (to the "errors" output) for a bad row or a clip ID several rows use."""
    checked = validate_row(item)
    if isinstance(checked, el.ClipRequest) and checked.clip_id in shared:
        count, places = shared[checked.clip_id]
        message = f"{checked.source}: clip_id {checked.clip_id!r} is used by {count} rows ({'; '.join(places)})"
        checked = el.ClipError(checked.clip_id, checked.object_id, el.DUPLICATE_CLIP_ID, message, 0, checked.columns)
    yield from _route_error(checked)
