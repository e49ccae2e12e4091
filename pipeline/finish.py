"""The job's last steps: the run's numbers counted from the data, then the dataset card and the run record.

They run inside the job, after both tables are written, so a detached launch (a Flex Template, a scheduler
that does not wait, a launcher that dies) still gets the card, `_RUN.json` and a clean output. The numbers
are combined in parallel (a combiner per worker, merged), so nothing but one small accumulator meets on
the worker that writes the files; the card needs no table read back (only `--export` reads the clips table,
a row group at a time, to write its manifests).
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import pyarrow as pa

from pipeline.card import ClipStats, Layout, write_card
from pipeline.elements import ClipError, ClipRecord
from pipeline.export import export_dataset
from pipeline.layout import tmp_path
from pipeline.lease import release_for
from pipeline.record import now, write_record
from pipeline.storage import StoreSettings, open_store
from pipeline.table_files import remove_stale, write_empty
from pipeline.transcripts import MOSTLY_INSIDE


@dataclass
class RunStats:
    """What the run did, from its outcomes (every manifest row gives exactly one)."""

    rows: int = 0
    written: int = 0
    skipped: int = 0
    bytes_written: int = 0
    audio_ms_written: int = 0
    clip_bytes: int = 0  # of every clip, written now or already there (the card's size)
    durations_ms: Counter = field(default_factory=Counter)  # clip duration -> clips
    channels: Counter = field(default_factory=Counter)  # channel count -> clips
    errors_by_code: Counter = field(default_factory=Counter)
    retries: int = 0
    held: int = 0
    waited_s: float = 0.0
    failed_attempts: Counter = field(default_factory=Counter)

    def add(self, out: ClipRecord | ClipError) -> None:
        self.rows += 1
        self.retries += max(0, out.attempts - 1)
        self.held += out.stats.held
        self.waited_s += out.stats.waited_s
        self.failed_attempts.update(out.stats.failures)
        if isinstance(out, ClipError):
            self.errors_by_code[out.error_code] += 1
            return
        self.clip_bytes += out.num_bytes
        self.durations_ms[out.clip_duration_ms] += 1
        self.channels[out.num_channels] += 1
        if out.attempts == 0:
            self.skipped += 1
        else:
            self.written += 1
            self.bytes_written += out.num_bytes
            self.audio_ms_written += out.clip_duration_ms

    def merge(self, other: RunStats) -> RunStats:
        for name, value in vars(other).items():
            mine = getattr(self, name)
            if isinstance(mine, Counter):
                mine.update(value)
            else:
                setattr(self, name, mine + value)
        return self

    def numbers(self, wall_seconds: float) -> dict[str, Any]:
        """The record's numbers (the launcher's summary prints them)."""
        clips, errors = self.written + self.skipped, sum(self.errors_by_code.values())
        return {
            "rows": self.rows,
            "clips": clips,
            "clips_written": self.written,
            "clips_skipped": self.skipped,
            "errors": errors,
            "errors_by_code": dict(sorted(self.errors_by_code.items())),
            "error_ratio": round(errors / self.rows, 6) if self.rows else 0.0,
            "bytes": self.bytes_written,
            "audio_seconds": self.audio_ms_written / 1000,
            "retries": self.retries,
            "throttled": self.held,
            "throttled_seconds": round(self.waited_s, 3),
            "failed_attempts_by_code": dict(sorted(self.failed_attempts.items())),
            "wall_seconds": round(wall_seconds, 3),
        }


class CountRun(beam.CombineFn):
    def create_accumulator(self) -> RunStats:
        return RunStats()

    def add_input(self, stats: RunStats, out: ClipRecord | ClipError) -> RunStats:
        stats.add(out)
        return stats

    def merge_accumulators(self, accumulators: Iterable[RunStats]) -> RunStats:
        merged = RunStats()
        for stats in accumulators:
            merged.merge(stats)
        return merged

    def extract_output(self, stats: RunStats) -> RunStats:
        return stats


@dataclass(frozen=True)
class RunInfo:
    """What the launcher knows and the last step writes: picklable, and holding no secret."""

    output: str
    store: StoreSettings
    started_at: str
    started_epoch: float
    manifest: tuple[str, ...]
    options: dict[str, Any]
    clip_format: str = "wav"
    sharded: bool = False
    exports: tuple[str, ...] = ()  # --export: the manifests to write from the clips table
    with_transcripts: bool = False
    edge_words: str = MOSTLY_INSIDE
    lease_run_id: str | None = None  # a detached run's: its launcher is gone, so this step releases the lease


class WriteRunFiles(beam.DoFn):
    """The last step, once: each table is exactly this run's files (another run's or an abandoned bundle's
    removed, an empty file for a table with no rows), the card, the record (last), the local scratch
    folder removed, and a detached run's lease released."""

    def __init__(self, info: RunInfo, schemas: dict[str, pa.Schema]):
        self.info = info
        self.schemas = schemas

    def process(
        self, _: Any, clip_stats: RunStats, error_stats: RunStats, objects: int, clip_files: list, error_files: list
    ) -> Iterator[dict[str, Any]]:
        info = self.info
        stats = RunStats().merge(clip_stats).merge(error_stats)
        store = open_store(info.output, info.store)
        files = {"clips": sorted(clip_files), "errors": sorted(error_files)}
        for name, written in files.items():
            remove_stale(store, info.output, name, written)
            if not written:
                written.append(write_empty(store, info.output, name, self.schemas[name]))
        clip_files, error_files = files["clips"], files["errors"]
        numbers = stats.numbers(time.time() - info.started_epoch)
        clip_stats = ClipStats(
            stats.written + stats.skipped, objects, stats.clip_bytes, dict(stats.channels), dict(stats.durations_ms)
        )
        errors = dict(sorted(stats.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0])))
        layout = Layout(info.clip_format, info.sharded, info.with_transcripts, info.edge_words, info.exports)
        write_card(store, info.output, numbers, clip_stats, errors, layout)
        if info.exports:
            export_dataset(store, info.output, info.exports, clip_files)
        record = {
            "started_at": info.started_at,
            "finished_at": now(),
            **numbers,
            "manifest": list(info.manifest),
            "clips_table": clip_files,
            "errors_table": error_files,
            "options": info.options,
        }
        write_record(store, info.output, record)
        if store.local:  # empty by now: the record went through it too
            shutil.rmtree(tmp_path(info.output), ignore_errors=True)
        if info.lease_run_id:  # after the scratch is gone: a next run may start at once
            release_for(store, info.output, info.lease_run_id)
        yield record


class FinishRun(beam.PTransform):
    """(clips, errors, clips table files, errors table files) -> the run record, written with the card.

    Clips and errors are counted apart and merged at the end: a Flatten of the two would make the
    in-process runner hold every record in memory between stages, where a combine holds one accumulator."""

    def __init__(self, info: RunInfo, schemas: dict[str, pa.Schema]):
        super().__init__()
        self.info = info
        self.schemas = schemas

    def expand(self, inputs):
        clips, errors, clip_files, error_files = inputs
        # Without defaults: an empty input's default comes from the side input instead, which spares each
        # combine the four steps that would make one (built and run at every start).
        clip_stats = clips | "CountClips" >> beam.CombineGlobally(CountRun()).without_defaults()
        error_stats = errors | "CountErrors" >> beam.CombineGlobally(CountRun()).without_defaults()
        objects = (
            clips
            | "ObjectIds" >> beam.Map(lambda r: r.object_id)
            | "DistinctObjects" >> beam.Distinct()
            | "CountObjects" >> beam.CombineGlobally(beam.combiners.CountCombineFn()).without_defaults()
        )
        side = beam.pvalue
        return (
            clips.pipeline
            | "Once" >> beam.Create([None])
            | "WriteCardAndRecord"
            >> beam.ParDo(
                WriteRunFiles(self.info, self.schemas),
                side.AsSingleton(clip_stats, default_value=RunStats()),
                side.AsSingleton(error_stats, default_value=RunStats()),
                side.AsSingleton(objects, default_value=0),
                side.AsList(clip_files),
                side.AsList(error_files),
            )
        )
