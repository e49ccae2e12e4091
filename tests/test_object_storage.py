"""Beam's FileSystems against real S3 (moto) and GCS (gcp-storage-emulator) servers on loopback.

These prove the pipeline options and environment in `tests.storage_servers` are all Beam needs,
in this process and in a child `python -m` process, and pin the write-visibility behaviour the
pipeline relies on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.local.storage_servers import StorageServer


@pytest.fixture(params=["s3_server", "gcs_server"], ids=["s3", "gcs"])
def storage(request: pytest.FixtureRequest) -> StorageServer:
    """Each test runs against both servers; FileSystems options are global, so set them each time."""
    srv: StorageServer = request.getfixturevalue(request.param)
    FileSystems.set_options(PipelineOptions(srv.flags))
    return srv


@pytest.fixture
def prefix(storage: StorageServer) -> str:
    """A fresh `scheme://bucket/<random>/` so tests sharing a session server don't collide."""
    return f"{storage.bucket_url}{uuid.uuid4().hex}/"


def write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def test_create_then_open_round_trips_and_publishes_on_close(prefix: str) -> None:
    path = prefix + "dir/hello.bin"
    data = os.urandom(300_000)
    f = FileSystems.create(path)
    f.write(data)
    assert not FileSystems.exists(path), "object must not be visible before close()"
    f.close()
    assert FileSystems.exists(path)
    assert read(path) == data


def test_match_glob(prefix: str) -> None:
    for name in ("a.txt", "b.txt", "c.csv", "sub/d.txt"):
        write(prefix + name, name.encode())
    (result,) = FileSystems.match([prefix + "*.txt"])
    sizes = {m.path: m.size_in_bytes for m in result.metadata_list}
    assert sizes == {prefix + "a.txt": 5, prefix + "b.txt": 5}


def test_exists_rename_delete(prefix: str) -> None:
    src, dst = prefix + "src.txt", prefix + "dst.txt"
    write(src, b"payload")
    assert FileSystems.exists(src) and not FileSystems.exists(dst)
    FileSystems.rename([src], [dst])
    assert not FileSystems.exists(src)
    assert read(dst) == b"payload"
    FileSystems.delete([dst])
    assert not FileSystems.exists(dst)


def test_parquet_through_filesystems(prefix: str) -> None:
    path = prefix + "table.parquet"
    table = pa.table({"id": list(range(1000)), "name": [f"row-{i}" for i in range(1000)]})
    with FileSystems.create(path) as f:
        pq.write_table(table, f)
    with FileSystems.open(path) as f:
        assert pq.read_table(f).equals(table)


def test_exception_inside_create_block(storage: StorageServer, prefix: str) -> None:
    """Characterises Beam 2.77: an exception inside `with FileSystems.create(...)` cancels the GCS
    upload (BlobWriter.__exit__ calls terminate()) but PUBLISHES the partial S3 object
    (io.BufferedWriter.__exit__ just calls close(), which completes the multipart upload)."""
    path = prefix + "partial.bin"
    with pytest.raises(RuntimeError), FileSystems.create(path) as f:
        f.write(b"partial")
        raise RuntimeError("writer failed")
    published = storage.bucket_url.startswith("s3://")
    assert FileSystems.exists(path) is published


def test_empty_object(storage: StorageServer, prefix: str) -> None:
    """Characterises Beam 2.77: for an empty file S3Uploader completes a multipart upload with zero
    parts, which S3 (and moto) reject with MalformedXML, so zero-byte s3:// writes fail.
    GCS writes empty objects fine."""
    path = prefix + "empty"
    if storage.bucket_url.startswith("s3://"):
        with pytest.raises(Exception, match="MalformedXML"):
            FileSystems.create(path).close()
    else:
        FileSystems.create(path).close()
        assert read(path) == b""


def test_direct_runner_pipeline_writes_text(storage: StorageServer, prefix: str) -> None:
    lines = [f"line-{i}" for i in range(20)]
    with beam.Pipeline(options=PipelineOptions([*storage.flags, "--runner=DirectRunner"])) as p:
        _ = p | beam.Create(lines) | beam.io.WriteToText(prefix + "out", num_shards=2)
    (result,) = FileSystems.match([prefix + "out*"])
    assert len(result.metadata_list) == 2
    written = b"".join(read(m.path) for m in result.metadata_list).decode().split()
    assert sorted(written) == sorted(lines)


def test_child_process_with_flags_and_env(storage: StorageServer, prefix: str) -> None:
    """`python -m <pipeline> <flags>` with `env` reaches the server with no other setup."""
    write(prefix + "in.txt", b"b a b\nc b a\n")
    cmd = [
        sys.executable, "-m", "apache_beam.examples.wordcount",
        f"--input={prefix}in.txt", f"--output={prefix}counts", *storage.flags,
    ]  # fmt: skip
    subprocess.run(cmd, env={**os.environ, **storage.env}, check=True, timeout=120)
    (result,) = FileSystems.match([prefix + "counts*"])
    counts = b"".join(read(m.path) for m in result.metadata_list).decode().split("\n")
    assert sorted(c for c in counts if c) == ["a: 2", "b: 3", "c: 1"]
