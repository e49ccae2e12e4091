"""The fetch steps with a fake client passed in (the shape of weather-tools' fetcher_test): what they make of
the client's answers, in a real Beam pipeline, without gRPC; and the client and pool they share per process."""

from __future__ import annotations

import dataclasses
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
import soundfile as sf

from pipeline.core.elements import WRITE_FAILED, ClipError, ClipRecord, ClipRequest
from pipeline.core.messages import AudioResult, GetAudioError, ObjectInfo, ObjectToken, StreamInfo, TimeRange
from pipeline.graph import fetch
from pipeline.graph.settings import ClientSettings, FetchSettings

BUILT: list[FakeClient] = []  # every fake built, in this process (the in-process runner unpickles steps here)
TOTAL_MS = 2_000


class FakeClient:
    """Answers every object with a ramp of samples; "missing" is NOT_FOUND; "retried" takes three attempts."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self.calls: list[str] = []
        self.closed = False
        BUILT.append(self)

    def get_audio(self, object_id, segment, sink, audio_format) -> AudioResult:
        self.calls.append(object_id)
        if object_id == "missing":
            raise GetAudioError("NOT_FOUND", f"no object {object_id}", attempts=1)
        info = StreamInfo(object_id, segment.start_ms, segment.duration_ms, TOTAL_MS, 1)
        sink.begin(info)
        sink.write(ramp(segment).tobytes())
        attempts = 3 if object_id == "retried" else 1
        failures = ("UNAVAILABLE",) * (attempts - 1)
        return AudioResult(info, info.num_frames, attempts, 0.01, failures=failures)

    def get_object(self, object_id) -> ObjectInfo:
        return ObjectInfo(object_id, TOTAL_MS, 1, (ObjectToken(0, "hello", 0, 400),))

    def close(self) -> None:
        self.closed = True


def ramp(segment: TimeRange) -> np.ndarray:
    start = segment.start_ms * 16
    return (np.arange(start, start + segment.duration_ms * 16) % 30_000).astype("<i2")


def settings(output: str) -> FetchSettings:
    client = ClientSettings(api_host="http://fake:1", api_key_file=None, max_attempts=3, rpc_timeout_s=5)
    return FetchSettings(output, client, "pcm_s16le", max_in_flight=4, total_rows=4)


def request(clip_id: str, object_id: str, start_ms: int = 0) -> ClipRequest:
    return ClipRequest(clip_id, object_id, TimeRange(start_ms, 500), {}, source=f"m.parquet, row {clip_id}")


OUT: list = []  # what the last run_fetch emitted (module state, as steps are pickled by reference to it)


def keep(element) -> None:
    OUT.append(element)


def run_fetch(output: str, requests: list[ClipRequest]) -> list[ClipRecord | ClipError]:
    OUT.clear()
    with beam.Pipeline(runner="FnApiRunner") as p:
        _ = p | beam.Create(requests) | beam.ParDo(fetch.FetchClips(settings(output), FakeClient)) | beam.Map(keep)
    return list(OUT)


def test_each_answer_becomes_a_clip_or_an_error_row(tmp_path):
    BUILT.clear()
    requests = [request("a", "obj"), request("b", "obj", 1000), request("c", "retried"), request("d", "missing")]
    out = {o.clip_id: o for o in run_fetch(str(tmp_path), requests)}
    assert set(out) == {"a", "b", "c", "d"}  # rows in = clips + errors
    for clip_id, start in (("a", 0), ("b", 1000), ("c", 0)):
        record = out[clip_id]
        assert isinstance(record, ClipRecord)
        assert record.path == f"clips/{clip_id}.wav"  # relative to the dataset's root
        samples, rate = sf.read(tmp_path / record.path, dtype="int16")
        assert rate == 16_000 and np.array_equal(samples, ramp(TimeRange(start, 500)))
        assert record.num_samples == 8_000 and record.clip_start_ms == start
    assert out["c"].attempts == 3 and out["c"].stats.failures == ("UNAVAILABLE", "UNAVAILABLE")
    error = out["d"]
    assert isinstance(error, ClipError) and error.error_code == "NOT_FOUND"
    assert error.error_message.startswith("m.parquet, row d: ")


def test_one_client_per_process_closed_when_the_steps_are_torn_down(tmp_path):
    BUILT.clear()
    run_fetch(str(tmp_path / "one"), [request(str(i), "obj", i * 10) for i in range(20)])
    assert len(BUILT) == 1 and len(BUILT[0].calls) == 20  # one client for every call of the run
    assert BUILT[0].closed and fetch.held() == 0  # nothing of the run stays in the process
    assert not [t for t in threading.enumerate() if t.name.startswith("getaudio")]
    run_fetch(str(tmp_path / "two"), [request("x", "obj")])
    assert len(BUILT) == 2  # the next run builds its own


def test_an_unwritable_output_gives_write_failed_rows(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    out = run_fetch(str(blocked), [request("a", "obj")])
    assert [(o.clip_id, o.error_code) for o in out] == [("a", WRITE_FAILED)]


BOOMED = threading.Event()


class FailingClient(FakeClient):
    """Fails object "boom" with an unexpected error (a bug, not a GetAudioError), and answers object "long",
    a 40 s clip (more than a clip keeps in memory, so it is spilled to a scratch file), after "boom" has
    failed: its result arrives while the failed shard is being discarded."""

    def get_audio(self, object_id, segment, sink, audio_format) -> AudioResult:
        if object_id == "boom":
            BOOMED.set()
            raise RuntimeError("boom")
        result = super().get_audio(object_id, segment, sink, audio_format)
        assert BOOMED.wait(10), "boom never failed"
        time.sleep(0.1)  # the failure reaches the DoFn first
        return result


def test_a_shard_failed_by_an_unexpected_error_leaves_no_scratch_file(tmp_path):
    BOOMED.clear()
    long = ClipRequest("long", "long", TimeRange(0, 40_000), {}, source="m.parquet, row long")
    shard_settings = dataclasses.replace(settings(str(tmp_path)), shards=1, layout="webdataset")
    with pytest.raises(Exception, match="boom"), beam.Pipeline(runner="FnApiRunner") as p:
        _ = (
            p
            | beam.Create([(0, {"fetch": [long, request("b", "boom")], "copy": []})])
            | beam.ParDo(fetch.FetchShard(shard_settings, FailingClient))
        )
    scratch = [f.name for f in (tmp_path / "_tmp").iterdir()]
    assert scratch == []  # neither the shard's tar nor the long clip's spilled audio
    assert not (tmp_path / "shards").exists()
