"""Datasets that training code loads as they are: built by the real pipeline against the local server,
copied to a new folder, the original deleted, and the copy loaded with the real libraries: the card's own
snippets, Hugging Face `datasets`, `webdataset`, and the NeMo and Lhotse manifests.

Lhotse needs torch (its wheel requires it and its modules import it), so CI does not install it: its
manifests are checked here against the schema its loaders read and the rules of its `validate(read_data=True)`
(lhotse/qa.py): durations agree with samples, audio has the declared channels and samples, supervisions lie
inside their recording on its channels, cuts are MonoCut for one channel and MultiCut for several.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.helpers import build


def table(root: str) -> list[dict]:
    return pq.read_table(sorted(glob_files(root, "metadata", "clips-"))).to_pylist()


def glob_files(root: str, folder: str, prefix: str) -> list[str]:
    return [os.path.join(root, folder, f) for f in os.listdir(os.path.join(root, folder)) if f.startswith(prefix)]


def snippets(root: str) -> list[str]:
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.DOTALL)


def run_snippet(code: str, cwd: str, tmp_path) -> list[str]:
    """A card snippet run as a user would, from the dataset's folder (no network, a fresh HF cache)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.fixture(scope="module")
def files_dataset(tmp_path_factory) -> str:
    """WAV clips with transcripts and both manifests, copied."""
    from pipeline.local.samples import write_sample_store
    from pipeline.local.server import LocalServer

    tmp = tmp_path_factory.mktemp("loaders")
    store = write_sample_store(str(tmp / "store"))
    with LocalServer(os.path.dirname(next(iter(store.values())))) as server:
        return build(lambda: server, tmp, "files", "--with_transcripts", "--export=lhotse,nemo")


def test_every_path_is_relative_and_the_card_snippet_loads_the_copy(files_dataset, tmp_path) -> None:
    rows = table(files_dataset)
    assert len(rows) == 6
    for row in rows:
        assert row["path"] == f"clips/{row['clip_id']}.wav"
    with open(os.path.join(files_dataset, "README.md"), encoding="utf-8") as f:
        card = f.read()
    assert str(tmp_path.parent) not in card and "/files/" not in card, "the card names no absolute path"
    printed = run_snippet(snippets(files_dataset)[0], files_dataset, tmp_path)
    assert sorted(line.split()[0] for line in printed) == sorted(r["clip_id"] for r in rows)


def test_transcripts_are_null_without_one_and_empty_without_words(files_dataset) -> None:
    rows = {r["clip_id"]: r for r in table(files_dataset)}
    assert rows["untranscribed"]["transcript_text"] is None and rows["untranscribed"]["transcript_tokens"] is None
    assert rows["mono-silence"]["transcript_text"] == "" and rows["mono-silence"]["transcript_tokens"] == []
    for row in rows.values():
        tokens = row["transcript_tokens"] or []
        assert not tokens or (tokens[0]["text"] != " " and tokens[-1]["text"] != " ")
        for t in tokens:  # the default rule: more than half of each word inside the clip
            inside = min(t["start_ms"] + t["duration_ms"], row["clip_duration_ms"]) - max(t["start_ms"], 0)
            assert t["duration_ms"] == 0 or 2 * inside > t["duration_ms"], (row["clip_id"], t)
            assert t["text"] == " " or t["confidence"] is not None
    assert {t["speaker"] for t in rows["stereo-time"]["transcript_tokens"] if t["text"] != " "} == {1, 2}
    assert {t["speaker"] for t in rows["mono-time"]["transcript_tokens"]} == {None}


def test_hugging_face_loads_the_copy_with_every_column(files_dataset, tmp_path) -> None:
    import datasets

    rows = table(files_dataset)
    names = pq.read_schema(glob_files(files_dataset, "metadata", "clips-")[0]).names
    ds = datasets.load_dataset(files_dataset, split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.column_names == names and len(ds) == len(rows), "the clips table, not the errors table nor audio only"
    ds = ds.add_column("audio", [os.path.join(files_dataset, p) for p in ds["path"]])
    ds = ds.cast_column("audio", datasets.Audio(decode=False))
    by_id = {r["clip_id"]: r for r in rows}
    for example in ds:
        row = by_id[example["clip_id"]]
        assert {name: example[name] for name in names} == row  # every column's value, as the table holds it
        with open(example["audio"]["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == row["sha256"]
    printed = run_snippet(snippets(files_dataset)[1], files_dataset, tmp_path)
    assert printed[-1].startswith(f"{len(rows)} ")


def test_nemo_manifest_resolves_against_its_folder(files_dataset) -> None:
    """NeMo joins a relative audio_filepath to its manifest's folder (common/parts/preprocessing/manifest.py)."""
    rows = {r["path"]: r for r in table(files_dataset)}
    manifest = os.path.join(files_dataset, "nemo_manifest.jsonl")
    with open(manifest, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    transcribed = {path for path, row in rows.items() if row["transcript_text"] is not None}
    assert {line["audio_filepath"] for line in lines} == transcribed and len(lines) == len(rows) - 1
    for line in lines:
        row = rows[line["audio_filepath"]]
        info = sf.info(os.path.join(os.path.dirname(manifest), line["audio_filepath"]))
        assert line["duration"] == info.frames / info.samplerate == row["clip_duration_ms"] / 1000
        assert line["text"] == row["transcript_text"]
        assert line.get("lang") == row["language"]
    with open(os.path.join(files_dataset, "README.md"), encoding="utf-8") as f:
        assert "- Without a transcript: 1 clips" in f.read()


def read_jsonl_gz(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_lhotse_manifests_follow_its_schema_and_validation_rules(files_dataset) -> None:
    folder = files_dataset
    recordings = {r["id"]: r for r in read_jsonl_gz(os.path.join(folder, "lhotse_recordings.jsonl.gz"))}
    supervisions = {s["id"]: s for s in read_jsonl_gz(os.path.join(folder, "lhotse_supervisions.jsonl.gz"))}
    cuts = read_jsonl_gz(os.path.join(folder, "lhotse_cuts.jsonl.gz"))
    rows = {r["clip_id"]: r for r in table(files_dataset)}
    transcribed = {k for k, r in rows.items() if r["transcript_text"] is not None}
    assert set(recordings) == set(rows) and transcribed == set(supervisions) == {c["id"] for c in cuts}
    assert len(transcribed) == len(rows) - 1
    for rid, rec in recordings.items():
        assert set(rec) == {"id", "sources", "sampling_rate", "num_samples", "duration", "channel_ids"}
        (source,) = rec["sources"]
        assert source["type"] == "file" and source["source"] == rows[rid]["path"]  # relative to the root
        assert rec["duration"] > 0 and rec["duration"] == rec["num_samples"] / rec["sampling_rate"]
        audio, rate = sf.read(os.path.join(files_dataset, source["source"]), dtype="int16", always_2d=True)
        assert (rate, audio.shape) == (rec["sampling_rate"], (rec["num_samples"], len(rec["channel_ids"])))
        assert source["channels"] == rec["channel_ids"] == list(range(rows[rid]["num_channels"]))
    for sup in supervisions.values():
        rec = recordings[sup["recording_id"]]
        assert sup["start"] >= 0 and sup["duration"] > 0 and sup["start"] + sup["duration"] <= rec["duration"]
        channels = sup["channel"] if isinstance(sup["channel"], list) else [sup["channel"]]
        assert set(channels) <= set(rec["channel_ids"])
        assert sup["text"] == rows[sup["id"]]["transcript_text"]
        assert sup.get("language") == rows[sup["id"]]["language"]
    assert supervisions["three-tokens"]["speaker"] == "ann"  # the manifest's column
    assert supervisions["stereo-time"].get("speaker") is None  # no column, and the tokens name two speakers
    for cut in cuts:
        rec = recordings[cut["id"]]
        assert cut["recording"] == rec and cut["start"] == 0 and cut["duration"] == rec["duration"]
        multi = len(rec["channel_ids"]) > 1
        assert cut["type"] == ("MultiCut" if multi else "MonoCut")
        assert cut["channel"] == (rec["channel_ids"] if multi else 0)
        assert cut["supervisions"] == [supervisions[cut["id"]]]
    assert {c["type"] for c in cuts} == {"MonoCut", "MultiCut"}


@pytest.fixture(scope="module")
def shards_dataset(tmp_path_factory) -> str:
    """FLAC clips in two tar shards with a NeMo (tarred) manifest, copied."""
    from pipeline.local.samples import write_sample_store
    from pipeline.local.server import LocalServer

    tmp = tmp_path_factory.mktemp("shards")
    store = write_sample_store(str(tmp / "store"))
    with LocalServer(os.path.dirname(next(iter(store.values())))) as server:
        flags = ("--shards=2", "--clip_format=flac", "--with_transcripts", "--export=nemo")
        return build(lambda: server, tmp, "shards", *flags)


def test_shards_load_from_the_copy(shards_dataset, tmp_path) -> None:
    import webdataset

    rows = {r["clip_id"]: r for r in table(shards_dataset)}
    for row in rows.values():
        assert re.fullmatch(r"shards/audio_0000[01]\.tar", row["path"])
    shards = sorted(glob_files(shards_dataset, "shards", "audio_"))
    samples = list(webdataset.WebDataset(shards, shardshuffle=False))
    assert len(samples) == len(rows)
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["path"] == rows[meta["clip_id"]]["path"] and sample["flac"][:4] == b"fLaC"
        assert hashlib.sha256(sample["flac"]).hexdigest() == rows[meta["clip_id"]]["sha256"]
    first, second = snippets(shards_dataset)
    assert len(run_snippet(first, shards_dataset, tmp_path)) == len(rows)
    count, path, member = run_snippet(second, shards_dataset, tmp_path)[-1].split()
    assert int(count) == len(rows) and rows[next(k for k, r in rows.items() if r["member"] == member)]["path"] == path


def test_nemo_tarred_manifest_names_each_member_and_its_shard(shards_dataset) -> None:
    rows = {r["member"]: r for r in table(shards_dataset)}
    with open(os.path.join(shards_dataset, "nemo_manifest.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    transcribed = {member for member, row in rows.items() if row["transcript_text"] is not None}
    assert {line["audio_filepath"] for line in lines} == transcribed
    for line in lines:
        row = rows[line["audio_filepath"]]
        assert row["path"] == f"shards/audio_{line['shard_id']:05d}.tar"
        with tarfile.open(os.path.join(shards_dataset, row["path"])) as tar:
            assert tar.getmember(line["audio_filepath"]).size == row["num_bytes"]
        assert line["duration"] == row["num_samples"] / 16_000
