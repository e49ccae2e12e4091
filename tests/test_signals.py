"""Ctrl-C, SIGTERM and SIGKILL in the middle of a run: a prompt stop with the shell's exit code, one line that
says what is in place and how to resume, only whole clips at final paths, no scratch left, and a rerun with
--skip_existing that completes the dataset."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.launch.run import GC_THRESHOLD, fewer_collections
from pipeline.local.server import Faults
from tests.helpers import (
    assert_clips_match_source,
    child_env,
    expect_exit,
    explain,
    fault_manifest,
    run_argv,
    run_cli,
    source_frames,
)

ROWS = 2000


def start_run(server, tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, list[dict], Path]:
    """A run of ROWS clips in a child (with its own $TMPDIR), returned once some clips are in place."""
    rows = fault_manifest(tmp_path / "m.parquet", ROWS)
    out, tmpdir = tmp_path / "out", tmp_path / "tmpdir"
    tmpdir.mkdir()
    argv = [sys.executable, "-m", "pipeline", "run", *run_argv(server, tmp_path / "m.parquet", out, *flags)]
    env = child_env(SONIOX_API_KEY="any", TMPDIR=str(tmpdir))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(clip_files(out)) < 50:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    return proc, rows, out


def clip_files(out: Path) -> list[Path]:
    return list((out / "clips").glob("*")) if (out / "clips").is_dir() else []


def assert_files_match_source(files: list[Path], rows: list[dict], store) -> None:
    """Every clip file at a final path is whole and exact, though no table lists it yet."""
    by_id = {r["clip_id"]: r for r in rows}
    for path in files:
        row = by_id[path.stem]
        audio, rate = sf.read(path, dtype="int16", always_2d=True)
        expected = source_frames(store[row["object_id"]], row["start_ms"], row["duration_ms"])
        assert rate == 16_000 and np.array_equal(audio, expected), path.name


def finish_with_skip_existing(server, tmp_path: Path, out: Path, rows: list[dict], store) -> None:
    """The rerun the stop line suggests: it fetches only the rest, and the dataset is complete and exact."""
    before = sum(server.calls.values())
    in_place = len(clip_files(out))
    done = run_cli("run", *run_argv(server, tmp_path / "m.parquet", out, "--skip_existing"))
    expect_exit(done, 0)
    assert sum(server.calls.values()) - before == ROWS - in_place
    assert len(assert_clips_match_source(out, rows, store)) == ROWS
    assert pq.read_table(out / "metadata").num_rows == ROWS


@pytest.mark.parametrize(
    "sig, flags",
    [
        (signal.SIGINT, []),
        (signal.SIGTERM, []),
        (signal.SIGTERM, ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]),
    ],
    ids=["SIGINT", "SIGTERM", "SIGTERM-multi_processing"],
)
def test_a_signal_stops_the_run_and_a_rerun_resumes_it(sig, flags, make_server, store, tmp_path) -> None:
    server = make_server(Faults(latency_s=0.3))
    proc, rows, out = start_run(server, tmp_path, *flags)
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    stop_s = time.monotonic() - sent
    done = f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert proc.returncode == 128 + sig, done
    assert stop_s < 5, f"the run took {stop_s:.1f} s to stop"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {sig.name}: "), done
    assert "Traceback" not in stderr, done
    in_place = clip_files(out)
    counted = re.search(r"\bat least (\d+) clip file\(s\) are in place", last)
    assert counted, last  # a lower bound: a call in flight in the launcher's process may publish after the count
    assert 50 <= int(counted.group(1)) <= len(in_place), (last, len(in_place))
    assert "--skip_existing" in last and len(in_place) < ROWS
    assert sorted(p.name for p in out.iterdir()) == ["clips"], "scratch, tables or a record left at the output"
    assert_files_match_source(in_place, rows, store)
    assert not list((tmp_path / "tmpdir").iterdir()), "the run's temporary folder was left"
    finish_with_skip_existing(server, tmp_path, out, rows, store)


def test_the_next_run_removes_what_a_killed_run_left(make_server, store, tmp_path) -> None:
    """SIGKILL leaves the run's folder in $TMPDIR (named for its process); the next run removes it."""
    server = make_server(Faults(latency_s=0.3))
    proc, rows, out = start_run(server, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    left = [p.name for p in (tmp_path / "tmpdir").iterdir()]
    assert left and all(name.startswith(f"clip-pipeline-{proc.pid}-") for name in left), left
    env = child_env(SONIOX_API_KEY="any", TMPDIR=str(tmp_path / "tmpdir"))
    done = run_cli("run", *run_argv(server, tmp_path / "m.parquet", out, "--skip_existing"), env=env)
    expect_exit(done, 0)
    assert not list((tmp_path / "tmpdir").iterdir()), explain(done)
    assert len(assert_clips_match_source(out, rows, store)) == ROWS
    assert os.path.exists(out / "_RUN.json")


def test_the_stop_line_counts_for_seconds_at_most() -> None:
    """A stopped run lists its clips to count them: over 10M clips on a bucket (10,000 LIST pages) the count
    must give up within its seconds, or the stop would take minutes."""
    from pipeline.launch.run import count_within

    def slow_listing():
        for i in range(1_000_000):
            time.sleep(0.001)
            yield i

    assert count_within(range(3), 1.0) == "at least 3" and count_within([], 1.0) == "at least 0"
    assert count_within(slow_listing(), 0.2).startswith("more than ")  # the whole listing would take 1,000 s


def test_the_collector_runs_less_often_during_a_run_and_as_before_after() -> None:
    """The run's own process tunes Python's collector for the run only: a caller's process is left as it was,
    even when the run fails."""
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), fewer_collections():
        assert gc.get_threshold()[0] == GC_THRESHOLD > before[0]
        raise RuntimeError("the run failed")
    assert gc.get_threshold() == before
