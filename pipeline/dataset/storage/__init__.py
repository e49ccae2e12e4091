"""The dataset's writes: clips, shards, tables, card and record, on a local disk, `s3://` or `gs://`.

Why not Beam's FileSystems for these: it builds a new S3 or GCS client on every call (a boto3 client costs
about 119 ms of CPU to build) and its bucket writers stage each object under a temporary name, then copy
and delete it: six requests a clip. Here a write is one request. An object store publishes an object only
when its upload completes, so an upload goes straight to its final name; a local file is written under
`{output}/_tmp/` and renamed into place. Reading the manifest stays with Beam (a few reads a job).

One module a part: `base` (the Store protocol, its errors and types), `local` (a folder), `bucket` (what the
two bucket stores share, the per-process client cache among it), `s3` (boto3) and `gcs` (google-cloud-storage);
each storage library is reached through its own module only. `open_store` gives an output its store.
"""

from __future__ import annotations

import importlib.util

from pipeline.dataset.storage.base import (
    NotFound,
    Precondition,
    Scratch,
    StorageError,
    Store,
    StoredObject,
    StoreSettings,
    is_local,
    split_bucket,
    translated,
)
from pipeline.dataset.storage.bucket import ATTEMPTS, CONNECTIONS, clear_clients
from pipeline.dataset.storage.gcs import GcsStore
from pipeline.dataset.storage.local import LocalStore
from pipeline.dataset.storage.s3 import S3_MIN_PART, S3_SINGLE_PUT_LIMIT, S3Store

__all__ = [
    "ATTEMPTS",
    "CONNECTIONS",
    "S3_MIN_PART",
    "S3_SINGLE_PUT_LIMIT",
    "GcsStore",
    "LocalStore",
    "NotFound",
    "Precondition",
    "S3Store",
    "Scratch",
    "StorageError",
    "Store",
    "StoreSettings",
    "StoredObject",
    "clear_clients",
    "is_local",
    "open_store",
    "split_bucket",
    "translated",
]


def open_store(output: str, settings: StoreSettings = StoreSettings()) -> Store:  # noqa: B008 (a frozen dataclass)
    """The store holding `output`: cheap to call, the clients behind it are built once per process."""
    if is_local(output):
        return LocalStore(output.removeprefix("file://"))
    scheme = output.split("://", 1)[0]
    stores = {"s3": (S3Store, "boto3", "aws"), "gs": (GcsStore, "google.cloud.storage", "gcp")}
    if scheme not in stores:
        raise ValueError(f"output {output}: unsupported scheme {scheme}:// (use a local path, gs:// or s3://)")
    store, module, extra = stores[scheme]
    if not _installed(module):
        raise ValueError(f"output {output}: {scheme}:// needs the [{extra}] extra (pip install '.[{extra}]')")
    return store(settings)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing ("google" without "google.cloud")
        return False
