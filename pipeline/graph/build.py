"""The job's graph: manifest -> validated requests -> concurrent fetch -> clips and tables -> the run's last steps."""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics

from pipeline.core import tables
from pipeline.core.elements import EARLIER, ClipError, ClipRecord, ClipRequest
from pipeline.dataset.shards import shard_of
from pipeline.graph.batches import bucket_count
from pipeline.graph.fetch import AttachTranscripts, FetchClips, FetchShard
from pipeline.graph.finish import FinishRun, RunInfo, RunOutputs
from pipeline.graph.read import Manifest, ReadManifest, ValidateRows, split_errors
from pipeline.graph.reconcile import Over, RemoveOrphans, reconcile
from pipeline.graph.settings import FetchSettings
from pipeline.graph.table_files import WriteExportParts, WriteTable

ERRORS_NAMESPACE = "errors"


def _count_error(error: ClipError) -> ClipError:
    Metrics.counter(ERRORS_NAMESPACE, error.error_code).inc()
    return error


def build(
    p: beam.Pipeline,
    settings: FetchSettings,
    manifest: Manifest,
    info: RunInfo,
    spread: bool = True,
    over: Over | None = None,
    schemas: dict[str, pa.Schema] | None = None,
) -> None:
    """The graph: read and validate the rows, spread them over the workers (`spread`: not on the in-process
    runner, where a shuffle would hold every request in memory), decide each against the dataset already
    there (`over`, pipeline/graph/reconcile.py), fetch, write the tables (`schemas`: default, this manifest's),
    then remove what no row lists, count the run and write the card and the record."""
    schemas = schemas or table_schemas(manifest, settings)
    read = lambda columns: ReadManifest(manifest, columns, spread)  # noqa: E731
    rows = p | "ValidateRows" >> ValidateRows(read, bucket_count(manifest.num_rows))
    requests, errors = rows["requests"], [rows["errors"]]
    # The clips come in branches (this run's, kept, --append's earlier) that are written and counted apart: a
    # Flatten of per-clip branches makes the in-process runner encode and decode every clip once more.
    clips, earlier_clips, earlier_errors, orphans = {}, {}, [], None
    if over is not None:  # the requests to fetch come out of the join spread over the workers (reconcile)
        decided = reconcile(requests, over, spread)
        requests, clips["Kept"], orphans = decided.fetch, decided.kept, decided.orphans
        earlier_clips["Earlier"], earlier_errors = decided.earlier, [decided.earlier_errors]
    elif spread:  # on a cluster the rows of a row group would stay with the worker that read them
        requests = requests | "SpreadRequests" >> beam.Reshuffle()
    if settings.with_transcripts:
        requests, no_transcript = _attach_transcripts(requests, settings)
        errors.append(no_transcript)
    if settings.shards:  # a shard's clips are fetched together, so the shard is built and written once
        n = settings.shards
        copies = decided.copies if over is not None else p | "NoCopies" >> beam.Create([])
        work = {"fetch": requests | "KeyByShard" >> beam.Map(lambda r: (shard_of(r.clip_id, n), r)), "copy": copies}
        shards = (
            work
            | "GroupByShard" >> beam.CoGroupByKey()
            | "FetchShards"
            >> beam.ParDo(FetchShard(settings, clips_schema=schemas["clips"])).with_outputs(EARLIER, main="fetched")
        )
        fetched = shards.fetched
        earlier_clips["EarlierInShards"] = shards[EARLIER]
    else:
        fetched = requests | "Fetch" >> beam.ParDo(FetchClips(settings))
    fetched = fetched | "SplitFailed" >> split_errors(ClipRecord, "clips")
    errors.append(fetched.errors)
    clips = {"": fetched.clips, **clips}
    clip_files, export_parts = _write_clips({**clips, **earlier_clips}, settings, info, schemas["clips"])
    all_errors = errors | "AllErrors" >> beam.Flatten() | "CountErrors" >> beam.Map(_count_error)
    error_files = (
        [all_errors, *earlier_errors]
        | "TableErrors" >> beam.Flatten()
        | "ErrorRows" >> beam.Map(tables.to_row)
        | "WriteErrors" >> WriteTable(settings.output, "errors", schemas["errors"], settings.store)
    )
    clip_files = clip_files | "ClipFiles" >> beam.Flatten(pipeline=p)
    done = beam.pvalue.AsList(clip_files), beam.pvalue.AsList(error_files)  # orphans go once the tables are there
    removed = (
        orphans | "RemoveOrphans" >> beam.ParDo(RemoveOrphans(over.plan), *done)
        if orphans is not None
        else p | "NoneRemoved" >> beam.Create([])
    )
    outputs = RunOutputs(
        clips=clips,
        errors=all_errors,
        earlier={**earlier_clips, **{f"Errors{i}": e for i, e in enumerate(earlier_errors)}},
        clip_files=clip_files,
        error_files=error_files,
        export_parts=export_parts | "ExportParts" >> beam.Flatten(pipeline=p),
        removed=removed,
    )
    _ = outputs.as_input() | "Finish" >> FinishRun(info, schemas)


def _write_clips(branches: dict[str, Any], settings: FetchSettings, info: RunInfo, schema: pa.Schema):
    """Each branch of clip records as rows of the clips table and of the export manifests' parts: the lists of
    the files written (PCollections of paths)."""
    out, store = settings.output, settings.store
    files, parts = [], []
    for label, records in branches.items():
        rows = records | f"ClipRows{label}" >> beam.Map(tables.to_row)
        files.append(rows | f"WriteClips{label}" >> WriteTable(out, "clips", schema, store))
        if info.exports:
            parts.append(rows | f"WriteExports{label}" >> WriteExportParts(out, info.exports, info.sharded, store))
    return files, parts


def table_schemas(manifest: Manifest, settings: FetchSettings) -> dict[str, pa.Schema]:
    """The clips and errors tables' columns for this manifest and these settings."""
    sharded = settings.shards > 0
    return {
        "clips": tables.clips_schema(manifest.schema, settings.with_transcripts, sharded),
        "errors": tables.errors_schema(manifest.schema),
    }


def _attach_transcripts(requests, settings: FetchSettings):
    """Requests with their object's tokens (one GetObject per object), and errors for objects without."""
    with_tokens = (
        requests
        | "KeyByObjectId" >> beam.Map(lambda r: (r.object_id, r))
        | "GroupByObjectId" >> beam.GroupByKey()
        | "AttachTranscripts" >> beam.ParDo(AttachTranscripts(settings))
        | "SplitNoTranscript" >> split_errors(ClipRequest, "requests")
    )
    return with_tokens.requests | "Spread" >> beam.Reshuffle(), with_tokens.errors
