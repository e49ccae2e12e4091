"""Clip writers alone: every way a clip is written (in memory or spilled, WAV or FLAC, disk or bucket) gives a
file whose samples, size and sha256 are the ones the clips table reports, and that `existing_clip` finds."""

from __future__ import annotations

import hashlib
import io
import os
import uuid

import numpy as np
import pytest
import soundfile as sf
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.core.messages import StreamInfo
from pipeline.dataset import clips
from pipeline.dataset.layout import clip_path
from pipeline.dataset.storage import Store, StoreSettings, open_store
from pipeline.local.samples import sample_audio

CHUNK = 10_000  # bytes per write, as messages would arrive


@pytest.fixture(params=["local", "s3", "gcs"])
def target(request, tmp_path) -> tuple[str, Store]:
    """(output, its store)."""
    if request.param == "local":
        return str(tmp_path), open_store(str(tmp_path))
    server = request.getfixturevalue(f"{request.param}_server")
    options = PipelineOptions(server.flags)
    output = f"{server.bucket_url}clips-{uuid.uuid4().hex[:8]}"
    return output, open_store(output, StoreSettings.from_options(options))


def write_clip(store: Store, output: str, audio: np.ndarray, clip_format: str) -> clips.WrittenClip:
    info = StreamInfo("obj", 1000, len(audio) // 16, 60_000, audio.shape[1])
    sink = clips.clip_file(store, clip_path(output, "c1", clip_format), "obj/t1000+x", clip_format)
    sink.begin(info)
    pcm = audio.tobytes()
    for i in range(0, len(pcm), CHUNK):
        sink.write(pcm[i : i + CHUNK])
    return sink.publish()


@pytest.mark.parametrize("clip_format", ["wav", "flac"])
@pytest.mark.parametrize("spill_bytes", [1 << 30, 50_000], ids=["in-memory", "spilled"])
def test_published_clip_matches_its_record(target, monkeypatch, clip_format, spill_bytes):
    output, store = target
    monkeypatch.setattr(clips, "SPILL_BYTES", spill_bytes)
    audio = sample_audio(3.0, 2, seed=5)  # 192,000 bytes of PCM: four spills at 50,000
    written = write_clip(store, output, audio, clip_format)
    assert written.path == clip_path(output, "c1", clip_format)
    data = store.read(written.path)
    assert (written.num_bytes, written.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert rate == 16_000 and np.array_equal(decoded, audio)
    assert clips.existing_clip(store, written.path, "obj/t1000+x", clip_format) == written
    assert clips.existing_clip(store, written.path, "obj/t1000+y", clip_format) is None  # another request
    assert clips.existing_clip(store, clip_path(output, "c2"), "obj/t1000+x") is None  # no such clip
    assert [o.path for o in store.list(output)] == [written.path], "only the clip is left in the output"


def test_a_short_clip_is_refused_and_leaves_nothing(tmp_path):
    output = str(tmp_path)
    store = open_store(output)
    sink = clips.clip_file(store, clip_path(output, "c1"), "obj/t0+100", "wav")
    sink.begin(StreamInfo("obj", 0, 100, 1000, 1))
    sink.write(b"\0" * 100)
    with pytest.raises(OSError, match="expected"):
        sink.publish()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not os.path.exists(clip_path(output, "c1"))
