"""The stores' shared vocabulary: what every store is (the `Store` protocol), what it raises and what it takes
and gives, so that a caller, and each store module, needs nothing of any one store or storage library.

Bytes too large to hold go through a `Scratch`, a local file that one object owns from its naming to its
removal: the writer writes into it, `put` publishes it (on a local disk by a rename, so scratch lives beside
the output), and the writer closes it, which removes whatever `put` left.

The libraries retry what is transient (throttling, 5xx, timeouts, dropped connections) a bounded number
of times; whatever still fails, and any error of a local disk, is raised as `StorageError` (the library's
error chained), which the fetch step turns into a `WRITE_FAILED` row.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol


class StorageError(OSError):
    """Any store operation that failed (after the library's retries): one kind of error whatever the store, an
    OSError as a failed local write is, so that a writer catching OSError catches both."""


class NotFound(StorageError, FileNotFoundError):
    """A read of an object or file that is not there."""


class Precondition(StorageError):
    """A conditional write or delete was refused: the object exists (create), or is no longer the version
    given (replaced or gone). Not retried: the caller reads the object again and decides."""


@dataclass(frozen=True)
class StoreSettings:
    """How to reach the output's store: Beam's S3 options and the GCP project; picklable."""

    s3_endpoint_url: str | None = None
    s3_region_name: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_session_token: str | None = field(default=None, repr=False)
    s3_verify: str | None = None
    s3_disable_ssl: bool = False
    gcp_project: str | None = None

    @classmethod
    def from_options(cls, options) -> StoreSettings:
        """From Beam's PipelineOptions (S3Options and GoogleCloudOptions), as Beam's own IO reads them."""
        every = options.get_all_options()
        return cls(
            s3_endpoint_url=every.get("s3_endpoint_url"),
            s3_region_name=every.get("s3_region_name"),
            s3_access_key_id=every.get("s3_access_key_id"),
            s3_secret_access_key=every.get("s3_secret_access_key"),
            s3_session_token=every.get("s3_session_token"),
            s3_verify=every.get("s3_verify"),
            s3_disable_ssl=bool(every.get("s3_disable_ssl")),
            gcp_project=every.get("project"),
        )


@dataclass(frozen=True)
class StoredObject:
    """An object found at a path: its size and the metadata it was written with (none on a local disk)."""

    path: str
    size: int
    metadata: dict[str, str] = field(default_factory=dict)


class Scratch:
    """A local scratch file for bytes on their way to `put(file=...)`, from `store.scratch_file`. It owns the file
    from its naming to its removal: write into `path`, pass it to `put` (which never removes it), then `close`
    it, or leave the `with` block, which removes what is left."""

    def __init__(self, path: str):
        self.path = path
        self._gone = False  # renamed into place by a local store's put, or removed

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the file if it is there (idempotent)."""
        if not self._gone:
            self._gone = True
            with translated(self.path, OSError), contextlib.suppress(FileNotFoundError):
                os.remove(self.path)

    def rename_to(self, path: str) -> None:
        """LocalStore.put's publish: the file becomes `path`, so nothing is left to remove."""
        os.replace(self.path, path)
        self._gone = True


class Store(Protocol):
    """What the pipeline does with its output. Paths are full paths (a local path, s3://b/k, gs://b/k). Every
    operation raises StorageError (NotFound, Precondition) naming the path, its cause chained."""

    local: bool

    def put(
        self,
        path: str,
        data: bytes | None = None,
        *,
        file: Scratch | None = None,
        content_type: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Publish `data`, or the scratch file `file` (still its owner's to close). `metadata` is kept where the
        store keeps any (a bucket object's); a local file says what it is in its header."""

    def head(self, path: str) -> StoredObject | None:
        """The object at `path` with its metadata (one request), or None."""

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object whose path starts with `prefix` (sizes only)."""

    def read(self, path: str) -> bytes:
        """A whole small object (the run record, a table file); NotFound when it is not there."""

    def open_for_read(self, path: str) -> BinaryIO:
        """The object as a binary file to read through: a local file opened in place, a bucket's object
        downloaded into memory (one request)."""

    def delete(self, paths: Iterable[str]) -> None: ...

    def remove_all(self, prefix: str) -> None:
        """Everything whose path starts with `prefix`, gone (a killed run's leftovers)."""

    def remove_scratch(self) -> None:
        """Remove, at once, the scratch this store stages beside the output (a finished or stopped run's)."""

    def check_writable(self, root: str, folders: Iterable[str]) -> None:
        """StorageError saying why nothing could be written under `root`, as far as can be told without writing;
        `folders`: the ones under it that a run writes into."""

    def concat(self, path: str, parts: list[StoredObject], content_type: str = "") -> None:
        """Write `path` as the parts' bytes one after another, in one publish, and delete the parts. On a bucket
        the bytes stay in the bucket (S3's UploadPartCopy, GCS's compose): a few requests, not a download."""
        ...

    def abort_uploads(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under `prefix` (a killed writer's); how many."""

    def scratch_file(self, suffix: str) -> Scratch:
        """A new scratch file (maybe not created yet) for bytes on their way to `put(file=...)`."""

    # Conditional writes of one small object (the lease): each is one request, decided by the store itself,
    # so of two processes racing for the same object exactly one succeeds. A version is an opaque string.

    def create(self, path: str, data: bytes) -> str:
        """Write `data` only where nothing is at `path` (else Precondition); the version written."""

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """A small object's bytes and version, or None."""

    def replace(self, path: str, data: bytes, version: str) -> str:
        """Overwrite the object only while it is `version` (else Precondition); the new version."""

    def delete_version(self, path: str, version: str) -> None:
        """Delete the object only while it is `version` (else Precondition, also when it is gone)."""


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def split_bucket(path: str) -> tuple[str, str]:
    """("bucket", "key") of s3://bucket/key or gs://bucket/key."""
    bucket, _, key = path.split("://", 1)[1].partition("/")
    return bucket, key


@contextlib.contextmanager
def translated(where: str, errors: type[Exception] = Exception) -> Iterator[None]:
    """A storage library's error (botocore, google-cloud, requests: any, as they share no base class), or a
    local disk's OSError (`errors`), as StorageError naming `where` (NotFound for a missing file), its cause
    chained, so that a caller handles one kind of error whatever the store."""
    try:
        yield
    except StorageError:
        raise
    except errors as e:
        kind = NotFound if isinstance(e, FileNotFoundError) else StorageError
        raise kind(f"{where}: {type(e).__name__}: {e}") from e
