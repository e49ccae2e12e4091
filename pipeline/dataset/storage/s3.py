"""S3, through boto3 (what Beam's [aws] extra installs): the stores reach boto3 and botocore here only, and
only inside the functions that use them, so importing this module (as `open_store` does) needs no [aws] extra.
The client's settings (`build_client`), S3Store, and botocore's errors as StorageError or Precondition."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

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

S3_SINGLE_PUT_LIMIT = 256 << 20  # larger uploads (long shards) go as multipart uploads
S3_MIN_PART = 5 << 20  # S3's smallest part of a multipart upload (but the last)


def build_client(s: StoreSettings):
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


class S3Store(BucketStore):
    """One PutObject per object (a multipart upload only past S3_SINGLE_PUT_LIMIT), metadata as x-amz-meta-*."""

    scheme = "s3"
    build_client = staticmethod(build_client)

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
