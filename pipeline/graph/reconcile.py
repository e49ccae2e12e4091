"""A run over an existing dataset: each clip decided from the dataset's earlier table rows and one listing.

The manifest's requests, the earlier clips and errors tables' rows and the listing of `clips/` (or `shards/`)
meet by clip_id (or shard), and each group is decided in one place:

- a request whose earlier row names the same request, at the same path, with the size the listing gives,
  is kept as it is: no call, no request to the store, no audio byte read (`--verify_existing` reads and
  hashes it first);
- a request with no such row is fetched (a file the listing holds but no row describes, a stopped run's,
  is looked at first: one metadata request, or the file's header);
- with `--append`, an earlier row no request names stays in the tables (its clip fetched again if its
  file is gone), and an earlier error stays until a request retries its clip;
- with `--skip_existing` and `--overwrite`, a file or shard that no request names is an orphan, removed once
  the new tables are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from pipeline.core import tables
from pipeline.core.elements import EARLIER, NOT_COLUMNS, ClipError, ClipRecord, ClipRequest, ShardCopy
from pipeline.core.rows import validate_row
from pipeline.dataset.layout import (
    CLIPS_DIR,
    FILES,
    LAYOUTS,
    clip_name,
    name_of,
    path_of,
    shard_index,
    shard_names,
    shards_dir,
)
from pipeline.dataset.record import APPEND, OVERWRITE
from pipeline.dataset.shards import shard_of
from pipeline.dataset.storage import StoreSettings, open_store
from pipeline.graph.batches import batched, by_key
from pipeline.graph.table_files import ReadTable

log = logging.getLogger(__name__)
KEPT, EARLIER_ERRORS, ORPHANS = "kept", "earlier_errors", "orphans"
VERIFY, REFETCH, COPY = "verify", "refetch", "copy"
_RECORD_FIELDS = [f.name for f in dataclasses.fields(ClipRecord) if f.name not in NOT_COLUMNS]
_ERROR_FIELDS = [f.name for f in dataclasses.fields(ClipError) if f.name not in NOT_COLUMNS]


@dataclass(frozen=True)
class Plan:
    """How the run goes over the dataset: picklable, for the steps that decide."""

    output: str
    mode: str
    clip_format: str
    shards: int
    verify: bool
    store: StoreSettings
    layout: str = FILES
    buckets: int = 1  # the join's buckets of clip_ids (pipeline/graph/batches.py)


def manifest_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The manifest's columns of a table row (what a ClipRequest's `columns` holds)."""
    return {k: v for k, v in row.items() if k not in tables.RESERVED}


def request_of(row: dict[str, Any], where: str) -> ClipRequest | ClipError:
    """The request an earlier row was made for, read from its manifest columns by the manifest's own rules."""
    return validate_row((where, manifest_columns(row)))


def same_request(row: dict[str, Any], request: ClipRequest) -> bool:
    """The earlier row was made for this request: the same object and range columns (the manifest's rules gave
    the request from those columns, so equal columns are an equal request; a row is not validated again)."""
    columns = request.columns
    return row.get("object_id") == request.object_id and all(
        row.get(name) == columns.get(name) for name in tables.RANGE_COLUMNS
    )


def record_of(row: dict[str, Any], columns: dict[str, Any]) -> ClipRecord:
    """A clip kept from an earlier run, as this run's tables hold it (attempts 0: no call made)."""
    fixed = {name: row.get(name) for name in _RECORD_FIELDS}
    return ClipRecord(**{**fixed, "attempts": 0}, columns=columns)


def error_of(row: dict[str, Any]) -> ClipError:
    return ClipError(**{name: row.get(name) for name in _ERROR_FIELDS}, columns=manifest_columns(row))


def listed_key(name: str, plan: Plan) -> tuple[Any, str]:
    """A listed file's group: the clip_id of `clips/{clip_id}.{format}` or the number of a shard; another
    name is its own group, which no request joins (an orphan)."""
    if plan.shards:
        try:
            return shard_index(name), name
        except ValueError:
            return name, name
    stem, _, ext = name.removeprefix(f"{CLIPS_DIR}/").rpartition(".")
    return (stem if ext == plan.clip_format else name), name


class ListFiles(beam.DoFn):
    """The output's clip files (or shards), as (group, (name, size)): one listing, pages of 1,000 on a bucket.
    --overwrite also lists the other layouts' folders, whose files (a dataset rebuilt in another layout) no
    request claims: they are removed at the end as orphans."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def process(self, _: Any) -> Iterator[tuple[Any, tuple[str, int]]]:
        plan = self.plan
        store = open_store(plan.output, plan.store)
        folders = [shards_dir(layout) for layout in LAYOUTS] if plan.mode == OVERWRITE else [shards_dir(plan.layout)]
        for folder in folders:
            for found in store.list(path_of(plan.output, f"{folder}/")):
                name = name_of(plan.output, found.path)
                key, name = listed_key(name, plan)
                yield key, (name, found.size)


def group_key(request: ClipRequest, plan: Plan) -> Any:
    return shard_of(request.clip_id, plan.shards) if plan.shards else request.clip_id


def row_key(row: dict[str, Any], plan: Plan) -> Any:
    """An earlier clips row's group: its clip_id, or the shard that holds it."""
    if not plan.shards:
        return row.get("clip_id")
    try:
        return shard_index(row.get("path") or "")
    except ValueError:
        return None


def error_key(row: dict[str, Any], plan: Plan) -> Any:
    """An earlier error's group: its clip_id, or the shard its clip would go to (None without a clip_id)."""
    clip_id = row.get("clip_id")
    if clip_id is None or not plan.shards:
        return clip_id
    return shard_of(clip_id, plan.shards)


class _Reconcile(beam.DoFn):
    """(bucket, {requests, rows, errors, listed} batches) -> each of the bucket's groups decided."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def process(self, item: tuple[int, dict[str, Iterable[bytes]]]) -> Iterator[Any]:
        for key, group in by_key(item[1]).items():
            yield from self.decide(key, *_unpack(group))

    def decide(self, key: Any, requests: list, rows: list[dict], errors: list[dict], sizes: dict[str, int]):
        raise NotImplementedError


class ReconcileClips(_Reconcile):
    """A clip_id's {requests, rows, errors, listed} -> a request to fetch (main), or a clip kept, an earlier
    row or error carried, a file to remove, a clip to verify (tagged outputs)."""

    def decide(self, key: Any, requests: list, rows: list[dict], errors: list[dict], sizes: dict[str, int]):
        plan = self.plan
        if not isinstance(key, str) or not (requests or rows or errors):
            yield from unclaimed(plan, errors, sizes)
            return
        name = clip_name(key, plan.clip_format)
        current = next((r for r in rows if r.get("path") == name and sizes.get(name) == r.get("num_bytes")), None)
        others = [n for n in sizes if n != name]  # this clip in another format, say
        if plan.mode != APPEND:
            yield from (beam.pvalue.TaggedOutput(ORPHANS, path_of(plan.output, n)) for n in others)
        if requests:
            yield from self._requested(requests[0], current, name in sizes and not rows)
        elif plan.mode == APPEND:
            yield from self._carried(current, rows, errors)
        elif name in sizes:
            yield beam.pvalue.TaggedOutput(ORPHANS, path_of(plan.output, name))

    def _requested(self, request: ClipRequest, current: dict | None, unexplained: bool) -> Iterator[Any]:
        plan = self.plan
        if current is not None and plan.mode != OVERWRITE and same_request(current, request):
            kept = record_of(current, request.columns)
            if plan.verify:
                yield beam.pvalue.TaggedOutput(VERIFY, (request, kept))
            else:
                yield beam.pvalue.TaggedOutput(KEPT, kept)
            return
        yield dataclasses.replace(request, listed=unexplained and plan.mode != OVERWRITE)

    def _carried(self, current: dict | None, rows: list[dict], errors: list[dict]) -> Iterator[Any]:
        """--append: an earlier clip no request names stays (fetched again when its file is gone); an earlier
        error stays."""
        if current is not None:
            kept = record_of(current, manifest_columns(current))
            request = request_of(current, f"{current.get('path')} (an earlier row)")
            if self.plan.verify and isinstance(request, ClipRequest):
                yield beam.pvalue.TaggedOutput(VERIFY, (request, kept))
            else:
                yield beam.pvalue.TaggedOutput(EARLIER, kept)
        elif rows:
            request = request_of(rows[0], f"{rows[0].get('path')} (an earlier row whose file is gone)")
            yield request if isinstance(request, ClipRequest) else beam.pvalue.TaggedOutput(EARLIER_ERRORS, request)
        elif errors:
            yield beam.pvalue.TaggedOutput(EARLIER_ERRORS, error_of(errors[0]))


def _unpack(group: dict[str, list]) -> tuple[list, list[dict], list[dict], dict[str, int]]:
    """A joined group: its requests, earlier rows, earlier errors, and listed files (name -> size)."""
    return group.get("requests", []), group.get("rows", []), group.get("errors", []), dict(group.get("listed", ()))


def unclaimed(plan: Plan, errors: list[dict], sizes: dict[str, int]) -> Iterator[Any]:
    """A group no clip_id names: errors of rows without a clip_id (--append keeps them), and files that are
    no clip's or shard's (orphans, but for --append)."""
    if plan.mode == APPEND:
        yield from (beam.pvalue.TaggedOutput(EARLIER_ERRORS, error_of(e)) for e in errors)
    else:
        yield from (beam.pvalue.TaggedOutput(ORPHANS, path_of(plan.output, n)) for n in sizes)


class ReconcileShards(_Reconcile):
    """A shard's {requests, rows, errors, listed} -> the requests to fetch (main), and for a shard that changes
    the clips to copy from its earlier version (COPY); a shard whose clips are all current is kept as it is
    (its rows on KEPT and EARLIER), one that no row names any more is an orphan."""

    def decide(self, key: Any, requests: list, rows: list[dict], errors: list[dict], sizes: dict[str, int]):
        plan = self.plan
        if not isinstance(key, int):  # a file in shards/ that is no shard, or errors without a clip_id
            yield from unclaimed(plan, errors, sizes)
            return
        own = shard_names(key, plan.layout)
        name, found = _shard_file(own, sizes)
        yield from (beam.pvalue.TaggedOutput(ORPHANS, path_of(plan.output, n)) for n in sizes if n not in (*own, found))
        present = found is not None
        kept_rows = rows if present and plan.mode != OVERWRITE else []
        earlier = {r["clip_id"]: r for r in kept_rows if r.get("path") == found}
        wanted = {r.clip_id for r in requests}
        fetch, copies = _fetch_or_copy(requests, earlier)
        extra = [row for clip_id, row in earlier.items() if clip_id not in wanted]
        if plan.mode == APPEND:
            yield from self._carried(extra, rows, errors, wanted, present, copies, fetch)
        changed = bool(fetch) or (plan.mode != APPEND and bool(extra)) or found not in (None, name)
        if not fetch and not copies:
            if present and plan.mode != APPEND:
                gone = [n for n in sizes if n in (*own, found)]
                yield from (beam.pvalue.TaggedOutput(ORPHANS, path_of(plan.output, n)) for n in gone)
            return
        if found != name and present and not copies:  # nothing to copy from the earlier name's file
            yield beam.pvalue.TaggedOutput(ORPHANS, path_of(plan.output, found))
        if not changed and not plan.verify:  # kept as it is: no byte of it read or written
            for record, _, carried in copies:
                yield beam.pvalue.TaggedOutput(EARLIER if carried else KEPT, record)
            return
        yield from fetch
        for record, request, carried in copies:
            yield beam.pvalue.TaggedOutput(COPY, (key, ShardCopy(record, request, carried, changed, plan.verify)))

    def _carried(self, extra, rows, errors, wanted, present, copies, fetch) -> Iterator[Any]:
        """--append: earlier clips of the shard no request names are copied (or, the shard gone, fetched
        again); earlier errors no request retries stay."""
        for row in extra:
            request = request_of(row, f"{row.get('path')} (an earlier row)")
            copies.append((record_of(row, manifest_columns(row)), _or_none(request), True))
        if not present:
            for row in rows:
                if row.get("clip_id") not in wanted and isinstance(
                    request := request_of(row, "an earlier row"), ClipRequest
                ):
                    fetch.append(request)
        have = wanted | {row.get("clip_id") for row in rows}
        seen = set()
        for error in errors:
            if error.get("clip_id") not in have | seen:
                seen.add(error.get("clip_id"))
                yield beam.pvalue.TaggedOutput(EARLIER_ERRORS, error_of(error))


def _fetch_or_copy(
    requests: list[ClipRequest], earlier: dict[str, dict[str, Any]]
) -> tuple[list[ClipRequest], list[tuple[ClipRecord, ClipRequest | None, bool]]]:
    """A shard's requests: those to fetch, and those its earlier version holds for the same request (to copy)."""
    fetch, copies = [], []
    for request in requests:
        row = earlier.get(request.clip_id)
        if row is not None and same_request(row, request):
            copies.append((record_of(row, request.columns), request, False))
        else:
            fetch.append(request)
    return fetch, copies


def _shard_file(own: tuple[str, ...], sizes: dict[str, int]) -> tuple[str, str | None]:
    """The shard's name (the first of its files' names), and the file of it that is there: under its name, or
    under an earlier version's (`shard-NNNNN.tar`), which a rebuild copies from, publishes under the name and
    then removes (FetchShard)."""
    name = own[0]
    return name, name if name in sizes else next((n for n in sorted(sizes) if n not in own), None)


def _or_none(request: ClipRequest | ClipError) -> ClipRequest | None:
    return request if isinstance(request, ClipRequest) else None


class VerifyClips(beam.DoFn):
    """(request, kept record) -> the record when the file's sha256 is the table's, else the request (on
    REFETCH: fetched again). Reads every byte of the clip."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def setup(self) -> None:
        self.store = open_store(self.plan.output, self.plan.store)

    def process(self, item: tuple[ClipRequest, ClipRecord]) -> Iterator[Any]:
        request, kept = item
        try:
            data = self.store.read(path_of(self.plan.output, kept.path))
        except OSError as e:  # gone since the listing, or unreadable: fetched again
            log.warning("cannot read %s to verify it (%s); fetching it again", kept.path, e)
            data = None
        if data is not None and hashlib.sha256(data).hexdigest() == kept.sha256:
            yield kept
        else:
            yield beam.pvalue.TaggedOutput(REFETCH, request)


@dataclass(frozen=True)
class Over:
    """A run over an existing dataset: its plan, and the earlier table files to read."""

    plan: Plan
    clips_tables: tuple[str, ...]
    errors_tables: tuple[str, ...]


@dataclass(frozen=True)
class Decided:
    fetch: Any  # ClipRequest: to fetch
    kept: Any  # ClipRecord: this manifest's clips already there (attempts 0)
    earlier: Any  # ClipRecord: --append's earlier clips that this manifest does not name
    earlier_errors: Any  # ClipError: --append's earlier errors that this manifest does not retry
    orphans: Any  # str: paths to remove once the tables are written
    copies: Any  # (shard, ShardCopy): clips to copy into a shard's new version


def reconcile(requests, over: Over, spread: bool) -> Decided:
    """Join the requests with the dataset's earlier rows and its listing in batches per bucket of keys (one
    element per batch crosses the join: pipeline/graph/batches.py), and decide each clip."""
    p, plan = requests.pipeline, over.plan
    wanted = None if plan.mode == APPEND else _WANTED  # --append carries the earlier rows whole
    rows = _earlier(p, "Clips", over.clips_tables if plan.mode != OVERWRITE else (), plan, wanted, spread)
    errors = _earlier(p, "Errors", over.errors_tables if plan.mode == APPEND else (), plan, None, spread, error_key)
    listed = p | "ListOnce" >> beam.Create([None]) | "List" >> beam.ParDo(ListFiles(plan))
    keyed = requests | "KeyRequests" >> beam.Map(lambda r: (group_key(r, plan), r))
    inputs = {"requests": keyed, "rows": rows, "errors": errors, "listed": listed}
    groups = {tag: items | f"Batch{tag.title()}" >> batched(plan.buckets) for tag, items in inputs.items()}
    out = (
        groups
        | "Join" >> beam.CoGroupByKey()
        | "Decide"
        >> beam.ParDo(decider(plan)).with_outputs(KEPT, EARLIER, EARLIER_ERRORS, ORPHANS, VERIFY, COPY, main="fetch")
    )
    fetch, kept, verify = out.fetch, out[KEPT], out[VERIFY]
    if spread:  # a bucket is decided on one worker: what it fetches or reads must not stay there
        verify = verify | "SpreadVerify" >> beam.Reshuffle()
    if plan.verify:
        verified = verify | "Verify" >> beam.ParDo(VerifyClips(plan)).with_outputs(REFETCH, main="kept")
        fetch = (fetch, verified[REFETCH]) | "ToFetch" >> beam.Flatten()
        kept = (kept, verified.kept) | "AllKept" >> beam.Flatten()
    if spread:
        fetch = fetch | "SpreadFetch" >> beam.Reshuffle()
    return Decided(fetch, kept, out[EARLIER], out[EARLIER_ERRORS], out[ORPHANS], out[COPY])


def decider(plan: Plan) -> _Reconcile:
    return ReconcileShards(plan) if plan.shards else ReconcileClips(plan)


# What deciding needs of an earlier clips row (its manifest columns come from the new request instead).
_WANTED = (*_RECORD_FIELDS, *tables.RANGE_COLUMNS)  # member included: a shard's rows


def _earlier(p, name: str, files: tuple[str, ...], plan: Plan, columns, spread: bool, key=row_key):
    read = p | f"Earlier{name}" >> ReadTable(plan.output, files, plan.store, columns, spread)
    return read | f"Key{name}" >> beam.Map(lambda row: (key(row, plan), row))


class RemoveOrphans(beam.DoFn):
    """Paths -> how many were removed, in batches (one request per 1,000 on S3, per 100 on GCS). Given the table
    files as a side input, so that it runs once the new tables are written."""

    BATCH = 1000

    def __init__(self, plan: Plan):
        self.plan = plan

    def setup(self) -> None:
        self.store = open_store(self.plan.output, self.plan.store)

    def start_bundle(self) -> None:
        self.paths: list[str] = []

    def process(self, path: str, *written: Any) -> Iterator[int]:
        self.paths.append(path)
        if len(self.paths) >= self.BATCH:
            yield self._remove()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self.paths:
            yield WindowedValue(self._remove(), MIN_TIMESTAMP, [GlobalWindow()])

    def _remove(self) -> int:
        """Remove a batch; one that fails is logged and left for the next --skip_existing run (the new tables no
        longer list it), so that a refused delete does not fail a run whose tables are written."""
        paths, self.paths = self.paths, []
        try:
            self.store.delete(paths)
        except OSError as e:
            log.warning(
                "could not remove %d file(s) no row lists, e.g. %s (%s); a next run removes them",
                len(paths),
                paths[0],
                e,
            )
            return 0
        return len(paths)
