"""Builds to buckets, counted and faulted: `python -m pipeline run` (in this process; in a child where it is
killed) writing to moto (S3) and the GCS emulator through `tests.storage_proxy`, which counts every storage
request by kind and injects faults into uploads.

What a user of a bucket output relies on: a clip costs one write request and nothing else (no staging copy,
no delete); a shard is one upload; a `--skip_existing` rerun reads no clip audio and makes no GetAudio call;
a throttled or dropped upload is retried, and one that still fails is a WRITE_FAILED row, never a failed
run; a run killed mid-way, then rerun, gives a complete dataset with nothing left behind.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import tarfile
import time
import types
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.endpoint
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.graph.beam_internals import process_options_kept
from pipeline.local.server import Faults, LocalServer
from pipeline.local.storage_proxy import StorageProxy
from pipeline.local.storage_servers import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, StorageServer
from tests.helpers import (
    Result,
    check_clips_table,
    child_env,
    clips_table,
    errors_table,
    expect_exit,
    read_bytes,
    run_argv,
    run_build,
    run_record,
    start_cli,
    total_calls,
    write_local_manifest,
)

# Per run: the launch's probe of the output (written, then deleted), the lease (created, then released), the two
# tables (one file each), the card and its histogram, the run record.
FIXED_WRITES = 7
FIXED_DELETES = 2


class Target:
    """A bucket behind a proxy: the output prefix, and the flags and environment that send a run through the
    proxy (set for the run only: this process reads the results from the server directly)."""

    def __init__(self, server: StorageServer, proxy: StorageProxy):
        self.server, self.proxy = server, proxy
        self.output = f"{server.bucket_url}{uuid.uuid4().hex}/ds"
        self.s3 = server.bucket_url.startswith("s3://")
        if self.s3:
            self.flags = [f"--s3_endpoint_url={proxy.endpoint_url}", *server.flags[1:]]
            self.env = {**server.env, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url}
        else:
            self.flags = []
            self.env = {**server.env, "STORAGE_EMULATOR_HOST": proxy.endpoint_url}
        FileSystems.set_options(PipelineOptions(server.flags))

    def run(self, server: LocalServer, manifest: str, *flags: str) -> Result:
        """`python -m pipeline run`, in this process."""
        return run_build(server, manifest, self.output, *self.flags, *flags, env=self.env)

    def objects(self) -> list[str]:
        (found,) = FileSystems.match([f"{self.output}/**"])
        return sorted(m.path[len(self.output) + 1 :] for m in found.metadata_list)


@pytest.fixture(autouse=True)
def filesystem_options_kept() -> Iterator[None]:
    """A Target sets Beam's FileSystems options for the test's own reads of the bucket: put back after it."""
    with process_options_kept():
        yield


@pytest.fixture(autouse=True)
def no_s3_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore backs off a refused request (SlowDown: up to 1 s, then 2 s, 4 s, ...) before each retry: the
    runs here, in this process, skip the sleeps, not the retries (the proxy still counts every attempt)."""
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture(params=["s3_server", "gcs_server"], ids=["s3", "gcs"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    server: StorageServer = request.getfixturevalue(request.param)
    with StorageProxy(server.endpoint_url) as proxy:
        yield Target(server, proxy)


def rows(n: int) -> list[dict]:
    return [
        {"clip_id": f"c{i:03d}", "object_id": "demo-mono", "start_ms": 130 * i % 11_000, "duration_ms": 700}
        for i in range(n)
    ]


def writes(counts: dict[str, int]) -> int:
    return counts.get("PUT", 0) + counts.get("POST_INIT", 0) + counts.get("COMPLETE", 0)


def test_one_write_per_clip_and_a_rerun_reads_no_audio(target: Target, make_server, store, tmp_path: Path) -> None:
    server = make_server()
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(12))
    expect_exit(target.run(server, manifest), 0)
    counts = target.proxy.counts()
    assert writes(counts) == counts["PUT"] == 12 + FIXED_WRITES, counts
    assert (counts.get("COPY", 0), counts.get("DELETE", 0)) == (0, FIXED_DELETES), counts
    clip_reads = [r for r in target.proxy.log if r.kind == "GET" and "/clips/" in r.path]
    assert clip_reads == [], "a clip was read back"
    table = clips_table(target.output).to_pylist()
    assert len(table) == 12 and errors_table(target.output).num_rows == 0
    check_clips_table(table, store, target.output)
    assert "_tmp" not in {name.split("/")[0] for name in target.objects()}

    target.proxy.reset()
    calls = total_calls(server)
    expect_exit(target.run(server, manifest, "--skip_existing"), 0)
    assert total_calls(server) == calls, "a current clip was fetched again"
    counts = target.proxy.counts()
    per_clip = [f"{r.kind} {r.path}" for r in target.proxy.log if r.kind in ("HEAD", "GET") and "/clips/" in r.path]
    assert per_clip == [], "the rerun looked at a clip (it is decided from the tables and one listing)"
    assert writes(counts) == FIXED_WRITES, counts  # only the probe, the lease, the tables, the card and the record
    rerun = clips_table(target.output).to_pylist()
    assert {r["clip_id"]: (r["sha256"], r["num_bytes"]) for r in rerun} == {
        r["clip_id"]: (r["sha256"], r["num_bytes"]) for r in table
    }
    assert all(r["attempts"] == 0 for r in rerun)
    assert run_record(target.output)["clips_skipped"] == 12
    assert counts.get("HEAD", 0) <= 2, counts  # none per clip


def test_a_first_run_as_configs_dataflow_yaml_sets_it_makes_one_write_per_clip(
    target: Target, make_server, store, tmp_path: Path
) -> None:
    """configs/dataflow.yaml sets skip_existing: true; into a new output that costs nothing per clip: one
    write each, no HEAD, no read (before, a HEAD and a PUT per clip)."""
    server = make_server()
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(15))
    expect_exit(target.run(server, manifest, "--skip_existing"), 0)
    counts = target.proxy.counts()
    assert writes(counts) == counts["PUT"] == 15 + FIXED_WRITES, counts
    per_clip = [f"{r.kind} {r.path}" for r in target.proxy.log if r.kind in ("HEAD", "GET") and "/clips/" in r.path]
    assert per_clip == [] and counts.get("HEAD", 0) <= 2, counts
    check_clips_table(clips_table(target.output).to_pylist(), store, target.output)


def test_files_no_row_lists_are_removed_in_batches(target: Target, make_server, tmp_path: Path) -> None:
    """A rerun with a smaller manifest removes the clips it no longer lists: 150 in one request on S3 (1,000 a
    request) and two on GCS (100 a request); before, GCS took one request each. (Each rerun also removes the
    earlier tables' files and its lease: the same requests in both reruns here.)"""
    server = make_server()
    every = write_local_manifest(tmp_path / "all.parquet", rows(152))
    expect_exit(target.run(server, every), 0)
    target.proxy.reset()
    expect_exit(target.run(server, every, "--skip_existing"), 0)
    no_orphans = target.proxy.counts().get("DELETE", 0)
    target.proxy.reset()
    expect_exit(target.run(server, write_local_manifest(tmp_path / "two.parquet", rows(2)), "--skip_existing"), 0)
    assert run_record(target.output)["clips_removed"] == 150
    assert [name for name in target.objects() if name.startswith("clips/")] == ["clips/c000.wav", "clips/c001.wav"]
    assert target.proxy.counts().get("DELETE", 0) - no_orphans == (1 if target.s3 else 2), target.proxy.log


def test_a_shard_is_one_upload(target: Target, make_server, store, tmp_path: Path) -> None:
    server = make_server()
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(10))
    expect_exit(target.run(server, manifest, "--shards=2", "--clip_format=flac"), 0)
    counts = target.proxy.counts()
    assert writes(counts) == counts["PUT"] == 2 + FIXED_WRITES, counts
    assert (counts.get("COPY", 0), counts.get("DELETE", 0)) == (0, FIXED_DELETES), counts
    assert [name for name in target.objects() if name.startswith("shards/")] == [
        "shards/audio_00000.tar",
        "shards/audio_00001.tar",
    ]
    table = clips_table(target.output).to_pylist()
    assert len(table) == 10
    for row in table:
        with tarfile.open(fileobj=io.BytesIO(read_bytes(f"{target.output}/{row['path']}"))) as tar:
            assert tar.extractfile(row["member"]).read()[:4] == b"fLaC"


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_flaky_uploads_are_retried(fault: str, target: Target, make_server, store, tmp_path: Path) -> None:
    """A share of clip uploads answered 503 (or cut off): the store's retries bring every clip in."""
    setattr(target.proxy, "fail_fraction" if fault == "503" else "drop_fraction", 0.3)
    target.proxy.fail_match = "/clips/"
    server = make_server()
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(20))
    proc = target.run(server, manifest, "--max_error_ratio=1")
    expect_exit(proc, 0)
    faults = target.proxy.faults().get(fault, 0)
    assert faults > 0, "no fault was injected"
    table = clips_table(target.output).to_pylist()
    errors = errors_table(target.output).to_pylist()
    assert len(table) + len(errors) == 20
    assert {e["error_code"] for e in errors} <= {"WRITE_FAILED"}
    # Without retries each faulted upload would be an error row; a clip is lost only if all its attempts fail.
    assert len(errors) < faults, f"{len(errors)} of {faults} faulted uploads were not retried into clips"
    check_clips_table(table, store, target.output)


def test_uploads_that_keep_failing_are_error_rows(s3_server: StorageServer, make_server, tmp_path: Path) -> None:
    """Every clip upload refused: each row is a WRITE_FAILED error naming the clip, the tables are written, and
    the run exits 1 ("ran, too many errors"), not with a crash. (S3 only: GCS's retry budget is two minutes.)"""
    with StorageProxy(s3_server.endpoint_url, fail_fraction=1.0, fail_match="/clips/") as proxy:
        target = Target(s3_server, proxy)
        server = make_server()
        manifest = write_local_manifest(tmp_path / "m.parquet", rows(4))
        expect_exit(target.run(server, manifest), 1)
    errors = sorted(errors_table(target.output).to_pylist(), key=lambda e: e["clip_id"])
    assert [(e["clip_id"], e["error_code"]) for e in errors] == [(f"c{i:03d}", "WRITE_FAILED") for i in range(4)]
    assert all("/ds/clips/c" in e["error_message"] and "SlowDown" in e["error_message"] for e in errors)
    assert clips_table(target.output).num_rows == 0
    assert not [name for name in target.objects() if name.startswith("clips/")]


def test_killed_run_on_s3_then_rerun(s3_server: StorageServer, make_server, store, tmp_path: Path) -> None:
    """SIGKILL mid-run, and an unfinished multipart upload as a kill mid-upload leaves one: the rerun with
    --skip_existing fetches only the missing clips, aborts the upload and leaves nothing under _tmp/."""
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    )
    with StorageProxy(s3_server.endpoint_url) as proxy:
        target = Target(s3_server, proxy)
        bucket, prefix = target.output[len("s3://") :].split("/", 1)
        server = make_server(faults=Faults(latency_s=0.05))
        manifest = write_local_manifest(tmp_path / "m.parquet", rows(80))
        argv = run_argv(server, manifest, target.output, "--max_in_flight=4", *target.flags)
        with open(tmp_path / "killed.log", "w") as log:  # a child: SIGKILL needs a process of its own
            proc = start_cli("run", *argv, env=child_env(**target.env), stdout=log, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 120
                while len([n for n in target.objects() if n.startswith("clips/")]) < 5:
                    assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                    assert time.monotonic() < deadline, "no clip appeared"
                    time.sleep(0.05)
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
        survivors = [n for n in target.objects() if n.startswith("clips/")]
        assert 5 <= len(survivors) < 80 and "_RUN.json" not in target.objects()
        s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/clips/c079.wav")  # a kill mid-upload

        server.settings.faults = Faults()
        calls = total_calls(server)
        expect_exit(target.run(server, manifest, "--skip_existing"), 0)
    assert total_calls(server) - calls == 80 - len(survivors)
    table = clips_table(target.output).to_pylist()
    assert len(table) == 80
    check_clips_table(table, store, target.output)
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []) == []
    assert not [n for n in target.objects() if n.startswith("_tmp/")]
    assert run_record(target.output)["clips_skipped"] == len(survivors)


def test_a_shard_that_cannot_be_written_is_error_rows(s3_server: StorageServer, make_server, tmp_path: Path) -> None:
    """Every shard upload refused: each of its rows is a WRITE_FAILED error naming the shard, every row is
    accounted for, and the run ends with exit 1, not a crash."""
    with StorageProxy(s3_server.endpoint_url, fail_fraction=1.0, fail_match="/shards/") as proxy:
        target = Target(s3_server, proxy)
        manifest = write_local_manifest(tmp_path / "m.parquet", rows(6))
        expect_exit(target.run(make_server(), manifest, "--shards=2"), 1)
    errors = sorted(errors_table(target.output).to_pylist(), key=lambda e: e["clip_id"])
    assert [(e["clip_id"], e["error_code"]) for e in errors] == [(f"c{i:03d}", "WRITE_FAILED") for i in range(6)]
    assert all("/ds/shards/audio_0000" in e["error_message"] for e in errors)
    assert clips_table(target.output).num_rows == 0
    assert not [name for name in target.objects() if name.startswith("shards/")]


def test_a_shar_shard_whose_cuts_cannot_be_written_is_not_left_half(
    s3_server: StorageServer, make_server, tmp_path: Path
) -> None:
    """Lhotse Shar's shard is two files: the recordings' tar, then the cuts. When the cuts are refused, the shard's
    rows are WRITE_FAILED and its tar is removed again (before, it stayed without its cuts, which stops Lhotse's
    reader of the folder)."""
    with StorageProxy(s3_server.endpoint_url, fail_fraction=1.0, fail_match="/shar/cuts.") as proxy:
        target = Target(s3_server, proxy)
        manifest = write_local_manifest(tmp_path / "m.parquet", rows(6))
        expect_exit(target.run(make_server(), manifest, "--layout=lhotse-shar", "--shards=2"), 1)
    errors = errors_table(target.output).to_pylist()
    assert sorted(e["error_code"] for e in errors) == ["WRITE_FAILED"] * 6
    assert not [name for name in target.objects() if name.startswith("shar/")]


def test_exports_are_joined_in_the_bucket_from_the_workers_parts(target: Target, make_server, tmp_path: Path) -> None:
    """--export on a bucket: the workers write the manifests in parts beside the clips table, and the last step
    joins the parts in the bucket (S3's multipart upload, GCS's compose) instead of reading the clips table back
    on one worker; each manifest lists every transcribed clip once, and no part is left under _tmp/."""
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(12))
    expect_exit(target.run(make_server(), manifest, "--with_transcripts", "--export=nemo,lhotse"), 0)
    table_reads = [r.path for r in target.proxy.log if r.kind == "GET" and "clips-" in urllib.parse.unquote(r.path)]
    assert table_reads == [], "the clips table was read back"
    clips = {row["path"]: row for row in clips_table(target.output).to_pylist()}
    assert len(clips) == 12 and all(row["transcript_text"] for row in clips.values())
    nemo = [json.loads(line) for line in read_bytes(f"{target.output}/nemo_manifest.jsonl").splitlines()]
    assert sorted(line["audio_filepath"] for line in nemo) == sorted(clips)
    for name in ("recordings", "supervisions", "cuts"):
        lines = gzip.decompress(read_bytes(f"{target.output}/lhotse_{name}.jsonl.gz")).splitlines()
        assert sorted(json.loads(line)["id"] for line in lines) == sorted(row["clip_id"] for row in clips.values())
    assert "_tmp" not in {name.split("/")[0] for name in target.objects()}
