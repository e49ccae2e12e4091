"""What a launch does before any work: a dry run on every local runner mode, --detach where a runner cannot
detach, and a service that cannot be reached at all, each told in one line before anything is written."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.launch.checks import stream_bound
from pipeline.local.server import LocalServer
from pipeline.local.storage_servers import free_port
from tests.helpers import child_env, demo_manifest, expect_exit, explain, one_error, run_argv, run_cli, tree

# The runner modes that run on this machine: Beam's in-process runner (one process, or several), and the
# portable runner with an external SDK worker pool, as Dataflow runs workers.
IN_PROCESS = []
MULTI_PROCESSING = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def dry_run(server: LocalServer, manifest: str, out: Path, *flags: str, dry: str = "--dry_run"):
    """A dry run with the key in a file (the portable runner's workers do not see SONIOX_API_KEY)."""
    key_file = out.parent / "key"
    key_file.write_text("any")
    argv = run_argv(server, manifest, out, f"--api_key_file={key_file}", *flags, dry)
    return run_cli("run", *argv)


@pytest.mark.parametrize("mode", ["in_process", "multi_processing", "portable"])
def test_a_dry_run_calls_and_writes_nothing(mode, server, worker_pool, tmp_path) -> None:
    """On each local runner mode, over a new output and over an existing dataset: zero GetAudio calls, the
    output tree identical (names, sizes, mtimes), and the line that says so; exit 0."""
    flags = {"in_process": IN_PROCESS, "multi_processing": MULTI_PROCESSING, "portable": worker_pool}[mode]
    manifest = demo_manifest(tmp_path / "m.parquet", 6)
    out = tmp_path / "out"
    done = dry_run(server, manifest, out, *flags)
    expect_exit(done, 0)
    assert "nothing was fetched, written or deleted" in done.stdout and "6 rows" in done.stdout
    assert not out.exists() and not server.calls
    expect_exit(run_cli("run", *run_argv(server, manifest, out)), 0)  # a real dataset, then a dry run over it
    before, calls = tree(out), sum(server.calls.values())
    assert "_RUN.json" in before and calls == 6
    time.sleep(0.05)  # a write in the dry run would show a later mtime
    for mode in ("--skip_existing", "--append", "--overwrite"):  # each builds its own graph over the dataset
        expect_exit(dry_run(server, manifest, out, *flags, mode), 0)
    assert tree(out) == before and sum(server.calls.values()) == calls


def test_dry_run_takes_a_value_and_is_in_the_help(server, tmp_path) -> None:
    """`--dry_run=false` is a real run (Beam's own flag took any string as true); --help lists --dry_run."""
    manifest = demo_manifest(tmp_path / "m.parquet", 2)
    done = dry_run(server, manifest, tmp_path / "out", dry="--dry_run=false")
    expect_exit(done, 0)
    assert sum(server.calls.values()) == 2 and (tmp_path / "out" / "_RUN.json").exists()
    assert "--dry_run" in run_cli("run", "--help").stdout


@pytest.mark.parametrize(
    "flags",
    [[], MULTI_PROCESSING, ["--runner=DirectRunner"], ["--runner=PortableRunner", "--job_endpoint=embed"]],
)
def test_detach_is_refused_where_the_runner_cannot_detach(flags, server, tmp_path) -> None:
    """The in-process runners would wait for the whole job and then say "submitted" (exit 0 whatever failed)."""
    manifest = demo_manifest(tmp_path / "m.parquet", 2)
    done = run_cli("run", *run_argv(server, manifest, tmp_path / "out", "--detach", *flags))
    expect_exit(done, 2)
    assert done.stderr.startswith("error: --detach needs a runner that runs the job elsewhere"), explain(done)
    assert not server.calls and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tls_port(tmp_path_factory) -> Iterator[int]:
    """A gRPC server that speaks only TLS (a self-signed certificate), on a loopback port."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", folder / "key.pem", "-out", folder / "cert.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pair = ((folder / "key.pem").read_bytes(), (folder / "cert.pem").read_bytes())
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    yield port
    server.stop(0)


@pytest.mark.parametrize(
    "mistake, expected",
    [
        ("no scheme", "does not speak TLS; for a plaintext server write --api_host http://127.0.0.1:"),
        ("nothing listens", "connection refused: nothing listens at 127.0.0.1:"),
        ("no such host", "the host name of no-such-host.invalid:443 cannot be resolved"),
        ("plaintext to TLS", "closed a plaintext connection; for a server that speaks TLS write --api_host https://"),
    ],
)
def test_a_service_that_cannot_be_reached_stops_the_launch(mistake, expected, server, tls_port, tmp_path) -> None:
    """Exit 2 in under 5 s, one line naming the cause and the fix, no call and no output; before, each row was
    tried --max_attempts times and the summary said only UNAVAILABLE."""
    host = {
        "no scheme": server.address.removeprefix("http://"),
        "nothing listens": f"http://127.0.0.1:{free_port()}",
        "no such host": "https://no-such-host.invalid:443",
        "plaintext to TLS": f"http://127.0.0.1:{tls_port}",
    }[mistake]
    manifest = demo_manifest(tmp_path / "m.parquet", 9)
    started = time.monotonic()
    done = run_cli("run", *run_argv(host, manifest, tmp_path / "out"), env=child_env(SONIOX_API_KEY="any"))
    launch_s = time.monotonic() - started
    expect_exit(done, 2)
    assert expected in one_error(done.stderr), explain(done)
    assert not server.calls and not (tmp_path / "out").exists()
    assert launch_s < 5, f"the launch took {launch_s:.1f} s to give up"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--machine_type=e2-medium", "--max_num_workers=3"], "3 worker(s) x 2 process(es) (e2-medium)"),
        (["--machine_type=n2-custom-8-32768", "--num_workers=2"], "= 1024 streams at most"),
        (["--machine_type=n2-standard-4"], "times the runner's worker count, which this launch does not know"),
        (["--machine_type=a2-highgpu-1g", "--max_num_workers=2"], "times a2-highgpu-1g's vCPUs"),
    ],
)
def test_the_stream_bound_of_a_cluster_job(flags, expected) -> None:
    """What the launch log says a Dataflow job can open at once; it crashed on e2-medium, and with no worker
    count it claimed one worker."""
    options = PipelineOptions(["--runner=DataflowRunner", *flags])
    assert expected in stream_bound(options, 64)


def test_a_file_uri_output_is_the_plain_path(server, tmp_path) -> None:
    """`--output file:///abs/out` builds the dataset at /abs/out: before, the clips, tables and record went under
    `$PWD/file:/abs/out` while the summary named /abs/out, where only an empty `_tmp/` was."""
    manifest = demo_manifest(tmp_path / "m.parquet", 2)
    (tmp_path / "cwd").mkdir()
    done = run_cli("run", *run_argv(server, manifest, f"file://{tmp_path}/out"), cwd=tmp_path / "cwd")
    expect_exit(done, 0)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "README.md",
        "_RUN.json",
        "clips",
        "duration_histogram.png",
        "metadata",
    ]
    assert len(os.listdir(tmp_path / "out" / "clips")) == 2 and not os.listdir(tmp_path / "cwd")
    assert f"{tmp_path}/out/metadata/clips-*.parquet" in done.stdout


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A read-only tmpfs (root ignores file modes, so a chmod would not do)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", folder], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", folder], check=True)


@pytest.mark.parametrize("case", ["read-only", "_tmp is a file", "metadata is a file", "output is a file"])
def test_a_local_output_that_cannot_be_written_stops_the_launch(case, server, tmp_path, request) -> None:
    """Found at launch (exit 2, one line naming the output), not after every clip was fetched."""
    out = tmp_path / "out"
    if case == "read-only":
        out = request.getfixturevalue("read_only_folder") / "out"
    elif case == "output is a file":
        out.write_text("")
    else:
        out.mkdir()
        (out / case.split()[0]).write_text("")
    manifest = demo_manifest(tmp_path / "m.parquet", 2)
    done = run_cli("run", *run_argv(server, manifest, out))
    expect_exit(done, 2)
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --output {out}: "), explain(done)
    assert "Traceback" not in done.stderr and not server.calls


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_a_missing_bucket_stops_the_launch(kind, server, s3_server, gcs_server, tmp_path) -> None:
    storage = s3_server if kind == "s3" else gcs_server
    out = storage.bucket_url.replace("test-bucket", "no-such-bucket") + "out"
    manifest = demo_manifest(tmp_path / "m.parquet", 2)
    done = run_cli("run", *run_argv(server, manifest, out, *storage.flags), env=child_env(**storage.env))
    expect_exit(done, 2)
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --output {out}: "), explain(done)
    assert "Traceback" not in done.stderr and not server.calls


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_refused_storage_credentials_stop_the_launch(kind, server, s3_server, gcs_server, tmp_path) -> None:
    """Every storage request answered 403 (as for wrong credentials): exit 2 naming the output, no call; before,
    a traceback and exit 3."""
    from pipeline.local.storage_proxy import KINDS, StorageProxy

    storage = s3_server if kind == "s3" else gcs_server
    with StorageProxy(storage.endpoint_url) as proxy:
        proxy.fail_kinds, proxy.fail_status, proxy.fail_fraction = KINDS, 403, 1.0
        if kind == "s3":
            flags, env = [f"--s3_endpoint_url={proxy.endpoint_url}", *storage.flags[1:]], storage.env
        else:
            flags, env = [], {**storage.env, "STORAGE_EMULATOR_HOST": proxy.endpoint_url}
        out = f"{storage.bucket_url}refused"
        manifest = demo_manifest(tmp_path / "m.parquet", 2)
        done = run_cli("run", *run_argv(server, manifest, out, *flags), env=child_env(**env))
    expect_exit(done, 2)
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --output {out}: "), explain(done)
    assert "Traceback" not in done.stderr and not server.calls
