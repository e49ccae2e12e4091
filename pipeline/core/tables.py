"""The table schemas, defined once: the manifest's columns in, the clips and errors tables out.

Each output table is its fixed columns followed by every manifest column (other than clip_id and
object_id, which are fixed columns already) under its own name and Arrow type.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pyarrow as pa

from pipeline.core.elements import NOT_COLUMNS, ClipError, ClipRecord

# The manifest.
OBJECT_ID = "object_id"
CLIP_ID = "clip_id"
TIME_COLUMNS = ("start_ms", "duration_ms")
TOKEN_COLUMNS = ("token_start", "token_end")
RANGE_COLUMNS = TIME_COLUMNS + TOKEN_COLUMNS

_PLAIN = {"str": pa.string(), "str | None": pa.string(), "int": pa.int64()}


def columns_of(element: type) -> pa.Schema:
    """The table columns of an element type: its fields but the manifest row and the fetch's numbers, typed
    from the field's `arrow` metadata or its Python type. A field added to the element is a column."""
    return pa.schema(
        (f.name, f.metadata.get("arrow") or _PLAIN[f.type])
        for f in dataclasses.fields(element)
        if f.name not in NOT_COLUMNS
    )


_RECORD = columns_of(ClipRecord)
TRANSCRIPT_FIELDS = pa.schema(
    [_RECORD.field("transcript_text"), _RECORD.field("transcript_tokens")]
)  # with transcripts
SHARD_FIELDS = pa.schema([_RECORD.field("member")])  # with --shards
CLIP_FIELDS = pa.schema(f for f in _RECORD if f.name not in TRANSCRIPT_FIELDS.names + SHARD_FIELDS.names)
ERROR_FIELDS = columns_of(ClipError)
SHARED = {OBJECT_ID, CLIP_ID}
RESERVED = (
    set(CLIP_FIELDS.names) | set(ERROR_FIELDS.names) | set(TRANSCRIPT_FIELDS.names) | set(SHARD_FIELDS.names)
) - SHARED


def passthrough(manifest_schema: pa.Schema) -> list[pa.Field]:
    return [f for f in manifest_schema if f.name not in SHARED]


def clips_schema(manifest_schema: pa.Schema, with_transcripts: bool = False, sharded: bool = False) -> pa.Schema:
    extra = (list(TRANSCRIPT_FIELDS) if with_transcripts else []) + (list(SHARD_FIELDS) if sharded else [])
    return pa.schema(list(CLIP_FIELDS) + extra + passthrough(manifest_schema))


def errors_schema(manifest_schema: pa.Schema) -> pa.Schema:
    return pa.schema(list(ERROR_FIELDS) + passthrough(manifest_schema))


def to_row(element: ClipRecord | ClipError) -> dict[str, Any]:
    """The table row of a record or error: its fixed fields, then the manifest columns (fields that the
    table's schema does not hold, such as transcripts in a run without them, are left out by the writer)."""
    row = {k: v for k, v in element.columns.items() if k not in SHARED}
    row.update((name, getattr(element, name)) for name in _column_names(type(element)))
    return row


@functools.cache
def _column_names(kind: type) -> tuple[str, ...]:
    """An element type's fields that are table columns (looked up once, not for every row)."""
    return tuple(f.name for f in dataclasses.fields(kind) if f.name not in NOT_COLUMNS)
