"""`python -m pipeline run`: the launch's checks, then the graph (pipeline/graph/build.py) built and run, its summary
and exit code."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from pipeline.core.errors import LaunchError, RunError, caused_by
from pipeline.dataset.layout import CLIPS_DIR, path_of, record_path, resolve_layout
from pipeline.dataset.lease import Holder, Lease, current_holder, new_run_id, refusal, take
from pipeline.dataset.record import APPEND, NEW, RunRecord, now
from pipeline.dataset.storage import Store, StoreSettings, open_store
from pipeline.graph.batches import bucket_count
from pipeline.graph.beam_internals import actions, in_process_runner, process_options_kept
from pipeline.graph.build import build, table_schemas
from pipeline.graph.finish import RunInfo
from pipeline.graph.read import Manifest
from pipeline.graph.reconcile import Over, Plan
from pipeline.graph.settings import ClientSettings, FetchSettings
from pipeline.launch import manifest as mf
from pipeline.launch.checks import (
    check_detach,
    check_output,
    check_workers_get_the_key,
    local_form,
    own_tempdir,
    preflight,
    probe_output,
    remove_leftovers,
    runner_name,
    stream_bound,
    workers_share_environment,
)
from pipeline.launch.cli import Parser, add_logging_options
from pipeline.launch.existing import Existing, choose_mode, exports_after, read_existing, stale_exports, table_schema
from pipeline.launch.export_command import parse_exports
from pipeline.launch.interrupt import stop_on_signals
from pipeline.launch.options import (
    REQUIRED,
    ClipOptions,
    add_dry_run,
    check_flags,
    check_values,
    expand_config,
    safe_options,
    take_dry_run,
)
from pipeline.launch.sizing import shard_count
from pipeline.service.client import DEFAULT_API_HOST

log = logging.getLogger(__name__)


def fetch_settings(opts: ClipOptions, manifest: Manifest, store: StoreSettings) -> FetchSettings:
    """The fetch step's settings: the options of the same names, the manifest's row count, the store.

    SONIOX_API_HOST is resolved here, at launch, so the workers call the host the launcher checked the key
    against, whatever their own environment holds."""
    client = ClientSettings(
        api_host=opts.api_host or os.environ.get("SONIOX_API_HOST"),
        api_key_file=opts.api_key_file,
        max_attempts=opts.max_attempts,
        rpc_timeout_s=opts.rpc_timeout_s,
    )
    own = [f.name for f in dataclasses.fields(FetchSettings) if f.name not in ("client", "total_rows", "store")]
    return FetchSettings(
        **{name: getattr(opts, name) for name in own}, client=client, total_rows=manifest.num_rows, store=store
    )


@dataclass
class Launch:
    """A run that passed every launch check, its graph built, not yet run."""

    pipeline: beam.Pipeline
    opts: ClipOptions
    store: Store
    manifest: Manifest
    dry_run: bool
    lease: Lease | None = None  # taken last in prepare (not in a dry run), released by execute or `stopped`
    in_use: Holder | None = None  # a dry run's finding: the run holding the output, which a real run would meet


def prepare(argv: list[str]) -> Launch:
    """Check the options, the manifest's footers, the output and the key, build the graph, then take the
    output's lease (pipeline/dataset/lease.py): last, so that no check can fail with it taken, and before execute
    deletes a killed run's leftovers, which would be a running run's scratch.

    Raises ManifestError or LaunchError (LeaseHeld when another run holds the output) before anything is
    fetched, written or deleted."""
    dry_run, flags = take_dry_run(expand_config(argv))
    check_flags(flags)
    options = PipelineOptions(flags)
    runner = None
    if options.view_as(StandardOptions).runner in (None, "FnApiRunner"):
        options.view_as(StandardOptions).runner = "FnApiRunner"
        runner = in_process_runner(options)
    opts = options.view_as(ClipOptions)
    check_values(opts)
    opts.layout = resolve_layout(opts.layout, opts.shards)  # as the record's options say it
    opts.output = local_form(opts.output)
    check_detach(opts, options)
    check_workers_get_the_key(opts, options)
    store_settings = StoreSettings.from_options(options)
    try:
        store = open_store(opts.output, store_settings)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    # Beam's filesystem options are process-wide, and this is the one place the pipeline sets them: the launch's
    # reads (the manifest, --api_key_file, the durations that size the shards) go through FileSystems, which has
    # no way to be given options per call, before beam.Pipeline(options=...) below sets the same ones. `main`
    # puts back what was there before (process_options_kept).
    FileSystems.set_options(options)
    manifest = mf.inspect_manifest(opts.manifest)
    log.info("manifest: %d file(s), %d rows", len(manifest.files), manifest.num_rows)
    check_output(store, opts.output)
    existing = read_existing(store, opts.output)
    opts.shards = shard_count(opts, manifest, existing)  # as the record's options say it: a rerun keeps it
    settings = fetch_settings(opts, manifest, store_settings)
    schemas = table_schemas(manifest, settings)
    over, schemas = over_existing(opts, store, store_settings, existing, schemas, manifest.num_rows)
    mode = over.plan.mode if over else NEW
    exports = exports_after(parse_exports(opts.export), existing, mode, opts.with_transcripts)
    host = settings.client.api_host or DEFAULT_API_HOST
    log.info("GetAudio at %s; concurrency: %s", host, stream_bound(options, opts.max_in_flight))
    preflight(settings, manifest)
    if not dry_run:  # the one check that writes, so the last; a dry run only looked at the output
        probe_output(store, opts.output)
    run_id = new_run_id()
    info = RunInfo(
        output=opts.output,
        store=store_settings,
        started_at=now(),
        started_epoch=time.time(),
        manifest=manifest.files,
        options=safe_options(options),
        clip_format=opts.clip_format,
        channels=opts.channels,
        layout=opts.layout,
        exports=exports,
        with_transcripts=opts.with_transcripts,
        edge_words=opts.edge_words,
        lease_run_id=run_id if opts.detach else None,  # the launcher will be gone: the job releases it
        mode=mode,
        stale_exports=stale_exports(existing, exports),
    )
    # Dataflow's own dry run builds the Dataflow job (no submission, no staging); no other runner has one.
    options.view_as(TestOptions).dry_run = dry_run and runner_name(options) == "DataflowRunner"
    p = beam.Pipeline(runner=runner, options=options)
    in_process = workers_share_environment(options)
    build(p, settings, manifest, info, spread=not in_process, over=over, schemas=schemas)
    if dry_run:  # takes none: it writes nothing, and must not stop a real run that starts meanwhile
        return Launch(p, opts, store, manifest, dry_run, in_use=current_holder(store, opts.output))
    lease = take(store, opts.output, run_id, detached=opts.detach, job_in_process=in_process)
    return Launch(p, opts, store, manifest, dry_run, lease=lease)


def over_existing(
    opts: ClipOptions,
    store: Store,
    settings: StoreSettings,
    existing: Existing,
    schemas: dict[str, pa.Schema],
    rows: int,
) -> tuple[Over | None, dict[str, pa.Schema]]:
    """How the run goes over the dataset already at the output (None: there is none), and the tables' columns:
    with --append, widened by the earlier rows' (LaunchError when no mode is given, or the columns clash).
    `rows`: the manifest's, which with the dataset's size the join's buckets are counted from."""
    mode = choose_mode(opts, existing, opts.output)
    if mode == NEW:
        return None, schemas
    if mode == APPEND:
        schemas = {
            "clips": table_schema(store, existing.clips_tables, schemas["clips"], opts.output),
            "errors": table_schema(store, existing.errors_tables, schemas["errors"], opts.output),
        }
    buckets = bucket_count(rows + existing.rows)
    plan = Plan(opts.output, mode, opts.clip_format, opts.shards, opts.verify_existing, settings, opts.layout, buckets)
    return Over(plan, existing.clips_tables, existing.errors_tables), schemas


def dry_run(launch: Launch) -> str:
    """Translate the graph as the runner would receive it (the Dataflow job, for Dataflow), run nothing."""
    if launch.pipeline.options.view_as(TestOptions).dry_run:
        launch.pipeline.run()
    proto = launch.pipeline.to_runner_api()
    steps = sum(1 for t in proto.components.transforms.values() if not t.subtransforms)
    m = launch.manifest
    return (
        f"dry run: options, {len(m.files)} manifest file(s) ({m.num_rows} rows), the output and the key checked; "
        f"the job graph was built ({steps} steps); nothing was fetched, written or deleted"
    )


def execute(launch: Launch) -> RunRecord | None:
    """Clear what a killed run left in the output, run the job, and wait for it (unless --detach): the
    summary read back from the record the job wrote (None when detached).

    The lease is released here, however the run ends: after the record is read (a next run deletes the
    record at its start), or on a failure. A detached job, once submitted, keeps it and releases it itself."""
    opts = launch.opts
    handed_to_job = False
    try:
        remove_leftovers(launch.store, opts.output)
        result = launch.pipeline.run()
        if opts.detach:
            handed_to_job = True
            log.info("submitted; %s appears when the job is done", record_path(opts.output))
            return None
        result.wait_until_finish()
        return RunRecord.from_bytes(launch.store.read(record_path(opts.output)))
    finally:
        if launch.lease is not None and not handed_to_job:
            launch.lease.release()


def run(argv: list[str]) -> tuple[RunRecord | None, ClipOptions]:
    """Run the pipeline over argv (Beam flags included): the summary (None for a dry run or a detached
    launch) and the options. Raises ManifestError or LaunchError before any clip is fetched."""
    launch = prepare(argv)
    if launch.dry_run:
        log.info(dry_run(launch))
        return None, launch.opts
    return execute(launch), launch.opts


def print_help() -> None:
    """`run --help`: this pipeline's options with their defaults, the required ones marked."""
    parser = Parser(
        prog="python -m pipeline run",
        description="Extract audio clips from the Soniox Storage API into WAV files and Parquet tables.",
        epilog="Any Apache Beam pipeline option (--runner, --direct_num_workers, --project, ...) may be added; "
        "a word no option knows stops the run (exit 2). The API key comes from SONIOX_API_KEY, SONIOX_API_KEY_FILE "
        "or --api_key_file, never from a flag. Exit codes: 0 done, 1 too many errors (tables written), "
        "2 the run could not start (nothing written), 3 the run failed (no run record).",
    )
    ClipOptions._add_argparse_args(parser)
    for action in actions(parser):
        action.required = action.dest in REQUIRED
    add_dry_run(parser)
    add_logging_options(parser)
    parser.print_help()


GC_THRESHOLD = 100_000  # allocations between the collector's young-generation passes (Python's default: 700)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Python's cyclic collector, run less often while the run runs, then as before. A run in this process (the
    in-process runner) allocates millions of short-lived objects beside a large heap, which the default
    thresholds made the collector scan over and over: 16% of a million-clip rerun's CPU (docs/performance.md).
    The worker processes of a distributed runner are Beam's and keep Python's default."""
    before = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def main(argv: list[str]) -> None:
    """`python -m pipeline run`: run and print the summary. Exit 2 when the run cannot start, 1 past
    --max_error_ratio, 3 when it fails after it started, 130 / 143 when stopped by SIGINT / SIGTERM, so that a
    scheduler can tell them apart."""
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return
    launch = None
    try:
        with (
            own_tempdir() as scratch,
            fewer_collections(),
            process_options_kept(),
            stop_on_signals(lambda: stopped(launch, scratch)),
        ):
            launch = prepare(argv)
            if launch.dry_run:
                print(dry_run(launch), flush=True)
                if launch.in_use is not None:  # exit 0 all the same: see README, "One run per output"
                    print(f"note: a run now would stop (exit 2): {refusal(launch.opts.output, launch.in_use)}")
                return
            summary = execute(launch)
    except (mf.ManifestError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # Python's own exit code, 1, would read as "ran, too many errors"
        late = caused_by(e, RunError)
        if late is None:  # a bug or a runner error: the traceback is the report
            traceback.print_exc()
        reason = str(late) if late else f"{type(e).__name__}, above"
        print(f"error: the run failed ({reason}); the run record was not written", file=sys.stderr)
        sys.exit(3)
    opts = launch.opts
    if summary is None:  # --detach
        print(f"submitted: the job writes {record_path(opts.output)} last, when it is done", flush=True)
        return
    print("\n".join(summary.lines(opts.output)), flush=True)
    if summary.error_ratio > opts.max_error_ratio:
        print(
            f"error: {summary.error_ratio:.1%} of rows failed, more than --max_error_ratio {opts.max_error_ratio}",
            file=sys.stderr,
        )
        sys.exit(1)


STOP_COUNT_S = 2.0  # a stop must end within seconds: 10M clips on a bucket are 10,000 LIST pages


def count_within(items: Iterable[object], seconds: float) -> str:
    """How many `items` there are, as a lower bound (a call in flight in this process may still publish a clip
    after the count), or "more than N" when counting them takes longer than `seconds`."""
    deadline, n = time.monotonic() + seconds, 0
    for n, _ in enumerate(items, 1):
        if time.monotonic() > deadline:
            return f"more than {n}"
    return f"at least {n}"


def stopped(launch: Launch | None, scratch: str) -> str:
    """Remove a stopped run's scratch, then release its lease (not before: a next run's scratch would go
    too); what it leaves and how to go on, in one line."""
    shutil.rmtree(scratch, ignore_errors=True)
    if launch is None:
        return "the run had not started; nothing was written"
    opts, store = launch.opts, launch.store
    store.remove_scratch()
    if launch.lease is not None:
        launch.lease.release()
    if opts.shards:
        return (
            f"no run record was written; run the same command with --skip_existing to finish {opts.output} "
            "(a shard that no table lists yet is built again)"
        )
    try:
        written = count_within(store.list(path_of(opts.output, CLIPS_DIR + "/")), STOP_COUNT_S)
    except Exception as e:  # a listing that fails must not hide the line
        written = f"? ({type(e).__name__})"
    return (
        f"{written} clip file(s) are in place in {opts.output} and no run record was written; "
        "run the same command with --skip_existing to fetch only the rest"
    )
