"""The store on its own: which store an output gets, and what a launch says when it cannot have one."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.core.errors import LaunchError
from pipeline.dataset import storage
from pipeline.dataset.storage import StorageError, StoredObject, StoreSettings, gcs, open_store
from pipeline.launch.run import run
from pipeline.local.storage_proxy import StorageProxy
from pipeline.local.storage_servers import StorageServer


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

    def find_spec(name: str, *args):
        if name == "boto3":
            return None
        if name.startswith("google.cloud"):  # "google" installed without "google.cloud"
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=r"gs:// needs the \[gcp\] extra"):
        storage.open_store("gs://bucket/out")
    with pytest.raises(LaunchError, match=r"s3:// needs the \[aws\] extra"):
        run(["--manifest=unused.parquet", "--output=s3://bucket/out"])


def test_every_local_operation_raises_storage_error(tmp_path) -> None:
    """As a bucket store's do: a missing file reads as NotFound (a FileNotFoundError), any other failure is a
    StorageError naming the path, the OS error chained."""
    store = storage.open_store(str(tmp_path))
    with pytest.raises(storage.NotFound, match="nothing-here"):
        store.read(str(tmp_path / "nothing-here"))
    with pytest.raises(StorageError, match="gone") as raised:
        store.delete([str(tmp_path / "gone")])
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    (tmp_path / "_tmp").write_text("a file where the scratch folder goes")
    blocked = str(tmp_path / "_tmp" / "x")
    for operation in (
        lambda: store.head(blocked),
        lambda: store.open_for_read(blocked),
        lambda: store.scratch_file(".wav"),
        lambda: store.put(str(tmp_path / "a"), b""),
        lambda: store.concat(str(tmp_path / "whole"), [StoredObject(blocked, 1)]),
        lambda: store.create(blocked, b"{}"),
        lambda: store.replace(blocked, b"{}", "v"),
        lambda: store.delete_version(blocked, "v"),
    ):
        with pytest.raises(StorageError, match="_tmp") as raised:
            operation()
        assert isinstance(raised.value.__cause__, OSError)
    with pytest.raises(StorageError, match="is a file, not a folder"):
        store.check_writable(str(tmp_path), ["_tmp"])


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
        lambda: store.open_for_read(missing + "a"),
        lambda: store.put(missing + "a", b""),
        lambda: store.delete([missing + "a"]),
        lambda: store.delete([missing + "a", missing + "b"]),  # GCS: a batch, then each alone
        lambda: store.remove_all(missing),
        lambda: store.concat(missing + "whole", [StoredObject(missing + "a", 1)]),
        lambda: store.check_writable(missing, ()),
        *([lambda: store.abort_uploads(missing)] if kind == "s3" else []),  # GCS has none to list
    ):
        with pytest.raises(StorageError, match="no-such-bucket") as raised:
            operation()
        assert raised.value.__cause__ is not None
    with pytest.raises(FileNotFoundError):
        open_store(server.bucket_url, settings).read(server.bucket_url + "no-such-object")


def test_orphans_that_cannot_be_removed_are_logged_and_not_counted(s3_server, caplog) -> None:
    """The last step of a --skip_existing run removes the files no row lists; a refused delete (here a bucket
    that is gone) counts none removed and says so, instead of failing a run whose tables are written."""
    from pipeline.graph.reconcile import Plan, RemoveOrphans

    missing = s3_server.bucket_url.replace("test-bucket", "no-such-bucket") + "ds"
    plan = Plan(missing, "skip_existing", "wav", 0, False, StoreSettings.from_options(PipelineOptions(s3_server.flags)))
    remove = RemoveOrphans(plan)
    remove.setup()
    remove.start_bundle()
    assert list(remove.process(f"{missing}/clips/a.wav")) == []
    assert [v.value for v in remove.finish_bundle()] == [0]
    assert "could not remove 1 file(s) no row lists, e.g. " in caplog.text and "no-such-bucket" in caplog.text


def _store_of(kind: str, request, monkeypatch, tmp_path) -> tuple[str, storage.Store]:
    """A root and its store: a folder, or a folder in the test server's bucket."""
    if kind == "local":
        return str(tmp_path), open_store(str(tmp_path))
    server = request.getfixturevalue(f"{kind}_server")
    for name, value in server.env.items():  # this process's GCS client finds the emulator by the environment
        monkeypatch.setenv(name, value)
    root = server.bucket_url + f"{request.node.originalname}-{kind}"
    return root, open_store(root, StoreSettings.from_options(PipelineOptions(server.flags)))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_scratch_file_is_its_owners_from_naming_to_removal(kind, request, monkeypatch, tmp_path) -> None:
    """put publishes a scratch file and never removes it, published or not: closing its Scratch does."""
    root, store = _store_of(kind, request, monkeypatch, tmp_path)
    with store.scratch_file(".bin") as scratch:
        Path(scratch.path).write_bytes(b"abc")
        store.put(f"{root}/a.bin", file=scratch)
        assert os.path.exists(scratch.path) == (kind != "local")  # a local one was renamed into place
    assert store.read(f"{root}/a.bin") == b"abc" and not os.path.exists(scratch.path)
    (tmp_path / "blocked").write_text("a file, not a folder")
    refused = f"{tmp_path}/blocked/b.bin" if kind == "local" else root.replace("test-bucket", "no-such-bucket")
    with store.scratch_file(".bin") as scratch:
        Path(scratch.path).write_bytes(b"abc")
        with pytest.raises(StorageError):
            store.put(refused, file=scratch)
        assert os.path.exists(scratch.path), "still its owner's"
    assert not os.path.exists(scratch.path)


def test_remove_all_and_remove_scratch_take_folders_too(tmp_path) -> None:
    """A killed run's leftovers by prefix (Beam's beam-temp-* folders), and the scratch folder, go whole; a later
    write makes the scratch folder again."""
    store = open_store(str(tmp_path))
    (tmp_path / "metadata" / "beam-temp-clips-1").mkdir(parents=True)
    (tmp_path / "metadata" / "beam-temp-clips-1" / "part").write_bytes(b"PAR1")
    (tmp_path / "metadata" / "clips-1.parquet").write_bytes(b"PAR1")
    store.put(str(tmp_path / "_tmp" / "exports" / "part"), b"")
    store.remove_all(str(tmp_path / "metadata" / "beam-temp-"))
    store.remove_scratch()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["metadata", "metadata/clips-1.parquet"]
    store.put(str(tmp_path / "a"), b"a")
    assert store.open_for_read(str(tmp_path / "a")).read() == b"a"


@pytest.mark.parametrize("kind", ["local", "s3", "gcs"])
def test_concat_publishes_the_parts_in_order_and_removes_them(kind, request, monkeypatch, tmp_path) -> None:
    """What the exports' assembly asks of a store: 70 parts (more than GCS composes in one request), two of them
    past S3's 5 MiB part minimum (copied in the bucket) among small ones (sent together), give one object of
    their bytes in order; the parts are gone; no parts give an empty object."""
    root, store = _store_of(kind, request, monkeypatch, tmp_path)
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


def test_the_gcs_clients_connection_pool_is_widened(monkeypatch: pytest.MonkeyPatch) -> None:
    """A library internal the stores use: google-cloud-storage's requests session (`Client._http`), whose
    pool of 10 connections would make most of 64 concurrent streams wait. An upgrade that removes it fails here."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # anonymous credentials; nothing is sent
    client = gcs.build_client(StoreSettings(gcp_project="test"))
    session = getattr(client, "_http", None)
    assert session is not None and hasattr(session, "get_adapter"), (
        "google.cloud.storage.Client no longer has the requests session `_http`: widen its pool another way"
    )
    for scheme in ("https://", "http://"):
        pool = session.get_adapter(f"{scheme}storage.googleapis.com")._pool_maxsize
        assert pool == storage.CONNECTIONS, f"{scheme} pool holds {pool} connections, not {storage.CONNECTIONS}"


@pytest.fixture
def gcs_behind_proxy(gcs_server: StorageServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageProxy]:
    """This process's GCS client sent through a request-counting proxy (a client of its own, built for it)."""
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")  # no bucket GET racing the calls
    with StorageProxy(gcs_server.endpoint_url) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint_url)
        storage.clear_clients()
        yield proxy
    storage.clear_clients()


def _objects(server: StorageServer, n: int) -> tuple[storage.Store, str, list[str]]:
    root = f"{server.bucket_url}{uuid.uuid4().hex}"
    store = open_store(root)
    paths = [f"{root}/clips/{i:04d}.wav" for i in range(n)]
    for path in paths:
        store.put(path, b"x")
    return store, root, paths


def test_gcs_deletes_go_a_hundred_a_request(gcs_server: StorageServer, gcs_behind_proxy: StorageProxy) -> None:
    """An --overwrite or a smaller manifest's rerun removes what no row lists: on GCS one batch request per 100
    objects (before: one request each, 10M for a 10M-clip dataset)."""
    store, root, paths = _objects(gcs_server, 250)
    gcs_behind_proxy.reset()
    try:
        store.delete(paths)
    except AttributeError as e:
        pytest.fail(f"google-cloud-storage's Batch changed ({e}): gcs.batch_statuses must read a batch another way")
    assert gcs_behind_proxy.counts() == {"DELETE": 3}, gcs_behind_proxy.log
    assert list(store.list(root + "/")) == []


def test_a_refused_gcs_batch_deletes_one_by_one(gcs_server: StorageServer, gcs_behind_proxy: StorageProxy) -> None:
    """The library retries no batch request: when one is refused, each of its objects is deleted alone (with the
    library's retries), and every object is gone."""
    store, root, paths = _objects(gcs_server, 120)
    gcs_behind_proxy.reset()
    gcs_behind_proxy.fail_kinds, gcs_behind_proxy.fail_match = {"DELETE"}, "/batch/"
    gcs_behind_proxy.fail_fraction = 1.0
    store.delete(paths)
    assert gcs_behind_proxy.faults() == {"503": 2}
    assert gcs_behind_proxy.counts() == {"DELETE": 2 + 120}, gcs_behind_proxy.counts()
    assert list(store.list(root + "/")) == []
