"""GCS, through google-cloud-storage (what Beam's [gcp] extra installs): the stores reach that library here
only, and only inside the functions that use it, so importing this module needs no [gcp] extra. This is also the
one place a storage library's internals are used: the client's requests session (`Client._http`), whose pool of 10
connections `build_client` widens to CONNECTIONS, and a batch's responses (`Batch._responses`, `batch_statuses`);
`tests/test_storage.py` fails if an upgrade removes either.
The client, GcsStore, and google-cloud's errors as StorageError or Precondition."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from pipeline.dataset.storage.base import (
    NotFound,
    Precondition,
    StorageError,
    StoredObject,
    StoreSettings,
    split_bucket,
    translated,
)
from pipeline.dataset.storage.bucket import ATTEMPTS, CONNECTIONS, BucketStore

_COMPOSE_MAX = 32  # GCS: sources in one compose request
BATCH_DELETES = 100  # GCS: calls in one batch request

log = logging.getLogger(__name__)


def batch_statuses(batch) -> list[int]:
    """The HTTP status of each call in a finished batch, in order (`Batch.finish` returns the responses, but its
    `with` block, which routes the calls into it, keeps them in `_responses`)."""
    return [response.status_code for response in batch._responses]


def build_client(s: StoreSettings):
    import requests
    from google.cloud import storage

    client = storage.Client(project=s.gcp_project)
    adapter = requests.adapters.HTTPAdapter(pool_connections=CONNECTIONS, pool_maxsize=CONNECTIONS)
    client._http.mount("https://", adapter)  # the default pool of 10 would make most streams wait
    client._http.mount("http://", adapter)
    return client


class GcsStore(BucketStore):
    """One single-request upload per object (a resumable upload past the library's 8 MiB), metadata as
    custom metadata. Uploads are retried: an object written whole at a name is idempotent."""

    scheme = "gs"
    build_client = staticmethod(build_client)

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
        """Up to 100 deletes a request (GCS's batch limit): orphans of a 10M-clip dataset are 100,000 requests,
        not 10M. What a batch did not delete (the request failed, or a call in it did) is deleted one request
        each, with the library's retries and errors: the library retries no batch."""
        paths = list(paths)
        for i in range(0, len(paths), BATCH_DELETES):
            chunk = paths[i : i + BATCH_DELETES]
            for path in self._batch_delete(chunk) if len(chunk) > 1 else chunk:
                with translated(path):
                    self._blob(path).delete()

    def _batch_delete(self, paths: list[str]) -> list[str]:
        """One batch request deleting `paths`: those it did not delete."""
        try:
            with self.client.batch(raise_exception=False) as batch:
                for path in paths:
                    self._blob(path).delete()
        except Exception as e:  # the batch request itself failed: each path goes alone
            log.info("a batch of %d deletes failed (%s: %s); deleting them one by one", len(paths), type(e).__name__, e)
            return paths
        return [path for path, status in zip(paths, batch_statuses(batch), strict=True) if not 200 <= status < 300]

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
