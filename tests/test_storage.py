"""The store on its own: which store an output gets, and what a launch says when it cannot have one."""

from __future__ import annotations

import importlib.util

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import storage
from pipeline.cli import LaunchError
from pipeline.run import run
from pipeline.storage import StorageError, StoreSettings, open_store


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


def test_every_local_operation_raises_storage_error(tmp_path) -> None:
    """As a bucket store's do: a missing file reads as NotFound (a FileNotFoundError), a delete that fails is a
    StorageError naming the path, the OS error chained."""
    store = storage.open_store(str(tmp_path))
    with pytest.raises(storage.NotFound, match="nothing-here"):
        store.read(str(tmp_path / "nothing-here"))
    with pytest.raises(StorageError, match="gone") as raised:
        store.delete([str(tmp_path / "gone")])
    assert isinstance(raised.value.__cause__, FileNotFoundError)


def test_local_store_publishes_whole_files_only(tmp_path):
    store = storage.open_store(str(tmp_path))
    path = str(tmp_path / "clips" / "a.wav")
    store.put(path, b"RIFF....")
    assert store.head(path) == storage.StoredObject(path, 8)
    assert [o.path for o in store.list(str(tmp_path) + "/")] == [path], "nothing but the file is left"
    store.delete([path])
    assert store.head(path) is None


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_every_bucket_operation_raises_storage_error(kind, request, monkeypatch) -> None:
    """A missing bucket: listing, reading, deleting and aborting uploads each raise StorageError naming the
    path, the library's error chained (before, list, read and delete raised botocore or google-cloud errors);
    a missing object reads as FileNotFoundError."""
    server = request.getfixturevalue(f"{kind}_server")
    for name, value in server.env.items():  # this process's GCS client finds the emulator by the environment
        monkeypatch.setenv(name, value)
    settings = StoreSettings.from_options(PipelineOptions(server.flags))
    missing = server.bucket_url.replace("test-bucket", "no-such-bucket") + "ds/"
    store = open_store(missing, settings)
    for operation in (
        lambda: list(store.list(missing)),
        lambda: store.read(missing + "a"),
        lambda: store.delete([missing + "a"]),
    ):
        with pytest.raises(StorageError, match="no-such-bucket") as raised:
            operation()
        assert raised.value.__cause__ is not None
    with pytest.raises(FileNotFoundError):
        open_store(server.bucket_url, settings).read(server.bucket_url + "no-such-object")


def test_orphans_that_cannot_be_removed_are_logged_and_not_counted(s3_server, caplog) -> None:
    """The last step of a --skip_existing run removes the files no row lists; a refused delete (here a bucket
    that is gone) counts none removed and says so, instead of failing a run whose tables are written."""
    from pipeline.reconcile import Plan, RemoveOrphans

    missing = s3_server.bucket_url.replace("test-bucket", "no-such-bucket") + "ds"
    plan = Plan(missing, "skip_existing", "wav", 0, False, StoreSettings.from_options(PipelineOptions(s3_server.flags)))
    remove = RemoveOrphans(plan)
    remove.setup()
    remove.start_bundle()
    assert list(remove.process(f"{missing}/clips/a.wav")) == []
    assert [v.value for v in remove.finish_bundle()] == [0]
    assert "could not remove 1 file(s) no row lists, e.g. " in caplog.text and "no-such-bucket" in caplog.text


@pytest.mark.parametrize("kind", ["local", "s3", "gcs"])
def test_concat_publishes_the_parts_in_order_and_removes_them(kind, request, monkeypatch, tmp_path) -> None:
    """What the exports' assembly asks of a store: 70 parts (more than GCS composes in one request), two of them
    past S3's 5 MiB part minimum (copied in the bucket) among small ones (sent together), give one object of
    their bytes in order; the parts are gone; no parts give an empty object."""
    if kind == "local":
        root, settings = str(tmp_path), StoreSettings()
    else:
        server = request.getfixturevalue(f"{kind}_server")
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        root, settings = server.bucket_url + f"concat-{kind}", StoreSettings.from_options(PipelineOptions(server.flags))
    store = open_store(root, settings)
    big = storage.S3_MIN_PART + 1
    datas = [bytes([i]) * (big if i in (0, 1) else 1000 + i) for i in range(70)]
    parts = []
    for i, data in enumerate(datas):
        store.put(f"{root}/_tmp/parts/{i:03d}", data)
        parts.append(storage.StoredObject(f"{root}/_tmp/parts/{i:03d}", len(data)))
    store.concat(f"{root}/whole.jsonl", parts, "application/jsonl")
    assert store.read(f"{root}/whole.jsonl") == b"".join(datas)
    assert list(store.list(f"{root}/_tmp/parts/")) == []
    store.concat(f"{root}/empty.jsonl", [])
    assert store.read(f"{root}/empty.jsonl") == b""
