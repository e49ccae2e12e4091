"""The dataset's writes: clips, shards, tables, card and record, on a local disk, `s3://` or `gs://`.

Why not Beam's FileSystems for these: it builds a new S3 or GCS client on every call (a boto3 client costs
about 119 ms of CPU to build) and its bucket writers stage each object under a temporary name, then copy
and delete it: six requests a clip. Here a write is one request. An object store publishes an object only
when its upload completes, so an upload goes straight to its final name; a local file is written under
`{output}/_tmp/` and renamed into place. Reading the manifest stays with Beam (a few reads a job).

Bytes too large to hold go through a `Scratch`, a local file that one object owns from its naming to its
removal: the writer writes into it, `put` publishes it (on a local disk by a rename, so scratch lives beside
the output), and the writer closes it, which removes whatever `put` left.

The per-process client cache (`_clients`, this module's only process-wide state): one boto3 client and one
google-cloud-storage client per worker process (per settings), built on first use and shared by every
thread, step and clip; both are thread-safe. A client cannot be a step's own: one costs about 119 ms of CPU
and holds the process's connection pool, and stores are opened outside any step too (the launcher, the last
step). `clear_clients` empties it, as a new process would.
The libraries retry what is transient (throttling, 5xx, timeouts, dropped connections) a bounded number
of times; whatever still fails, and any error of a local disk, is raised as `StorageError` (the library's
error chained), which the fetch step turns into a `WRITE_FAILED` row.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import itertools
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from pipeline.dataset.layout import TMP_DIR

S3_SINGLE_PUT_LIMIT = 256 << 20  # larger uploads (long shards) go as multipart uploads
S3_MIN_PART = 5 << 20  # S3's smallest part of a multipart upload (but the last)
_COMPOSE_MAX = 32  # GCS: sources in one compose request
CONNECTIONS = 128  # per process: above the default 64 streams, so no thread waits for a connection
ATTEMPTS = 5  # of each storage request, the libraries' own retries with backoff


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

    def _rename(self, path: str) -> None:
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


def open_store(output: str, settings: StoreSettings = StoreSettings()) -> Store:
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


_clients: dict[tuple[str, StoreSettings], object] = {}
_clients_lock = threading.Lock()


def clear_clients() -> None:
    """Forget the clients built so far, as a new process would (a test pointing the same settings at another
    server)."""
    with _clients_lock:
        _clients.clear()


def _client(scheme: str, settings: StoreSettings):
    """The per-process client cache (see the module's docstring)."""
    key = (scheme, settings)
    client = _clients.get(key)  # the common case takes no lock
    if client is None:
        with _clients_lock:
            if key not in _clients:
                _clients[key] = _s3_client(settings) if scheme == "s3" else _gcs_client(settings)
            client = _clients[key]
    return client


class LocalStore:
    """A folder: each write goes to `{root}/_tmp/` and is renamed into place, so no reader sees half a file.
    Its OSErrors are raised as StorageError (NotFound for a missing file)."""

    local = True

    def __init__(self, root: str):
        self.tmp = os.path.join(root, TMP_DIR)
        self._tmp_made = False
        # Scratch names: a prefix unique to this store object, then a counter (its next() is atomic under the
        # GIL), so no random bytes are read per clip.
        self._prefix, self._count = uuid.uuid4().hex[:12], itertools.count()

    def put(self, path, data=None, *, file=None, content_type="", metadata=None) -> None:
        """Renamed into place: `file` (this store's scratch, on the same disk), or `data` written into a scratch
        file first. No metadata: a local file has none (a clip says what it is in its header)."""
        with translated(path, OSError):
            if file is not None:
                _rename(file, path)
                return
            with self.scratch_file(os.path.splitext(path)[1]) as scratch:
                _write_file(scratch.path, data)
                _rename(scratch, path)

    def head(self, path: str) -> StoredObject | None:
        with translated(path, OSError):
            try:
                return StoredObject(path, os.stat(path).st_size)
            except FileNotFoundError:
                return None

    def list(self, prefix: str) -> Iterator[StoredObject]:
        folder = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
        with translated(prefix, OSError):
            for dirpath, _, names in os.walk(folder or "."):
                for name in names:
                    path = os.path.join(dirpath, name)
                    if path.startswith(prefix):
                        yield StoredObject(path, os.stat(path).st_size)

    def read(self, path: str) -> bytes:
        with self.open_for_read(path) as f, translated(path, OSError):
            return f.read()

    def open_for_read(self, path: str) -> BinaryIO:
        with translated(path, OSError):
            return open(path, "rb")

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            with translated(path, OSError):
                os.remove(path)

    def remove_all(self, prefix: str) -> None:
        """Each file and folder whose path starts with `prefix`, with what is in it (a folder is no object).
        What cannot be removed stays, as a leftover's leftover, not a reason to stop."""
        self._tmp_made = False  # `_tmp/` may be among them
        folder, start = os.path.split(prefix)
        try:
            paths = [e.path for e in os.scandir(folder or ".") if e.name.startswith(start)] if start else [folder]
        except OSError:  # no such folder: nothing to remove
            return
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)

    def remove_scratch(self) -> None:
        """The output's `_tmp/` with all in it (a run's export parts too)."""
        self.remove_all(self.tmp + os.sep)

    def check_writable(self, root: str, folders: Iterable[str]) -> None:
        """No file where `root` or one of its `folders` should be a folder, and a writable folder to make it in."""
        for path in (root, *(os.path.join(root, f) for f in folders)):
            if os.path.exists(path) and not os.path.isdir(path):
                raise StorageError(f"{path} is a file, not a folder")
        existing = os.path.dirname(os.path.abspath(root))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise StorageError(f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{existing} is not writable")

    def concat(self, path: str, parts: list[StoredObject], content_type: str = "") -> None:
        with self.scratch_file(os.path.splitext(path)[1]) as scratch:
            with translated(path, OSError), open(scratch.path, "wb") as out:
                for part in parts:
                    with open(part.path, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            self.put(path, file=scratch)
        self.delete(p.path for p in parts)

    def abort_uploads(self, prefix: str) -> int:
        return 0

    def create(self, path: str, data: bytes) -> str:
        with translated(path, OSError):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with _folder_lock(path):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError as e:
                    raise Precondition(f"{path}: exists") from e
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        return _local_version(data)

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        if not os.path.isdir(os.path.dirname(path) or "."):
            return None
        with translated(path, OSError), _folder_lock(path):
            data = _read_if_there(path)
        return None if data is None else (data, _local_version(data))

    def replace(self, path: str, data: bytes, version: str) -> str:
        with translated(path, OSError), _folder_lock(path):
            _check_version(path, version)
            staged = f"{path}.{uuid.uuid4().hex}"  # renamed over it: a reader without the lock sees old or new
            _write_file(staged, data)
            os.replace(staged, path)
        return _local_version(data)

    def delete_version(self, path: str, version: str) -> None:
        with translated(path, OSError), _folder_lock(path):
            _check_version(path, version)
            os.remove(path)

    def scratch_file(self, suffix: str) -> Scratch:
        """In the output's `_tmp/`, so that `put` renames it into place. Named, not created: one open per clip,
        not two."""
        if not self._tmp_made:
            with translated(self.tmp, OSError):
                os.makedirs(self.tmp, exist_ok=True)
            self._tmp_made = True
        return Scratch(os.path.join(self.tmp, f"{self._prefix}-{next(self._count)}{suffix}"))


def _rename(scratch: Scratch, path: str) -> None:
    try:
        scratch._rename(path)
    except FileNotFoundError:  # the first file in a new folder: no makedirs call for every clip
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        scratch._rename(path)


@contextlib.contextmanager
def _folder_lock(path: str) -> Iterator[None]:
    """An exclusive flock on the folder holding `path`, for one conditional operation: O_EXCL makes a creation
    atomic, but a compare-then-replace or compare-then-delete is two steps, and the lock makes them one
    among processes and threads (each open of the folder is its own lock holder). The folder, not a lock
    file, so nothing is left behind. On a filesystem without flock (some network mounts) only the creation
    stays atomic."""
    import fcntl

    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _local_version(data: bytes) -> str:
    """A local file's version is its content's hash: every lease written differs (run id, expiry)."""
    return hashlib.sha256(data).hexdigest()


def _read_if_there(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _check_version(path: str, version: str) -> None:
    data = _read_if_there(path)
    if data is None or _local_version(data) != version:
        raise Precondition(f"{path}: {'gone' if data is None else 'replaced'}")


def _write_file(path: str, data: bytes) -> None:
    """`data` into a new file with open, write and close only: Python's buffered `open` adds a stat, a
    terminal check and a seek, about a tenth of the system time of writing a 5-second clip."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# S3, through boto3 (what Beam's [aws] extra installs).


def _s3_client(s: StoreSettings):
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=CONNECTIONS,
        retries={"mode": "standard", "max_attempts": ATTEMPTS},
        connect_timeout=20,
        read_timeout=120,
        # CPU per clip: no second checksum of a body whose sha256 is in its metadata (a checksummed body
        # goes out as aws-chunked with an Expect: 100-continue round trip), no re-validation of our own
        # parameters. S3 still checks each upload's Content-MD5/length, and TLS protects the bytes.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        parameter_validation=False,
    )
    verify = None if s.s3_verify is None else s.s3_verify not in ("false", "False", "0")
    return boto3.session.Session().client(
        "s3",
        endpoint_url=s.s3_endpoint_url,
        region_name=s.s3_region_name,
        aws_access_key_id=s.s3_access_key_id,
        aws_secret_access_key=s.s3_secret_access_key,
        aws_session_token=s.s3_session_token,
        use_ssl=not s.s3_disable_ssl,
        verify=verify,
        config=config,
    )


class _BucketStore:
    """A bucket store's client, built on first use (a dry run, or a launcher that only names the output,
    needs no credentials)."""

    local = False
    scheme = ""

    def __init__(self, settings: StoreSettings):
        self.settings = settings

    @property
    def client(self):
        return _client(self.scheme, self.settings)

    def scratch_file(self, suffix: str) -> Scratch:
        """A file in the machine's temporary folder: bytes bound for a bucket need no room beside the output."""
        import tempfile

        with translated(f"a scratch file *{suffix}", OSError):
            fd, path = tempfile.mkstemp(prefix="clip-", suffix=suffix)
            os.close(fd)
        return Scratch(path)

    def remove_scratch(self) -> None:
        """Nothing: each scratch file is in the machine's temporary folder and removed by its Scratch (the
        exports' parts under the bucket's `_tmp/` are the last step's to join, or the next run's to remove)."""

    def open_for_read(self, path: str) -> BinaryIO:
        return io.BytesIO(self.read(path))

    def remove_all(self, prefix: str) -> None:
        left = [o.path for o in self.list(prefix)]
        if left:
            self.delete(left)

    def check_writable(self, root: str, folders: Iterable[str]) -> None:
        """A listing works: the bucket is there and the credentials are taken (what a write needs is probed)."""
        try:
            next(iter(self.list(root + "/")), None)
        except StorageError as e:
            raise StorageError(f"cannot list it: {e}") from e


class S3Store(_BucketStore):
    """One PutObject per object (a multipart upload only past S3_SINGLE_PUT_LIMIT), metadata as x-amz-meta-*."""

    scheme = "s3"

    def put(self, path, data=None, *, file=None, content_type="", metadata=None) -> None:
        bucket, key = split_bucket(path)
        extra = {"ContentType": content_type or "application/octet-stream", "Metadata": metadata or {}}
        with translated(path):
            if file is None:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
            elif os.path.getsize(file.path) <= S3_SINGLE_PUT_LIMIT:
                with open(file.path, "rb") as f:
                    self.client.put_object(Bucket=bucket, Key=key, Body=f, **extra)
            else:
                from boto3.s3.transfer import TransferConfig

                config = TransferConfig(multipart_threshold=S3_SINGLE_PUT_LIMIT, use_threads=False)
                self.client.upload_file(file.path, bucket, key, ExtraArgs=extra, Config=config)

    def head(self, path: str) -> StoredObject | None:
        from botocore.exceptions import ClientError

        bucket, key = split_bucket(path)
        try:
            found = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as e:  # a ClientError, or a connection error after the retries
            if isinstance(e, ClientError) and e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise StorageError(f"{path}: {type(e).__name__}: {e}") from e
        return StoredObject(path, found["ContentLength"], found.get("Metadata", {}))

    def list(self, prefix: str) -> Iterator[StoredObject]:
        bucket, key = split_bucket(prefix)
        with translated(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                for o in page.get("Contents", []):
                    yield StoredObject(f"s3://{bucket}/{o['Key']}", o["Size"])

    def read(self, path: str) -> bytes:
        bucket, key = split_bucket(path)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            code = str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", ""))
            kind = NotFound if code in ("NoSuchKey", "404") else StorageError
            raise kind(f"{path}: {type(e).__name__}: {e}") from e

    def delete(self, paths: Iterable[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for path in paths:
            bucket, key = split_bucket(path)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), 1000):  # DeleteObjects takes 1,000 keys a request
                batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
                with translated(f"s3://{bucket}"):
                    failed = self.client.delete_objects(Bucket=bucket, Delete=batch).get("Errors", [])
                if failed:  # a 200 answer can still refuse some keys: say so, not nothing
                    first = failed[0]
                    raise StorageError(
                        f"s3://{bucket}: {len(failed)} object(s) not deleted, e.g. {first['Key']}: "
                        f"{first.get('Code')} {first.get('Message', '')}"
                    )

    def concat(self, path: str, parts: list[StoredObject], content_type: str = "") -> None:
        """One multipart upload: a part of S3's 5 MiB minimum that starts a part of the upload is copied in the
        bucket (UploadPartCopy); the others are read and sent together in parts of at least that size (the
        last may be smaller). So the larger parts first: only the small ones are read."""
        if not parts:
            self.put(path, b"", content_type=content_type)
            return
        bucket, key = split_bucket(path)
        with translated(path):
            upload = self.client.create_multipart_upload(
                Bucket=bucket, Key=key, ContentType=content_type or "application/octet-stream"
            )["UploadId"]
            try:
                done = self._upload_parts(bucket, key, upload, parts)
                self.client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
                )
            except BaseException:
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
                raise
        self.delete(p.path for p in parts)

    def _upload_parts(self, bucket: str, key: str, upload: str, parts: list[StoredObject]) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []

        def sent(answer: dict[str, Any]) -> None:
            done.append({"PartNumber": len(done) + 1, "ETag": answer["ETag"]})

        buffer = bytearray()
        for part in parts:
            if not buffer and part.size >= S3_MIN_PART:
                source = dict(zip(("Bucket", "Key"), split_bucket(part.path), strict=True))
                copied = self.client.upload_part_copy(
                    Bucket=bucket, Key=key, UploadId=upload, PartNumber=len(done) + 1, CopySource=source
                )
                sent(copied["CopyPartResult"])
                continue
            buffer += self.read(part.path)
            if len(buffer) >= S3_MIN_PART:
                sent(
                    self.client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload, PartNumber=len(done) + 1, Body=bytes(buffer)
                    )
                )
                buffer.clear()
        if buffer:
            sent(
                self.client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload, PartNumber=len(done) + 1, Body=bytes(buffer)
                )
            )
        return done

    def abort_uploads(self, prefix: str) -> int:
        bucket, key = split_bucket(prefix)
        aborted = 0
        with translated(prefix):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
        return aborted

    # S3's conditional requests (2024-25): If-None-Match "*" creates only, If-Match an ETag replaces or deletes
    # only that version; a refused one is 412 PreconditionFailed, a missing object 404 NoSuchKey, and a
    # conditional write racing another on the same key 409 ConditionalRequestConflict (lost: read again).

    def create(self, path: str, data: bytes) -> str:
        return self._put_if(path, data, IfNoneMatch="*")

    def replace(self, path: str, data: bytes, version: str) -> str:
        return self._put_if(path, data, IfMatch=version)

    def _put_if(self, path: str, data: bytes, **condition: str) -> str:
        bucket, key = split_bucket(path)
        try:
            put = self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json", **condition)
        except Exception as e:
            raise _s3_error(path, e) from e
        return put["ETag"]

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        bucket, key = split_bucket(path)
        try:
            found = self.client.get_object(Bucket=bucket, Key=key)
            return found["Body"].read(), found["ETag"]
        except Exception as e:
            error = _s3_error(path, e)
            if isinstance(error, Precondition):  # 404: nothing there
                return None
            raise error from e

    def delete_version(self, path: str, version: str) -> None:
        bucket, key = split_bucket(path)
        try:
            self.client.delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except Exception as e:
            raise _s3_error(path, e) from e


_S3_REFUSED = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412")


def _s3_error(path: str, e: Exception) -> StorageError:
    """A refused condition (or a missing object) as Precondition; anything else as StorageError."""
    response = getattr(e, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    kind = Precondition if code in _S3_REFUSED else StorageError
    return kind(f"{path}: {type(e).__name__}: {e}")


# GCS, through google-cloud-storage (what Beam's [gcp] extra installs).


def _gcs_client(s: StoreSettings):
    import requests
    from google.cloud import storage

    client = storage.Client(project=s.gcp_project)
    adapter = requests.adapters.HTTPAdapter(pool_connections=CONNECTIONS, pool_maxsize=CONNECTIONS)
    client._http.mount("https://", adapter)  # the default pool of 10 would make most streams wait
    client._http.mount("http://", adapter)
    return client


class GcsStore(_BucketStore):
    """One single-request upload per object (a resumable upload past the library's 8 MiB), metadata as
    custom metadata. Uploads are retried: an object written whole at a name is idempotent."""

    scheme = "gs"

    def _blob(self, path: str):
        bucket, name = split_bucket(path)
        return self.client.bucket(bucket).blob(name)  # no request: bucket() and blob() only name them

    def put(self, path, data=None, *, file=None, content_type="", metadata=None) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        content_type = content_type or "application/octet-stream"
        with translated(path):
            blob = self._blob(path)
            blob.metadata = metadata or None
            if file is None:
                blob.upload_from_string(data, content_type=content_type, retry=DEFAULT_RETRY)
            else:
                blob.upload_from_filename(file.path, content_type=content_type, retry=DEFAULT_RETRY)

    def head(self, path: str) -> StoredObject | None:
        bucket, name = split_bucket(path)
        with translated(path):
            blob = self.client.bucket(bucket).get_blob(name)
        return None if blob is None else StoredObject(path, blob.size, dict(blob.metadata or {}))

    def list(self, prefix: str) -> Iterator[StoredObject]:
        bucket, name = split_bucket(prefix)
        with translated(prefix):
            for blob in self.client.list_blobs(bucket, prefix=name):
                yield StoredObject(f"gs://{bucket}/{blob.name}", blob.size)

    def read(self, path: str) -> bytes:
        try:
            return self._blob(path).download_as_bytes()
        except Exception as e:
            kind = NotFound if getattr(e, "code", None) == 404 else StorageError
            raise kind(f"{path}: {type(e).__name__}: {e}") from e

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            with translated(path):
                self._blob(path).delete()

    def concat(self, path: str, parts: list[StoredObject], content_type: str = "") -> None:
        """Compose takes 32 sources a request: the first part grows by 31 at a time (composed into itself),
        then becomes `path` in one last compose, so no reader sees `path` half made."""
        if not parts:
            self.put(path, b"", content_type=content_type)
            return
        with translated(path):
            first, rest = parts[0].path, [self._blob(p.path) for p in parts[1:]]
            while len(rest) > _COMPOSE_MAX - 1:  # a new blob each time: one carries the checksum it was given
                self._blob(first).compose([self._blob(first), *rest[: _COMPOSE_MAX - 1]])
                rest = rest[_COMPOSE_MAX - 1 :]
            target = self._blob(path)
            target.content_type = content_type or "application/octet-stream"
            target.compose([self._blob(first), *rest])
        self.delete(p.path for p in parts)

    def abort_uploads(self, prefix: str) -> int:
        return 0  # an unfinished resumable upload is never visible and expires by itself

    # GCS's preconditions: ifGenerationMatch=0 creates only, =N replaces or deletes only generation N; a refused
    # one is 412, a missing object 404. The library retries a conditional request (it is idempotent).

    def create(self, path: str, data: bytes) -> str:
        return self._upload_if(path, data, 0)

    def replace(self, path: str, data: bytes, version: str) -> str:
        return self._upload_if(path, data, int(version))

    def _upload_if(self, path: str, data: bytes, generation: int) -> str:
        try:
            blob = self._blob(path)
            blob.upload_from_string(data, content_type="application/json", if_generation_match=generation)
        except Exception as e:
            raise _gcs_error(path, e) from e
        return str(blob.generation)

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """Its generation (a metadata request), then that generation's bytes: a download alone does not say
        which generation it read on every server (the emulator sends no x-goog-generation)."""
        bucket, name = split_bucket(path)
        for _ in range(ATTEMPTS):  # replaced between the two requests: read the new one
            try:
                blob = self.client.bucket(bucket).get_blob(name)
                if blob is None:
                    return None
                generation = blob.generation  # before the download, which sets it from its headers
                return blob.download_as_bytes(if_generation_match=generation), str(generation)
            except Exception as e:
                if not isinstance(_gcs_error(path, e), Precondition):
                    raise _gcs_error(path, e) from e
        raise StorageError(f"{path}: replaced on every one of {ATTEMPTS} reads")

    def delete_version(self, path: str, version: str) -> None:
        try:
            self._blob(path).delete(if_generation_match=int(version))
        except Exception as e:
            raise _gcs_error(path, e) from e


def _gcs_error(path: str, e: Exception) -> StorageError:
    """412 (precondition failed) or 404 (not found) as Precondition; anything else as StorageError."""
    kind = Precondition if getattr(e, "code", None) in (404, 412) else StorageError
    return kind(f"{path}: {type(e).__name__}: {e}")


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
