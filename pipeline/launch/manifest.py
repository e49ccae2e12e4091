"""The manifest at launch: whole-file checks before any call. The row checks that turn rows into requests or
errors are pipeline/core/rows.py, applied as the job reads the rows (pipeline/graph/read.py).

A whole-file problem stops the run with one message naming the file and column; a row problem becomes
an error row with a code, and the other rows go on. Nothing is dropped: rows in = requests + errors.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.core.ids import object_id_problem
from pipeline.core.tables import (
    CLIP_ID,
    ERROR_FIELDS,
    OBJECT_ID,
    RANGE_COLUMNS,
    RESERVED,
    SHARED,
    TIME_COLUMNS,
    TOKEN_COLUMNS,
)
from pipeline.graph.read import Manifest, Piece, float_ranges

ERROR_ONLY = set(ERROR_FIELDS.names) - SHARED  # dropped when an errors table is read as a manifest


class ManifestError(ValueError):
    """A problem with a whole manifest file: the run stops before any call."""


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
