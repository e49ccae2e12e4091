"""The element types that travel through the pipeline, each defined once.

manifest row --validate--> ClipRequest | ClipError --fetch--> ClipRecord | ClipError
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.core.messages import ObjectToken, Segment, TimeRange, TokenRange

# Validation codes (the errors table also carries gRPC status names and BAD_STREAM).
MISSING_VALUE = "MISSING_VALUE"  # a required value is null
INVALID_RANGE = "INVALID_RANGE"  # negative, zero, both or neither range, token_end <= token_start
INVALID_OBJECT_ID = "INVALID_OBJECT_ID"
INVALID_CLIP_ID = "INVALID_CLIP_ID"
DUPLICATE_CLIP_ID = "DUPLICATE_CLIP_ID"
WRITE_FAILED = "WRITE_FAILED"  # the clip could not be written to the output filesystem
NO_TRANSCRIPT = "NO_TRANSCRIPT"  # --layout lhotse-shar --with_transcripts: the object has none (not fetched)


def segment_tag(segment: Segment) -> str:
    """A short, file-name-safe tag of a range: "t1000+500" (time) or "k2-5" (tokens)."""
    if isinstance(segment, TimeRange):
        return f"t{segment.start_ms}+{segment.duration_ms}"
    return f"k{segment.token_start}-{segment.token_end}"


NOT_COLUMNS = ("columns", "stats")  # the manifest row (spread into its own columns) and the fetch's numbers
TOKEN_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("start_ms", pa.int64()),
        ("duration_ms", pa.int64()),
        ("speaker", pa.int32()),  # null: the service gave none
        ("confidence", pa.float64()),  # null: the service gave none
    ]
)


def arrow(type_: pa.DataType) -> Any:
    """A field whose table column is not the plain Arrow type of its Python type (str: string, int: int64)."""
    return field(metadata={"arrow": type_})


@dataclass(frozen=True)
class CallStats:
    """What fetching one clip took: carried with its record or error so the job's last step can count
    retries, failed attempts and time held back from the data, on whatever worker it runs."""

    seconds: float = 0.0
    held: int = 0  # times the call was held back by client-side throttling
    waited_s: float = 0.0  # held back or backing off
    failures: tuple[str, ...] = ()  # the status of each failed attempt, in order


@dataclass(frozen=True)
class ClipRequest:
    """A valid manifest row: which audio to fetch and where it came from."""

    clip_id: str
    object_id: str
    segment: Segment
    columns: dict[str, Any] = field(compare=False)  # the manifest row, unchanged
    source: str = ""  # "file, row N" for messages
    tokens: tuple[ObjectToken, ...] | None = field(default=None, compare=False)  # --with_transcripts: this clip's
    listed: bool = field(default=False, compare=False)  # a file is at its path that no table row describes

    @property
    def fingerprint(self) -> str:
        """What was asked for: a clip at the same path with another fingerprint is stale."""
        return f"{self.object_id}/{segment_tag(self.segment)}"


@dataclass(frozen=True)
class ClipRecord:
    """A clip written: one row of the clips table."""

    clip_id: str
    object_id: str
    path: str  # relative to the dataset's root: a copied or uploaded dataset still resolves
    clip_start_ms: int
    clip_duration_ms: int
    object_duration_ms: int
    num_channels: int = arrow(pa.int32())
    sample_rate: int = arrow(pa.int32())
    num_samples: int
    num_bytes: int
    sha256: str
    attempts: int = arrow(pa.int32())
    columns: dict[str, Any] = field(compare=False)
    transcript_text: str | None = None  # with --with_transcripts
    transcript_tokens: list[dict[str, Any]] | None = field(default=None, metadata={"arrow": pa.list_(TOKEN_TYPE)})
    member: str | None = None  # with --shards: the clip's name inside the tar at `path`
    stats: CallStats = field(default_factory=CallStats, compare=False)  # not a table column


@dataclass(frozen=True)
class ClipError:
    """A row that gave no clip: one row of the errors table."""

    clip_id: str | None
    object_id: str | None
    error_code: str
    error_message: str
    attempts: int = arrow(pa.int32())
    columns: dict[str, Any] = field(compare=False)
    stats: CallStats = field(default_factory=CallStats, compare=False)  # not a table column


EARLIER = "earlier"  # the output of the rows --append carries over from earlier runs


@dataclass(frozen=True)
class ShardCopy:
    """A clip an earlier run put in a tar shard, to copy into the shard's new version (pipeline/graph/reconcile.py)."""

    record: ClipRecord  # as the tables hold it (attempts 0)
    request: ClipRequest | None  # to fetch it again when its member is missing or (verify) differs
    earlier: bool  # --append's earlier row that this manifest does not name
    rebuild: bool  # the shard changes whatever the copy finds: a clip is added or dropped
    verify: bool  # --verify_existing: hash the member against the table's sha256


__all__ = ["CallStats", "ClipError", "ClipRecord", "ClipRequest", "Segment", "TimeRange", "TokenRange"]
