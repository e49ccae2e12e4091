"""The table schemas, defined once: the manifest's columns in, the clips and errors tables out.

Each output table is its fixed columns followed by every manifest column (other than clip_id and
object_id, which are fixed columns already) under its own name and Arrow type.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow as pa

from pipeline.elements import ClipError, ClipRecord

# The manifest.
OBJECT_ID = "object_id"
CLIP_ID = "clip_id"
TIME_COLUMNS = ("start_ms", "duration_ms")
TOKEN_COLUMNS = ("token_start", "token_end")
RANGE_COLUMNS = TIME_COLUMNS + TOKEN_COLUMNS

CLIP_FIELDS = pa.schema(
    [
        ("clip_id", pa.string()),
        ("object_id", pa.string()),
        ("path", pa.string()),  # relative to the dataset's root: a copied or uploaded dataset still resolves
        ("clip_start_ms", pa.int64()),
        ("clip_duration_ms", pa.int64()),
        ("object_duration_ms", pa.int64()),
        ("num_channels", pa.int32()),
        ("sample_rate", pa.int32()),
        ("num_samples", pa.int64()),
        ("num_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("attempts", pa.int32()),
    ]
)
ERROR_FIELDS = pa.schema(
    [
        ("clip_id", pa.string()),
        ("object_id", pa.string()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
        ("attempts", pa.int32()),
    ]
)
TRANSCRIPT_FIELDS = pa.schema(
    [
        ("transcript_text", pa.string()),
        (
            "transcript_tokens",
            pa.list_(
                pa.struct(
                    [
                        ("text", pa.string()),
                        ("start_ms", pa.int64()),
                        ("duration_ms", pa.int64()),
                        ("speaker", pa.int32()),  # null: the service gave none
                        ("confidence", pa.float64()),  # null: the service gave none
                    ]
                )
            ),
        ),
    ]
)
SHARD_FIELDS = pa.schema([("member", pa.string())])
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


NOT_COLUMNS = ("columns", "stats")  # the manifest row (spread into columns) and the fetch's numbers


def to_row(element: ClipRecord | ClipError) -> dict[str, Any]:
    """The table row of a record or error: its fixed fields, then the manifest columns (fields that the
    table's schema does not hold, such as transcripts in a run without them, are left out by the writer)."""
    row = {k: v for k, v in element.columns.items() if k not in SHARED}
    row.update((f.name, getattr(element, f.name)) for f in dataclasses.fields(element) if f.name not in NOT_COLUMNS)
    return row
