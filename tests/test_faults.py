"""Reliability: the pipeline under injected faults, permanent errors, a server that comes and goes, and load."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Iterator

import apache_beam as beam
import grpc
import pytest
from apache_beam.io.components.adaptive_throttler import ThrottlingSignaler
from apache_beam.metrics.metric import MetricsFilter

from pipeline.core.elements import ClipRequest
from pipeline.core.messages import GetAudioError, TimeRange
from pipeline.graph import fetch
from pipeline.graph.settings import ClientSettings, FetchSettings
from pipeline.local.server import Faults, LocalServer, ServerSettings
from pipeline.local.storage_servers import free_port
from pipeline.service.client import GetAudioClient, RetryPolicy
from pipeline.service.throttle import AdaptiveThrottler
from tests.helpers import (
    Started,
    assert_clips_match_source,
    explain,
    fault_manifest,
    rows_of,
    run_argv,
    run_build,
    run_cli,
)


def start(manifest, output, api_host, *flags) -> Started:
    """`python -m pipeline run`, in a thread of this process, for a test that changes the server meanwhile."""
    return Started("run", *run_argv(api_host, manifest, output, *flags))


@pytest.fixture
def retried_attempts() -> Iterator[list[str]]:
    """The status code of every failed GetAudio or GetObject attempt that this process's clients retry, as it
    happens: read from the client's log record of each retry (its `status`), as `--log_level DEBUG` shows it."""
    seen: list[str] = []

    class Retries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "status"):
                seen.append(record.status)

    handler = Retries(logging.DEBUG)
    client_log = logging.getLogger("pipeline.service.client")
    level = client_log.level
    client_log.setLevel(logging.DEBUG)  # the run sets the level of "pipeline", its parent, only
    client_log.addHandler(handler)
    try:
        yield seen
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(level)


def wait_until(condition, what: str, timeout_s: float = 60, started: Started | None = None) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`, or as soon as the `started` run has ended."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert started is None or started.running(), f"the run ended before {what}: {explain(started.wait())}"
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.02)


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
    rows = fault_manifest(tmp_path / "m.parquet", 120, duration_ms=700)
    out = tmp_path / "out"
    done = run_build(server.address, tmp_path / "m.parquet", out, "--rpc_timeout_s=1", "--max_attempts=12")
    assert done.returncode == 0, explain(done)
    clips = assert_clips_match_source(out, rows, store)
    assert len(clips) == len(rows) and rows_of(out, "errors") == []
    record = json.loads((out / "_RUN.json").read_text())
    failed = record["failed_attempts_by_code"]
    assert record["retries"] > 0 and record["retries"] == sum(c["attempts"] - 1 for c in clips.values())
    assert {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"} <= set(failed), failed
    assert server.servicer.outcomes["BROKEN"] > 0
    assert sum(server.calls.values()) == sum(c["attempts"] for c in clips.values())


def test_time_held_back_reaches_beams_throttling_counter(make_server, tmp_path):
    """Under RESOURCE_EXHAUSTED the seconds that calls spend held back or backing off go to Beam's
    `cumulativeThrottlingSeconds` counter (what Dataflow's autoscaler reads); without pushback it stays 0."""
    fault_manifest(tmp_path / "m.parquet", 40)
    seconds = {}
    for fraction in (0.0, 0.6):
        server = make_server(Faults(throttle_fraction=fraction, seed=3))
        out = tmp_path / f"out-{fraction}"
        done = run_build(server.address, tmp_path / "m.parquet", out, "--max_attempts=20", "--max_error_ratio=1")
        assert done.returncode == 0, explain(done)
        record = json.loads((out / "_RUN.json").read_text())
        assert record["clips"] == 40, record
        seconds[fraction] = record["throttled_seconds"]
    assert seconds[0.0] == 0 and seconds[0.6] >= 1, seconds


@dataclasses.dataclass(frozen=True)
class SteadyBackoff(RetryPolicy):
    """The same backoff after every failure: one long, known wait to watch."""

    def backoff(self, attempt: int) -> float:
        return self.backoff_base_s


def steady_backoff_client(settings: ClientSettings) -> GetAudioClient:
    retry = SteadyBackoff(max_attempts=settings.max_attempts, backoff_base_s=3.0, min_budget_s=0.0)
    return GetAudioClient(settings.api_host, retry=retry, rpc_timeout_s=settings.rpc_timeout_s)


def test_the_throttling_counter_moves_while_a_call_backs_off(make_server, tmp_path, monkeypatch):
    """Issue 23, case 11: Beam's throttling counter moved only when a clip ended, so an autoscaler saw nothing of a
    long backoff until it was over. One call, failed once, backs off 3 s: the counter grows before its retry."""
    server = make_server(Faults(fail_fraction=1.0))
    signalled: list[tuple[int, int]] = []  # (seconds, GetAudio attempts the server had seen by then)
    signal = ThrottlingSignaler.signal_throttled

    def watch(self, seconds: int) -> None:
        signalled.append((seconds, sum(server.calls.values())))
        signal(self, seconds)

    monkeypatch.setattr(ThrottlingSignaler, "signal_throttled", watch)
    client = ClientSettings(server.address, None, max_attempts=2, rpc_timeout_s=5)
    settings = FetchSettings(str(tmp_path), client, "pcm_s16le", max_in_flight=4)
    request = ClipRequest("c", "demo-mono", TimeRange(0, 200), {}, source="m.parquet, row c")
    p = beam.Pipeline(runner="FnApiRunner")
    _ = p | beam.Create([request]) | beam.ParDo(fetch.FetchClips(settings, steady_backoff_client))
    result = p.run()
    result.wait_until_finish()
    assert server.calls["demo-mono"] == 2
    assert [calls for _, calls in signalled][:1] == [1], signalled  # signalled before the retry was made
    counters = result.metrics().query(MetricsFilter().with_name("cumulativeThrottlingSeconds"))["counters"]
    assert sum(c.committed for c in counters) == sum(s for s, _ in signalled) >= 3, (counters, signalled)


@pytest.mark.parametrize("code", ["NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED"])
def test_permanent_errors_are_tried_exactly_once(make_server, tmp_path, code):
    server = make_server(Faults(fail_fraction=1.0, fail_code=grpc.StatusCode[code]))
    rows = fault_manifest(tmp_path / "m.parquet", 6)
    out = tmp_path / "out"
    done = run_build(server.address, tmp_path / "m.parquet", out, "--max_error_ratio=1")
    assert done.returncode == 0, explain(done)
    errors = rows_of(out, "errors")
    assert sorted(e["clip_id"] for e in errors) == [r["clip_id"] for r in rows]
    assert {(e["error_code"], e["attempts"]) for e in errors} == {(code, 1)}
    assert sum(server.calls.values()) == len(rows)


def test_a_server_gone_after_the_key_check_that_comes_back_in_time(store_dir, store, tmp_path, retried_attempts):
    """The launch's key check reaches the server (a launch that reaches nobody stops with exit 2:
    tests/test_launch.py); it is gone before the first GetAudio call and back within the retry budget."""
    port = free_port()
    rows = fault_manifest(tmp_path / "m.parquet", 20)
    out = tmp_path / "out"
    server = LocalServer(store_dir, ServerSettings(faults=Faults(latency_s=0.5)), port=port).start()
    started = start(tmp_path / "m.parquet", out, server.address, "--max_attempts=10")
    wait_until(lambda: server.servicer.object_calls, "the key check", started=started)
    server.stop()
    wait_until(lambda: len(retried_attempts) >= 1, "the run's first calls failed", started=started)
    with LocalServer(store_dir, ServerSettings(), port=port):
        done = started.wait()
    assert done.returncode == 0, explain(done)
    assert len(assert_clips_match_source(out, rows, store)) == len(rows)
    record = json.loads((out / "_RUN.json").read_text())
    assert record["failed_attempts_by_code"].get("UNAVAILABLE", 0) >= 1, record  # the server was absent
    assert record["clips"] == len(rows) and record["retries"] >= 1


def test_a_server_gone_mid_run_and_back_damages_nothing(store_dir, store, tmp_path, retried_attempts):
    port = free_port()
    settings = ServerSettings(faults=Faults(latency_s=0.15))
    rows = fault_manifest(tmp_path / "m.parquet", 80)
    out = tmp_path / "out"
    server = LocalServer(store_dir, settings, port=port).start()
    started = start(tmp_path / "m.parquet", out, server.address, "--max_in_flight=4", "--max_attempts=10")
    clips_dir = out / "clips"
    wait_until(
        lambda: clips_dir.exists() and len(list(clips_dir.glob("*.wav"))) >= 10, "10 clips", 120, started=started
    )
    failed = len(retried_attempts)
    server.stop()  # gone mid-run: calls in flight break, new ones find nobody
    wait_until(lambda: len(retried_attempts) > failed, "a call failed with the server gone", started=started)
    with LocalServer(store_dir, ServerSettings(), port=port):
        done = started.wait()
    errors = rows_of(out, "errors") if (out / "metadata").exists() else []
    assert done.returncode == 0, (explain(done), errors[:5])
    assert len(assert_clips_match_source(out, rows, store)) == len(rows), (errors[:5], retried_attempts)
    assert not list(clips_dir.glob("*[!v]")), "only finished .wav clips at final paths"
    record = json.loads((out / "_RUN.json").read_text())
    assert sum(record["failed_attempts_by_code"].values()) >= 1, record  # the server was gone for a while


@pytest.mark.parametrize("round_", [1, 2, 3])
def test_a_two_second_restart_loses_no_row_at_the_defaults(store_dir, store, tmp_path, retried_attempts, round_):
    """Issue 23, case 7: a server stopped for 2 s mid-run and started on the same port cost 7, 0 and 2 of 120 rows
    (UNAVAILABLE: the 6 attempts were spent while the channel reconnected). At the default retry settings, three
    runs in a row now lose nothing."""
    port = free_port()
    rows = fault_manifest(tmp_path / "m.parquet", 120)
    out = tmp_path / "out"
    server = LocalServer(store_dir, ServerSettings(faults=Faults(latency_s=1.0)), port=port).start()
    started = start(tmp_path / "m.parquet", out, server.address)  # --max_attempts and the backoff as shipped
    clips_dir = out / "clips"
    wait_until(
        lambda: clips_dir.exists() and len(list(clips_dir.glob("*.wav"))) >= 10, "10 clips", 120, started=started
    )
    failed = len(retried_attempts)
    stopped = time.monotonic()
    server.stop()  # calls in flight break, new ones find nobody
    wait_until(lambda: len(retried_attempts) > failed, "a call failed with the server gone", started=started)
    time.sleep(max(0.0, 2.0 - (time.monotonic() - stopped)))
    with LocalServer(store_dir, ServerSettings(), port=port):
        done = started.wait()
    errors = rows_of(out, "errors") if (out / "metadata").exists() else []
    assert done.returncode == 0 and errors == [], (explain(done), [(e["clip_id"], e["error_code"]) for e in errors])
    assert len(assert_clips_match_source(out, rows, store)) == len(rows)
    assert {"UNAVAILABLE", "CANCELLED"} & set(retried_attempts[failed:]), retried_attempts  # the server was gone


def test_a_service_that_answers_the_key_check_then_fails_every_call_ends_with_errors(make_server, tmp_path):
    """Every GetAudio call UNAVAILABLE (the launch's GetObject answered, so the run started): each row is tried
    --max_attempts times and ends in the errors table. (A service not reachable at all stops the launch:
    tests/test_launch.py.)"""
    server = make_server(Faults(fail_fraction=1.0, fail_code=grpc.StatusCode.UNAVAILABLE))
    rows = fault_manifest(tmp_path / "m.parquet", 5)
    out = tmp_path / "out"
    done = run_build(server.address, tmp_path / "m.parquet", out, "--max_attempts=3")
    assert done.returncode == 1, explain(done)  # every row failed: over --max_error_ratio
    errors = rows_of(out, "errors")
    assert sorted(e["clip_id"] for e in errors) == [r["clip_id"] for r in rows]
    assert {(e["error_code"], e["attempts"]) for e in errors} == {("UNAVAILABLE", 3)}


# -- load -------------------------------------------------------------------------------------------------


def test_twenty_thousand_rows_with_faults_lose_nothing(make_server, tmp_path):
    server = make_server(Faults(fail_fraction=0.05, break_fraction=0.05, throttle_fraction=0.05, seed=11))
    n = 20_000
    fault_manifest(tmp_path / "m.parquet", n, duration_ms=100)
    out = tmp_path / "out"
    # A child: under load, the pipeline and the server each get a process (and a GIL) of their own.
    done = run_cli("run", *run_argv(server, tmp_path / "m.parquet", out, "--max_attempts=8"))
    assert done.returncode == 0, explain(done)
    clips, errors = rows_of(out, "clips"), rows_of(out, "errors")
    assert len(clips) + len(errors) == n
    ids = [c["clip_id"] for c in clips] + [e["clip_id"] for e in errors]
    assert len(set(ids)) == n, "a row appears twice"
    assert len(list((out / "clips").iterdir())) == len(clips)
    record = json.loads((out / "_RUN.json").read_text())
    assert record["rows"] == n and record["clips"] + record["errors"] == n
