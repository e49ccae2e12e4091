"""The wire contract: our stubs against `schemas/`, and against the official Soniox SDK (soniox 1.x).

1. The committed stubs in `pipeline/service/wire/` are what `make proto` makes of `schemas/speech_service.proto`.
2. Every message, field and method we define is the SDK's, with the same number, type and shape.
3. The SDK's `soniox.storage.get_audio` gets exact audio from our `LocalServer`.
4. Our `GetAudioClient` gets exact audio and tokens from a server built on the SDK's own stubs.

The SDK's generated module registers the same protobuf symbols as `pipeline.service.wire` in the default
descriptor pool, so it is never imported in this process: every SDK-side piece runs in a subprocess.
"""

from __future__ import annotations

import difflib
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from google.protobuf import descriptor_pb2, json_format, text_format

from pipeline.core.audio import SAMPLE_RATE, SAMPLES_PER_MS, WAV_HEADER_BYTES, pcm_bytes
from pipeline.core.messages import GetAudioError, ObjectToken, StreamInfo, TimeRange, TokenRange
from pipeline.local.samples import write_sample_store
from pipeline.local.server import LocalServer, ServerSettings
from pipeline.service.client import GetAudioClient, RetryPolicy
from pipeline.service.wire import speech_service_pb2 as pb
from pipeline.service.wire import speech_service_pb2_grpc as pb_grpc
from tests.helpers import REPO, child_env, sidecar_tokens, source_audio

pytestmark = pytest.mark.timeout(60)

PROTO = "schemas/speech_service.proto"
SUBPROCESS_TIMEOUT_S = 20
API_KEY = "contract-test-key"
OUR_MESSAGES = {
    "GetAudioRequest",
    "GetAudioResponse",
    "GetObjectRequest",
    "GetObjectResponse",
    "StoredObject",
    "Transcript",
    "Token",
}
OUR_METHODS = {"GetAudio", "GetObject"}


def _run(args: list[str], **extra_env: str) -> subprocess.CompletedProcess[str]:
    """Run a child process from the repo root; fail the test with its output when it fails."""
    proc = subprocess.run(
        args, cwd=REPO, env=child_env(**extra_env), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    if proc.returncode != 0:
        pytest.fail(f"{args[:3]} exited with {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def _run_python(code: str, *argv: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-c", code, *argv], **extra_env)


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """This module's own sample store: object_id -> audio file path (16 kHz WAV for the objects used here)."""
    return write_sample_store(str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def local_server(sample_store: dict[str, str]) -> Iterator[LocalServer]:
    with LocalServer(os.path.dirname(sample_store["demo-mono"]), ServerSettings(api_key=API_KEY)) as srv:
        yield srv


# -- 1. stub drift -------------------------------------------------------------------------------------


def _without_json_names(messages) -> None:
    """protoc's descriptor sets carry json_name; the descriptors embedded in generated Python do not."""
    for message in messages:
        for f in message.field:
            f.ClearField("json_name")
        _without_json_names(message.nested_type)


def test_committed_stubs_match_schema(tmp_path: Path) -> None:
    out = tmp_path / "speech_service.pb"
    _run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "--proto_path=pipeline/service/wire=schemas",
            f"--descriptor_set_out={out}",
            PROTO,
        ]
    )
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    _without_json_names(fresh.message_type)
    committed = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(committed)

    assert fresh.name == committed.name == "pipeline/service/wire/speech_service.proto"
    if fresh != committed:
        diff = difflib.unified_diff(
            text_format.MessageToString(committed).splitlines(keepends=True),
            text_format.MessageToString(fresh).splitlines(keepends=True),
            "committed pipeline/service/wire/speech_service_pb2.py",
            f"protoc {PROTO}",
        )
        pytest.fail(f"the committed stubs are stale: run `make proto` and commit them\n{''.join(diff)}")
    # The embedded descriptor is the generated module's own, not a copy made by the runtime.
    assert descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb) == fresh, "run `make proto`"


class _RecordingChannel:
    """Stands in for a grpc.Channel: records what kind of callable the stub asks for, per method path."""

    def __init__(self) -> None:
        self.methods: dict[str, tuple[str, object, object]] = {}

    def _record(self, kind: str):
        def make(path, request_serializer=None, response_deserializer=None, **_):
            self.methods[path] = (kind, request_serializer, response_deserializer)
            return kind

        return make

    def __getattr__(self, kind: str):
        if kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            return self._record(kind)
        raise AttributeError(kind)


def test_grpc_stub_module_exposes_service() -> None:
    channel = _RecordingChannel()
    stub = pb_grpc.SpeechServiceStub(channel)
    assert stub.GetAudio == "unary_stream", "GetAudio must be server-streaming: run `make proto`"
    assert stub.GetObject == "unary_unary", "run `make proto`"
    prefix = "/soniox.speech_service.SpeechService/"
    assert channel.methods == {
        prefix + "GetAudio": (
            "unary_stream",
            pb.GetAudioRequest.SerializeToString,
            pb.GetAudioResponse.FromString,
        ),
        prefix + "GetObject": (
            "unary_unary",
            pb.GetObjectRequest.SerializeToString,
            pb.GetObjectResponse.FromString,
        ),
    }, "pipeline/service/wire/speech_service_pb2_grpc.py does not match the schema: run `make proto`"
    assert {"GetAudio", "GetObject"} <= set(vars(pb_grpc.SpeechServiceServicer))


# -- 2. same wire as the SDK ---------------------------------------------------------------------------

SDK_DESCRIPTOR = """
from google.protobuf import descriptor_pb2, json_format
import soniox.speech_service_pb2 as sdk
fp = descriptor_pb2.FileDescriptorProto()
sdk.DESCRIPTOR.CopyToProto(fp)
print(json_format.MessageToJson(fp))
"""


@dataclass(frozen=True)
class FieldShape:
    number: int
    type: str  # TYPE_INT32, ...
    label: str  # LABEL_OPTIONAL, ...
    type_name: str
    oneof: str | None
    proto3_optional: bool


def _messages(fp: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of the file, nested ones included, by full name."""
    found = {}

    def walk(scope: str, messages) -> None:
        for m in messages:
            name = f"{scope}.{m.name}"
            found[name] = m
            walk(name, m.nested_type)

    walk(fp.package, fp.message_type)
    return found


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, FieldShape]:
    oneofs = [o.name for o in message.oneof_decl]
    return {
        f.name: FieldShape(
            f.number,
            descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            f.type_name,
            oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            f.proto3_optional,
        )
        for f in message.field
    }


def _methods(fp: descriptor_pb2.FileDescriptorProto) -> dict[str, tuple[str, str, bool, bool]]:
    return {
        f"{s.name}.{m.name}": (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        for s in fp.service
        for m in s.method
    }


@pytest.fixture(scope="module")
def sdk_file() -> descriptor_pb2.FileDescriptorProto:
    out = _run_python(SDK_DESCRIPTOR).stdout
    return json_format.Parse(out, descriptor_pb2.FileDescriptorProto())


def test_same_package_and_syntax_as_sdk(sdk_file: descriptor_pb2.FileDescriptorProto) -> None:
    ours = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    assert ours.package == sdk_file.package == "soniox.speech_service"
    assert ours.syntax == sdk_file.syntax == "proto3"
    assert {m.name for m in ours.message_type} == OUR_MESSAGES
    assert {s.name for s in ours.service} == {"SpeechService"}


def test_every_message_and_field_is_the_sdks(sdk_file: descriptor_pb2.FileDescriptorProto) -> None:
    ours = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    sdk_messages = _messages(sdk_file)
    problems = []
    for name, message in _messages(ours).items():
        theirs = sdk_messages.get(name)
        if theirs is None:
            problems.append(f"{name}: no such message in the SDK")
            continue
        if message.options.map_entry != theirs.options.map_entry:
            problems.append(f"{name}: map_entry {message.options.map_entry} vs SDK {theirs.options.map_entry}")
        sdk_fields = _fields(theirs)
        for field_name, shape in _fields(message).items():
            if field_name not in sdk_fields:
                problems.append(f"{name}.{field_name}: a field of our own, not in the SDK")
            elif shape != sdk_fields[field_name]:
                problems.append(f"{name}.{field_name}: ours {shape} vs SDK {sdk_fields[field_name]}")
        sdk_oneofs = {o.name for o in theirs.oneof_decl}
        problems += [f"{name}: oneof {o.name} not in the SDK" for o in message.oneof_decl if o.name not in sdk_oneofs]
    assert not problems, "\n".join(problems)


def test_the_parts_the_pipeline_relies_on(sdk_file: descriptor_pb2.FileDescriptorProto) -> None:
    """Spelled out, so that a change on either side shows up by name, not only as a mismatch."""
    sdk = _messages(sdk_file)
    request = _fields(sdk["soniox.speech_service.GetAudioRequest"])
    assert request["time_segment"] == FieldShape(
        3,
        "TYPE_MESSAGE",
        "LABEL_OPTIONAL",
        ".soniox.speech_service.GetAudioRequest.TimeSegment",
        "oneof_segment",
        False,
    )
    assert request["token_segment"] == FieldShape(
        4,
        "TYPE_MESSAGE",
        "LABEL_OPTIONAL",
        ".soniox.speech_service.GetAudioRequest.TokenSegment",
        "oneof_segment",
        False,
    )
    assert request["audio_bytes_format"].number == 5
    assert _fields(sdk["soniox.speech_service.GetAudioRequest.TimeSegment"]).keys() == {"start_ms", "duration_ms"}
    assert _fields(sdk["soniox.speech_service.GetAudioRequest.TokenSegment"]).keys() == {"token_start", "token_end"}
    response = {k: v.number for k, v in _fields(sdk["soniox.speech_service.GetAudioResponse"]).items()}
    expected = {
        "object_id": 1,
        "start_ms": 2,
        "duration_ms": 3,
        "total_duration_ms": 4,
        "data": 5,
        "num_audio_channels": 6,
    }
    assert response.items() >= expected.items()


def test_same_methods_as_sdk(sdk_file: descriptor_pb2.FileDescriptorProto) -> None:
    ours = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(ours)
    sdk_methods = _methods(sdk_file)
    our_methods = _methods(ours)
    assert set(our_methods) == {f"SpeechService.{m}" for m in OUR_METHODS}
    for name, shape in our_methods.items():
        assert sdk_methods.get(name) == shape, f"{name}: ours {shape} vs SDK {sdk_methods.get(name)}"
    prefix = ".soniox.speech_service."
    assert sdk_methods["SpeechService.GetAudio"] == (
        prefix + "GetAudioRequest",
        prefix + "GetAudioResponse",
        False,
        True,
    )
    assert sdk_methods["SpeechService.GetObject"] == (
        prefix + "GetObjectRequest",
        prefix + "GetObjectResponse",
        False,
        False,
    )


# -- 3. the SDK against our LocalServer ----------------------------------------------------------------

SDK_GET_AUDIO = """
import json, sys
import grpc
from soniox.speech_service import SpeechClient
from soniox.storage import get_audio

job = json.loads(sys.argv[1])
ranges = {k: job[k] for k in ("start_ms", "duration_ms", "token_start", "token_end") if k in job}
try:
    with SpeechClient() as client:
        responses = list(get_audio(job["object_id"], client, audio_bytes_format=job["format"], **ranges))
except grpc.RpcError as e:
    print(e.code().name)
    sys.exit(0)
first = responses[0]
meta = {
    "object_id": first.object_id,
    "start_ms": first.start_ms,
    "duration_ms": first.duration_ms,
    "total_duration_ms": first.total_duration_ms,
    "num_audio_channels": first.num_audio_channels,
    "first_data_bytes": len(first.data),
    "messages": len(responses),
    "later_with_metadata": sum(
        1 for r in responses[1:]
        if r.object_id or r.start_ms or r.duration_ms or r.total_duration_ms or r.num_audio_channels
    ),
}
with open(job["out"] + ".audio", "wb") as f:
    f.write(b"".join(r.data for r in responses))
with open(job["out"] + ".json", "w") as f:
    json.dump(meta, f)
print("OK")
"""


def _sdk_get_audio(server: LocalServer, out: Path, api_key: str = API_KEY, **job) -> tuple[str, bytes, dict]:
    """(status printed by the SDK-side child, concatenated data, first message's metadata)."""
    job["out"] = str(out)
    status = _run_python(
        SDK_GET_AUDIO, json.dumps(job), SONIOX_API_HOST=server.address, SONIOX_API_KEY=api_key
    ).stdout.strip()
    if status != "OK":
        return status, b"", {}
    return status, Path(f"{out}.audio").read_bytes(), json.loads(Path(f"{out}.json").read_text())


def _check_stream_shape(meta: dict, object_id: str, channels: int, total_ms: int) -> None:
    assert meta["object_id"] == object_id
    assert meta["num_audio_channels"] == channels
    assert meta["total_duration_ms"] == total_ms
    assert meta["first_data_bytes"] == 0, "the first message must carry metadata only"
    assert meta["later_with_metadata"] == 0, "only the first message may carry metadata"
    assert meta["messages"] >= 2


def _check_wav(data: bytes, path: Path, channels: int, frames: int) -> np.ndarray:
    """Check the WAV header by hand and with soundfile; return its samples (frames, channels)."""
    riff, riff_size, wave = struct.unpack_from("<4sI4s", data)
    assert (riff, wave, riff_size) == (b"RIFF", b"WAVE", len(data) - 8)
    assert struct.unpack_from("<4sI", data, WAV_HEADER_BYTES - 8) == (b"data", len(data) - WAV_HEADER_BYTES)
    path.write_bytes(data)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (SAMPLE_RATE, channels, frames, "PCM_16")
    samples, _ = sf.read(str(path), dtype="int16", always_2d=True)
    return samples


TIME_CASES = [
    # object_id, channels, start_ms, duration_ms, format
    pytest.param("demo-mono", 1, 1000, 976, "wav", id="mono-wav-976ms"),
    pytest.param("demo-mono", 1, 0, 2500, "pcm_s16le", id="mono-pcm-from-0"),
    pytest.param("demo-mono", 1, 9000, 3000, "wav", id="mono-wav-to-end"),
    pytest.param("demo-stereo", 2, 1234, 3001, "wav", id="stereo-wav"),
    pytest.param("demo-stereo", 2, 4321, 1700, "pcm_s16le", id="stereo-pcm"),
]


@pytest.mark.parametrize(("object_id", "channels", "start_ms", "duration_ms", "fmt"), TIME_CASES)
def test_sdk_get_audio_time_range(
    local_server: LocalServer,
    sample_store: dict[str, str],
    tmp_path: Path,
    object_id: str,
    channels: int,
    start_ms: int,
    duration_ms: int,
    fmt: str,
) -> None:
    source = source_audio(sample_store[object_id])
    status, data, meta = _sdk_get_audio(
        local_server, tmp_path / "clip", object_id=object_id, start_ms=start_ms, duration_ms=duration_ms, format=fmt
    )
    assert status == "OK"
    _check_stream_shape(meta, object_id, channels, len(source) // SAMPLES_PER_MS)
    assert (meta["start_ms"], meta["duration_ms"]) == (start_ms, duration_ms)
    expected = source[start_ms * SAMPLES_PER_MS : (start_ms + duration_ms) * SAMPLES_PER_MS]
    frames = duration_ms * SAMPLES_PER_MS
    if fmt == "wav":
        assert len(data) == WAV_HEADER_BYTES + duration_ms * 16 * 2 * channels
        samples = _check_wav(data, tmp_path / "clip.wav", channels, frames)
    else:
        assert len(data) == duration_ms * 16 * 2 * channels
        samples = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    np.testing.assert_array_equal(samples, expected)


def test_sdk_get_audio_docs_example(local_server: LocalServer, tmp_path: Path) -> None:
    """The docs' example: 976 ms of mono audio as WAV is 31,276 bytes."""
    status, data, _ = _sdk_get_audio(
        local_server, tmp_path / "clip", object_id="demo-mono", start_ms=0, duration_ms=976, format="wav"
    )
    assert status == "OK"
    assert len(data) == 31_276


@pytest.mark.parametrize(
    ("object_id", "channels", "token_start", "token_end", "fmt"),
    [
        pytest.param("demo-mono", 1, 2, 7, "wav", id="mono-wav"),
        pytest.param("demo-mono", 1, 0, 1, "pcm_s16le", id="mono-pcm-first-token"),
        pytest.param("demo-stereo", 2, 4, 9, "pcm_s16le", id="stereo-pcm"),
    ],
)
def test_sdk_get_audio_token_range(
    local_server: LocalServer,
    sample_store: dict[str, str],
    tmp_path: Path,
    object_id: str,
    channels: int,
    token_start: int,
    token_end: int,
    fmt: str,
) -> None:
    source = source_audio(sample_store[object_id])
    total_ms = len(source) // SAMPLES_PER_MS
    tokens = sidecar_tokens(sample_store, object_id)
    pad = local_server.settings.token_padding_ms
    start_ms = max(0, tokens[token_start]["start_ms"] - pad)
    last = tokens[token_end - 1]
    duration_ms = min(total_ms, last["start_ms"] + last["duration_ms"] + pad) - start_ms

    status, data, meta = _sdk_get_audio(
        local_server, tmp_path / "clip", object_id=object_id, token_start=token_start, token_end=token_end, format=fmt
    )
    assert status == "OK"
    _check_stream_shape(meta, object_id, channels, total_ms)
    assert (meta["start_ms"], meta["duration_ms"]) == (start_ms, duration_ms)
    expected = source[start_ms * SAMPLES_PER_MS : (start_ms + duration_ms) * SAMPLES_PER_MS]
    if fmt == "wav":
        assert len(data) == WAV_HEADER_BYTES + pcm_bytes(duration_ms, channels)
        samples = _check_wav(data, tmp_path / "clip.wav", channels, duration_ms * SAMPLES_PER_MS)
    else:
        assert len(data) == pcm_bytes(duration_ms, channels)
        samples = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    np.testing.assert_array_equal(samples, expected)


def test_sdk_with_wrong_key_is_unauthenticated(local_server: LocalServer, tmp_path: Path) -> None:
    status, _, _ = _sdk_get_audio(
        local_server,
        tmp_path / "clip",
        api_key="not-the-key",
        object_id="demo-mono",
        start_ms=0,
        duration_ms=500,
        format="wav",
    )
    assert status == "UNAUTHENTICATED"


# -- 4. our client against a server built on the SDK's stubs -------------------------------------------

SDK_SERVER = """
import json, sys
from concurrent import futures
import grpc
from google.protobuf import json_format
from soniox import speech_service_pb2 as pb, speech_service_pb2_grpc as pb_grpc
from pipeline.core.audio import wav_header  # plain struct code: no protobuf symbols of ours

assert "pipeline.service.wire.speech_service_pb2" not in sys.modules
cfg = json.loads(open(sys.argv[1]).read())


class Servicer(pb_grpc.SpeechServiceServicer):
    def _object(self, request, context):
        with open(cfg["log"], "a") as f:
            f.write(json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None) + "\\n")
        if request.api_key != cfg["api_key"]:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        obj = cfg["objects"].get(request.object_id)
        if obj is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such object")
        return obj

    def GetAudio(self, request, context):
        obj = self._object(request, context)
        with open(obj["pcm"], "rb") as f:
            pcm = f.read()
        channels = obj["channels"]
        frame = 2 * channels
        total_ms = len(pcm) // frame // 16
        kind = request.WhichOneof("oneof_segment")
        if kind == "time_segment":
            start_ms, duration_ms = request.time_segment.start_ms, request.time_segment.duration_ms
        elif kind == "token_segment":
            tokens = obj["tokens"]
            first, last = tokens[request.token_segment.token_start], tokens[request.token_segment.token_end - 1]
            start_ms = first["start_ms"]
            duration_ms = last["start_ms"] + last["duration_ms"] - start_ms
        else:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no segment")
        if request.audio_bytes_format not in ("wav", "pcm_s16le"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad audio_bytes_format")
        yield pb.GetAudioResponse(
            object_id=request.object_id,
            start_ms=start_ms,
            duration_ms=duration_ms,
            total_duration_ms=total_ms,
            num_audio_channels=channels,
        )
        body = pcm[start_ms * 16 * frame : (start_ms + duration_ms) * 16 * frame]
        if request.audio_bytes_format == "wav":
            body = wav_header(duration_ms * 16, channels) + body
        chunk = cfg["chunk_bytes"]
        for i in range(0, len(body), chunk):
            yield pb.GetAudioResponse(data=body[i : i + chunk])

    def GetObject(self, request, context):
        obj = self._object(request, context)
        transcript = pb.Transcript(text="".join(t["text"] for t in obj["tokens"]))
        pos = 0
        for idx, t in enumerate(obj["tokens"]):
            transcript.tokens.add(
                idx=idx, text=t["text"], text_start=pos, text_end=pos + len(t["text"]),
                start_ms=t["start_ms"], duration_ms=t["duration_ms"], confidence=0.5, speaker_id=1,
            )
            pos += len(t["text"])
        with open(obj["pcm"], "rb") as f:
            total_ms = len(f.read()) // (2 * obj["channels"]) // 16
        return pb.GetObjectResponse(
            object=pb.StoredObject(
                object_id=request.object_id,
                title="contract test",
                metadata={"source": "sdk-stub server"},
                duration_ms=total_ms,
                num_audio_channels=obj["channels"],
                audio_stored=True,
                transcript=transcript,
            )
        )


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
pb_grpc.add_SpeechServiceServicer_to_server(Servicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


@dataclass
class SdkServer:
    address: str
    log: Path

    def last_request(self) -> dict:
        return json.loads(self.log.read_text().splitlines()[-1])


@pytest.fixture(scope="module", params=[10_000, 17], ids=["chunks-10000", "chunks-17"])
def sdk_server(
    request: pytest.FixtureRequest, sample_store: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SdkServer]:
    """A server on the SDK's stubs; 17-byte chunks split the WAV header and frames across messages."""
    root = tmp_path_factory.mktemp("sdk-server")
    objects = {}
    for object_id in ("demo-mono", "demo-stereo"):
        audio = source_audio(sample_store[object_id])
        pcm = root / f"{object_id}.pcm"
        pcm.write_bytes(audio.astype("<i2").tobytes())
        objects[object_id] = {
            "pcm": str(pcm),
            "channels": audio.shape[1],
            "tokens": sidecar_tokens(sample_store, object_id),
        }
    config = root / "config.json"
    log = root / "requests.jsonl"
    config.write_text(
        json.dumps({"api_key": API_KEY, "objects": objects, "chunk_bytes": request.param, "log": str(log)})
    )
    stderr = open(root / "stderr.txt", "w+")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-c", SDK_SERVER, str(config)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        line = ""
        while not line and proc.poll() is None and (left := deadline - time.monotonic()) > 0:
            if select.select([proc.stdout], [], [], left)[0]:
                line = proc.stdout.readline()
        if not line.strip().isdigit():
            stderr.seek(0)
            pytest.fail(f"the SDK-stub server did not start (exit {proc.poll()}):\n{stderr.read()}")
        yield SdkServer(f"http://127.0.0.1:{int(line)}", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        stderr.close()


class RecordingSink:
    def __init__(self) -> None:
        self.info: StreamInfo | None = None
        self.pcm = bytearray()
        self.begins = 0

    def begin(self, info: StreamInfo) -> None:
        self.info = info
        self.begins += 1

    def write(self, pcm: bytes) -> None:
        assert self.info is not None, "write before begin"
        assert len(pcm) % self.info.frame_bytes == 0, "a write that is not whole frames"
        self.pcm += pcm


def _client(server: SdkServer, api_key: str = API_KEY) -> GetAudioClient:
    """One attempt only: a resume must not paper over a wire mismatch."""
    return GetAudioClient(server.address, api_key, retry=RetryPolicy(max_attempts=1), rpc_timeout_s=10)


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le"])
@pytest.mark.parametrize(
    ("object_id", "channels", "start_ms", "duration_ms"),
    [
        pytest.param("demo-mono", 1, 1000, 976, id="mono"),
        pytest.param("demo-stereo", 2, 2345, 777, id="stereo"),
    ],
)
def test_our_client_against_sdk_server_time_range(
    sdk_server: SdkServer,
    sample_store: dict[str, str],
    object_id: str,
    channels: int,
    start_ms: int,
    duration_ms: int,
    fmt: str,
) -> None:
    source = source_audio(sample_store[object_id])
    sink = RecordingSink()
    result = _client(sdk_server).get_audio(object_id, TimeRange(start_ms, duration_ms), sink, fmt)

    assert sdk_server.last_request() == {
        "api_key": API_KEY,
        "object_id": object_id,
        "time_segment": {"start_ms": start_ms, "duration_ms": duration_ms},
        "audio_bytes_format": fmt,
    }
    info = StreamInfo(object_id, start_ms, duration_ms, len(source) // SAMPLES_PER_MS, channels)
    assert (sink.info, sink.begins, result.info, result.attempts) == (info, 1, info, 1)
    assert result.num_frames == duration_ms * SAMPLES_PER_MS
    expected = source[start_ms * SAMPLES_PER_MS : (start_ms + duration_ms) * SAMPLES_PER_MS]
    assert bytes(sink.pcm) == expected.astype("<i2").tobytes()


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le"])
def test_our_client_against_sdk_server_token_range(
    sdk_server: SdkServer, sample_store: dict[str, str], fmt: str
) -> None:
    source = source_audio(sample_store["demo-stereo"])
    tokens = sidecar_tokens(sample_store, "demo-stereo")
    sink = RecordingSink()
    result = _client(sdk_server).get_audio("demo-stereo", TokenRange(2, 5), sink, fmt)

    assert sdk_server.last_request() == {
        "api_key": API_KEY,
        "object_id": "demo-stereo",
        "token_segment": {"token_start": 2, "token_end": 5},
        "audio_bytes_format": fmt,
    }
    start_ms = tokens[2]["start_ms"]
    duration_ms = tokens[4]["start_ms"] + tokens[4]["duration_ms"] - start_ms
    assert (result.info.start_ms, result.info.duration_ms, result.attempts) == (start_ms, duration_ms, 1)
    expected = source[start_ms * SAMPLES_PER_MS : (start_ms + duration_ms) * SAMPLES_PER_MS]
    assert bytes(sink.pcm) == expected.astype("<i2").tobytes()


def test_our_client_get_object_against_sdk_server(sdk_server: SdkServer, sample_store: dict[str, str]) -> None:
    obj = _client(sdk_server).get_object("demo-mono")
    assert sdk_server.last_request() == {"api_key": API_KEY, "object_id": "demo-mono"}
    tokens = sidecar_tokens(sample_store, "demo-mono")
    assert (obj.object_id, obj.duration_ms, obj.channels) == ("demo-mono", 12_000, 1)
    assert obj.tokens == tuple(  # the server built with the SDK's types gives every token speaker 1, confidence 0.5
        ObjectToken(idx, t["text"], t["start_ms"], t["duration_ms"], 1, 0.5) for idx, t in enumerate(tokens)
    )


def test_our_client_with_wrong_key_against_sdk_server(sdk_server: SdkServer) -> None:
    with pytest.raises(GetAudioError) as e:
        _client(sdk_server, "not-the-key").get_audio("demo-mono", TimeRange(0, 500), RecordingSink(), "wav")
    assert (e.value.code, e.value.attempts) == ("UNAUTHENTICATED", 1)
    with pytest.raises(GetAudioError) as e:
        _client(sdk_server, "not-the-key").get_object("demo-mono")
    assert e.value.code == "UNAUTHENTICATED"
