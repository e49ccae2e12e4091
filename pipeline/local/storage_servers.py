"""Real object-storage servers on loopback for tests and benchmarks: moto (S3) and gcp-storage-emulator (GCS).

A development tool, not the product: moto and the emulator come with the `test` extra (`pip install -e
".[test]"`) and are imported inside the functions that start them, so `import pipeline` never needs them.
Plain functions (no pytest) so that the tests' fixtures, scripts and benchmarks can share them. Each server
comes back as a `StorageServer` that says how to point Beam at it:

* `flags` -- pipeline options, for `PipelineOptions(flags)` / `FileSystems.set_options(...)` or a
  child `python -m ... <flags>`;
* `env` -- environment variables a child process (or, for GCS, this process) needs.

What Beam 2.77 honours (read from its source):

* S3: `S3Options` (`--s3_endpoint_url`, `--s3_access_key_id`, `--s3_secret_access_key`,
  `--s3_region_name`) go straight into `boto3.session.Session().client('s3', ...)`. The flags
  alone are enough; `env` repeats them as AWS_* variables for non-Beam boto3 clients.
* GCS: there is no endpoint pipeline option. `google-cloud-storage` reads STORAGE_EMULATOR_HOST
  itself. Beam always asks `google.auth.default()` for credentials first, retrying 4 times with
  exponential backoff (about 30 s) when there are none, so `env` also points
  GOOGLE_APPLICATION_CREDENTIALS at a fake `authorized_user` file whose access token never
  expires: no refresh, no network, and the emulator ignores the bearer token.
  GOOGLE_CLOUD_PROJECT only silences google-auth's "No project ID" warning. No GCS flags needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
S3_ACCESS_KEY = "testing"
S3_SECRET_KEY = "testing"
S3_REGION = "us-east-1"
GCS_PROJECT = "local-test"


@dataclass(frozen=True)
class StorageServer:
    """A running storage server and the settings that point Beam at it."""

    bucket_url: str
    """`s3://bucket/` or `gs://bucket/`, with the trailing slash."""
    endpoint_url: str
    """`http://127.0.0.1:<port>`."""
    env: dict[str, str]
    """Environment variables a child process needs."""
    flags: list[str]
    """Beam pipeline option flags."""
    _stop: Callable[[], None] = field(repr=False)

    def stop(self) -> None:
        """Shut the server down and remove any files it made."""
        self._stop()


def free_port() -> int:
    """A free TCP port on loopback (for servers that can't report the port they bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def start_s3_server(bucket: str = "test-bucket") -> StorageServer:
    """Start moto's S3 in a thread on a free loopback port and create `bucket`."""
    import boto3
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO, which floods test output once Beam sets up logging.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    ).create_bucket(Bucket=bucket)
    return StorageServer(
        bucket_url=f"s3://{bucket}/",
        endpoint_url=endpoint,
        env={
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_ENDPOINT_URL_S3": endpoint,
        },
        flags=[
            f"--s3_endpoint_url={endpoint}",
            f"--s3_access_key_id={S3_ACCESS_KEY}",
            f"--s3_secret_access_key={S3_SECRET_KEY}",
            f"--s3_region_name={S3_REGION}",
        ],
        _stop=server.stop,
    )


def write_fake_gcp_credentials(directory: str) -> str:
    """Write an ADC file whose token is valid until 2999, so google-auth never refreshes it."""
    path = os.path.join(directory, "fake_adc.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(
            {
                "type": "authorized_user",
                "client_id": "fake",
                "client_secret": "fake",
                "refresh_token": "fake",
                "token": "fake-token",
                "expiry": "2999-01-01T00:00:00Z",
            },
            f,
        )
    return path


def start_gcs_server(bucket: str = "test-bucket") -> StorageServer:
    """Start gcp-storage-emulator in memory, in a thread on a free loopback port, with `bucket`.

    The emulator serves one request at a time and closes each connection, from a socket with
    `http.server`'s listen backlog of 5: under 64 concurrent uploads most connections would be refused
    (a real bucket refuses none) and the clients would spend their time in retry backoff. Its server
    thread is started here with a backlog of 256 instead, so connections wait their turn.
    """
    from functools import partial
    from http.server import HTTPServer

    from gcp_storage_emulator.server import RequestHandler, create_server

    class Backlogged(HTTPServer):
        request_queue_size = 256

    port = free_port()
    server = create_server(LOOPBACK, port, in_memory=True, default_bucket=bucket)
    api = server._api

    def serve() -> None:  # APIThread.run, with the larger backlog
        api._httpd = Backlogged((api._host, api._port), partial(RequestHandler, api._storage))
        api.is_running.set()
        api._httpd.serve_forever()

    api.run = serve
    server.start()
    endpoint = f"http://{LOOPBACK}:{port}"
    tmp = tempfile.mkdtemp(prefix="fake-gcp-adc-")

    def stop() -> None:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    return StorageServer(
        bucket_url=f"gs://{bucket}/",
        endpoint_url=endpoint,
        env={
            "STORAGE_EMULATOR_HOST": endpoint,
            "GOOGLE_APPLICATION_CREDENTIALS": write_fake_gcp_credentials(tmp),
            "GOOGLE_CLOUD_PROJECT": GCS_PROJECT,
        },
        flags=[],  # Beam has no GCS endpoint option; a --project flag is optional.
        _stop=stop,
    )


def gcs_bucket(server: StorageServer, name: str = "test-bucket"):
    """A google-cloud-storage Bucket on `server`, named by its endpoint (not by this process's environment,
    which other tests may point elsewhere)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project=GCS_PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": server.endpoint_url}
    )
    return client.bucket(name)
