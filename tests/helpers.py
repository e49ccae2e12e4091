"""What the test modules share: running the pipeline (in this process, or as `python -m pipeline` in a child),
manifests and tables, environments, ports.

Most builds run in this process (`run_pipeline`): a child costs seconds of interpreter and Beam start-up per
run, and the servers the tests count calls on already run here. A few tests start a real child
(`run_cli`): exit codes and messages of the command line itself, SIGKILL, runners that start worker
processes. Both return a `Result` with the child's names (returncode, stdout, stderr), so the assertions
read the same.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

REPO = Path(__file__).resolve().parents[1]
# A child's timeout is below pytest's (pytest.ini: timeout = 300), so a stuck child fails its test with
# the child's output rather than pytest's stack dump; the same for a run in a thread (`Started.wait`).
CHILD_TIMEOUT_S = 240


# -- environments ----------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SONIOX_* setting, with this checkout first on PYTHONPATH (so a
    child imports the code under test, whatever its working directory), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SONIOX_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextlib.contextmanager
def environment(extra: dict[str, str] | None = None) -> Iterator[None]:
    """os.environ as a child started with `child_env(**extra)` would see it, for the duration of the block."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("SONIOX_")]:
            del os.environ[name]
        os.environ.update(extra or {})
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def free_port() -> int:
    """A free TCP port on loopback (for a server that must come up later on a port known now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- running the pipeline -------------------------------------------------------------------------------


@dataclass
class Result:
    """How a `python -m pipeline ...` ended: its exit code and what it printed (log lines on stderr)."""

    returncode: int
    stdout: str
    stderr: str
    args: list[str]


def explain(proc: Result | subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def expect_exit(proc: Result | subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, explain(proc)


def run_argv(server_or_host: Any, manifest: str | Path, output: str | Path, *flags: str) -> list[str]:
    """`run`'s arguments: the manifest, the output and the server (a LocalServer or an address), then `flags`."""
    host = getattr(server_or_host, "address", server_or_host)
    return [f"--manifest={manifest}", f"--output={output}", f"--api_host={host}", *map(str, flags)]


def run_cli(
    *argv: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = CHILD_TIMEOUT_S
) -> Result:
    """`python -m pipeline *argv` in a child, in `child_env()` (or `env`); waits for it."""
    args = [sys.executable, "-m", "pipeline", *argv]
    proc = subprocess.run(args, env=env or child_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return Result(proc.returncode, proc.stdout, proc.stderr, args)


def start_cli(*argv: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """`python -m pipeline *argv` in a child that the caller waits for (or kills)."""
    args = [sys.executable, "-m", "pipeline", *argv]
    return subprocess.Popen(args, env=env or child_env(), cwd=REPO, **popen)


class _LogText(logging.Handler):
    """The log lines a child would print on stderr (the CLI's format), into a buffer."""

    def __init__(self, buffer: io.StringIO):
        from pipeline.cli import LOG_FORMAT

        super().__init__()
        self.buffer = buffer
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("pipeline.local."):  # the test's own server would log in another process
            self.buffer.write(self.format(record) + "\n")


def _forget_process_caches() -> list:
    """After an in-process run, empty what a child's exit would: the one per-process cache, the object-storage
    clients (a later test may point the same settings at another emulator), and any fetch client and pool the
    run's steps left (the last step's teardown should have closed them). Returns what the steps left, closed
    here so that a later run starts clean whatever this one did."""
    from pipeline import fetch, storage

    with storage._clients_lock:
        storage._clients.clear()
    with fetch._in_use_lock:
        left = dict(fetch._in_use)
        fetch._in_use.clear()
    for resources in left.values():
        resources.close()
    return list(left)


@contextlib.contextmanager
def _process_state(left_behind: list) -> Iterator[None]:
    """Put back what `python -m pipeline` sets for its whole process: logging levels, handlers and filters,
    Beam's global filesystem options; and empty the caches the run filled (what its fetch steps left goes
    into `left_behind`)."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.value_provider import RuntimeValueProvider

    root, own = logging.getLogger(), logging.getLogger("pipeline")
    saved_logging = root.level, list(root.handlers), list(root.filters), own.level
    saved_fs = FileSystems._pipeline_options, RuntimeValueProvider.runtime_options
    try:
        yield
    finally:
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        root.filters[:] = saved_logging[2]
        own.setLevel(saved_logging[3])
        FileSystems._pipeline_options, RuntimeValueProvider.runtime_options = saved_fs
        left_behind += _forget_process_caches()


def run_pipeline(*argv: str, env: dict[str, str] | None = None) -> Result:
    """`python -m pipeline *argv`, in this process: its exit code, what it printed, and its log lines as a
    child's stderr would hold them. `env` is set (and SONIOX_* cleared) for the run only, as for a child."""
    from pipeline.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    handler = _LogText(err)
    code: int | str | None = 0
    left: list = []  # fetch clients and pools the run's steps left behind
    with _process_state(left), environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        logging.getLogger().addHandler(handler)
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code
        finally:
            logging.getLogger().removeHandler(handler)
    if code is None:  # sys.exit() exits 0
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") prints it and exits 1
        err.write(f"{code}\n")
        code = 1
    result = Result(code, out.getvalue(), err.getvalue(), ["pipeline", *argv])
    assert not left, f"the run left fetch clients and pools behind: {left}\n{explain(result)}"
    return result


class Started:
    """A `run_pipeline` in a thread of this process, for tests that act while it runs (each is waited for at
    the end of its test: `finish_started_runs`)."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None):
        self.result: Result | None = None
        self._error: BaseException | None = None
        self._waited = False
        self._thread = threading.Thread(target=self._run, args=(argv, env), name="pipeline-run", daemon=True)
        _started.append(self)
        self._thread.start()

    def _run(self, argv, env) -> None:
        try:
            self.result = run_pipeline(*argv, env=env)
        except BaseException as e:
            self._error = e

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float = CHILD_TIMEOUT_S) -> Result:
        self._waited = True
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the run did not end within {timeout} s"
        if self._error is not None:
            raise self._error
        return self.result


_started: list[Started] = []


def finish_started_runs() -> None:
    """At a test's end, wait for the runs it started in threads: a run still going would swap this process's
    environment, output and logging back in the middle of a later test. An error nobody waited for fails."""
    runs, _started[:] = list(_started), []
    for run in runs:
        run._thread.join(CHILD_TIMEOUT_S)
        assert not run._thread.is_alive(), f"a run the test started did not end within {CHILD_TIMEOUT_S} s"
        if run._error is not None and not run._waited:
            raise run._error


# -- manifests and tables -------------------------------------------------------------------------------


def write_manifest(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None, **kw: Any) -> str:
    """`rows` as a Parquet manifest at `path` (with `schema`, or the one pyarrow infers); the path.
    `kw` goes to pq.write_table (e.g. row_group_size)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kw)
    return str(path)


def table_files(output: str | Path, name: str) -> list[str]:
    """The files of table `name` (clips or errors) under a local output."""
    return sorted(glob.glob(os.path.join(str(output), "metadata", f"{name}-*.parquet")))


def read_table(output: str | Path, name: str) -> pa.Table:
    """Table `name` (clips or errors) of a local output, all its files."""
    files = table_files(output, name)
    assert files, f"no {name} table under {output}/metadata"
    return pa.concat_tables(pq.read_table(f) for f in files)


def recorded_table(output: str | Path, record: dict[str, Any], name: str) -> pa.Table:
    """Table `name` as the run record lists it: its files' names, relative to the dataset's root."""
    return pa.concat_tables(pq.read_table(os.path.join(str(output), file)) for file in record[f"{name}_table"])


_bucket_io: dict[tuple[str, int], tuple[PipelineOptions, object]] = {}


def _bucket_client(scheme: str):
    """Beam's S3IO or GcsIO for this process's FileSystems options, made once: FileSystems.open builds a new
    boto3 or GCS client (a new session, its service model loaded again) for every file it opens."""
    options = FileSystems._pipeline_options
    key = (scheme, id(options))
    if key not in _bucket_io:
        if scheme == "s3":
            from apache_beam.io.aws.s3io import S3IO

            _bucket_io[key] = (options, S3IO(options=options))  # the options kept alive: their id is the key
        else:
            from apache_beam.io.gcp.gcsio import GcsIO

            _bucket_io[key] = (options, GcsIO(pipeline_options=options))
    return _bucket_io[key][1]


def read_bytes(path: str) -> bytes:
    """A file's bytes, on any filesystem (a bucket's with the FileSystems options this process has set)."""
    scheme = path.split("://", 1)[0] if "://" in path else ""
    if scheme in ("s3", "gs"):
        with _bucket_client(scheme).open(path) as f:
            return f.read()
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read()


def read_table_file(path: str) -> pa.Table:
    """One table file, on any filesystem."""
    return pq.read_table(io.BytesIO(read_bytes(path)))
