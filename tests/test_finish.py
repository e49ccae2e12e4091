"""The job's last steps: the card and `_RUN.json` are written by the job itself (a launcher that does not
wait still gets them), the tables' files are exactly this run's, and the numbers add up on every runner here."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.dataset.record import now
from pipeline.dataset.storage import StoreSettings
from pipeline.graph.build import build
from pipeline.graph.finish import RunInfo
from pipeline.launch import manifest as mf
from pipeline.launch.options import ClipOptions
from pipeline.launch.run import fetch_settings
from pipeline.local.server import LocalServer
from tests.helpers import (
    Result,
    check_clips_table,
    child_env,
    expect_exit,
    local_files,
    recorded_table,
    run_argv,
    run_build,
    run_cli,
    write_local_manifest,
)


def rows(n: int) -> list[dict]:
    return [
        {"clip_id": f"c{i:03d}", "object_id": "demo-mono", "start_ms": 100 * i % 11_000, "duration_ms": 300}
        for i in range(n)
    ] + [{"clip_id": "gone", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 100}]


def test_the_job_writes_its_own_card_and_record(server, store, tmp_path: Path) -> None:
    """The graph alone, run with no launcher code after it (as a detached Dataflow job or a Flex Template
    launch would be): the card, the record and both tables are there, and the numbers add up."""
    manifest = mf.inspect_manifest(write_local_manifest(tmp_path / "m.parquet", rows(12)))
    out = str(tmp_path / "out")
    options = PipelineOptions([f"--manifest={manifest.files[0]}", f"--output={out}", f"--api_host={server.address}"])
    settings = fetch_settings(options.view_as(ClipOptions), manifest, StoreSettings())
    info = RunInfo(out, StoreSettings(), now(), time.time(), manifest.files, {"note": "test"})
    p = beam.Pipeline(options=options)
    build(p, settings, manifest, info)
    p.run().wait_until_finish()

    record = json.loads(Path(out, "_RUN.json").read_text())
    assert (record["rows"], record["clips"], record["errors"]) == (13, 12, 1)
    assert record["errors_by_code"] == {"NOT_FOUND": 1} and record["options"] == {"note": "test"}
    clips = recorded_table(out, record, "clips").to_pylist()
    assert len(clips) == 12
    check_clips_table(clips, store, out)
    assert record["bytes"] == sum(c["num_bytes"] for c in clips)
    assert record["audio_seconds"] == sum(c["clip_duration_ms"] for c in clips) / 1000
    card = Path(out, "README.md").read_text()
    assert "- Clips: 12 (12 written" in card and "| NOT_FOUND | 1 |" in card and "- Distinct objects: 1" in card
    assert not os.path.exists(os.path.join(out, "_tmp"))
    # The kernel's file clock ticks every few ms, so files written in one tick share a time: no file may be newer.
    mtimes = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in local_files(out)}
    newer = [name for name, mtime in mtimes.items() if mtime > mtimes["_RUN.json"]]
    assert newer == [], "the record must be the last file written"


def test_each_table_is_exactly_this_runs_files(make_server, store, tmp_path: Path) -> None:
    """A rerun replaces the tables' files (an earlier run's, and a file no committed bundle wrote, as a
    retried bundle leaves, are removed); files are named for their content; a table with no rows gets one
    empty file with its columns."""
    server = make_server()
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(20)[:-1])  # no row fails
    out = tmp_path / "out"
    expect_exit(run_build(server, manifest, str(out)), 0)
    first = json.loads((out / "_RUN.json").read_text())
    abandoned = out / "metadata" / "clips-0123456789abcdef.parquet"
    abandoned.write_bytes(b"PAR1 a retried bundle's file")
    expect_exit(run_build(server, manifest, str(out), "--skip_existing"), 0)
    record = json.loads((out / "_RUN.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in (out / "metadata").iterdir())
    assert files == sorted(record["clips_table"] + record["errors_table"])
    assert not set(files) & set(first["clips_table"]) and not abandoned.exists()  # the clips changed: attempts 0
    assert record["errors_table"] == first["errors_table"]  # the same (empty) content, so the same name
    for name in files:  # each file is named for its content: a retried bundle rewrites, never adds
        content = (out / name).read_bytes()
        assert Path(name).name.split("-")[1] == hashlib.sha256(content).hexdigest()[:16] + ".parquet"
    clips = recorded_table(out, record, "clips").to_pylist()
    assert sorted(c["clip_id"] for c in clips) == [f"c{i:03d}" for i in range(20)]
    assert all(c["attempts"] == 0 for c in clips)
    errors = recorded_table(out, record, "errors")
    assert errors.num_rows == 0 and "error_code" in errors.schema.names


@pytest.mark.latest
def test_a_plain_run_never_tries_prism(server, tmp_path: Path, monkeypatch) -> None:
    """Beam's DirectRunner first tries to download and run Prism when the machine is online; a plain run
    uses the in-process runner the tests use, online or not: Prism is never asked, and the record says so."""
    from apache_beam.runners.portability import prism_runner

    from pipeline.launch.run import run

    def refuse(*args, **kwargs):
        raise AssertionError("a plain run tried the Prism runner")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    monkeypatch.setenv("SONIOX_API_KEY", "any")  # the local server takes any key
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(3))
    out = str(tmp_path / "out")
    flags = [f"--manifest={manifest}", f"--output={out}", f"--api_host={server.address}", "--max_error_ratio=1"]
    summary, _ = run(flags)
    assert (summary.rows, summary.clips) == (4, 3)
    assert json.loads(Path(out, "_RUN.json").read_text())["options"]["runner"] == "FnApiRunner"


SPY = """
import os

from pipeline.graph import read

_process = read.ReadManifestRows.process


def process(self, piece):
    with open(os.environ["ROW_GROUP_SPY"], "a") as f:
        f.write(f"{os.getpid()} {piece.row_group}\\n")
    yield from _process(self, piece)


read.ReadManifestRows.process = process
"""


@dataclass
class MultiProcessingRun:
    server: LocalServer
    out: Path
    proc: Result
    spy_log: Path


@pytest.fixture(scope="module")
def multi_processing_run(store_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiProcessingRun]:
    """One `python -m pipeline run` in a child with Beam's DirectRunner and two worker processes, over a one-file
    manifest of 9 row groups (one row fails), shared by the tests below. A sitecustomize module in the workers'
    path records which process read which row group."""
    tmp_path = tmp_path_factory.mktemp("multi-processing")
    spy_dir, spy_log = tmp_path / "spy", tmp_path / "spy.log"
    spy_dir.mkdir()
    (spy_dir / "sitecustomize.py").write_text(SPY)
    path = tmp_path / "m.parquet"
    write_local_manifest(path, rows(40))
    pq.write_table(pq.read_table(path), path, row_group_size=5)  # 9 row groups
    out = tmp_path / "out"
    flags = ["--direct_running_mode=multi_processing", "--direct_num_workers=2", "--max_error_ratio=1"]
    env = child_env(ROW_GROUP_SPY=str(spy_log))
    env["PYTHONPATH"] = os.pathsep.join([str(spy_dir), env["PYTHONPATH"]])
    with LocalServer(store_dir) as server:
        proc = run_cli("run", *run_argv(server, path, out, *flags), env=env)
        yield MultiProcessingRun(server, out, proc, spy_log)


@pytest.mark.latest
def test_multi_processing_runner(multi_processing_run: MultiProcessingRun, store) -> None:
    """Beam's DirectRunner with two worker processes: a one-file manifest in many row groups, and the run's
    numbers (combined across the processes) agree with the tables."""
    run = multi_processing_run
    expect_exit(run.proc, 0)
    record = json.loads((run.out / "_RUN.json").read_text())
    assert (record["rows"], record["clips"], record["errors"]) == (41, 40, 1)
    clips = recorded_table(run.out, record, "clips").to_pylist()
    check_clips_table(clips, store, run.out)
    assert "2 process(es) x --max_in_flight 64 = 128 streams" in run.proc.stderr


def test_a_one_file_manifest_is_read_by_more_than_one_worker(multi_processing_run: MultiProcessingRun) -> None:
    """Two worker processes, one manifest file of 9 row groups: the row groups are spread before they are
    read, so both processes read some."""
    run = multi_processing_run
    expect_exit(run.proc, 0)
    assert run.server.calls, "nothing was fetched"
    reads = [line.split() for line in run.spy_log.read_text().splitlines()]
    readers = {pid for pid, _ in reads}
    groups = sorted(int(group) for _, group in reads)
    assert groups == sorted(list(range(9)) * 2), groups  # each row group read twice: clip IDs, then requests
    assert len(readers) >= 2, f"every row group was read by one process: {readers}"


@pytest.mark.latest
def test_portable_runner_with_an_external_worker_pool(make_server, store, worker_pool, tmp_path: Path) -> None:
    """The portable runner (an embedded job service) with an external SDK worker pool, as Dataflow and other
    portable runners run workers: the key comes from --api_key_file, and the clips, tables, card and record
    are the job's own."""
    server = make_server(api_key="pool-key")
    key_file = tmp_path / "key"
    key_file.write_text("pool-key")
    manifest = write_local_manifest(tmp_path / "m.parquet", rows(6))
    out = tmp_path / "out"
    flags = [*worker_pool, f"--api_key_file={key_file}", "--max_error_ratio=1"]
    expect_exit(run_cli("run", *run_argv(server, manifest, out, *flags), env=child_env(SONIOX_API_KEY="")), 0)
    record = json.loads((out / "_RUN.json").read_text())
    assert (record["rows"], record["clips"], record["errors_by_code"]) == (7, 6, {"NOT_FOUND": 1})
    check_clips_table(recorded_table(out, record, "clips").to_pylist(), store, out)
