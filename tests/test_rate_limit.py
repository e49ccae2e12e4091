"""A job-wide rate limit: with --rate_limit_service every GetAudio call first asks an Envoy rate limit
service (Beam's EnvoyRateLimiter), so the limit holds however many workers the job has; the time calls wait
is reported as throttled."""

from __future__ import annotations

from pathlib import Path

from pipeline.launch.run import run
from pipeline.local.rate_limit_server import RateLimitServer
from pipeline.local.server import Faults
from tests.helpers import write_local_manifest

PER_SECOND = 4


def test_every_call_waits_for_the_rate_limit_service(make_server, tmp_path: Path) -> None:
    server = make_server()
    rows = [
        {"clip_id": f"c{i:02d}", "object_id": "demo-mono", "start_ms": 100 * i, "duration_ms": 200} for i in range(10)
    ]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    with RateLimitServer(PER_SECOND, observe=lambda: sum(server.calls.values())) as limits:
        summary, _ = run(
            [
                f"--manifest={manifest}",
                f"--output={tmp_path / 'out'}",
                f"--api_host={server.address}",
                f"--rate_limit_service={limits.address}",
                "--rate_limit_domain=speech-data",
            ]
        )
    assert summary.clips == 10 and not summary.errors
    calls = sum(server.calls.values())
    assert len(limits.allowed) == calls == 10  # each call was allowed first, and only once
    assert limits.refused > 0  # 64 streams wanted more than 4 a second, and were held back
    # No call started before its go-ahead: at the k-th grant the server had had fewer than k calls.
    assert all(seen < k for k, seen in enumerate(limits.observed, 1)), limits.observed
    assert summary.throttled_seconds >= 1  # the wait counts as throttled (and reaches Beam's throttling counter)
    asked = {(r.domain, e.key, e.value) for r in limits.requests for d in r.descriptors for e in d.entries}
    assert asked == {("speech-data", "method", "GetAudio")}


def test_retries_ask_the_rate_limit_service_too(make_server, tmp_path: Path) -> None:
    """Issue 23, case 11: under a job-wide limit every GetAudio attempt asks first, retries included (on a
    cluster 5,000 go-aheads let 7,183 attempts through). Under 30% RESOURCE_EXHAUSTED, attempts = grants."""
    server = make_server(Faults(throttle_fraction=0.3, seed=5))
    rows = [
        {"clip_id": f"c{i:02d}", "object_id": "demo-mono", "start_ms": 100 * i, "duration_ms": 200} for i in range(24)
    ]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    with RateLimitServer(12, observe=lambda: sum(server.calls.values())) as limits:
        summary, _ = run(
            [
                f"--manifest={manifest}",
                f"--output={tmp_path / 'out'}",
                f"--api_host={server.address}",
                f"--rate_limit_service={limits.address}",
                "--max_error_ratio=1",
            ]
        )
    assert summary.clips + summary.errors == len(rows)
    attempts = sum(server.calls.values())
    assert server.servicer.outcomes["RESOURCE_EXHAUSTED"] > 0  # some attempts were retried
    assert attempts > len(rows) and len(limits.allowed) == attempts
    assert all(seen < k for k, seen in enumerate(limits.observed, 1)), limits.observed  # no attempt before its grant
