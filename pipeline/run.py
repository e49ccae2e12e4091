"""Builds and runs the pipeline: manifest -> validated requests -> concurrent fetch -> clips and tables."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import manifest as mf
from pipeline import tables
from pipeline.clips import prepare_output, remove_tmp
from pipeline.elements import ClipError
from pipeline.fetch import NAMESPACE, FetchClips, FetchSettings
from pipeline.options import ClipOptions, expand_config

log = logging.getLogger(__name__)
ERRORS_NAMESPACE = "errors"


def _count_error(error: ClipError) -> ClipError:
    Metrics.counter(ERRORS_NAMESPACE, error.error_code).inc()
    return error


def table_paths(output: str) -> tuple[str, str]:
    return FileSystems.join(output, "metadata", "clips"), FileSystems.join(output, "metadata", "errors")


def build(p: beam.Pipeline, opts: ClipOptions, manifest: mf.Manifest) -> None:
    """The graph: read, validate (its GroupByKey on clip_id spreads rows over workers), fetch, write tables."""
    settings = FetchSettings(
        output=opts.output,
        api_host=opts.api_host,
        api_key_file=opts.api_key_file,
        audio_format=opts.audio_format,
        max_in_flight=opts.max_in_flight,
        max_attempts=opts.max_attempts,
        rpc_timeout_s=opts.rpc_timeout_s,
        skip_existing=opts.skip_existing,
        total_rows=manifest.num_rows,
    )
    rows = (
        p
        | "ManifestFiles" >> beam.Create(manifest.files)
        | "ReadRows" >> beam.ParDo(mf.ReadManifestRows())
        | "ValidateRows" >> mf.ValidateRows()
    )
    fetched = (
        rows["requests"]
        | "Fetch" >> beam.ParDo(FetchClips(settings))
        | "SplitFailed" >> beam.ParDo(mf.split_errors).with_outputs("errors", main="clips")
    )
    errors = (rows["errors"], fetched.errors) | "AllErrors" >> beam.Flatten()
    clips_path, errors_path = table_paths(opts.output)
    _ = (
        fetched.clips
        | "ClipRows" >> beam.Map(tables.to_row)
        | "WriteClips" >> _write_table(clips_path, tables.clips_schema(manifest.schema))
    )
    _ = (
        errors
        | "CountErrors" >> beam.Map(_count_error)
        | "ErrorRows" >> beam.Map(tables.to_row)
        | "WriteErrors" >> _write_table(errors_path, tables.errors_schema(manifest.schema))
    )


def _write_table(prefix: str, schema) -> beam.PTransform:
    # One shard: deterministic names that a rerun overwrites, and metadata rows are small.
    return beam.io.WriteToParquet(prefix, schema, file_name_suffix=".parquet", num_shards=1)


@dataclass
class Summary:
    """The run in numbers, from Beam's metrics."""

    rows: int
    written: int = 0
    skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    audio_ms: int = 0
    retries: int = 0
    seconds: float = 0.0

    @property
    def clips(self) -> int:
        return self.written + self.skipped

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @classmethod
    def from_result(cls, result, rows: int, seconds: float) -> Summary:
        s = cls(rows=rows, seconds=seconds)
        for c in result.metrics().query(MetricsFilter())["counters"]:
            ns, name, value = c.key.metric.namespace, c.key.metric.name, c.committed or 0
            if ns == ERRORS_NAMESPACE:
                s.errors[name] = s.errors.get(name, 0) + value
            elif ns == NAMESPACE and name in ("written", "skipped", "bytes", "audio_ms", "retries"):
                setattr(s, name, getattr(s, name) + value)
        return s

    def lines(self, output: str) -> Iterator[str]:
        clips_path, errors_path = table_paths(output)
        yield f"rows in         {self.rows:>10,}"
        yield f"clips           {self.clips:>10,}   ({self.written:,} written, {self.skipped:,} already there)"
        yield f"errors          {self.error_count:>10,}"
        for code, n in sorted(self.errors.items(), key=lambda kv: -kv[1]):
            yield f"  {code:<22}{n:>8,}"
        yield f"audio           {self.audio_ms / 3_600_000:>10.3f} h written"
        yield f"bytes           {self.bytes:>10,}"
        yield f"retries         {self.retries:>10,}"
        rate = self.written / self.seconds if self.seconds else 0.0
        yield f"wall time       {self.seconds:>10.1f} s   ({rate:.1f} clips/s)"
        yield f"clips table     {clips_path}-*.parquet"
        yield f"errors table    {errors_path}-*.parquet"


def run(argv: list[str]) -> Summary:
    """Run the pipeline over argv (Beam flags included); returns the summary. Raises ManifestError."""
    options = PipelineOptions(expand_config(argv))
    opts = options.view_as(ClipOptions)
    for name in ("manifest", "output"):
        if not getattr(opts, name):
            raise SystemExit(f"error: --{name} is required")
    FileSystems.set_options(options)  # so gs:// and s3:// options apply to the manifest check too
    manifest = mf.inspect_manifest(opts.manifest)
    log.info("manifest: %d file(s), %d rows", len(manifest.files), manifest.num_rows)
    started = time.monotonic()
    prepare_output(opts.output)
    p = beam.Pipeline(options=options)
    build(p, opts, manifest)
    result = p.run()
    result.wait_until_finish()
    remove_tmp(opts.output)
    return Summary.from_result(result, manifest.num_rows, time.monotonic() - started)


def main(argv: list[str]) -> None:
    """`python -m pipeline run`: run, print the summary, exit non-zero past --max_error_ratio."""
    if any(a in ("-h", "--help") for a in argv):
        ClipOptions(["--help"])  # prints the options of this pipeline, then exits
    try:
        summary = run(argv)
    except mf.ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    opts = PipelineOptions(expand_config(argv)).view_as(ClipOptions)
    print("\n".join(summary.lines(opts.output)), flush=True)
    ratio = summary.error_count / summary.rows if summary.rows else 0.0
    if ratio > opts.max_error_ratio:
        print(f"error: {ratio:.1%} of rows failed, more than --max_error_ratio {opts.max_error_ratio}", file=sys.stderr)
        sys.exit(1)
