"""The GetAudio client against the local server on loopback: round trips, statuses, faults, secrecy."""

from __future__ import annotations

import logging
import struct
import subprocess
import sys
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from pipeline.core.audio import wav_header
from pipeline.core.messages import BAD_STREAM, GetAudioError, StreamInfo, TimeRange, TokenRange
from pipeline.local.server import AudioStore, Faults, ServerSettings, SpeechServicer
from pipeline.service.api_key import read_api_key
from pipeline.service.client import GetAudioClient, RetryPolicy, resolve_host
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc
from tests.helpers import source_frames

FAST_RETRY = RetryPolicy(max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05, min_budget_s=0)


class CollectSink:
    """Keeps what the client hands over, and checks it gets whole frames only."""

    def __init__(self):
        self.info: StreamInfo | None = None
        self.chunks: list[bytes] = []
        self.begins = 0

    def begin(self, info: StreamInfo) -> None:
        self.info, self.begins = info, self.begins + 1

    def write(self, pcm: bytes) -> None:
        assert len(pcm) % self.info.frame_bytes == 0, "sink got a partial frame"
        self.chunks.append(pcm)

    def frames(self) -> np.ndarray:
        return np.frombuffer(b"".join(self.chunks), np.int16).reshape(-1, self.info.channels)


def fetch(server, object_id, segment, fmt="pcm_s16le", **kw):
    kw.setdefault("retry", FAST_RETRY)
    client = GetAudioClient(kw.pop("api_host", server.address), **kw)
    sink = CollectSink()
    return client.get_audio(object_id, segment, sink, fmt), sink


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le"])
@pytest.mark.parametrize("object_id", ["demo-mono", "demo-stereo", "demo-flac-3ch"])
def test_time_range_is_sample_identical(server, store, fmt, object_id):
    result, sink = fetch(server, object_id, TimeRange(1234, 2001), fmt)
    expected = source_frames(store[object_id], 1234, 2001)
    assert np.array_equal(sink.frames(), expected)
    assert (result.info.start_ms, result.info.duration_ms) == (1234, 2001)
    assert result.num_frames == 2001 * 16 and result.attempts == 1
    assert result.info.channels == expected.shape[1]


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le"])
def test_token_range_covers_tokens_with_padding(make_server, store, fmt):
    server = make_server(token_padding_ms=120)
    tokens = GetAudioClient(server.address).get_object("demo-stereo").tokens
    result, sink = fetch(server, "demo-stereo", TokenRange(2, 5), fmt)
    start = tokens[2].start_ms - 120
    end = tokens[4].start_ms + tokens[4].duration_ms + 120
    assert (result.info.start_ms, result.info.duration_ms) == (start, end - start)
    assert np.array_equal(sink.frames(), source_frames(store["demo-stereo"], start, end - start))


def test_token_range_is_clipped_to_the_object(make_server):
    server = make_server(token_padding_ms=100_000)
    result, _ = fetch(server, "demo-mono", TokenRange(0, 3))
    assert (result.info.start_ms, result.info.duration_ms) == (0, 12_000)


def test_get_object_reports_duration_channels_and_tokens(server):
    obj = GetAudioClient(server.address).get_object("demo-stereo")
    assert (obj.object_id, obj.duration_ms, obj.channels) == ("demo-stereo", 9000, 2)
    assert [t.idx for t in obj.tokens] == list(range(len(obj.tokens)))
    assert obj.tokens[1].text == " " and obj.tokens[0].start_ms == 300


def test_resampled_object_has_16k_duration(server):
    result, sink = fetch(server, "demo-44k-notokens", TimeRange(0, 4000))
    assert result.info.total_duration_ms == 4000 and len(sink.frames()) == 64_000


@pytest.mark.parametrize(
    ("object_id", "segment", "fmt", "code"),
    [
        ("no-such-object", TimeRange(0, 100), "wav", "NOT_FOUND"),
        ("bad/../id", TimeRange(0, 100), "wav", "INVALID_ARGUMENT"),
        ("demo-mono", TimeRange(0, 0), "wav", "INVALID_ARGUMENT"),
        ("demo-mono", TimeRange(0, 100), "mp3", "INVALID_ARGUMENT"),
        ("demo-mono", TokenRange(5, 5), "wav", "INVALID_ARGUMENT"),
        ("demo-mono", TimeRange(11_000, 2000), "wav", "OUT_OF_RANGE"),
        ("demo-mono", TokenRange(0, 10_000), "wav", "OUT_OF_RANGE"),
        ("demo-44k-notokens", TokenRange(0, 1), "wav", "FAILED_PRECONDITION"),
    ],
)
def test_permanent_errors_are_tried_once(server, object_id, segment, fmt, code):
    with pytest.raises(GetAudioError) as err:
        fetch(server, object_id, segment, fmt)
    assert (err.value.code, err.value.attempts) == (code, 1)
    assert server.calls[object_id] == 1


def test_past_end_is_clipped_when_the_server_says_so(make_server, store):
    server = make_server(clip_past_end=True)
    result, sink = fetch(server, "demo-mono", TimeRange(11_000, 2000))
    assert (result.info.start_ms, result.info.duration_ms) == (11_000, 1000)
    assert np.array_equal(sink.frames(), source_frames(store["demo-mono"], 11_000, 1000))


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le"])
@pytest.mark.parametrize("object_id", ["demo-mono", "demo-stereo"])
def test_broken_streams_are_resumed_sample_identical(make_server, store, fmt, object_id):
    # 250-frame chunks (15.6 ms): breaks fall between millisecond boundaries, so resume must skip frames.
    server = make_server(Faults(break_fraction=1.0), chunk_bytes=250 * 2 * (2 if object_id == "demo-stereo" else 1))
    result, sink = fetch(server, object_id, TimeRange(1001, 1500), fmt)
    assert np.array_equal(sink.frames(), source_frames(store[object_id], 1001, 1500))
    assert result.attempts > 3 and server.calls[object_id] == result.attempts
    assert sink.begins == 1


def test_broken_token_range_resumes_by_time(make_server, store):
    server = make_server(Faults(break_fraction=1.0), chunk_bytes=3000)
    result, sink = fetch(server, "demo-mono", TokenRange(0, 9), "wav")
    info = result.info
    assert result.attempts > 1
    assert np.array_equal(sink.frames(), source_frames(store["demo-mono"], info.start_ms, info.duration_ms))


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "CANCELLED"])
def test_retries_stop_at_the_limit(make_server, code):
    server = make_server(Faults(fail_fraction=1.0, fail_code=grpc.StatusCode[code]))
    with pytest.raises(GetAudioError) as err:
        fetch(server, "demo-mono", TimeRange(0, 100))
    assert (err.value.code, err.value.attempts) == (code, FAST_RETRY.max_attempts)
    assert server.calls["demo-mono"] == FAST_RETRY.max_attempts


def test_retryable_failures_then_success(make_server, store):
    server = make_server(Faults(fail_fraction=0.5, seed=3))
    for start in range(0, 5000, 500):
        _, sink = fetch(server, "demo-mono", TimeRange(start, 300), retry=RetryPolicy(20, backoff_base_s=0.001))
        assert np.array_equal(sink.frames(), source_frames(store["demo-mono"], start, 300))
    assert server.servicer.outcomes["UNAVAILABLE"] > 0


def test_a_hung_call_ends_at_its_deadline(make_server):
    server = make_server(Faults(slow_fraction=1.0, slow_s=60))
    retry = RetryPolicy(2, backoff_base_s=0.01, min_budget_s=0)
    started = time.monotonic()
    with pytest.raises(GetAudioError) as err:
        fetch(server, "demo-mono", TimeRange(0, 100), rpc_timeout_s=0.2, retry=retry)
    assert (err.value.code, err.value.attempts) == ("DEADLINE_EXCEEDED", 2)
    assert time.monotonic() - started < 30  # two 0.2 s deadlines, not the server's 60 s stall


def test_wrong_key_is_unauthenticated_and_never_shown(make_server, caplog):
    marker = "sk-MARKER-7f3a9c"
    server = make_server(api_key="the-right-key")
    caplog.set_level(logging.DEBUG)
    client = GetAudioClient(server.address, api_key=marker, retry=FAST_RETRY)
    with pytest.raises(GetAudioError) as err:
        client.get_audio("demo-mono", TimeRange(0, 100), CollectSink())
    assert (err.value.code, err.value.attempts) == ("UNAUTHENTICATED", 1)
    with pytest.raises(GetAudioError):
        client.get_object("demo-mono")
    # vars(client): every attribute the client keeps (the key's holder among them), as a traceback with locals shows
    shown = " ".join([str(err.value), repr(err.value), repr(client), repr(vars(client)), caplog.text])
    assert marker not in shown


def test_right_key_is_accepted(make_server, store):
    server = make_server(api_key="the-right-key")
    _, sink = fetch(server, "demo-mono", TimeRange(0, 100), api_key="the-right-key")
    assert np.array_equal(sink.frames(), source_frames(store["demo-mono"], 0, 100))


def test_key_and_host_sources(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("SONIOX_API_KEY", "from-env")
    assert read_api_key(str(key_file)).reveal() == "from-file"
    assert read_api_key().reveal() == "from-env"
    monkeypatch.setenv("SONIOX_API_KEY_FILE", str(key_file))
    assert read_api_key().reveal() == "from-file"
    monkeypatch.delenv("SONIOX_API_KEY_FILE")
    monkeypatch.delenv("SONIOX_API_HOST", raising=False)
    assert resolve_host() == ("api.soniox.com:443", True)
    assert resolve_host("http://127.0.0.1:5") == ("127.0.0.1:5", False)
    assert resolve_host("example.com:443") == ("example.com:443", True)
    monkeypatch.setenv("SONIOX_API_HOST", "http://localhost:9")
    assert resolve_host() == ("localhost:9", False)


def test_tls_client_cannot_talk_to_a_plaintext_server(server):
    with pytest.raises(GetAudioError) as err:
        fetch(server, "demo-mono", TimeRange(0, 100), api_host=f"https://127.0.0.1:{server.port}")
    assert err.value.code == "UNAVAILABLE"


class _MisbehavingServicer(SpeechServicer):
    """Breaks the contract in one chosen way, to see the client refuse it."""

    mode = ""

    def GetAudio(self, request, context):
        meta = pb.GetAudioResponse(
            object_id="x", start_ms=0, duration_ms=10, total_duration_ms=10, num_audio_channels=1
        )
        if self.mode == "data_first":
            meta.data = b"\0" * 320
            yield meta
        elif self.mode == "meta_later":
            yield meta
            yield pb.GetAudioResponse(data=b"\0" * 160, duration_ms=10)
        elif self.mode == "too_long":
            yield meta
            yield pb.GetAudioResponse(data=b"\0" * 322)
        elif self.mode == "bad_header":
            yield meta
            header = wav_header(160, 1).replace(struct.pack("<I", 16_000), struct.pack("<I", 8_000), 1)
            yield pb.GetAudioResponse(data=header + b"\0" * 320)


@pytest.mark.parametrize("mode", ["data_first", "meta_later", "too_long", "bad_header"])
def test_contract_violations_are_typed_errors(store_dir, mode):
    servicer = type("S", (_MisbehavingServicer,), {"mode": mode})(AudioStore(store_dir), ServerSettings())
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_SpeechServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = GetAudioClient(f"http://127.0.0.1:{port}", retry=FAST_RETRY)
        with pytest.raises(GetAudioError) as err:
            client.get_audio("x", TimeRange(0, 10), CollectSink(), "wav" if mode == "bad_header" else "pcm_s16le")
    finally:
        server.stop(0)
    assert (err.value.code, err.value.attempts) == (BAD_STREAM, 1)


def test_serve_command_binds_loopback_and_requires_its_key(store_dir, store, tmp_path):
    """`python -m pipeline serve` as a user runs it: loopback by default, the key required when set."""
    key_file = tmp_path / "key"
    key_file.write_text("serve-key\n")
    cmd = [sys.executable, "-m", "pipeline", "serve", "--store", store_dir, "--api_key_file", str(key_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        address = line.split(" on ")[-1].strip()
        assert address.startswith("http://127.0.0.1:"), line
        _, sink = fetch(_At(address), "demo-stereo", TimeRange(500, 700), "wav", api_key="serve-key")
        assert np.array_equal(sink.frames(), source_frames(store["demo-stereo"], 500, 700))
        with pytest.raises(GetAudioError) as err:
            fetch(_At(address), "demo-stereo", TimeRange(500, 700), api_key="")
        assert err.value.code == "UNAUTHENTICATED"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _At:
    """A server known only by its address."""

    def __init__(self, address: str):
        self.address = address
