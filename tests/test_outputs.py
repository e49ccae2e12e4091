"""Dataset outputs read back: transcripts, FLAC clips and WebDataset tar shards, against the source."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.helpers import SCHEMA, run, segment_of, served_range, sidecar_tokens, source_frames, write_manifest

PADDING_MS = 100  # the server's default token padding

ROWS = [
    {"clip_id": "mono-time", "object_id": "demo-mono", "start_ms": 1000, "duration_ms": 2500},
    {"clip_id": "stereo-time", "object_id": "demo-stereo", "start_ms": 2222, "duration_ms": 1111},
    {"clip_id": "mono-tokens", "object_id": "demo-mono", "token_start": 2, "token_end": 7},
    {"clip_id": "three-tokens", "object_id": "demo-flac-3ch", "token_start": 0, "token_end": 3},
    {"clip_id": None, "object_id": "demo-stereo", "start_ms": 0, "duration_ms": 700},
]


def expected_served(store, row) -> tuple[int, int]:
    """The range the server serves for a row: a time range as is, a token range widened by the padding."""
    return served_range(store, row["object_id"], segment_of(row), PADDING_MS)


def expected_tokens(store, row, start, duration) -> list[dict]:
    """The sidecar's tokens a clip keeps: a token range's own; for a time range the words more than half
    inside the clip (and the spaces inside it); no space at either end."""
    tokens = sidecar_tokens(store, row["object_id"])
    if row.get("token_start") is not None:
        chosen = tokens[row["token_start"] : row["token_end"]]
    else:
        end = start + duration
        chosen = [
            t
            for t in tokens
            if (start <= t["start_ms"] < end if t["duration_ms"] == 0 else
                2 * (min(t["start_ms"] + t["duration_ms"], end) - max(t["start_ms"], start)) > t["duration_ms"])
        ]  # fmt: skip
    while chosen and chosen[0]["text"] == " ":
        chosen = chosen[1:]
    while chosen and chosen[-1]["text"] == " ":
        chosen = chosen[:-1]
    return [
        {
            "text": t["text"],
            "start_ms": t["start_ms"] - start,
            "duration_ms": t["duration_ms"],
            "speaker": t.get("speaker"),
            "confidence": t.get("confidence"),
        }
        for t in chosen
    ]


def by_clip(table) -> dict:
    return {r["clip_id"]: r for r in table.values()}


def test_transcripts_are_cut_to_each_clip_from_one_get_object_per_object(make_server, store, tmp_path):
    server = make_server()
    out = tmp_path / "out"
    table = by_clip(run(server, write_manifest(tmp_path / "m.parquet", ROWS, SCHEMA), out, "--with_transcripts"))
    assert len(table) == len(ROWS)
    for row in ROWS:
        record = table[row["clip_id"]] if row["clip_id"] else table["demo-stereo.t0+700"]
        start, duration = expected_served(store, row)
        assert (record["clip_start_ms"], record["clip_duration_ms"]) == (start, duration)
        tokens = expected_tokens(store, row, start, duration)
        assert record["transcript_tokens"] == tokens, row
        assert record["transcript_text"] == "".join(t["text"] for t in tokens).strip()
        assert record["transcript_text"], "every clip here covers some words"
        audio, _ = sf.read(out / record["path"], dtype="int16", always_2d=True)
        assert np.array_equal(audio, source_frames(store[row["object_id"]], start, duration))
    # One GetObject per object; the first row's object has one more: the key check before the run.
    assert dict(server.servicer.object_calls) == {"demo-mono": 2, "demo-stereo": 1, "demo-flac-3ch": 1}
    # A token range gets exactly its tokens, each inside the (padded) clip.
    tokens = table["mono-tokens"]["transcript_tokens"]
    assert len(tokens) == 5 and tokens[0]["start_ms"] == PADDING_MS


def test_a_run_without_transcripts_has_no_transcript_columns(make_server, tmp_path):
    server = make_server()
    out = tmp_path / "out"
    run(server, write_manifest(tmp_path / "m.parquet", ROWS, SCHEMA), out)
    names = pq.read_schema(glob.glob(os.path.join(out, "metadata", "clips-*.parquet"))[0]).names
    assert "transcript_text" not in names and "member" not in names
    assert sum(server.servicer.object_calls.values()) == 1  # the key check before the run, nothing else


def test_flac_clips_are_lossless_and_hashed_as_written(make_server, store, tmp_path):
    server = make_server()
    manifest = write_manifest(tmp_path / "m.parquet", ROWS, SCHEMA)
    wav = by_clip(run(server, manifest, tmp_path / "wav"))
    flac = by_clip(run(server, manifest, tmp_path / "flac", "--clip_format=flac"))
    assert wav.keys() == flac.keys()
    for clip_id, record in flac.items():
        assert record["path"] == f"clips/{clip_id}.flac"
        with open(tmp_path / "flac" / record["path"], "rb") as f:
            data = f.read()
        assert data[:4] == b"fLaC"
        assert (record["num_bytes"], record["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        audio, rate = sf.read(tmp_path / "flac" / record["path"], dtype="int16", always_2d=True)
        expected, _ = sf.read(tmp_path / "wav" / wav[clip_id]["path"], dtype="int16", always_2d=True)
        assert rate == 16_000 and np.array_equal(audio, expected)
        assert record["num_samples"] == len(audio) and record["num_channels"] == audio.shape[1]
    assert sum(r["num_bytes"] for r in flac.values()) < sum(r["num_bytes"] for r in wav.values())
    calls = sum(server.calls.values())
    again = by_clip(run(server, manifest, tmp_path / "flac", "--clip_format=flac", "--skip_existing"))
    assert sum(server.calls.values()) == calls, "--skip_existing recognises complete FLAC clips"
    assert {k: r["sha256"] for k, r in again.items()} == {k: r["sha256"] for k, r in flac.items()}
    assert {r["attempts"] for r in again.values()} == {0}


@pytest.mark.parametrize("clip_format", ["wav", "flac"])
def test_tar_shards_hold_every_clip_once_with_its_metadata(make_server, store, tmp_path, clip_format):
    server = make_server()
    out = tmp_path / "out"
    table = by_clip(
        run(
            server,
            write_manifest(tmp_path / "m.parquet", ROWS, SCHEMA),
            out,
            "--shards=2",
            f"--clip_format={clip_format}",
        )
    )
    assert len(table) == len(ROWS)
    assert not (out / "clips").exists() and not (out / "_tmp").exists()
    shard_files = sorted((out / "shards").iterdir())
    assert 1 <= len(shard_files) <= 2
    seen = {}
    for shard in shard_files:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)  # WebDataset: the key is the name up to the first dot
            seen.setdefault(key, {})[ext] = (str(shard), name, data)
    assert len(seen) == len(ROWS)
    for clip_id, record in table.items():
        key = clip_id.replace(".", "~")
        shard, name, audio_bytes = seen[key][clip_format]
        assert (str(out / record["path"]), record["member"]) == (shard, name)
        assert (record["num_bytes"], record["sha256"]) == (len(audio_bytes), hashlib.sha256(audio_bytes).hexdigest())
        meta = json.loads(seen[key]["json"][2])
        assert meta["clip_id"] == clip_id and meta["member"] == name and meta["sha256"] == record["sha256"]
        row = next(r for r in ROWS if (r["clip_id"] or "demo-stereo.t0+700") == clip_id)
        audio, _ = sf.read(io.BytesIO(audio_bytes), dtype="int16", always_2d=True)
        assert np.array_equal(audio, source_frames(store[row["object_id"]], *expected_served(store, row)))
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    assert "tarfile" in snippet and "shards/audio_NNNNN.tar" in card
    printed = subprocess.run([sys.executable, "-c", snippet], cwd=out, capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    assert len(printed.stdout.splitlines()) == len(ROWS)
