"""Session-scoped pytest fixtures for the loopback storage servers in `tests.storage_servers`.

Import them into a test module or a conftest (`from tests.storage_fixtures import s3_server,
gcs_server  # noqa: F401`). Each server starts once per session, on first use.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.local.storage_servers import StorageServer, start_gcs_server, start_s3_server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[StorageServer]:
    """moto S3 with bucket `test-bucket`. Beam needs only `s3_server.flags`, so the AWS_* variables
    in `s3_server.env` are not exported here (they would redirect unrelated boto3 clients)."""
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[StorageServer]:
    """gcp-storage-emulator with bucket `test-bucket`. Its `env` is exported to this process for the
    whole session, because google-cloud-storage and google-auth read it from os.environ."""
    server = start_gcs_server()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()
