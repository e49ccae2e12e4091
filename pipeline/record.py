"""The run record, `{output}/_RUN.json`: what a run did, written last so a scheduler can take it as done.

It holds the options with anything secret-looking redacted (the API key is never an option at all).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import __version__
from pipeline.layout import CARD_NAME, path_of, record_path, table_prefix
from pipeline.options import option_names
from pipeline.storage import Store

_SECRET = re.compile(r"secret|password|passwd|token|credential|key", re.IGNORECASE)
_SAFE = re.compile(r"_file$|_path$|^api_key_file$")


def safe_options(options: PipelineOptions) -> dict[str, Any]:
    """This pipeline's options and every other option that was set, secret-looking values redacted."""
    every = options.get_all_options()
    chosen = {name: every.get(name) for name in option_names()}
    chosen.update(options.get_all_options(drop_default=True, retain_unknown_options=True))
    return {
        name: "<redacted>" if value is not None and _SECRET.search(name) and not _SAFE.search(name) else value
        for name, value in sorted(chosen.items())
    }


def write_record(store: Store, output: str, record: dict[str, Any]) -> str:
    """Write the record in one write (a bucket publishes it whole; a local disk renames it into place)."""
    body = dict(record, version=__version__)
    store.put(record_path(output), json.dumps(body, indent=2, default=str).encode(), content_type="application/json")
    return record_path(output)


def remove_record(store: Store, output: str) -> None:
    """Remove the previous run's record at the start of a run: its done marker no longer holds."""
    if store.head(record_path(output)) is not None:
        store.delete([record_path(output)])


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class Summary:
    """The run in numbers, as the job recorded them."""

    rows: int
    written: int = 0
    skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    audio_ms: int = 0
    retries: int = 0
    throttled: int = 0
    throttled_seconds: float = 0.0
    failed_attempts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clips(self) -> int:
        return self.written + self.skipped

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def error_ratio(self) -> float:
        return self.error_count / self.rows if self.rows else 0.0

    @classmethod
    def from_record(cls, record: dict) -> Summary:
        """The numbers the job's last step wrote into `_RUN.json`."""
        return cls(
            rows=record["rows"],
            written=record["clips_written"],
            skipped=record["clips_skipped"],
            errors=record["errors_by_code"],
            bytes=record["bytes"],
            audio_ms=round(record["audio_seconds"] * 1000),
            retries=record["retries"],
            throttled=record["throttled"],
            throttled_seconds=record["throttled_seconds"],
            failed_attempts=record["failed_attempts_by_code"],
            seconds=record["wall_seconds"],
        )

    def lines(self, output: str) -> Iterator[str]:
        yield f"rows in         {self.rows:>10,}"
        yield f"clips           {self.clips:>10,}   ({self.written:,} written, {self.skipped:,} already there)"
        yield f"errors          {self.error_count:>10,}"
        for code, n in sorted(self.errors.items(), key=lambda kv: -kv[1]):
            yield f"  {code:<22}{n:>8,}"
        yield f"audio           {self.audio_ms / 3_600_000:>10.3f} h written"
        yield f"bytes           {self.bytes:>10,}"
        yield (
            f"retries         {self.retries:>10,}   ({self.throttled:,} calls held back by throttling; "
            f"{self.throttled_seconds:,} s held or backing off)"
        )
        if self.failed_attempts:
            by_code = ", ".join(f"{c} {n:,}" for c, n in sorted(self.failed_attempts.items(), key=lambda kv: -kv[1]))
            yield f"failed attempts {sum(self.failed_attempts.values()):>10,}   ({by_code})"
        if self.written:
            rate = f"{self.written / max(self.seconds, 1e-9):.1f} clips/s"
        else:  # a rerun that found every clip there: how fast the rows were checked is the rate that means something
            rate = f"nothing fetched; {self.rows / max(self.seconds, 1e-9):,.1f} rows/s checked"
        yield f"wall time       {self.seconds:>10.1f} s   ({rate})"
        yield f"clips table     {table_prefix(output, 'clips')}*.parquet"
        yield f"errors table    {table_prefix(output, 'errors')}*.parquet"
        yield f"dataset card    {path_of(output, CARD_NAME)}"
