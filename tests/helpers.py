"""What the test modules share: running the pipeline (in this process, or as `python -m pipeline` in a child),
manifests, outputs and their tables, the sample store's audio, environments.

The one helper module: a test module imports its helpers from here (and the loopback servers from
pipeline/local/, which benchmarks share), never from another test module or from conftest.py, whose fixtures
pytest injects by name.

Most builds run in this process (`run_pipeline`): a child costs seconds of interpreter and Beam start-up per
run, and the servers the tests count calls on already run here. A few tests start a real child
(`run_cli`): exit codes and messages of the command line itself, SIGKILL, runners that start worker
processes. Both return a `Result` with the child's names (returncode, stdout, stderr), so the assertions
read the same.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import __version__
from pipeline.core.audio import SAMPLE_RATE, parse_wav_header
from pipeline.core.elements import segment_tag
from pipeline.core.ids import derive_clip_id
from pipeline.core.messages import TimeRange, TokenRange
from pipeline.graph.beam_internals import filesystem_options
from pipeline.local.server import LocalServer

REPO = Path(__file__).resolve().parents[1]
# A child's timeout is below pytest's (pytest.ini: timeout = 300), so a stuck child fails its test with
# the child's output rather than pytest's stack dump; the same for a run in a thread (`Started.wait`).
CHILD_TIMEOUT_S = 240

# object_id -> duration in ms, channels: the sample store's 16 kHz objects (pipeline.local.samples) ...
OBJECTS = {"demo-mono": (12_000, 1), "demo-stereo": (9_000, 2), "demo-flac-3ch": (5_000, 3)}
# ... and all of them: demo-44k-notokens is stored at 44.1 kHz (the server resamples it) with no transcript
ALL_OBJECTS = {**OBJECTS, "demo-44k-notokens": (4_000, 1)}


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


def one_error(stderr: str) -> str:
    """The command's one `error: ...` line, with no traceback around it."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


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
        from pipeline.launch.cli import LOG_FORMAT

        super().__init__()
        self.buffer = buffer
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("pipeline.local."):  # the test's own server would log in another process
            self.buffer.write(self.format(record) + "\n")


def _forget_process_caches() -> None:
    """After an in-process run, empty what a child's exit would: the one per-process cache, the object-storage
    clients (a later test may point the same settings at another emulator)."""
    from pipeline.dataset import storage

    storage.clear_clients()


@contextlib.contextmanager
def _process_state() -> Iterator[None]:
    """Put back what `python -m pipeline` sets for its whole process (logging levels, handlers and filters: a
    command-line program configures its process's logging), and empty the caches the run filled. The run itself
    puts back Beam's process-wide options (tests/test_beam_internals.py checks it)."""
    root, own = logging.getLogger(), logging.getLogger("pipeline")
    saved_logging = root.level, list(root.handlers), list(root.filters), own.level
    try:
        yield
    finally:
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
        root.filters[:] = saved_logging[2]
        own.setLevel(saved_logging[3])
        _forget_process_caches()


def run_pipeline(*argv: str, env: dict[str, str] | None = None) -> Result:
    """`python -m pipeline *argv`, in this process: its exit code, what it printed, and its log lines as a
    child's stderr would hold them. `env` is set (and SONIOX_* cleared) for the run only, as for a child."""
    from pipeline.__main__ import main
    from pipeline.graph.fetch import held

    out, err = io.StringIO(), io.StringIO()
    handler = _LogText(err)
    code: int | str | None = 0
    with _process_state(), environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
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
    assert held() == 0, f"the run's fetch steps left {held()} client(s) and pool(s) open\n{explain(result)}"
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

    def finish(self) -> None:
        """At its test's end: wait for it, unless the test did (then it has ended), raising its error."""
        if not self._waited:
            self.wait()


_started: list[Started] = []


def finish_started_runs() -> None:
    """At a test's end, wait for the runs it started in threads: a run still going would swap this process's
    environment, output and logging back in the middle of a later test. An error nobody waited for fails."""
    runs, _started[:] = list(_started), []
    for run in runs:
        run.finish()


# -- builds over a LocalServer --------------------------------------------------------------------------


def run_build(
    server: LocalServer | str,
    manifest: str | Path,
    output: str | Path,
    *flags: str,
    env: dict[str, str] | None = None,
) -> Result:
    """`python -m pipeline run` over `manifest` into `output` against `server` (or an address), in this process
    (`env` set for the run only, SONIOX_* cleared)."""
    return run_pipeline("run", *run_argv(server, manifest, output, *flags), env=env)


def run(server: LocalServer | str, manifest: str | Path, out: str | Path, *flags: str) -> dict[str, dict[str, Any]]:
    """A build that must succeed, in this process; its clips table by object_id:clip_id."""
    expect_exit(run_build(server, manifest, out, *flags), 0)
    return {r["object_id"] + ":" + r["clip_id"]: r for r in read_table(out, "clips").to_pylist()}


def build(make_server: Callable[[], LocalServer], tmp_path: Path, name: str, *flags: str) -> str:
    """A dataset of ROWS built with `flags`, copied to `{name}-copy` with the original deleted: the copy's path
    (a dataset must not depend on the folder it was built in)."""
    manifest = tmp_path / f"{name}.parquet"
    schema = SCHEMA.append(pa.field("language", pa.string())).append(pa.field("speaker", pa.string()))
    pq.write_table(pa.Table.from_pylist(ROWS, schema), manifest)
    original = tmp_path / name
    run(make_server(), manifest, original, "--max_error_ratio=0.5", *flags)
    copy = tmp_path / f"{name}-copy"
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    return str(copy)


def total_calls(server: LocalServer) -> int:
    return sum(server.calls.values())


def summary_numbers(stdout: str) -> dict[str, int]:
    """rows in / clips / errors (and written / already there) from the printed summary."""

    def number(pattern: str) -> int:
        match = re.search(pattern, stdout, re.MULTILINE)
        assert match, f"no {pattern!r} in the summary:\n{stdout}"
        return int(match.group(1).replace(",", ""))

    return {
        "rows": number(r"^rows in\s+([\d,]+)\s*$"),
        "clips": number(r"^clips\s+([\d,]+)\b"),
        "written": number(r"^clips\s+.*?([\d,]+) written"),
        "already": number(r"^clips\s+.*?([\d,]+) already there"),
        "errors": number(r"^errors\s+([\d,]+)\s*$"),
    }


# -- manifests ------------------------------------------------------------------------------------------


def write_manifest(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None, **kw: Any) -> str:
    """`rows` as a Parquet manifest at `path` (with `schema`, or the one pyarrow infers); the path.
    `kw` goes to pq.write_table (e.g. row_group_size)."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, **kw)
    return str(path)


SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("object_id", pa.string()),
        ("start_ms", pa.int32()),
        ("duration_ms", pa.int32()),
        ("token_start", pa.int32()),
        ("token_end", pa.int32()),
    ]
)

ROWS = [  # `build`'s manifest, with a trainer's columns: `language` on most rows, `speaker` on one
    {"clip_id": "mono-time", "object_id": "demo-mono", "start_ms": 1000, "duration_ms": 2500, "language": "en"},
    {"clip_id": "mono-silence", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 250},  # before any word
    {"clip_id": "stereo-time", "object_id": "demo-stereo", "start_ms": 2222, "duration_ms": 1111, "language": "de"},
    {"clip_id": "three-tokens", "object_id": "demo-flac-3ch", "token_start": 0, "token_end": 3, "speaker": "ann"},
    {"clip_id": "untranscribed", "object_id": "demo-44k-notokens", "start_ms": 500, "duration_ms": 1000},
    {"clip_id": None, "object_id": "demo-stereo", "start_ms": 0, "duration_ms": 700},
    {"clip_id": "missing", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 700},
]


def manifest_table(rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    """A manifest with clip_id, object_id, both range pairs (nullable) and `extra` pass-through columns."""
    fields = [
        ("clip_id", pa.string()),
        ("object_id", pa.string()),
        ("start_ms", pa.int64()),
        ("duration_ms", pa.int64()),
        ("token_start", pa.int64()),
        ("token_end", pa.int64()),
        *(extra or {}).items(),
    ]
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def write_local_manifest(path: Path, rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None) -> str:
    pq.write_table(manifest_table(rows, extra), path)
    return str(path)


def time_rows(
    n: int, prefix: str = "c", first: int = 0, objects: tuple[str, ...] = tuple(OBJECTS), duration_ms: int = 250
) -> list[dict[str, Any]]:
    """`n` time-range rows over `objects`, clip_ids `{prefix}{i:03d}` for i from `first`."""
    rows = []
    for i in range(first, first + n):
        object_id = objects[i % len(objects)]
        start = (i * 211) % (OBJECTS[object_id][0] - duration_ms)
        rows.append(
            {"clip_id": f"{prefix}{i:03d}", "object_id": object_id, "start_ms": start, "duration_ms": duration_ms}
        )
    return rows


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(r["clip_id"] for r in rows)


_DEMO_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("object_id", pa.string()), ("start_ms", pa.int64()), ("duration_ms", pa.int64())]
)


def demo_manifest(path: Path, rows: int = 2, missing: int = 0) -> str:
    """`rows` clips of demo-mono, then `missing` rows naming an object the store does not have."""
    object_ids = ["demo-mono"] * rows + ["no-such-object"] * missing
    manifest_rows = [
        {"clip_id": f"c{i}", "object_id": object_id, "start_ms": 300 * i, "duration_ms": 250}
        for i, object_id in enumerate(object_ids)
    ]
    return write_manifest(path, manifest_rows, _DEMO_SCHEMA)


_FAULT_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("object_id", pa.string()), ("start_ms", pa.int32()), ("duration_ms", pa.int32())]
)


def fault_manifest(path: str | Path, n: int, duration_ms: int = 300) -> list[dict[str, Any]]:
    """n time-range rows spread over the sample objects, each with its own clip_id, written to `path`."""
    rows = []
    for i in range(n):
        object_id = list(OBJECTS)[i % len(OBJECTS)]
        start = (i * 37) % (OBJECTS[object_id][0] - duration_ms)
        rows.append({"clip_id": f"c{i:05d}", "object_id": object_id, "start_ms": start, "duration_ms": duration_ms})
    write_manifest(path, rows, _FAULT_SCHEMA)
    return rows


UNREADABLE = (OSError, pa.ArrowException)  # what pyarrow raises for garbled pages or footers


def garble(path: str, names: set[str] | None = None, groups: set[int] | None = None) -> None:
    """Overwrite the middle of the pages of columns `names` (None: all) in row groups `groups` (None: all),
    leaving the footer (the schema, the row counts) intact; check that those pages are really unreadable."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(Path(path).read_bytes())
    for g in range(meta.num_row_groups) if groups is None else groups:
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            if names is None or chunk.path_in_schema in names:
                start = chunk.dictionary_page_offset or chunk.data_page_offset
                size = chunk.total_compressed_size
                data[start + size // 4 : start + size - size // 4] = b"\xa5" * (size - 2 * (size // 4))
    Path(path).write_bytes(bytes(data))
    parquet = pq.ParquetFile(path)
    for g in range(meta.num_row_groups) if groups is None else groups:
        with pytest.raises(UNREADABLE):
            parquet.read_row_group(g, columns=None if names is None else list(names))


# -- outputs: their tables, record and files ------------------------------------------------------------


def table_files(output: str | Path, name: str) -> list[str]:
    """The files of table `name` (clips or errors) under an output, on any filesystem."""
    (found,) = FileSystems.match([FileSystems.join(str(output), "metadata", f"{name}-*.parquet")])
    return sorted(m.path for m in found.metadata_list)


def read_table(output: str | Path, name: str) -> pa.Table:
    """Table `name` (clips or errors) of an output, all its files, on any filesystem."""
    files = table_files(output, name)
    assert files, f"no {name} table under {output}/metadata"
    return pa.concat_tables(read_table_file(f) for f in files)


def clips_table(output: str | Path) -> pa.Table:
    return read_table(output, "clips")


def errors_table(output: str | Path) -> pa.Table:
    return read_table(output, "errors")


def rows_of(output: str | Path, name: str) -> list[dict[str, Any]]:
    return read_table(output, name).to_pylist()


def recorded_table(output: str | Path, record: dict[str, Any], name: str) -> pa.Table:
    """Table `name` as the run record lists it: its files' names, relative to the dataset's root."""
    return pa.concat_tables(pq.read_table(os.path.join(str(output), file)) for file in record[f"{name}_table"])


RECORD_KEYS = {
    "started_at",
    "finished_at",
    "rows",
    "clips",
    "errors",
    "errors_by_code",
    "bytes",
    "audio_seconds",
    "options",
    "version",
}


def run_record(output: str | Path) -> dict[str, Any]:
    """`_RUN.json` of an output (on any filesystem) as a user reads it: the derived numbers (clips, errors)
    included."""
    return json.loads(read_bytes(FileSystems.join(str(output), "_RUN.json")))


def check_record_adds_up(record: dict[str, Any], rows: int) -> None:
    assert set(record) >= RECORD_KEYS, f"missing keys: {RECORD_KEYS - set(record)}"
    assert record["rows"] == rows
    assert record["rows"] == record["clips"] + record["errors"]
    assert record["errors"] == sum(record["errors_by_code"].values())
    assert record["version"] == __version__
    started = datetime.fromisoformat(record["started_at"])
    finished = datetime.fromisoformat(record["finished_at"])
    assert started <= finished


CARD = ("README.md", "duration_histogram.png")  # the dataset card, written before the record
TABLES = ("metadata/clips-*.parquet", "metadata/errors-*.parquet")  # a table's files, as `as_globs` shows them


def as_globs(names: Iterable[str]) -> list[str]:
    """Names under an output, each table file shown as its table's glob (its id differs on every run)."""
    return [re.sub(r"^(metadata/(?:clips|errors))-[0-9a-f]{16}\.parquet$", r"\1-*.parquet", n) for n in names]


def local_files(root: str | Path) -> set[str]:
    """Every file under `root`, as a path relative to it."""
    return {
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, files in os.walk(root) for f in files
    }


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` with its size and mtime: what "nothing written or deleted" compares."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            found[os.path.relpath(path, root)] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return found


# -- clips and the sample store's audio -----------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _samples(path: str, mtime_ns: int) -> np.ndarray:
    audio, rate = sf.read(path, dtype="int16", always_2d=True)
    assert rate == SAMPLE_RATE
    audio.flags.writeable = False  # shared by every caller
    return audio


def source_audio(path: str) -> np.ndarray:
    """A 16 kHz object's samples, as (frames, channels) int16: read once while the file is unchanged (the
    tests compare many clips with the same few objects)."""
    return _samples(str(path), os.stat(path).st_mtime_ns)


def source_frames(path: str, start_ms: int, duration_ms: int) -> np.ndarray:
    """The store's samples for a time range, as (frames, channels) int16."""
    return source_audio(path)[start_ms * 16 : (start_ms + duration_ms) * 16]


def sidecar_tokens(store: dict[str, str], object_id: str) -> list[dict[str, Any]]:
    """The object's transcript tokens, as its sidecar lists them."""
    with open(os.path.splitext(store[object_id])[0] + ".json", encoding="utf-8") as f:
        return json.load(f)["tokens"]


def segment_of(row: dict[str, Any]) -> TimeRange | TokenRange:
    if row.get("start_ms") is not None:
        return TimeRange(row["start_ms"], row["duration_ms"])
    return TokenRange(row["token_start"], row["token_end"])


def served_range(
    store: dict[str, str], object_id: str, segment: TimeRange | TokenRange, pad_ms: int
) -> tuple[int, int]:
    """(start_ms, duration_ms) the server serves: a time range as asked, a token range from the sidecar."""
    if isinstance(segment, TimeRange):
        return segment.start_ms, segment.duration_ms
    tokens = sidecar_tokens(store, object_id)
    first, last = tokens[segment.token_start], tokens[segment.token_end - 1]
    start = max(0, first["start_ms"] - pad_ms)
    stop = min(ALL_OBJECTS[object_id][0], last["start_ms"] + last["duration_ms"] + pad_ms)
    return start, stop - start


def check_clip(data: bytes, store: dict[str, str], object_id: str, start_ms: int, duration_ms: int) -> None:
    """The WAV bytes are a complete 16 kHz clip, sample-identical to the store's object over the range."""
    header = parse_wav_header(data[:4096])
    assert header is not None and header.sample_rate == SAMPLE_RATE
    assert len(data) == header.data_offset + header.data_bytes, "file size disagrees with its header"
    audio, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert rate == SAMPLE_RATE
    expected = source_frames(store[object_id], start_ms, duration_ms)
    assert audio.shape == expected.shape, f"{object_id} {start_ms}+{duration_ms}: {audio.shape} != {expected.shape}"
    assert np.array_equal(audio, expected), f"{object_id} {start_ms}+{duration_ms}: samples differ"


def clip_bytes(root: str | Path, row: dict[str, Any]) -> bytes:
    """A clips-table row's audio file: the file at its `path`, or (a sharded dataset) its `member` in that tar
    or the `audio` bytes of its row in that Parquet shard."""
    data = read_bytes(f"{str(root).rstrip('/')}/{row['path']}")
    if not row.get("member"):
        return data
    if row["path"].endswith(".parquet"):
        shard = pq.read_table(io.BytesIO(data), columns=["member", "audio"]).to_pylist()
        (audio,) = [r["audio"] for r in shard if r["member"] == row["member"]]
        assert audio["path"] == row["member"]
        return audio["bytes"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile(row["member"]).read()


def check_clips_table(rows: list[dict[str, Any]], store: dict[str, str], root: str | Path) -> None:
    """Every row's file (its `path` relative to the dataset's root) is complete, matches its row (size, hash,
    frames) and the source audio."""
    for row in rows:
        assert "://" not in row["path"] and not row["path"].startswith("/"), row["path"]
        data = clip_bytes(root, row)
        assert len(data) == row["num_bytes"], row["clip_id"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"], row["clip_id"]
        assert row["sample_rate"] == SAMPLE_RATE
        assert row["num_samples"] == row["clip_duration_ms"] * 16
        assert row["num_channels"] == OBJECTS[row["object_id"]][1]
        check_clip(data, store, row["object_id"], row["clip_start_ms"], row["clip_duration_ms"])


def check_clip_row(out: Path, clip: dict[str, Any], row: dict[str, Any], store: dict[str, str], pad_ms: int) -> None:
    """One clips-table row against its manifest row, its file and the source audio."""
    object_id, segment = row["object_id"], segment_of(row)
    object_ms, channels = ALL_OBJECTS[object_id]
    clip_id = row.get("clip_id") or derive_clip_id(object_id, segment_tag(segment))
    assert clip["clip_id"] == clip_id and clip["object_id"] == object_id
    path = out / "clips" / f"{clip_id}.wav"
    assert clip["path"] == f"clips/{clip_id}.wav" and path.is_file()
    data = path.read_bytes()
    assert clip["num_bytes"] == len(data)
    assert clip["sha256"] == hashlib.sha256(data).hexdigest()
    info = sf.info(str(path))
    assert (info.samplerate, info.subtype, info.channels) == (16_000, "PCM_16", channels), info
    audio, _ = sf.read(str(path), dtype="int16", always_2d=True)
    start_ms, duration_ms = served_range(store, object_id, segment, pad_ms)
    assert (clip["clip_start_ms"], clip["clip_duration_ms"]) == (start_ms, duration_ms), clip_id
    assert clip["object_duration_ms"] == object_ms
    assert (clip["num_channels"], clip["sample_rate"]) == (channels, 16_000)
    assert clip["num_samples"] == len(audio) == duration_ms * 16
    if object_id in OBJECTS:
        check_clip(data, store, object_id, start_ms, duration_ms)
    else:  # resampled by the server: no 16 kHz source to compare with
        assert np.abs(audio.astype(np.int32)).max() > 1000, "resampled clip is silent"
    comment = json.loads(sf.SoundFile(str(path)).comment)  # the clip describes itself (for --skip_existing)
    assert (comment["clip_start_ms"], comment["clip_duration_ms"]) == (start_ms, duration_ms)


def assert_clips_match_source(
    output: str | Path, rows: list[dict[str, Any]], store: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """The clips the table lists for `rows` (time ranges) are the source's samples; those clips by clip_id."""
    clips = {r["clip_id"]: r for r in rows_of(output, "clips")}
    for row in rows:
        if row["clip_id"] not in clips:
            continue
        audio, rate = sf.read(os.path.join(output, clips[row["clip_id"]]["path"]), dtype="int16", always_2d=True)
        expected = source_frames(store[row["object_id"]], row["start_ms"], row["duration_ms"])
        assert rate == 16_000 and np.array_equal(audio, expected), row["clip_id"]
    return clips


# -- reading any filesystem -----------------------------------------------------------------------------


_bucket_io: dict[tuple[str, int], tuple[PipelineOptions, object]] = {}


def _bucket_client(scheme: str):
    """Beam's S3IO or GcsIO for this process's FileSystems options, made once: FileSystems.open builds a new
    boto3 or GCS client (a new session, its service model loaded again) for every file it opens."""
    options = filesystem_options()
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
