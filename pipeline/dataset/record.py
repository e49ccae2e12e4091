"""The run record, `{output}/_RUN.json`: what a run did, written last so a scheduler can take it as done.

It holds the options with anything secret-looking redacted (options.safe_options; the API key is never an option).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pipeline import __version__
from pipeline.dataset.layout import CARD_NAME, path_of, record_path, table_prefix
from pipeline.dataset.storage import Store

log = logging.getLogger(__name__)


def write_record(store: Store, output: str, record: RunRecord) -> str:
    """Write the record in one write (a bucket publishes it whole; a local disk renames it into place)."""
    store.put(record_path(output), record.to_bytes(), content_type="application/json")
    return record_path(output)


def read_record(store: Store, output: str) -> RunRecord | None:
    """The output's record, or None when it has none (a new output, or a run that did not finish)."""
    try:
        return RunRecord.from_bytes(store.read(record_path(output)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, AttributeError) as e:  # not ours, or cut short: the tables still say what is there
        log.warning("%s cannot be read (%s); going by the tables", record_path(output), e)
        return None


def remove_record(store: Store, output: str) -> None:
    """Remove the previous run's record at the start of a run: its done marker no longer holds."""
    if store.head(record_path(output)) is not None:
        store.delete([record_path(output)])


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


NEW, SKIP_EXISTING, APPEND, OVERWRITE = "new", "skip_existing", "append", "overwrite"
MODES = (SKIP_EXISTING, APPEND, OVERWRITE)


@dataclass(frozen=True)
class RunRecord:
    """`_RUN.json`, typed: written by the job's last step, read back by the launcher (its summary) and by the
    next run over the same output (which tables the dataset has). Table and export names are relative to
    the dataset's root, so the record still holds after a copy."""

    rows: int = 0
    clips_written: int = 0
    clips_skipped: int = 0  # already in the dataset and current: no call made
    clips_removed: int = 0  # files or shards no row of the dataset lists any more (--skip_existing)
    clips_kept: int = 0  # earlier rows that --append left in the tables (this manifest did not name them)
    clips_untranscribed: int = 0  # --with_transcripts: clips whose object has none, left out of the exports
    errors_by_code: dict[str, int] = field(default_factory=dict)  # this run's rows
    errors_kept: int = 0  # earlier errors that --append left in the errors table (no row retried them)
    bytes: int = 0
    audio_seconds: float = 0.0
    retries: int = 0
    throttled: int = 0
    throttled_seconds: float = 0.0
    failed_attempts_by_code: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    mode: str = "new"  # new, skip_existing, append or overwrite
    started_at: str = ""
    finished_at: str = ""
    manifest: list[str] = field(default_factory=list)
    clips_table: list[str] = field(default_factory=list)
    errors_table: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    @property
    def clips(self) -> int:
        return self.clips_written + self.clips_skipped + self.clips_kept

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    @property
    def error_ratio(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    def to_bytes(self) -> bytes:
        derived = {"clips": self.clips, "errors": self.errors, "error_ratio": round(self.error_ratio, 6)}
        return json.dumps({**derived, **dataclasses.asdict(self)}, indent=2, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RunRecord:
        """The record's own fields (the derived ones, and those of another version, are left out)."""
        body = json.loads(data)
        return cls(**{f.name: body[f.name] for f in dataclasses.fields(cls) if f.name in body})

    def lines(self, output: str) -> Iterator[str]:
        already = f"{self.clips_skipped:,} already there"
        if self.clips_kept:
            already += f", {self.clips_kept:,} kept from earlier runs"
        yield f"rows in         {self.rows:>10,}"
        yield f"clips           {self.clips:>10,}   ({self.clips_written:,} written, {already})"
        if self.errors_kept:
            yield f"errors kept     {self.errors_kept:>10,}   (earlier errors no row of this run retried)"
        if self.clips_untranscribed:
            yield f"untranscribed   {self.clips_untranscribed:>10,}   (their object has no transcript: in no export)"
        if self.clips_removed:
            yield f"removed         {self.clips_removed:>10,}   (clip files or shards no row lists any more)"
        yield f"errors          {self.errors:>10,}"
        for code, n in sorted(self.errors_by_code.items(), key=lambda kv: -kv[1]):
            yield f"  {code:<22}{n:>8,}"
        yield f"audio           {self.audio_seconds / 3600:>10.3f} h written"
        yield f"bytes           {self.bytes:>10,}"
        yield (
            f"retries         {self.retries:>10,}   ({self.throttled:,} calls held back by throttling; "
            f"{self.throttled_seconds:,} s held or backing off)"
        )
        failed = self.failed_attempts_by_code
        if failed:
            by_code = ", ".join(f"{c} {n:,}" for c, n in sorted(failed.items(), key=lambda kv: -kv[1]))
            yield f"failed attempts {sum(failed.values()):>10,}   ({by_code})"
        seconds = max(self.wall_seconds, 1e-9)
        if self.clips_written:
            rate = f"{self.clips_written / seconds:.1f} clips/s"
        else:  # a rerun that found every clip there: how fast the rows were checked is the rate that means something
            rate = f"nothing fetched; {self.rows / seconds:,.1f} rows/s checked"
        yield f"wall time       {self.wall_seconds:>10.1f} s   ({rate})"
        yield f"clips table     {table_prefix(output, 'clips')}*.parquet"
        yield f"errors table    {table_prefix(output, 'errors')}*.parquet"
        yield f"dataset card    {path_of(output, CARD_NAME)}"
