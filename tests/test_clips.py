"""ClipFile on its own: every way a clip is written (in memory or spilled, WAV or FLAC, disk or bucket) gives a
file whose samples, size and sha256 are the ones the clips table reports."""

from __future__ import annotations

import hashlib
import io
import uuid

import numpy as np
import pytest
import soundfile as sf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import clips
from pipeline.client import StreamInfo
from pipeline.samples import sample_audio
from tests.storage_fixtures import gcs_server  # noqa: F401

CHUNK = 10_000  # bytes per write, as messages would arrive


@pytest.fixture(params=["local", "gcs"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        clips.prepare_output(str(tmp_path))
        return str(tmp_path)
    server = request.getfixturevalue("gcs_server")
    FileSystems.set_options(PipelineOptions(server.flags))
    return f"{server.bucket_url}clips-{uuid.uuid4().hex[:8]}"


def write_clip(output: str, audio: np.ndarray, clip_format: str) -> clips.WrittenClip:
    info = StreamInfo("obj", 1000, len(audio) // 16, 60_000, audio.shape[1])
    sink = clips.ClipFile(output, "c1", "obj/t1000+x", clip_format)
    sink.begin(info)
    pcm = audio.tobytes()
    for i in range(0, len(pcm), CHUNK):
        sink.write(pcm[i : i + CHUNK])
    return sink.publish()


@pytest.mark.parametrize("clip_format", ["wav", "flac"])
@pytest.mark.parametrize("spill_bytes", [1 << 30, 50_000], ids=["in-memory", "spilled"])
def test_published_clip_matches_its_record(output, monkeypatch, clip_format, spill_bytes):
    monkeypatch.setattr(clips, "SPILL_BYTES", spill_bytes)
    audio = sample_audio(3.0, 2, seed=5)  # 192,000 bytes of PCM: four spills at 50,000
    written = write_clip(output, audio, clip_format)
    assert written.path == clips.clip_path(output, "c1", clip_format)
    with FileSystems.open(written.path) as f:
        data = f.read()
    assert (written.num_bytes, written.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert rate == 16_000 and np.array_equal(decoded, audio)
    assert clips.existing_clip(output, "c1", "obj/t1000+x", clip_format) == written
    assert clips.existing_clip(output, "c1", "obj/t1000+y", clip_format) is None  # another request
    assert FileSystems.match([FileSystems.join(clips.tmp_dir(output), "*")])[0].metadata_list == []


def test_a_short_clip_is_refused_and_leaves_nothing(tmp_path):
    output = str(tmp_path)
    clips.prepare_output(output)
    sink = clips.ClipFile(output, "c1", "obj/t0+100", "wav")
    sink.begin(StreamInfo("obj", 0, 100, 1000, 1))
    sink.write(b"\0" * 100)
    with pytest.raises(OSError, match="expected"):
        sink.publish()
    assert not list(tmp_path.rglob("*.wav"))
