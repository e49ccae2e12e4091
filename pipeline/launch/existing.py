"""What an output already holds, read once at launch, and the way a run goes over it.

A run into an output that holds a dataset must say what to do with it (`--skip_existing`, `--append` or
`--overwrite`): a scheduled rerun that silently replaced a dataset's tables with another manifest's rows
lost them. What the dataset holds is read from its record, its tables' file list and one look at its
clip and shard folders; nothing per clip.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import LaunchError
from pipeline.dataset.clips import KEEP
from pipeline.dataset.layout import (
    CLIPS_DIR,
    EXPORTS,
    FILES,
    LAYOUTS,
    TABLES,
    export_names,
    export_of,
    path_of,
    resolve_layout,
    shards_dir,
    table_prefix,
)
from pipeline.dataset.record import APPEND, MODES, NEW, SKIP_EXISTING, RunRecord, read_record
from pipeline.dataset.storage import Store
from pipeline.launch.export_command import NO_TEXT


@dataclass(frozen=True)
class Existing:
    """The dataset at an output when a run starts (all empty for a new output)."""

    record: RunRecord | None = None
    clips_tables: tuple[str, ...] = ()  # paths of the table files
    errors_tables: tuple[str, ...] = ()
    has_clips: bool = False  # clips/ holds a file
    has_shards: bool = False  # a sharded layout's folder (shards/, data/, shar/) holds a file

    @property
    def rows(self) -> int:
        """The rows its tables hold, as its record counts them (a stopped run's, without one, are not counted)."""
        record = self.record
        return 0 if record is None else record.clips + record.errors + record.errors_kept

    @property
    def empty(self) -> bool:
        return not (self.record or self.clips_tables or self.errors_tables or self.has_clips or self.has_shards)


def read_existing(store: Store, output: str) -> Existing:
    """The record, every table file (a stopped run's too: its rows describe clips it wrote) and whether the clip
    and shard folders hold anything: a few requests, whatever the dataset's size."""
    tables = [
        tuple(sorted(o.path for o in store.list(table_prefix(output, name)) if o.path.endswith(".parquet")))
        for name in TABLES
    ]
    sharded = any(_holds(store, output, shards_dir(layout)) for layout in LAYOUTS if layout != FILES)
    return Existing(read_record(store, output), *tables, _holds(store, output, CLIPS_DIR), sharded)


def _holds(store: Store, output: str, folder: str) -> bool:
    """Whether the folder holds a file: one LIST page on a bucket."""
    return next(iter(store.list(path_of(output, f"{folder}/"))), None) is not None


def choose_mode(opts, existing: Existing, output: str) -> str:
    """The run's way over the output: NEW for an empty one, else the mode the options give; none is a LaunchError."""
    if existing.empty:
        return NEW
    given = [mode for mode in MODES if getattr(opts, mode)]
    if not given:
        raise LaunchError(
            f"--output {output} already holds a dataset; say what to do with it: --skip_existing (make it match this "
            "manifest, fetching only what it lacks), --append (add this manifest's rows to it) or --overwrite "
            "(replace it)"
        )
    mode = given[0]
    if mode in (SKIP_EXISTING, APPEND):
        _check_same_kind(opts, existing, output)
        _check_same_channels(opts, existing, output)
    if mode == APPEND:
        _check_same_format(opts, existing, output)
    return mode


def _check_same_format(opts, existing: Existing, output: str) -> None:
    """--append keeps the earlier clips as they are, so the new ones must be written the same way (the layout
    is checked for both modes, by _check_same_kind)."""
    if existing.record is None:
        return
    before = existing.record.options
    was = (before.get("clip_format") or "wav", int(before.get("shards") or 0))
    now = (opts.clip_format, opts.shards)
    if was != now:
        given = "--clip_format {} --shards {}"
        raise LaunchError(
            f"--output {output} was built with {given.format(*was)}; --append adds clips the same way (this run: "
            f"{given.format(*now)}): use those, or --skip_existing or --overwrite"
        )


def _check_same_kind(opts, existing: Existing, output: str) -> None:
    """A rerun reads the earlier clips in its own layout's folder only: another layout would leave them there,
    listed by no table."""
    if existing.record is None:
        return
    before = existing.record.options
    was = resolve_layout(before.get("layout") or FILES, int(before.get("shards") or 0))
    if was != opts.layout:
        raise LaunchError(
            f"--output {output} was built with --layout {was}; this run's --layout {opts.layout} would write its "
            "clips elsewhere: use --overwrite to rebuild it that way (or another --output)"
        )


def _check_same_channels(opts, existing: Existing, output: str) -> None:
    """A kept clip must be what this run would write: another --channels changes every multi-channel clip. A
    dataset without a record (a stopped run's) says nothing: its files' headers do (clips.fingerprint_of)."""
    if existing.record is None:
        return
    was = existing.record.options.get("channels") or KEEP
    if was != opts.channels:
        raise LaunchError(
            f"--output {output} was built with --channels {was}; this run's --channels {opts.channels} would change "
            "its clips: use --overwrite to rebuild it that way"
        )


def exports_after(asked: tuple[str, ...], existing: Existing, mode: str, with_transcripts: bool) -> tuple[str, ...]:
    """The exports a run writes: those asked for, and those the dataset has (kept current), unless replaced.
    Kept exports need the transcripts as asked ones do (options.check_values): a LaunchError without them."""
    had = existing.record.exports if existing.record and mode in (SKIP_EXISTING, APPEND) else []
    found = [f for f in EXPORTS if f in {export_of(name) for name in had}]
    if found and not with_transcripts:
        raise LaunchError(
            f"the dataset has {' and '.join(found)} manifests, which a run over it keeps current: add "
            f"--with_transcripts (without it {NO_TEXT}), or --overwrite"
        )
    return tuple(dict.fromkeys([*asked, *found]))


def stale_exports(existing: Existing, exports: tuple[str, ...]) -> tuple[str, ...]:
    """The dataset's manifests that this run does not write (`exports`), removed at its end: --overwrite's of
    formats not asked for again, and those an earlier version wrote under other names (`lhotse/`)."""
    if existing.record is None:
        return ()
    return tuple(name for name in existing.record.exports if name not in export_names(exports))


def table_schema(store: Store, files: tuple[str, ...], schema: pa.Schema, output: str) -> pa.Schema:
    """This run's table schema widened with the columns of the dataset's earlier rows, which --append keeps."""
    if not files:
        return schema
    earlier = table_schema_of(store, files[0])
    try:
        return pa.unify_schemas([schema, earlier])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise LaunchError(
            f"--append: this manifest's columns do not match the dataset's at {output} ({e}); "
            "use --skip_existing or --overwrite"
        ) from None


def table_schema_of(store: Store, path: str) -> pa.Schema:
    """The columns of one table file (its footer, from one read of the file)."""
    return pq.read_schema(io.BytesIO(store.read(path)))
