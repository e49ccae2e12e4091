"""The manifest: whole-file checks before any call, then row checks that turn rows into requests or errors.

A whole-file problem stops the run with one message naming the file and column; a row problem becomes
an error row with a code, and the other rows go on. Nothing is dropped: rows in = requests + errors.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline import elements as el
from pipeline.batches import batched, unbatched
from pipeline.cli import RunError
from pipeline.ids import clip_id_problem, derive_clip_id, object_id_problem
from pipeline.tables import (
    CLIP_ID,
    ERROR_FIELDS,
    OBJECT_ID,
    RANGE_COLUMNS,
    RESERVED,
    SHARED,
    TIME_COLUMNS,
    TOKEN_COLUMNS,
)

INT32_MAX = 2**31 - 1
ID_COLUMNS = (OBJECT_ID, CLIP_ID, *RANGE_COLUMNS)  # all that validating a row and deriving its clip ID read
ERROR_ONLY = set(ERROR_FIELDS.names) - SHARED  # dropped when an errors table is read as a manifest


class ManifestError(ValueError):
    """A problem with a whole manifest file: the run stops before any call."""


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


def inspect_manifest(pattern: str) -> Manifest:
    """Match the files, check each one's schema (and float range columns' values), and unify them; raises
    ManifestError."""
    files = _match(local_pattern(pattern))
    schema, num_rows, pieces, key_object_id = None, 0, [], None
    for path in files:
        file_schema, rows, file_pieces, object_id = _inspect_file(path)
        key_object_id = key_object_id or object_id
        try:  # int32 in one file and int64 in another is fine; int and string is not
            schema = (
                file_schema if schema is None else pa.unify_schemas([schema, file_schema], promote_options="permissive")
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ManifestError(f"manifest {path}: its column types disagree with {files[0]} ({e})") from None
        num_rows += rows
        pieces += file_pieces
    return Manifest(tuple(files), schema, num_rows, tuple(pieces), key_object_id)


def local_pattern(pattern: str) -> str:
    """A `file://` URI as the local path it names, and a relative glob with no folder ("cp-*.parquet") as
    "./cp-*.parquet": Beam's local filesystem knows no scheme, and lists the folder of a glob's fixed part,
    which "cp-" lacks. Any other pattern as it is."""
    if FileSystems.get_scheme(pattern) == "file":
        uri = urlparse(pattern)
        if uri.netloc not in ("", "localhost"):
            raise ManifestError(f"manifest {pattern}: a file:// URI must name a local path (file:///path)")
        pattern = url2pathname(uri.path)
    fixed = re.match(r"[^[*?]*", pattern).group(0)
    if FileSystems.get_scheme(pattern) is None and fixed != pattern and not os.path.dirname(fixed):
        return os.path.join(os.curdir, pattern)
    return pattern


def _match(pattern: str) -> list[str]:
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:
        raise ManifestError(f"manifest {pattern}: cannot list it ({e})") from None
    if not matched:
        raise ManifestError(f"manifest {pattern}: no file matches")
    return sorted(m.path for m in matched)


def _inspect_file(path: str) -> tuple[pa.Schema, int, list[Piece], str | None]:
    """One file's schema as its rows will be read, its row count, its row groups and the first valid object_id
    of its first row group. Its footer is parsed once, here."""
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
            if set(schema.names) >= ERROR_ONLY:  # an errors table, fed back to retry its rows
                schema = pa.schema([field for field in schema if field.name not in ERROR_ONLY])
            check_schema(path, schema)
            object_id = check_first_row_group(path, parquet, schema.names)
            check_float_ranges(path, parquet)
            return as_read(schema), parquet.metadata.num_rows, _pieces(path, parquet.metadata), object_id
    except ManifestError:
        raise
    except Exception as e:
        raise ManifestError(f"manifest {path}: not a readable Parquet file ({e})") from None


def check_first_row_group(path: str, parquet: pq.ParquetFile, columns: list[str]) -> str | None:
    """Decode every page of the first row group, a column at a time: garbled pages behind a valid footer stop
    the launch here, naming the file, rather than a worker mid-run. Only the first group, to stay cheap; a later
    one that fails is named by ReadManifestRows. Returns the group's first valid object_id (None if none)."""
    if parquet.metadata.num_row_groups == 0:
        return None
    object_id = None
    for name in columns:
        try:
            values = parquet.read_row_group(0, columns=[name]).column(0)
        except Exception as e:
            raise ManifestError(f"manifest {path}: column '{name}' of row group 0 cannot be read ({e})") from None
        if name == OBJECT_ID:
            object_id = _first_valid_id(values)
    return object_id


def _first_valid_id(values: pa.ChunkedArray) -> str | None:
    """The first value that is a valid object ID; None if none is. Stops there: usually the first row."""
    ids = (scalar.as_py() for scalar in values)
    return next((v for v in ids if v is not None and not object_id_problem(v)), None)


def _pieces(path: str, meta: pq.FileMetaData) -> list[Piece]:
    pieces, first = [], 0
    for group in range(meta.num_row_groups):
        pieces.append(Piece(path, group, first))
        first += meta.row_group(group).num_rows
    return pieces


def first_object_id(manifest: Manifest) -> str | None:
    """A valid object_id of the manifest, for a cheap check of the key before the run: found while the launch
    read the first row groups, so no footer is parsed again."""
    return manifest.key_object_id


def check_schema(path: str, schema: pa.Schema) -> None:
    """The columns a manifest must have, and the types they must be."""
    check_unique_names(path, schema)
    names = set(schema.names)
    if OBJECT_ID not in names:
        raise ManifestError(f"manifest {path}: no column '{OBJECT_ID}' (columns: {', '.join(schema.names)})")
    for name in (OBJECT_ID, CLIP_ID):
        if name in names and not _is_string(schema.field(name).type):
            raise ManifestError(f"manifest {path}: column '{name}' is {schema.field(name).type}, not a string")
    for name in RANGE_COLUMNS:
        if name in names and not _is_number(schema.field(name).type):
            raise ManifestError(f"manifest {path}: column '{name}' is {schema.field(name).type}, not an integer")
    pairs = [pair for pair in (TIME_COLUMNS, TOKEN_COLUMNS) if set(pair) <= names]
    for pair in (TIME_COLUMNS, TOKEN_COLUMNS):
        if len(set(pair) & names) == 1:
            raise ManifestError(f"manifest {path}: has '{(set(pair) & names).pop()}' without its pair {pair}")
    if not pairs:
        raise ManifestError(f"manifest {path}: needs columns {TIME_COLUMNS} or {TOKEN_COLUMNS}")
    clash = sorted(RESERVED & names)
    if clash:
        raise ManifestError(f"manifest {path}: column(s) {clash} clash with output columns; rename them")


def check_unique_names(path: str, schema: pa.Schema) -> None:
    """Parquet allows two columns of one name; the output tables do not, nor does picking a column by name: the
    run would fetch every clip and then fail to write its tables."""
    twice = [name for name, n in Counter(schema.names).items() if n > 1]
    if twice:
        names = ", ".join(f"'{name}'" for name in twice)
        raise ManifestError(f"manifest {path}: more than one column is named {names}; rename or drop the copies")


def _is_string(t: pa.DataType) -> bool:
    """pyarrow and pandas' object columns write string; polars and pandas 3 large_string; string_view is newer.
    Every writer types a column of nulls only as null: fine (a null clip_id is derived, a null object_id is a
    MISSING_VALUE row like any other)."""
    return pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_number(t: pa.DataType) -> bool:
    """Integers; floats (pandas makes an int column with a null float64), whose values are checked at launch;
    or null (a range column that no row uses, as every writer types it)."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)


def float_ranges(schema: pa.Schema) -> list[str]:
    """The range columns that are floating point: their values are read as integers."""
    return [n for n in RANGE_COLUMNS if n in schema.names and pa.types.is_floating(schema.field(n).type)]


def as_read(schema: pa.Schema) -> pa.Schema:
    """The schema of the rows as ReadManifestRows gives them, which the output tables carry: float (and null)
    range columns as int64, a null clip_id or object_id as string, string_view (an in-memory layout that older
    readers of the tables lack) as large_string."""
    for i, field in enumerate(schema):
        if field.name in RANGE_COLUMNS and not pa.types.is_integer(field.type):
            schema = schema.set(i, field.with_type(pa.int64()))
        elif field.name in (CLIP_ID, OBJECT_ID) and pa.types.is_null(field.type):
            schema = schema.set(i, field.with_type(pa.string()))
        elif pa.types.is_string_view(field.type):
            schema = schema.set(i, field.with_type(pa.large_string()))
    return schema


def check_float_ranges(path: str, parquet: pq.ParquetFile) -> None:
    """Every value of a float range column must be null, NaN or a whole number within int64: a 1.5 stops the
    launch (naming its row) rather than becoming a clip of a range nobody asked for. Reads only those
    columns, one row group at a time; a manifest without float range columns reads nothing here."""
    columns = float_ranges(parquet.schema_arrow)
    if not columns:
        return
    first = 0
    for group in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(group, columns=columns)
        for name in columns:
            index = _first_not_whole(table.column(name))
            if index is not None:
                value = table.column(name)[index].as_py()
                problem = "outside int64" if math.isfinite(value) and value.is_integer() else "not a whole number"
                raise ManifestError(f"manifest {path}: column '{name}' row {first + index} is {value}, {problem}")
        first += table.num_rows


def _first_not_whole(values: pa.ChunkedArray) -> int | None:
    """The index of the first value that is not null, NaN or a whole number within int64; None if none is."""
    x = pc.cast(values, pa.float64())  # float16 has no compute kernels of its own
    whole = pc.and_(pc.is_finite(x), pc.equal(pc.floor(x), x))
    inside = pc.and_(pc.greater_equal(x, -(2.0**63)), pc.less(x, 2.0**63))  # 2.0**63 itself is past int64
    bad = pc.fill_null(pc.invert(pc.or_(pc.is_nan(x), pc.and_(whole, inside))), False)
    index = pc.index(bad, True).as_py()
    return None if index < 0 else index


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


def validate_row(item: tuple[str, dict[str, Any]]) -> el.ClipRequest | el.ClipError:
    """A ClipRequest for a good row, a ClipError (with a code and the row's place) for a bad one."""
    where, row = item
    object_id = row.get(OBJECT_ID)
    clip_id = row.get(CLIP_ID)
    segment, problem = _segment(row)
    problem = _object_id_problem(object_id) or problem
    if problem is None and clip_id is None:  # derived only from a valid object ID and range
        clip_id = derive_clip_id(object_id, el.segment_tag(segment))
    elif problem is None and clip_id_problem(clip_id):
        problem = (el.INVALID_CLIP_ID, clip_id_problem(clip_id))
    if problem:
        code, message = problem
        return el.ClipError(clip_id, object_id, code, f"{where}: {message}", 0, row)
    return el.ClipRequest(clip_id, object_id, segment, row, where)


def _object_id_problem(object_id: str | None) -> tuple[str, str] | None:
    if object_id is None:
        return el.MISSING_VALUE, "object_id is null"
    problem = object_id_problem(object_id)
    return (el.INVALID_OBJECT_ID, problem) if problem else None


def _segment(row: dict[str, Any]) -> tuple[el.Segment | None, tuple[str, str] | None]:
    """The row's range, or the problem with it."""
    time = [row.get(c) for c in TIME_COLUMNS]
    token = [row.get(c) for c in TOKEN_COLUMNS]
    has_time, has_token = any(v is not None for v in time), any(v is not None for v in token)
    if has_time and has_token:
        return None, (el.INVALID_RANGE, "row has both a time range and a token range; give one")
    if not has_time and not has_token:
        return None, (el.INVALID_RANGE, "row has neither a time range nor a token range")
    names, values = (TIME_COLUMNS, time) if has_time else (TOKEN_COLUMNS, token)
    for name, value in zip(names, values, strict=True):
        if value is None:
            return None, (el.MISSING_VALUE, f"{name} is null")
    a, b = values
    if has_time:
        if a < 0 or b <= 0 or a + b > INT32_MAX:
            return None, (el.INVALID_RANGE, f"time range start_ms={a} duration_ms={b} needs start >= 0, duration > 0")
        return el.TimeRange(a, b), None
    if a < 0 or b <= a or b > INT32_MAX:
        return None, (el.INVALID_RANGE, f"token range [{a}, {b}) needs 0 <= token_start < token_end")
    return el.TokenRange(a, b), None


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
    pipeline/batches.py), each bucket counted apart. The second checks each row and refuses those IDs. No
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
