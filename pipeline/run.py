"""Builds and runs the pipeline: manifest -> validated requests -> concurrent fetch -> clips and tables."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)

from pipeline import manifest as mf
from pipeline import tables
from pipeline.cli import LaunchError, Parser, add_logging_options
from pipeline.client import DEFAULT_API_HOST, resolve_api_key
from pipeline.elements import ClipError
from pipeline.export import parse_exports
from pipeline.fetch import (
    AttachTranscripts,
    FetchClips,
    FetchSettings,
    FetchShard,
    check_key,
    read_api_key,
)
from pipeline.finish import FinishRun, RunInfo
from pipeline.options import REQUIRED, ClipOptions, check_flags, check_values, expand_config
from pipeline.record import now, record_path, remove_record, safe_options
from pipeline.shards import shard_of
from pipeline.storage import TMP_DIR, Store, StoreSettings, open_store
from pipeline.table_files import WriteTable, table_prefix

log = logging.getLogger(__name__)
ERRORS_NAMESPACE = "errors"


def _count_error(error: ClipError) -> ClipError:
    Metrics.counter(ERRORS_NAMESPACE, error.error_code).inc()
    return error


def fetch_settings(opts: ClipOptions, manifest: mf.Manifest, store: StoreSettings) -> FetchSettings:
    """The fetch step's settings: the options of the same names, the manifest's row count, the store.

    SONIOX_API_HOST is resolved here, at launch, so the workers call the host the launcher checked the key
    against, whatever their own environment holds."""
    names = [f.name for f in dataclasses.fields(FetchSettings) if f.name not in ("total_rows", "store")]
    settings = FetchSettings(**{name: getattr(opts, name) for name in names}, total_rows=manifest.num_rows, store=store)
    return dataclasses.replace(settings, api_host=opts.api_host or os.environ.get("SONIOX_API_HOST"))


def build(p: beam.Pipeline, settings: FetchSettings, manifest: mf.Manifest, info: RunInfo, spread: bool = True) -> None:
    """The graph: read and validate the rows, spread them over the workers (`spread`: not on the in-process
    runner, where a shuffle would hold every request in memory), fetch, write the tables, then count the
    run and write the card and the record."""
    rows = p | "ValidateRows" >> mf.ValidateRows(lambda columns: mf.ReadManifest(manifest, columns))
    requests, errors = rows["requests"], [rows["errors"]]
    if spread:  # on a cluster the rows of a row group would stay with the worker that read them
        requests = requests | "SpreadRequests" >> beam.Reshuffle()
    if settings.with_transcripts:
        requests, no_transcript = _attach_transcripts(requests, settings)
        errors.append(no_transcript)
    if settings.shards:  # a shard's clips are fetched together, so the shard is built and written once
        n = settings.shards
        fetched = (
            requests
            | "KeyByShard" >> beam.Map(lambda r: (shard_of(r.clip_id, n), r))
            | "GroupByShard" >> beam.GroupByKey()
            | "FetchShards" >> beam.ParDo(FetchShard(settings))
        )
    else:
        fetched = requests | "Fetch" >> beam.ParDo(FetchClips(settings))
    fetched = fetched | "SplitFailed" >> beam.ParDo(mf.split_errors).with_outputs("errors", main="clips")
    errors.append(fetched.errors)
    out, store = settings.output, settings.store
    clips_schema = tables.clips_schema(manifest.schema, settings.with_transcripts, settings.shards > 0)
    errors_schema = tables.errors_schema(manifest.schema)
    clip_files = (
        fetched.clips
        | "ClipRows" >> beam.Map(tables.to_row)
        | "WriteClips" >> WriteTable(out, "clips", clips_schema, store)
    )
    all_errors = errors | "AllErrors" >> beam.Flatten() | "CountErrors" >> beam.Map(_count_error)
    error_files = (
        all_errors
        | "ErrorRows" >> beam.Map(tables.to_row)
        | "WriteErrors" >> WriteTable(out, "errors", errors_schema, store)
    )
    schemas = {"clips": clips_schema, "errors": errors_schema}
    _ = (fetched.clips, all_errors, clip_files, error_files) | "Finish" >> FinishRun(info, schemas)


def _attach_transcripts(requests, settings: FetchSettings):
    """Requests with their object's tokens (one GetObject per object), and errors for objects without."""
    with_tokens = (
        requests
        | "KeyByObjectId" >> beam.Map(lambda r: (r.object_id, r))
        | "GroupByObjectId" >> beam.GroupByKey()
        | "AttachTranscripts" >> beam.ParDo(AttachTranscripts(settings))
        | "SplitNoTranscript" >> beam.ParDo(mf.split_errors).with_outputs("errors", main="requests")
    )
    return with_tokens.requests | "Spread" >> beam.Reshuffle(), with_tokens.errors


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
        yield f"dataset card    {output.rstrip('/')}/README.md"


class KeyRejected(LaunchError):
    """The service refused the API key: every call would fail, so the run stops before it starts."""


# Runners whose workers run on this machine, in this process or its children, and so see its environment.
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner")


def workers_share_environment(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    if name.rsplit(".", 1)[-1] in LOCAL_RUNNERS:
        return True
    return (options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"


def local_runner(options: PipelineOptions):
    """The runner of a plain run: Beam's in-process FnApiRunner, set up as Beam's DirectRunner sets it up
    (the workers of --direct_running_mode multi_processing get the options), but without the DirectRunner's
    first attempt to download and run Prism when the machine is online: the same runner online or not,
    and the one the tests run."""
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=info)


def check_workers_get_the_key(opts: ClipOptions, options: PipelineOptions) -> None:
    """On Dataflow (or a portable runner's containers) SONIOX_API_KEY set here never reaches the workers,
    which would fail every row UNAUTHENTICATED after a key check here had passed: refuse at launch."""
    if not opts.api_key_file and not workers_share_environment(options):
        raise LaunchError(
            "this runner's workers do not see this machine's environment, so SONIOX_API_KEY would not reach "
            "them: put the key in a file they can read (e.g. a locked-down gs:// object) and pass --api_key_file"
        )


def stream_bound(options: PipelineOptions, max_in_flight: int) -> str:
    """The most GetAudio streams the job can open at once, as a sentence for the launch log."""
    workers = options.view_as(WorkerOptions)
    if workers_share_environment(options):
        processes = options.view_as(DirectOptions).direct_num_workers or 1
        return f"{processes} process(es) x --max_in_flight {max_in_flight} = {processes * max_in_flight} streams"
    machines = workers.max_num_workers or workers.num_workers or 1
    vcpus = int(re.search(r"-(\d+)", workers.machine_type or "n1-standard-1").group(1))  # a process per vCPU
    most = machines * vcpus * max_in_flight
    return (
        f"{machines} worker(s) x {vcpus} process(es) ({workers.machine_type or 'default machine type'}) x "
        f"--max_in_flight {max_in_flight} = {most} streams at most (bound it with --max_num_workers)"
    )


def key_given(settings: FetchSettings) -> bool:
    """Whether a key was given; read here, so that a key file that cannot be read stops the launch (exit 2)
    rather than every worker."""
    path = settings.api_key_file or os.environ.get("SONIOX_API_KEY_FILE")
    where = "--api_key_file" if settings.api_key_file else "SONIOX_API_KEY_FILE"
    try:
        return bool(read_api_key(settings.api_key_file) or resolve_api_key().reveal())
    except Exception as e:  # any filesystem's "cannot read": missing, no permission, no credentials
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
        raise LaunchError(f"{where} {path}: cannot read the API key ({reason})") from None


def preflight(settings: FetchSettings, manifest: mf.Manifest) -> None:
    """One GetObject call with the key, so a wrong or missing key stops the run with one message, not one
    error per row."""
    given = key_given(settings)
    object_id = mf.first_object_id(manifest)
    if object_id is None:
        return
    code = check_key(settings, object_id)
    host = settings.api_host or DEFAULT_API_HOST
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") and not given:
        raise LaunchError(
            f"no API key was given and {host} requires one ({code}): set SONIOX_API_KEY (or SONIOX_API_KEY_FILE) "
            "or pass --api_key_file"
        )
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        raise KeyRejected(f"the API key was refused by {host} ({code})")
    if code is not None:  # the service may come back within the retry budget: the run goes on
        log.warning("key check: GetObject %s answered %s; starting the run anyway", object_id, code)


def remove_leftovers(store: Store, output: str) -> None:
    """What a killed run left: scratch files, unfinished multipart uploads, the old run record.

    Older versions also staged clips and Beam's table files under `_tmp/` and `metadata/beam-temp-*`."""
    root = output.rstrip("/")
    if store.local:
        for folder in [os.path.join(root, TMP_DIR), *_beam_temp_folders(root)]:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        left = [o.path for o in store.list(f"{root}/{TMP_DIR}/")]
        left += [o.path for o in store.list(f"{root}/metadata/beam-temp-")]
        if left:
            store.delete(left)
        aborted = store.abort_uploads(f"{root}/")
        if aborted:
            log.info("aborted %d unfinished multipart upload(s) under %s", aborted, root)
    remove_record(store, output)


def _beam_temp_folders(root: str) -> list[str]:
    metadata = os.path.join(root, "metadata")
    return (
        [os.path.join(metadata, d) for d in os.listdir(metadata) if d.startswith("beam-temp-")]
        if os.path.isdir(metadata)
        else []
    )


def run(argv: list[str]) -> tuple[Summary | None, ClipOptions]:
    """Run the pipeline over argv (Beam flags included): the summary (None for a dry run or a detached
    launch) and the options.

    Raises ManifestError or LaunchError before any clip is fetched.
    """
    flags = expand_config(argv)
    check_flags(flags)
    options = PipelineOptions(flags)
    runner = None
    if options.view_as(StandardOptions).runner in (None, "FnApiRunner"):
        options.view_as(StandardOptions).runner = "FnApiRunner"
        runner = local_runner(options)
    opts = options.view_as(ClipOptions)
    check_values(opts)
    check_workers_get_the_key(opts, options)
    store_settings = StoreSettings.from_options(options)
    try:
        store = open_store(opts.output, store_settings)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    FileSystems.set_options(options)  # so gs:// and s3:// options apply to the launcher's reads of the manifest
    manifest = mf.inspect_manifest(opts.manifest)
    log.info("manifest: %d file(s), %d rows", len(manifest.files), manifest.num_rows)
    settings = fetch_settings(opts, manifest, store_settings)
    host = settings.api_host or DEFAULT_API_HOST
    log.info("GetAudio at %s; concurrency: %s", host, stream_bound(options, opts.max_in_flight))
    dry_run = options.view_as(TestOptions).dry_run
    if not dry_run:
        preflight(settings, manifest)
        remove_leftovers(store, opts.output)
    info = RunInfo(
        output=opts.output,
        store=store_settings,
        started_at=now(),
        started_epoch=time.time(),
        manifest=manifest.files,
        options=safe_options(options),
        clip_format=opts.clip_format,
        sharded=opts.shards > 0,
        exports=parse_exports(opts.export),
        with_transcripts=opts.with_transcripts,
        edge_words=opts.edge_words,
    )
    p = beam.Pipeline(runner=runner, options=options)
    build(p, settings, manifest, info, spread=not workers_share_environment(options))
    result = p.run()
    if opts.detach and not dry_run:
        log.info("submitted; %s appears when the job is done", record_path(opts.output))
        return None, opts
    result.wait_until_finish()
    if dry_run:
        return None, opts
    return Summary.from_record(json.loads(store.read(record_path(opts.output)))), opts


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
    for action in parser._actions:
        action.required = action.dest in REQUIRED
    add_logging_options(parser)
    parser.print_help()


@contextlib.contextmanager
def own_tempdir() -> Iterator[None]:
    """Beam leaves folders in $TMPDIR after every run (its job server's, the staged dependencies'): the run
    gets a folder of its own, for this process and the worker processes it starts, removed at the end."""
    folder = tempfile.mkdtemp(prefix="clip-pipeline-")
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = folder
    try:
        yield
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> None:
    """`python -m pipeline run`: run and print the summary. Exit 2 when the run cannot start, 1 past
    --max_error_ratio, 3 when it fails after it started, so that a scheduler can tell them apart."""
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return
    try:
        with own_tempdir():
            summary, opts = run(argv)
    except (mf.ManifestError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # Python's own exit code, 1, would read as "ran, too many errors"
        traceback.print_exc()
        print(f"error: the run failed ({type(e).__name__}, above); the run record was not written", file=sys.stderr)
        sys.exit(3)
    if summary is None and opts.view_as(TestOptions).dry_run:
        print("dry run: the job graph was built; nothing was run", flush=True)
        return
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
