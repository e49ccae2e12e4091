"""Shared fixtures: the sample store, local GetAudio servers and the loopback storage servers (moto S3, the GCS
emulator; each started once per session, on first use)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pipeline.local.samples import write_sample_store
from pipeline.local.server import Faults, LocalServer, ServerSettings
from pipeline.local.storage_servers import StorageServer, free_port, start_gcs_server, start_s3_server
from tests.helpers import child_env, finish_started_runs


@pytest.fixture(autouse=True)
def _runs_end_with_their_test():
    """No pipeline run a test started in a thread outlives the test."""
    yield
    finish_started_runs()


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> dict[str, str]:
    """The sample store: object_id -> audio file path (its folder is `store_dir`)."""
    return write_sample_store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="session")
def store_dir(store) -> str:
    return os.path.dirname(next(iter(store.values())))


@pytest.fixture
def make_server(store_dir):
    """Start a LocalServer with the given settings/faults; all are stopped after the test."""
    servers = []

    def start(faults: Faults | None = None, **settings) -> LocalServer:
        server = LocalServer(store_dir, ServerSettings(faults=faults or Faults(), **settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
def server(make_server) -> LocalServer:
    return make_server()


@pytest.fixture
def worker_pool() -> Iterator[list[str]]:
    """An external SDK worker pool; the portable runner's flags that use it."""
    port = free_port()
    env = child_env(PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    pool = subprocess.Popen(
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield [
            "--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{port}",
        ]  # fmt: skip
    finally:
        pool.kill()
        pool.wait()


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
