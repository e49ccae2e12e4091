"""The manifest's time ranges for the child processes (only pyarrow, so their start-up stays light)."""

from __future__ import annotations

import pyarrow.parquet as pq

COLUMNS = ("clip_id", "object_id", "start_ms", "duration_ms")


def read_ranges(manifest: str, limit: int | None = None) -> list[tuple[str, str, int, int]]:
    """(clip_id, object_id, start_ms, duration_ms) of the manifest's first `limit` rows (all when None)."""
    table = pq.read_table(manifest, columns=list(COLUMNS))
    if limit is not None:
        table = table.slice(0, limit)
    return list(zip(*(table.column(n).to_pylist() for n in COLUMNS), strict=True))
