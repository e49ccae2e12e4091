"""`tests.storage_proxy.StorageProxy` in front of moto (S3) and the GCS emulator: what each client
operation counts as, and that injected 503s and connection drops reach the client and stop the write.
"""

from __future__ import annotations

import http.client
import os
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.endpoint
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from pipeline.local.storage_proxy import StorageProxy, classify
from pipeline.local.storage_servers import GCS_PROJECT, S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, StorageServer

BUCKET = "test-bucket"
# One attempt in all: botocore's `max_attempts` counts retries after the first attempt, so
# {"max_attempts": 1} would still retry once.
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def s3_client(endpoint_url: str, config: Config | None = None) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=config,
    )


def counted(proxy: StorageProxy, operation: Callable[[], object]) -> dict[str, int]:
    """The requests one client operation makes."""
    proxy.reset()
    operation()
    return proxy.counts()


@pytest.fixture
def s3_proxy(s3_server: StorageServer) -> Iterator[StorageProxy]:
    with StorageProxy(s3_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def gcs_proxy(gcs_server: StorageServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[StorageProxy]:
    # google-cloud-storage >= 3.x fetches bucket metadata (GET /storage/v1/b/BUCKET) in a background
    # thread on a client's first call per bucket, for OpenTelemetry attributes, racing the call itself.
    monkeypatch.setenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    with StorageProxy(gcs_server.endpoint_url) as proxy:
        yield proxy


@pytest.fixture
def key() -> str:
    return f"{uuid.uuid4().hex}/clip.bin"


def test_classify_without_a_server() -> None:
    assert classify("PUT", "/b/k?partNumber=2&uploadId=u") == "PUT"
    assert classify("PUT", "/b/k", {"x-amz-copy-source": "/b/j"}) == "COPY"
    assert classify("PUT", "/b/k?tagging") == "OTHER"
    assert classify("GET", "/b/k?uploadId=u") == "LIST"  # ListParts
    assert classify("GET", "/b") == "LIST"  # ListObjects v1 with no parameters
    assert classify("GET", "/b?location") == "BUCKET"
    assert classify("DELETE", "/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=x") == "ABORT"
    assert classify("GET", "/storage/v1/b/b/o/a%2Fb?alt=media") == "GET"
    assert classify("PATCH", "/storage/v1/b/b/o/a%2Fb") == "OTHER"
    batch = b"--x\r\nContent-Type: application/http\r\n\r\nDELETE /storage/v1/b/b/o/a HTTP/1.1\r\n\r\n--x--"
    assert classify("POST", "/batch/storage/v1", {}, batch) == "DELETE"


def test_s3_operations_count_by_kind(s3_proxy: StorageProxy, key: str) -> None:
    s3 = s3_client(s3_proxy.endpoint_url)
    data = os.urandom(200_000)
    assert counted(s3_proxy, lambda: s3.put_object(Bucket=BUCKET, Key=key, Body=data)) == {"PUT": 1}
    assert s3_proxy.bytes_written() == len(data)
    assert counted(s3_proxy, lambda: s3.head_object(Bucket=BUCKET, Key=key)) == {"HEAD": 1}
    assert s3_proxy.bytes_read() == 0
    got = {}
    assert counted(s3_proxy, lambda: got.update(body=s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())) == {
        "GET": 1
    }
    assert got["body"] == data and s3_proxy.bytes_read() == 200_000
    prefix = key.split("/")[0] + "/"
    assert counted(s3_proxy, lambda: s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)) == {"LIST": 1}
    copy = {"Bucket": BUCKET, "Key": key}
    assert counted(s3_proxy, lambda: s3.copy_object(Bucket=BUCKET, Key=key + ".copy", CopySource=copy)) == {"COPY": 1}
    objects = {"Objects": [{"Key": key}, {"Key": key + ".copy"}]}
    assert counted(s3_proxy, lambda: s3.delete_objects(Bucket=BUCKET, Delete=objects)) == {"DELETE": 1}
    assert counted(s3_proxy, lambda: s3.delete_object(Bucket=BUCKET, Key=key)) == {"DELETE": 1}
    assert counted(s3_proxy, lambda: s3.head_bucket(Bucket=BUCKET)) == {"BUCKET": 1}

    s3_proxy.reset()
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    part = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload, PartNumber=1, Body=data)
    parts = {"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}
    s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload, MultipartUpload=parts)
    assert s3_proxy.counts() == {"POST_INIT": 1, "PUT": 1, "COMPLETE": 1}, s3_proxy.log
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key=key + ".aborted")["UploadId"]
    assert counted(
        s3_proxy, lambda: s3.abort_multipart_upload(Bucket=BUCKET, Key=key + ".aborted", UploadId=upload)
    ) == {"ABORT": 1}
    assert [(kind, method) for kind, method, _ in s3_proxy.log] == [("ABORT", "DELETE")]


def test_gcs_operations_count_by_kind(gcs_proxy: StorageProxy, key: str) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=GCS_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_proxy.endpoint_url},
    )
    bucket = client.bucket(BUCKET)
    data = os.urandom(50_000)
    # One POST /upload/...?uploadType=multipart: a single-request upload, so one PUT.
    assert counted(gcs_proxy, lambda: bucket.blob(key).upload_from_string(data)) == {"PUT": 1}
    got = {}
    assert counted(gcs_proxy, lambda: got.update(blob=bucket.get_blob(key))) == {"HEAD": 1}
    # The emulator builds mediaLink from the Host header, so the download comes back through the proxy.
    assert counted(gcs_proxy, lambda: got.update(body=got["blob"].download_as_bytes())) == {"GET": 1}
    assert got["body"] == data and gcs_proxy.bytes_read() == len(data)
    prefix = key.split("/")[0] + "/"
    assert counted(gcs_proxy, lambda: list(client.list_blobs(BUCKET, prefix=prefix))) == {"LIST": 1}
    assert counted(gcs_proxy, lambda: bucket.copy_blob(bucket.blob(key), bucket, key + ".copy")) == {"COPY": 1}
    assert counted(gcs_proxy, lambda: bucket.blob(key + ".copy").delete()) == {"DELETE": 1}
    assert counted(gcs_proxy, lambda: client.get_bucket(BUCKET)) == {"BUCKET": 1}
    assert gcs_proxy.bytes_read() == 0

    def batch_delete() -> None:
        with client.batch():
            bucket.blob(key).delete()

    assert counted(gcs_proxy, batch_delete) == {"DELETE": 1}, gcs_proxy.log
    assert bucket.get_blob(key) is None


def test_s3_injected_503_is_not_forwarded(s3_server: StorageServer, s3_proxy: StorageProxy, key: str) -> None:
    s3_proxy.fail_fraction = 1.0
    with pytest.raises(ClientError) as raised:
        s3_client(s3_proxy.endpoint_url, NO_RETRIES).put_object(Bucket=BUCKET, Key=key, Body=b"audio")
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert raised.value.response["Error"]["Code"] == "SlowDown"
    assert s3_proxy.counts() == {"PUT": 1} and s3_proxy.faults() == {"503": 1}
    with pytest.raises(ClientError, match="404"):
        s3_client(s3_server.endpoint_url).head_object(Bucket=BUCKET, Key=key)


def test_s3_default_retries_ride_out_half_failing_puts(
    s3_server: StorageServer,
    s3_proxy: StorageProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # botocore backs off SlowDown like throttling (up to 1 s, then 2 s); skip the sleeps, not the retries.
    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    s3_proxy.fail_fraction = 0.5
    # botocore's default is 3 attempts, so a put fails outright with probability 1/8 and most seeds
    # fail one of 20; with seed 3 (the draws are deterministic for sequential requests) none does.
    s3_proxy.reseed(3)
    s3 = s3_client(s3_proxy.endpoint_url)
    prefix = uuid.uuid4().hex
    for i in range(20):
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{i}", Body=b"audio")
    faults = s3_proxy.faults()["503"]
    assert faults > 0 and s3_proxy.counts() == {"PUT": 20 + faults}
    listed = s3_client(s3_server.endpoint_url).list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    assert listed["KeyCount"] == 20


def test_s3_dropped_connection(s3_server: StorageServer, s3_proxy: StorageProxy, key: str) -> None:
    s3_proxy.drop_fraction = 1.0
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        s3_client(s3_proxy.endpoint_url, NO_RETRIES).put_object(Bucket=BUCKET, Key=key, Body=b"audio")
    assert s3_proxy.faults() == {"drop": 1}
    with pytest.raises(ClientError, match="404"):
        s3_client(s3_server.endpoint_url).head_object(Bucket=BUCKET, Key=key)


def test_gcs_injected_503_is_json(gcs_proxy: StorageProxy, key: str) -> None:
    from google.api_core.exceptions import ServiceUnavailable
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=GCS_PROJECT,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_proxy.endpoint_url},
    )
    gcs_proxy.fail_fraction = 1.0
    with pytest.raises(ServiceUnavailable, match="injected"):
        client.bucket(BUCKET).blob(key).upload_from_string(b"audio", retry=None)
    assert gcs_proxy.faults() == {"503": 1}
    gcs_proxy.fail_fraction = 0.0
    assert client.bucket(BUCKET).get_blob(key) is None


def test_chunked_request_bodies_on_one_connection(s3_proxy: StorageProxy, key: str) -> None:
    """Unsigned chunked PUTs from a raw client (moto doesn't check signatures on PUT), then boto3."""
    conn = http.client.HTTPConnection("127.0.0.1", int(s3_proxy.endpoint_url.rsplit(":", 1)[1]), timeout=10)
    try:
        for name in (key, key + ".2"):
            conn.request("PUT", f"/{BUCKET}/{name}", body=iter([b"chunk-one,", b"chunk-two"]), encode_chunked=True)
            response = conn.getresponse()
            assert response.status == 200, response.read()
            response.read()
    finally:
        conn.close()
    s3 = s3_client(s3_proxy.endpoint_url)
    for name in (key, key + ".2"):
        assert s3.get_object(Bucket=BUCKET, Key=name)["Body"].read() == b"chunk-one,chunk-two"
    assert s3_proxy.counts() == {"PUT": 2, "GET": 2}
    assert s3_proxy.connections() == 2, "one for the raw client, one kept alive by boto3"
