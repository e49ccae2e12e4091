"""`--channels mix`: every clip mono, each sample the mean of the object's channels at that frame, so a mono
model trains on multi-channel data with one transcript per piece of audio and no loader setting."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.local.server import LocalServer
from tests.helpers import (
    clip_bytes,
    clips_table,
    errors_table,
    expect_exit,
    run_build,
    run_record,
    source_frames,
    time_rows,
    total_calls,
    write_local_manifest,
)

OBJECTS = ("demo-mono", "demo-stereo", "demo-flac-3ch")  # 1, 2 and 3 channels


def mixed(store: dict[str, str], row: dict) -> np.ndarray:
    """The source's frames over the clip's served range, averaged across channels (halves to even)."""
    frames = source_frames(store[row["object_id"]], row["clip_start_ms"], row["clip_duration_ms"])
    return np.rint(frames.mean(axis=1)).astype(np.int16)


@pytest.mark.parametrize("layout", [("--clip_format=wav",), ("--clip_format=flac", "--shards=2")])
def test_mixed_clips_are_the_mean_of_the_source_channels(
    server: LocalServer, store: dict[str, str], tmp_path: Path, layout: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    rows = time_rows(9, objects=OBJECTS, duration_ms=700)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    expect_exit(run_build(server, manifest, str(out), "--channels=mix", "--with_transcripts", *layout), 0)
    clips = clips_table(str(out)).to_pylist()
    assert len(clips) == len(rows) and errors_table(str(out)).num_rows == 0  # rows in = clips + errors
    assert total_calls(server) == len(rows), "one call per clip, the mix made as the audio arrives"
    for row in clips:
        data = clip_bytes(out, row)
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["num_bytes"]
        audio, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
        assert (rate, audio.shape, row["num_channels"]) == (16_000, (row["num_samples"], 1), 1)
        assert np.array_equal(audio[:, 0], mixed(store, row)), row["clip_id"]
    by_object = {row["object_id"]: row for row in clips}
    mono = by_object["demo-mono"]  # a mono object passes unchanged
    assert np.array_equal(mixed(store, mono), source_frames(store["demo-mono"], mono["clip_start_ms"], 700)[:, 0])
    assert "Every clip is mono" in (out / "README.md").read_text()
    assert json.loads((out / "_RUN.json").read_text())["options"]["channels"] == "mix"


def test_a_rerun_that_changes_channels_must_overwrite(server: LocalServer, store: dict[str, str], tmp_path) -> None:
    """A kept stereo clip is not what a --channels mix run writes: --skip_existing and --append stop at launch
    (nothing written, no call), --overwrite fetches every clip again, mono."""
    out = tmp_path / "out"
    rows = time_rows(6, objects=OBJECTS)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    expect_exit(run_build(server, manifest, str(out)), 0)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    calls = total_calls(server)
    for mode in ("--skip_existing", "--append"):
        done = run_build(server, manifest, str(out), "--channels=mix", mode)
        expect_exit(done, 2)
        assert "built with --channels keep" in done.stderr and "--overwrite" in done.stderr, done.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before and total_calls(server) == calls
    expect_exit(run_build(server, manifest, str(out), "--channels=mix", "--overwrite"), 0)
    assert total_calls(server) - calls == len(rows)
    clips = clips_table(str(out)).to_pylist()
    assert {row["num_channels"] for row in clips} == {1} and len(clips) == len(rows)
    for row in clips:
        audio, _ = sf.read(out / row["path"], dtype="int16", always_2d=True)
        assert np.array_equal(audio[:, 0], mixed(store, row))
    expect_exit(run_build(server, manifest, str(out), "--channels=mix", "--skip_existing"), 0)
    assert total_calls(server) - calls == len(rows) and run_record(out)["clips_skipped"] == len(rows)


def test_a_stopped_runs_mixed_clips_are_kept_by_a_mixed_rerun(server: LocalServer, tmp_path: Path) -> None:
    """No record (a run stopped before its end) says nothing of --channels: a --channels mix rerun keeps the
    mixed clips the tables describe, and no call is made."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(6, objects=OBJECTS))
    expect_exit(run_build(server, manifest, str(out), "--channels=mix"), 0)
    (out / "_RUN.json").unlink()
    calls = total_calls(server)
    expect_exit(run_build(server, manifest, str(out), "--channels=mix", "--skip_existing"), 0)
    assert total_calls(server) == calls and run_record(out)["clips_skipped"] == 6
