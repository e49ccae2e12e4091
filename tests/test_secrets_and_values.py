"""Issue 23, cases 8-10: option values out of range stop the launch; nothing a server says reaches a table or a
log with the key in it; a key is read the same (stripped of whitespace and BOMs) from a file or a variable.

Every case runs against real gRPC servers on loopback: the local GetAudio server, or one that echoes the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.__main__ import main
from pipeline.core.messages import MASK, GetAudioError, Secret, TimeRange
from pipeline.launch.options import MAX_RPC_TIMEOUT_S
from pipeline.service.api_key import read_api_key
from pipeline.service.client import GetAudioClient, RetryPolicy
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc
from tests.helpers import explain, one_error, read_table, run_argv, run_pipeline, write_manifest

SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("object_id", pa.string()), ("start_ms", pa.int64()), ("duration_ms", pa.int64())]
)
ONE_TRY = RetryPolicy(max_attempts=1)


def manifest(path: Path, object_id: str = "demo-mono", rows: int = 2) -> str:
    rows = [{"clip_id": f"c{i}", "object_id": object_id, "start_ms": 300 * i, "duration_ms": 250} for i in range(rows)]
    return write_manifest(path, rows, SCHEMA)


@pytest.fixture
def env(monkeypatch):
    """No SONIOX_* setting from the machine running the tests."""
    for name in [n for n in os.environ if n.startswith("SONIOX_")]:
        monkeypatch.delenv(name)
    return monkeypatch


class _Sink:
    def __init__(self):
        self.frames = 0

    def begin(self, info) -> None:
        self.frame_bytes = info.frame_bytes

    def write(self, pcm: bytes) -> None:
        self.frames += len(pcm) // self.frame_bytes


# -- case 8: float options out of range ----------------------------------------------------------------


def launch(capsys, *argv: str) -> tuple[int, str]:
    """`python -m pipeline run *argv` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("rpc_timeout_s", "nan"),
        ("rpc_timeout_s", "inf"),
        ("rpc_timeout_s", "-inf"),
        ("rpc_timeout_s", "1e300"),
        ("rpc_timeout_s", "1e400"),  # parses as inf
        ("rpc_timeout_s", str(MAX_RPC_TIMEOUT_S + 1)),
        ("rpc_timeout_s", "0"),
        ("max_error_ratio", "nan"),
        ("max_error_ratio", "inf"),
        ("max_error_ratio", "-inf"),
        ("max_error_ratio", "1e300"),
    ],
)
def test_a_float_option_out_of_range_stops_the_launch(option, value, server, capsys, env, tmp_path):
    """Exit 2 with one line naming the option, before any call: with `--rpc_timeout_s 1e300` every row used to
    fail with DEADLINE_EXCEEDED without reaching the server."""
    out = tmp_path / "out"
    argv = run_argv(server, manifest(tmp_path / "m.parquet"), out, f"--{option}={value}")
    code, err = launch(capsys, *argv)
    assert code == 2, err
    assert one_error(err).startswith(f"error: --{option} takes "), err
    assert not server.calls and not server.servicer.object_calls and not out.exists()


def test_a_nan_in_a_config_file_stops_the_launch(server, capsys, env, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rpc_timeout_s: .nan\n")
    argv = run_argv(server, manifest(tmp_path / "m.parquet"), tmp_path / "out", f"--config={config}")
    code, err = launch(capsys, *argv)
    assert code == 2 and "error: --rpc_timeout_s takes a number of seconds above 0, up to 86400 (a day), not nan" in err
    assert not server.calls


def test_the_largest_rpc_timeout_is_kept_by_grpc_and_a_huge_one_never_reaches_the_server(server, env):
    """Why the bound: a day, plus the share of ten hours of audio, is a deadline gRPC keeps (the call is
    served); 1e300 overflows gRPC's deadline arithmetic, and the call fails on this machine."""
    ten_hours = 10 * 3600 * 0.1 / 0.25  # timeout_per_audio_s that gives the 250 ms range a 10-hour clip's share
    big = GetAudioClient(server.address, retry=ONE_TRY, rpc_timeout_s=MAX_RPC_TIMEOUT_S, timeout_per_audio_s=ten_hours)
    sink = _Sink()
    assert big.get_audio("demo-mono", TimeRange(0, 250), sink).num_frames == sink.frames == 4000
    assert sum(server.calls.values()) == 1
    huge = GetAudioClient(server.address, retry=ONE_TRY, rpc_timeout_s=1e300)
    with pytest.raises(GetAudioError) as e:
        huge.get_audio("demo-mono", TimeRange(0, 250), _Sink())
    assert e.value.code == "DEADLINE_EXCEEDED" and sum(server.calls.values()) == 1


def test_a_run_at_the_largest_rpc_timeout_builds(server, env, tmp_path):
    out = tmp_path / "out"
    argv = run_argv(server, manifest(tmp_path / "m.parquet"), out, f"--rpc_timeout_s={MAX_RPC_TIMEOUT_S:.0f}")
    proc = run_pipeline("run", *argv)
    assert proc.returncode == 0, explain(proc)
    assert read_table(out, "clips").num_rows == 2


# -- case 9: a server that echoes the key --------------------------------------------------------------

OTHER_KEY = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # shaped like a key, not ours
LONG_OBJECT_ID = "recording-2024-06-01-0001-abcdef0123456789"  # key-shaped too, but the row's own object ID


class _EchoingServicer(pb_grpc.SpeechServiceServicer):
    """Aborts every call with details that repeat the request: its key, its object ID, and another key.
    GetObject (the launch's key check) answers `object_code`."""

    def __init__(self, object_code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND):
        self.object_code = object_code

    def _details(self, request: pb.GetAudioRequest | pb.GetObjectRequest) -> str:
        return f"echo: api_key={request.api_key} object {request.object_id}; a key of another project: {OTHER_KEY}"

    def GetAudio(self, request: pb.GetAudioRequest, context: grpc.ServicerContext) -> Iterator[pb.GetAudioResponse]:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, self._details(request))
        yield pb.GetAudioResponse()  # never reached: a generator, as gRPC wants of a stream's handler

    def GetObject(self, request: pb.GetObjectRequest, context: grpc.ServicerContext) -> pb.GetObjectResponse:
        context.abort(self.object_code, self._details(request))


@pytest.fixture
def make_echoing_server() -> Iterator[Callable[..., str]]:
    """Starts an echoing GetAudio server on loopback: its address. All are stopped after the test."""
    servers = []

    def start(object_code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(8))
        pb_grpc.add_SpeechServiceServicer_to_server(_EchoingServicer(object_code), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0)


def all_text(output: Path) -> str:
    """Every file of an output as text: tables as their values (their pages may be compressed), others raw."""
    parts = []
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
        else:
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


@pytest.mark.parametrize(
    ("key", "flags"),
    [
        ("echo-test-key", []),  # not shaped like a key: masked because it is the key
        ("4d2a7c0e9b1f4e8aa3c6d5b7e0f1928374a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9", ["--with_transcripts"]),
    ],
    ids=["plain-key", "key-shaped-key+transcripts"],
)
def test_a_server_that_echoes_the_key_leaks_it_nowhere(key, flags, make_echoing_server, tmp_path):
    """The key check is answered (NOT_FOUND), every row fails with the server's words in its error_message."""
    out = tmp_path / "out"
    m = manifest(tmp_path / "m.parquet", LONG_OBJECT_ID)
    argv = run_argv(make_echoing_server(), m, out, "--max_error_ratio=1", "--log_level=DEBUG", "-vv", *flags)
    proc = run_pipeline("run", *argv, env={"SONIOX_API_KEY": key})
    assert proc.returncode == 0, explain(proc)
    messages = read_table(out, "errors").column("error_message").to_pylist()
    assert len(messages) == 2 and all(f"echo: api_key={MASK} object {LONG_OBJECT_ID}" in m for m in messages)
    assert all(m.endswith(f"another project: {MASK}") for m in messages), messages
    assert (out / "_RUN.json").is_file() and (out / "README.md").is_file()
    for text in (all_text(out), proc.stdout, proc.stderr):
        assert key not in text and OTHER_KEY not in text


def test_a_key_check_that_fails_says_why_without_the_key(make_echoing_server, tmp_path):
    """A key check the service does not answer stops the launch with the server's words in the error line."""
    key = "launch-echo-key"
    host = make_echoing_server(grpc.StatusCode.INTERNAL)
    out = tmp_path / "out"
    proc = run_pipeline("run", *run_argv(host, manifest(tmp_path / "m.parquet"), out), env={"SONIOX_API_KEY": key})
    assert proc.returncode == 2, explain(proc)
    assert f"error: cannot talk to {host}: INTERNAL: echo: api_key={MASK} object demo-mono;" in proc.stderr
    assert key not in proc.stderr + proc.stdout
    assert OTHER_KEY not in proc.stderr


class _KeyInMetadataServicer(pb_grpc.SpeechServiceServicer):
    """Breaks the contract with a first message that names the request's key as its object (and no channels)."""

    def GetAudio(self, request: pb.GetAudioRequest, context: grpc.ServicerContext) -> Iterator[pb.GetAudioResponse]:
        yield pb.GetAudioResponse(object_id=request.api_key, duration_ms=10, total_duration_ms=10)


def test_a_contract_violation_that_quotes_the_key_is_masked():
    """A BAD_STREAM message describes what the server sent: its words too."""
    key = "metadata-echo-key"
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_SpeechServiceServicer_to_server(_KeyInMetadataServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = GetAudioClient(f"http://127.0.0.1:{port}", api_key=key, retry=ONE_TRY)
        with pytest.raises(GetAudioError) as e:
            client.get_audio("demo-mono", TimeRange(0, 10), _Sink())
    finally:
        server.stop(0)
    assert e.value.message.startswith("metadata is not a servable clip") and f"object_id='{MASK}'" in e.value.message
    assert key not in str(e.value)


def test_mask_leaves_a_message_without_keys_as_it_is():
    text = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert Secret("k-1").mask(text) == text
    assert Secret("").mask("SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER") == (
        "SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER"
    )
    assert Secret("k-1").mask(f"key k-1 id {OTHER_KEY}.", keep=()) == f"key {MASK} id {MASK}."


# -- case 10: whitespace and a BOM around the key ------------------------------------------------------

KEY = "sk-live-key-10"
AROUND = [("", "\n"), ("", "\r\n"), (" ", " "), ("\ufeff", ""), ("\ufeff", "\n"), ("\t\ufeff ", " \n")]
AROUND_IDS = ["newline", "crlf", "spaces", "bom", "bom+newline", "mixed"]


def key_from(source: str, text: str, tmp_path: Path, env: pytest.MonkeyPatch) -> str | None:
    """Put `text` where `source` reads the key from; the --api_key_file value (None: not a flag)."""
    if source == "variable":
        env.setenv("SONIOX_API_KEY", text)
        return None
    path = tmp_path / "key"
    path.write_bytes(text.encode())
    if source == "file variable":
        env.setenv("SONIOX_API_KEY_FILE", str(path))
        return None
    return str(path)


@pytest.mark.parametrize(("before", "after"), AROUND, ids=AROUND_IDS)
@pytest.mark.parametrize("source", ["variable", "file variable", "flag"])
def test_a_key_with_whitespace_or_a_bom_around_it_is_taken(source, before, after, make_server, env, tmp_path):
    """The server requires the key: the key as read is the one it takes."""
    server = make_server(api_key=KEY)
    key = read_api_key(key_from(source, before + KEY + after, tmp_path, env))
    sink = _Sink()
    GetAudioClient(server.address, api_key=key, retry=ONE_TRY).get_audio("demo-mono", TimeRange(0, 100), sink)
    assert sink.frames == 1600


def test_a_key_inside_is_kept_as_written(env):
    env.setenv("SONIOX_API_KEY", "\ufeff a b\ufeffc \n")
    assert read_api_key().reveal() == "a b\ufeffc"


@pytest.mark.parametrize("source", ["variable", "flag"])
def test_a_run_with_a_newline_and_a_bom_around_the_key_builds(source, make_server, env, tmp_path):
    server = make_server(api_key=KEY)
    out = tmp_path / "out"
    key_file = key_from(source, f"\ufeff{KEY}\r\n", tmp_path, env)
    flags = [f"--api_key_file={key_file}"] if key_file else []
    extra = {"SONIOX_API_KEY": os.environ["SONIOX_API_KEY"]} if source == "variable" else {}
    proc = run_pipeline("run", *run_argv(server, manifest(tmp_path / "m.parquet"), out, *flags), env=extra)
    assert proc.returncode == 0, explain(proc)
    assert read_table(out, "clips").num_rows == 2
