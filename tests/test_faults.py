"""Reliability: the pipeline under injected faults, permanent errors, a server that comes and goes, and load."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.client import GetAudioClient, RetryPolicy
from pipeline.local.server import Faults, LocalServer, ServerSettings
from pipeline.messages import GetAudioError, TimeRange
from pipeline.throttle import AdaptiveThrottler
from tests.conftest import source_frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OBJECTS = {"demo-mono": 12_000, "demo-stereo": 9_000, "demo-flac-3ch": 5_000}


def write_manifest(path, n: int, duration_ms: int = 300) -> list[dict]:
    """n time-range rows spread over the sample objects, each with its own clip_id."""
    rows = []
    for i in range(n):
        object_id = list(OBJECTS)[i % len(OBJECTS)]
        start = (i * 37) % (OBJECTS[object_id] - duration_ms)
        rows.append({"clip_id": f"c{i:05d}", "object_id": object_id, "start_ms": start, "duration_ms": duration_ms})
    schema = pa.schema(
        [("clip_id", pa.string()), ("object_id", pa.string()), ("start_ms", pa.int32()), ("duration_ms", pa.int32())]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema), path)
    return rows


def run_cli(manifest, output, api_host, *flags, timeout=600, wait=True):
    cmd = [sys.executable, "-m", "pipeline", "run", f"--manifest={manifest}", f"--output={output}"]
    cmd += [f"--api_host={api_host}", *flags]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_table(output, name):
    files = sorted(glob.glob(os.path.join(output, "metadata", f"{name}-*.parquet")))
    return pq.read_table(files).to_pylist()


def assert_clips_match_source(output, rows, store):
    clips = {r["clip_id"]: r for r in read_table(output, "clips")}
    for row in rows:
        if row["clip_id"] not in clips:
            continue
        audio, rate = sf.read(os.path.join(output, clips[row["clip_id"]]["path"]), dtype="int16", always_2d=True)
        expected = source_frames(store[row["object_id"]], row["start_ms"], row["duration_ms"])
        assert rate == 16_000 and np.array_equal(audio, expected), row["clip_id"]
    return clips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the client's backoff ---------------------------------------------------------------------------------


def test_throttler_holds_back_while_rejected_and_recovers():
    t = AdaptiveThrottler(window_s=60)
    assert t.reject_probability() == 0
    for _ in range(50):
        t.rejected()
    assert t.reject_probability() > 0.9
    for _ in range(100):
        t.accepted()
    assert t.reject_probability() == 0


def _hammer(client: GetAudioClient, seconds: float, threads: int = 8) -> None:
    """Many application calls (one attempt each), as a pipeline with many rows makes them."""
    end = time.monotonic() + seconds

    def loop():
        while time.monotonic() < end:
            with contextlib.suppress(GetAudioError):
                client.get_audio("demo-mono", TimeRange(0, 100), _NullSink())

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


class _NullSink:
    def begin(self, info):
        pass

    def write(self, pcm):
        pass


def test_call_rate_drops_while_the_server_pushes_back(make_server):
    """Under RESOURCE_EXHAUSTED the adaptive throttler holds calls back: far fewer reach the server than
    from the same client with throttling switched off, and calls flow again once the server accepts."""
    server = make_server(Faults(throttle_fraction=1.0))
    retry = RetryPolicy(max_attempts=1, backoff_base_s=0.05)
    unthrottled = GetAudioClient(server.address, retry=retry)
    unthrottled.throttler.should_hold = lambda: False  # the baseline: a client that never holds back
    _hammer(unthrottled, 1.0)
    baseline = server.calls["demo-mono"]

    throttled = GetAudioClient(server.address, retry=retry)
    _hammer(throttled, 1.0)
    assert server.calls["demo-mono"] - baseline < baseline / 5

    server.settings.faults.throttle_fraction = 0.0
    for _ in range(40):  # the server accepts again: held calls go through and the throttle opens
        with contextlib.suppress(GetAudioError):
            throttled.get_audio("demo-mono", TimeRange(0, 100), _NullSink())
    assert throttled.throttler.reject_probability() < 0.5


# -- the pipeline under faults ----------------------------------------------------------------------------


def test_every_clip_completes_under_the_fault_mix(make_server, store, tmp_path):
    """20% UNAVAILABLE, 10% broken mid-stream, 10% RESOURCE_EXHAUSTED, 5% slower than the deadline."""
    server = make_server(
        Faults(fail_fraction=0.2, break_fraction=0.1, throttle_fraction=0.1, slow_fraction=0.05, slow_s=5, seed=7),
        chunk_bytes=4000,  # several chunks per clip, so broken streams are resumed part-way
    )
    rows = write_manifest(tmp_path / "m.parquet", 120, duration_ms=700)
    out = tmp_path / "out"
    done = run_cli(tmp_path / "m.parquet", out, server.address, "--rpc_timeout_s=1", "--max_attempts=12")
    assert done.returncode == 0, done.stderr
    clips = assert_clips_match_source(out, rows, store)
    assert len(clips) == len(rows) and read_table(out, "errors") == []
    record = json.loads((out / "_RUN.json").read_text())
    failed = record["failed_attempts_by_code"]
    assert record["retries"] > 0 and record["retries"] == sum(c["attempts"] - 1 for c in clips.values())
    assert {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"} <= set(failed), failed
    assert server.servicer.outcomes["BROKEN"] > 0
    assert sum(server.calls.values()) == sum(c["attempts"] for c in clips.values())


def test_time_held_back_reaches_beams_throttling_counter(make_server, tmp_path):
    """Under RESOURCE_EXHAUSTED the seconds that calls spend held back or backing off go to Beam's
    `cumulativeThrottlingSeconds` counter (what Dataflow's autoscaler reads); without pushback it stays 0."""
    write_manifest(tmp_path / "m.parquet", 40)
    seconds = {}
    for fraction in (0.0, 0.6):
        server = make_server(Faults(throttle_fraction=fraction, seed=3))
        out = tmp_path / f"out-{fraction}"
        done = run_cli(tmp_path / "m.parquet", out, server.address, "--max_attempts=20", "--max_error_ratio=1")
        assert done.returncode == 0, done.stderr
        record = json.loads((out / "_RUN.json").read_text())
        assert record["clips"] == 40, record
        seconds[fraction] = record["throttled_seconds"]
    assert seconds[0.0] == 0 and seconds[0.6] >= 1, seconds


@pytest.mark.parametrize("code", ["NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"])
def test_permanent_errors_are_tried_exactly_once(make_server, tmp_path, code):
    server = make_server(Faults(fail_fraction=1.0, fail_code=grpc.StatusCode[code]))
    rows = write_manifest(tmp_path / "m.parquet", 6)
    out = tmp_path / "out"
    done = run_cli(tmp_path / "m.parquet", out, server.address, "--max_error_ratio=1")
    assert done.returncode == 0, done.stderr
    errors = read_table(out, "errors")
    assert sorted(e["clip_id"] for e in errors) == [r["clip_id"] for r in rows]
    assert {(e["error_code"], e["attempts"]) for e in errors} == {(code, 1)}
    assert sum(server.calls.values()) == len(rows)


def test_a_server_absent_at_start_that_comes_back_in_time(store_dir, store, tmp_path):
    port = free_port()
    rows = write_manifest(tmp_path / "m.parquet", 20)
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "m.parquet", out, f"http://127.0.0.1:{port}", "--max_attempts=10", wait=False)
    time.sleep(5)  # the run has started and its first calls found nobody
    with LocalServer(store_dir, ServerSettings(), port=port):
        _stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert len(assert_clips_match_source(out, rows, store)) == len(rows)


def test_a_server_gone_mid_run_and_back_damages_nothing(store_dir, store, tmp_path):
    port = free_port()
    settings = ServerSettings(faults=Faults(latency_s=0.15))
    rows = write_manifest(tmp_path / "m.parquet", 80)
    out = tmp_path / "out"
    server = LocalServer(store_dir, settings, port=port).start()
    proc = run_cli(tmp_path / "m.parquet", out, server.address, "--max_in_flight=4", "--max_attempts=10", wait=False)
    clips_dir = out / "clips"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(clips_dir.glob("*.wav")) if clips_dir.exists() else []) < 10:
        time.sleep(0.1)
    server.stop()  # gone mid-run: calls in flight break, new ones find nobody
    time.sleep(2)
    with LocalServer(store_dir, ServerSettings(), port=port):
        _stdout, stderr = proc.communicate(timeout=300)
    errors = read_table(out, "errors") if (out / "metadata").exists() else []
    assert proc.returncode == 0, (stderr[-3000:], errors[:5])
    assert len(assert_clips_match_source(out, rows, store)) == len(rows)
    assert not list(clips_dir.glob("*[!v]")), "only finished .wav clips at final paths"


def test_a_server_that_never_comes_back_ends_with_errors(tmp_path):
    rows = write_manifest(tmp_path / "m.parquet", 5)
    out = tmp_path / "out"
    done = run_cli(tmp_path / "m.parquet", out, f"http://127.0.0.1:{free_port()}", "--max_attempts=3", timeout=120)
    assert done.returncode == 1, done.stderr  # every row failed: over --max_error_ratio
    errors = read_table(out, "errors")
    assert sorted(e["clip_id"] for e in errors) == [r["clip_id"] for r in rows]
    assert {(e["error_code"], e["attempts"]) for e in errors} == {("UNAVAILABLE", 3)}


# -- load -------------------------------------------------------------------------------------------------


def test_twenty_thousand_rows_with_faults_lose_nothing(make_server, tmp_path):
    server = make_server(Faults(fail_fraction=0.05, break_fraction=0.05, throttle_fraction=0.05, seed=11))
    n = 20_000
    write_manifest(tmp_path / "m.parquet", n, duration_ms=100)
    out = tmp_path / "out"
    done = run_cli(tmp_path / "m.parquet", out, server.address, "--max_attempts=8", timeout=900)
    assert done.returncode == 0, done.stderr
    clips, errors = read_table(out, "clips"), read_table(out, "errors")
    assert len(clips) + len(errors) == n
    ids = [c["clip_id"] for c in clips] + [e["clip_id"] for e in errors]
    assert len(set(ids)) == n, "a row appears twice"
    assert len(list((out / "clips").iterdir())) == len(clips)
    record = json.loads((out / "_RUN.json").read_text())
    assert record["rows"] == n and record["clips"] + record["errors"] == n
