"""`--layout hf-parquet`: Parquet shards whose rows are the clips table's, each with its audio in Hugging Face's
Audio encoding, loaded by `datasets.load_dataset(root)` with no cast; kept in place by reruns like tar shards."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.local.server import LocalServer
from tests.helpers import (
    check_clips_table,
    clip_bytes,
    clips_table,
    errors_table,
    expect_exit,
    ids,
    run_build,
    run_record,
    source_frames,
    time_rows,
    total_calls,
    write_local_manifest,
)

HF = ("--layout=hf-parquet", "--shards=3")


def shard_rows(root: Path) -> list[dict]:
    return pq.read_table(sorted((root / "data").glob("train-*.parquet"))).to_pylist()


@pytest.mark.parametrize("clip_format", ["wav", "flac"])
def test_parquet_shards_hold_every_clip_row_with_its_audio(
    server: LocalServer, store: dict[str, str], tmp_path: Path, clip_format: str
) -> None:
    out = tmp_path / "out"
    rows = time_rows(12)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    expect_exit(run_build(server, manifest, str(out), *HF, f"--clip_format={clip_format}", "--with_transcripts"), 0)
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"train-0000{i}.parquet" for i in range(3)]
    assert not (out / "clips").exists() and not (out / "shards").exists()
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows) and total_calls(server) == len(rows)
    for row in clips:  # each row's audio bytes: the samples of the source
        audio, _ = sf.read(io.BytesIO(clip_bytes(out, row)), dtype="int16", always_2d=True)
        expected = source_frames(store[row["object_id"]], row["clip_start_ms"], row["clip_duration_ms"])
        assert np.array_equal(audio, expected), row["clip_id"]
    by_id = {row["clip_id"]: row for row in clips}
    for row in shard_rows(out):
        audio, duration = row.pop("audio"), row.pop("duration")
        assert row == by_id[row["clip_id"]], "every clips-table column, as the table holds it"
        assert duration == row["num_samples"] / 16_000 and audio["path"] == row["member"]
        assert audio["path"].endswith(f".{clip_format}") and row["path"].startswith("data/train-")
        assert hashlib.sha256(audio["bytes"]).hexdigest() == row["sha256"]


def test_hugging_face_loads_the_audio_with_no_cast(server: LocalServer, tmp_path: Path) -> None:
    """`load_dataset(copy)` (the card's `configs` names data/): `audio` is an Audio feature at 16 kHz, the errors
    and clips tables beside the shards are not read; bytes compared without decoding (no torchcodec here)."""
    import datasets

    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(9))
    expect_exit(run_build(server, manifest, str(out), *HF), 0)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    ds = datasets.load_dataset(str(copy), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds.features["audio"], datasets.Audio) and ds.features["audio"].sampling_rate == 16_000
    assert len(ds) == 9 and "error_code" not in ds.column_names and "duration" in ds.column_names
    by_id = {row["clip_id"]: row for row in clips_table(str(copy)).to_pylist()}
    for example in ds.cast_column("audio", datasets.Audio(decode=False)):
        row = by_id[example["clip_id"]]
        assert hashlib.sha256(example["audio"]["bytes"]).hexdigest() == row["sha256"]
        assert example["duration"] == row["clip_duration_ms"] / 1000


def test_a_rerun_rewrites_only_the_parquet_shard_that_changes(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    """A changed clip: one call, its shard rebuilt (its other clips copied from the earlier file), the other
    shards neither read nor written."""
    out = tmp_path / "out"
    rows = time_rows(12)
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", rows), str(out), *HF), 0)
    before = _files(out)
    calls = total_calls(server)
    changed = dict(rows[4], start_ms=rows[4]["start_ms"] + 100)
    manifest = write_local_manifest(tmp_path / "b.parquet", [*rows[:4], changed, *rows[5:]])
    expect_exit(run_build(server, manifest, str(out), *HF, "--skip_existing"), 0)
    assert total_calls(server) - calls == 1
    after = _files(out)
    assert sorted(after) == sorted(before) and sum(after[n] != before[n] for n in after) == 1
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows) and len(shard_rows(out)) == len(rows)
    check_clips_table(clips, store, str(out))
    assert (run_record(out)["clips_written"], run_record(out)["clips_skipped"]) == (1, 11)


def _files(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "data").iterdir()}


def test_the_shard_count_comes_from_the_target_size_and_stays_for_reruns(server: LocalServer, tmp_path: Path) -> None:
    """12 mono WAV clips of 250 ms are 96 kB of audio: --shard_mb 0.024 gives 4 shards, which a rerun keeps
    whatever size it is given (each clip stays in its shard: no call)."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(12, objects=("demo-mono",)))
    expect_exit(run_build(server, manifest, str(out), "--layout=webdataset", "--shard_mb=0.024"), 0)
    assert run_record(out)["options"]["shards"] == 4 and run_record(out)["options"]["layout"] == "webdataset"
    names = sorted(p.name for p in (out / "shards").iterdir())
    assert 1 < len(names) <= 4 and set(names) <= {f"audio_0000{i}.tar" for i in range(4)}
    calls = total_calls(server)
    expect_exit(run_build(server, manifest, str(out), "--layout=webdataset", "--shard_mb=0.01", "--skip_existing"), 0)
    assert total_calls(server) == calls and run_record(out)["options"]["shards"] == 4
    assert sorted(p.name for p in (out / "shards").iterdir()) == names


def test_bad_sizes_and_hf_parquet_exports_stop_at_launch(tmp_path: Path) -> None:
    from tests.helpers import run_pipeline

    for flags, message in [
        (["--layout=hf-parquet", "--shard_mb=-1"], "--shard_mb takes a size in MB"),
        ([*HF, "--with_transcripts", "--export=nemo"], "not of --layout hf-parquet"),
    ]:
        done = run_pipeline("run", f"--manifest={tmp_path}/m.parquet", f"--output={tmp_path}/o", *flags)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_export_command_refuses_the_layouts_that_are_their_own_format(server: LocalServer, tmp_path: Path) -> None:
    from tests.helpers import run_pipeline

    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(3))
    for layout, folder in (("hf-parquet", "data"), ("lhotse-shar", "shar")):
        out = tmp_path / layout
        expect_exit(run_build(server, manifest, str(out), f"--layout={layout}", "--with_transcripts"), 0)
        done = run_pipeline("export", str(out))
        expect_exit(done, 2)
        assert f"not {folder}/" in done.stderr and not (out / "nemo_manifest.jsonl").exists(), done.stderr


def test_append_and_skip_existing_keep_the_layout(server: LocalServer, tmp_path: Path) -> None:
    """Another layout would write the clips in another folder and leave the earlier ones there: exit 2."""
    out = tmp_path / "out"
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", time_rows(4)), str(out), *HF), 0)
    manifest = write_local_manifest(tmp_path / "b.parquet", time_rows(2, first=4))
    for mode in ("--append", "--skip_existing"):
        done = run_build(server, manifest, str(out), "--layout=webdataset", "--shards=3", mode)
        expect_exit(done, 2)
        assert "--layout hf-parquet" in done.stderr and "--overwrite" in done.stderr, done.stderr
    assert not (out / "shards").exists()
    expect_exit(run_build(server, manifest, str(out), *HF, "--append"), 0)
    assert len(shard_rows(out)) == 6 and ids(clips_table(str(out)).to_pylist()) == ids(time_rows(6))


# -- lhotse-shar ----------------------------------------------------------------------------------------------


def shar_shards(root: Path) -> dict[int, tuple[list[str], list[dict]]]:
    """Each shard's tar members, in order, and its cuts, in order."""
    found = {}
    for tar_path in sorted((root / "shar").glob("recording.*.tar")):
        index = tar_path.name.split(".")[1]
        with tarfile.open(tar_path) as tar:
            members = tar.getnames()
        with gzip.open(root / "shar" / f"cuts.{index}.jsonl.gz", "rt", encoding="utf-8") as f:
            found[int(index)] = (members, [json.loads(line) for line in f])
    return found


def test_lhotse_shar_pairs_each_clip_with_its_cut(server: LocalServer, store: dict[str, str], tmp_path: Path) -> None:
    """Shar's contract (lhotse/shar/readers): per shard a tar of (audio, recording JSON) pairs and the cuts in the
    same order, each cut's id the audio member's name without its suffix, every cut supervised; nothing else in
    shar/. A row whose object has no transcript is a NO_TRANSCRIPT error, not fetched (a cut with no
    supervision would be an empty training target in NeMo's shar_path)."""
    out = tmp_path / "out"
    rows = time_rows(10)
    no_words = {"clip_id": "no.words", "object_id": "demo-44k-notokens", "start_ms": 0, "duration_ms": 500}
    manifest = write_local_manifest(tmp_path / "m.parquet", [*rows, no_words])
    flags = ("--layout=lhotse-shar", "--shards=2", "--with_transcripts", "--max_error_ratio=0.1")
    expect_exit(run_build(server, manifest, str(out), *flags), 0)
    assert total_calls(server) == len(rows) and server.calls["demo-44k-notokens"] == 0
    (error,) = errors_table(str(out)).to_pylist()
    assert (error["clip_id"], error["error_code"]) == ("no.words", "NO_TRANSCRIPT")
    assert sorted(p.name for p in (out / "shar").iterdir()) == [
        "cuts.000000.jsonl.gz", "cuts.000001.jsonl.gz", "recording.000000.tar", "recording.000001.tar"
    ]  # fmt: skip
    clips = {row["clip_id"]: row for row in clips_table(str(out)).to_pylist()}
    assert sorted(clips) == sorted(ids(rows))
    seen = []
    for index, (members, cuts) in shar_shards(out).items():
        assert members[0::2] == [f"{cut['id']}.wav" for cut in cuts] and members[1::2] == [
            f"{c['id']}.json" for c in cuts
        ]
        for cut in cuts:
            row = clips[cut["id"]]
            assert row["path"] == f"shar/recording.{index:06d}.tar" and row["member"] == f"{cut['id']}.wav"
            assert cut["duration"] == row["num_samples"] / 16_000
            assert [s["text"] for s in cut["supervisions"]] == [row["transcript_text"]]
            seen.append(cut["id"])
    assert sorted(seen) == sorted(clips)
    for row in clips.values():  # the audio as it was written: hash and samples of the source
        data = clip_bytes(out, row)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        audio, _ = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
        source = source_frames(store[row["object_id"]], row["clip_start_ms"], row["clip_duration_ms"])
        assert np.array_equal(audio, source)


def test_a_shar_rerun_rewrites_only_the_shard_that_changes(server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = time_rows(12)
    flags = ("--layout=lhotse-shar", "--shards=3")
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", rows), str(out), *flags), 0)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shar").iterdir()}
    calls = total_calls(server)
    changed = dict(rows[4], start_ms=rows[4]["start_ms"] + 100)
    manifest = write_local_manifest(tmp_path / "b.parquet", [*rows[:4], changed, *rows[5:]])
    expect_exit(run_build(server, manifest, str(out), *flags, "--skip_existing"), 0)
    assert total_calls(server) - calls == 1
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shar").iterdir()}
    rewritten = sorted(name for name in after if after[name] != before[name])
    assert sorted(after) == sorted(before) and len(rewritten) == 2, rewritten  # one shard's tar and cuts
    assert rewritten[0].split(".")[1] == rewritten[1].split(".")[1]
    assert sum(len(cuts) for _, cuts in shar_shards(out).values()) == len(rows)


def test_overwrite_into_another_layout_removes_the_earlier_layouts_files(server: LocalServer, tmp_path: Path) -> None:
    """--overwrite rebuilds a files dataset as Parquet shards: once the new tables are written the clip files are
    gone (they are listed by no table), and the record counts them removed."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(5))
    expect_exit(run_build(server, manifest, str(out)), 0)
    assert len(list((out / "clips").iterdir())) == 5
    expect_exit(run_build(server, manifest, str(out), *HF, "--overwrite"), 0)
    assert not list((out / "clips").iterdir()) and len(shard_rows(out)) == 5
    assert run_record(out)["clips_removed"] == 5
