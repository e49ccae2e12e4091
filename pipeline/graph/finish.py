"""The job's last steps: the run's numbers counted from the data, then the dataset card and the run record.

They run inside the job, after both tables are written, so a detached launch (a Flex Template, a scheduler
that does not wait, a launcher that dies) still gets the card, `_RUN.json` and a clean output. The numbers
are combined in parallel (a combiner per worker, merged), so nothing but one small accumulator meets on
the worker that writes the files; the card needs no table read back, and the exports were written in parts by
the workers beside the clips table (this step joins them, in the bucket).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import pyarrow as pa

from pipeline.core.elements import ClipError, ClipRecord
from pipeline.dataset.card import ClipStats, Layout, write_card
from pipeline.dataset.clips import KEEP
from pipeline.dataset.export import assemble_exports
from pipeline.dataset.layout import FILES, export_names, name_of, path_of
from pipeline.dataset.lease import release_for
from pipeline.dataset.record import RunRecord, now, write_record
from pipeline.dataset.storage import StoreSettings, open_store
from pipeline.dataset.transcripts import MOSTLY_INSIDE
from pipeline.graph.table_files import remove_stale, write_empty


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
    untranscribed: int = 0  # clips whose object has no transcript (none without --with_transcripts' columns)
    errors_by_code: Counter = field(default_factory=Counter)
    retries: int = 0
    held: int = 0
    waited_s: float = 0.0
    failed_attempts: Counter = field(default_factory=Counter)
    earlier: int = 0  # --append: earlier clips that this manifest does not name, kept in the tables
    earlier_errors: Counter = field(default_factory=Counter)  # and earlier errors it does not retry

    def add_earlier(self, out: ClipRecord | ClipError) -> None:
        """An earlier row kept in the tables: part of the dataset (the card counts it), not of this run's rows."""
        if isinstance(out, ClipError):
            self.earlier_errors[out.error_code] += 1
            return
        self.earlier += 1
        self._describe(out)

    def _describe(self, out: ClipRecord) -> None:
        self.clip_bytes += out.num_bytes
        self.durations_ms[out.clip_duration_ms] += 1
        self.channels[out.num_channels] += 1
        self.untranscribed += out.transcript_text is None

    def add(self, out: ClipRecord | ClipError) -> None:
        self.rows += 1
        self.retries += max(0, out.attempts - 1)
        self.held += out.stats.held
        self.waited_s += out.stats.waited_s
        self.failed_attempts.update(out.stats.failures)
        if isinstance(out, ClipError):
            self.errors_by_code[out.error_code] += 1
            return
        self._describe(out)
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

    def record(self, info: RunInfo, removed: int, clips_table: list[str], errors_table: list[str]) -> RunRecord:
        """The run record of a run that ends now (table and export names relative to the root)."""
        return RunRecord(
            rows=self.rows,
            clips_written=self.written,
            clips_skipped=self.skipped,
            clips_kept=self.earlier,
            clips_removed=removed,
            clips_untranscribed=self.untranscribed if info.with_transcripts else 0,
            errors_by_code=dict(sorted(self.errors_by_code.items())),
            errors_kept=sum(self.earlier_errors.values()),
            bytes=self.bytes_written,
            audio_seconds=self.audio_ms_written / 1000,
            retries=self.retries,
            throttled=self.held,
            throttled_seconds=round(self.waited_s, 3),
            failed_attempts_by_code=dict(sorted(self.failed_attempts.items())),
            wall_seconds=round(time.time() - info.started_epoch, 3),
            mode=info.mode,
            started_at=info.started_at,
            finished_at=now(),
            manifest=list(info.manifest),
            clips_table=[name_of(info.output, f) for f in clips_table],
            errors_table=[name_of(info.output, f) for f in errors_table],
            exports=export_names(info.exports),
            options=info.options,
        )


class CountRun(beam.CombineFn):
    """This run's outcomes, or (`earlier`) the earlier rows that --append keeps."""

    def __init__(self, earlier: bool = False):
        self.earlier = earlier

    def create_accumulator(self) -> RunStats:
        return RunStats()

    def add_input(self, stats: RunStats, out: ClipRecord | ClipError) -> RunStats:
        (stats.add_earlier if self.earlier else stats.add)(out)
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
    channels: str = KEEP
    layout: str = FILES
    exports: tuple[str, ...] = ()  # --export: the manifests to write from the clips table
    with_transcripts: bool = False
    edge_words: str = MOSTLY_INSIDE
    lease_run_id: str | None = None  # a detached run's: its launcher is gone, so this step releases the lease
    mode: str = "new"  # the way over the output (pipeline/launch/existing.py)
    stale_exports: tuple[str, ...] = ()  # the dataset's manifests that this run does not write (existing.py)

    @property
    def sharded(self) -> bool:
        return self.layout != FILES


class WriteRunFiles(beam.DoFn):
    """The last step, once: each table is exactly this run's files (another run's or an abandoned bundle's
    removed, an empty file for a table with no rows), the card, the exports (and, --overwrite, the replaced
    dataset's others removed), the record (last), the local scratch folder removed, and a detached run's
    lease released."""

    def __init__(self, info: RunInfo, schemas: dict[str, pa.Schema]):
        self.info = info
        self.schemas = schemas

    def process(
        self,
        _: Any,
        counted: list[RunStats],
        objects: int,
        clip_files: list,
        error_files: list,
        export_parts: list,
        removed: list[int],
    ) -> Iterator[RunRecord]:
        info = self.info
        stats = RunStats()
        for part in counted:
            stats.merge(part)
        store = open_store(info.output, info.store)
        files = {"clips": sorted(clip_files), "errors": sorted(error_files)}
        for name, written in files.items():
            remove_stale(store, info.output, name, written)
            if not written:
                written.append(write_empty(store, info.output, name, self.schemas[name]))
        record = stats.record(info, sum(removed), files["clips"], files["errors"])
        clip_stats = ClipStats(record.clips, objects, stats.clip_bytes, dict(stats.channels), dict(stats.durations_ms))
        every_error = stats.errors_by_code + stats.earlier_errors
        errors = dict(sorted(every_error.items(), key=lambda kv: (-kv[1], kv[0])))
        layout = Layout(
            info.clip_format,
            info.with_transcripts,
            info.edge_words,
            info.exports,
            info.channels,
            info.layout,
        )
        write_card(store, info.output, record, clip_stats, errors, layout)
        if info.exports:
            assemble_exports(store, info.output, info.exports, export_parts)
        stale = [path_of(info.output, name) for name in info.stale_exports]
        store.delete([path for path in stale if store.head(path) is not None])
        write_record(store, info.output, record)
        store.remove_scratch()  # empty by now on a local disk: the record went through it too
        if info.lease_run_id:  # after the scratch is gone: a next run may start at once
            release_for(store, info.output, info.lease_run_id)
        yield record


@dataclass
class RunOutputs:
    """What the last step counts and records, by kind. Beam hands a composite one flat dict of PCollections, so
    `as_input` names each branch by its kind and `of` reads the kinds back: the names are made and read here only.

    The clip records come in branches, counted apart and merged at the end: a Flatten of them would make the
    in-process runner encode every record once more, where a combine passes on one accumulator per bundle."""

    clips: dict[str, Any]  # this run's clip records, by branch ("" fetched, "Kept" found in place by a rerun)
    errors: Any  # this run's errors
    earlier: dict[str, Any]  # --append: the earlier clip records and errors it carries over, by branch
    clip_files: Any  # the clips table's files
    error_files: Any  # the errors table's files
    export_parts: Any  # the export manifests' parts
    removed: Any  # the counts of orphans removed

    SINGLE = ("errors", "clip_files", "error_files", "export_parts", "removed")

    def as_input(self) -> dict[str, Any]:
        return {
            **{f"clips:{label}": branch for label, branch in self.clips.items()},
            **{f"earlier:{label}": branch for label, branch in self.earlier.items()},
            **{name: getattr(self, name) for name in self.SINGLE},
        }

    @classmethod
    def of(cls, inputs: dict[str, Any]) -> RunOutputs:
        branches: dict[str, dict[str, Any]] = {"clips": {}, "earlier": {}}
        for name, pcoll in inputs.items():
            kind, _, label = name.partition(":")
            if kind in branches:
                branches[kind][label] = pcoll
        return cls(**branches, **{name: inputs[name] for name in cls.SINGLE})

    def counted(self) -> Iterator[tuple[str, Any, bool]]:
        """(label, outcomes, earlier?) for each branch of clip records or errors that the run's numbers count."""
        yield from ((f"clips{label}", branch, False) for label, branch in self.clips.items())
        yield "errors", self.errors, False
        yield from ((f"earlier{label}", branch, True) for label, branch in self.earlier.items())


class FinishRun(beam.PTransform):
    """`RunOutputs.as_input()` -> the run record, written with the card."""

    def __init__(self, info: RunInfo, schemas: dict[str, pa.Schema]):
        super().__init__()
        self.info = info
        self.schemas = schemas

    def expand(self, inputs):
        side = beam.pvalue
        outputs = RunOutputs.of(inputs)
        p = outputs.clip_files.pipeline
        # Without defaults: an empty input's default comes from the side input instead, which spares each
        # combine the four steps that would make one (built and run at every start).
        counted = [
            branch | f"Count{label}" >> beam.CombineGlobally(CountRun(earlier)).without_defaults()
            for label, branch, earlier in outputs.counted()
        ]
        objects = [  # the errors have no object that counts
            branch | f"ObjectIds{label}" >> beam.FlatMap(_object_id) | f"Objects{label}" >> beam.Distinct()
            for label, branch, _ in outputs.counted()
            if branch is not outputs.errors
        ]
        count_objects = beam.combiners.CountCombineFn()
        return (
            p
            | "Once" >> beam.Create([None])
            | "WriteCardAndRecord"
            >> beam.ParDo(
                WriteRunFiles(self.info, self.schemas),
                side.AsList(counted | "Counts" >> beam.Flatten(pipeline=p)),
                side.AsSingleton(
                    objects
                    | "EveryObject" >> beam.Flatten(pipeline=p)
                    | "DistinctObjects" >> beam.Distinct()
                    | "CountObjects" >> beam.CombineGlobally(count_objects).without_defaults(),
                    default_value=0,
                ),
                side.AsList(outputs.clip_files),
                side.AsList(outputs.error_files),
                side.AsList(outputs.export_parts),
                side.AsList(outputs.removed),
            )
        )


def _object_id(out: ClipRecord | ClipError) -> Iterator[str]:
    """A clip's object (an earlier error has none that counts)."""
    if isinstance(out, ClipRecord):
        yield out.object_id
