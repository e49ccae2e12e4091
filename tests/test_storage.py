"""The store on its own: which store an output gets, and what a launch says when it cannot have one."""

from __future__ import annotations

import importlib.util

import pytest

from pipeline import storage
from pipeline.cli import LaunchError
from pipeline.run import run


def test_an_output_gets_its_store(tmp_path):
    assert storage.open_store(str(tmp_path)).local
    assert isinstance(storage.open_store("s3://b/out"), storage.S3Store)
    assert isinstance(storage.open_store("gs://b/out"), storage.GcsStore)
    with pytest.raises(ValueError, match="unsupported scheme az://"):
        storage.open_store("az://b/out")


def test_a_bucket_without_its_library_stops_the_launch(monkeypatch, tmp_path):
    """pip install . without the [aws] extra, then --output s3://...: exit 2 naming the extra, not a
    WRITE_FAILED row for every clip."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "boto3" else real(name, *a))
    assert storage._installed("google.cloud.storage") and not storage._installed("google.no_such_package")
    with pytest.raises(LaunchError, match=r"s3:// needs the \[aws\] extra"):
        run(["--manifest=unused.parquet", "--output=s3://bucket/out"])


def test_local_store_publishes_whole_files_only(tmp_path):
    store = storage.open_store(str(tmp_path))
    path = str(tmp_path / "clips" / "a.wav")
    store.put(path, b"RIFF....")
    assert store.head(path) == storage.StoredObject(path, 8)
    assert [o.path for o in store.list(str(tmp_path) + "/")] == [path], "nothing but the file is left"
    store.delete([path])
    assert store.head(path) is None
