"""The ways a run goes over an output that already holds a dataset: `--skip_existing`, `--append`, `--overwrite`.

Each test runs `python -m pipeline run` (in this process) against a LocalServer into a local folder and checks
what a user relies on: a rerun without a mode changes nothing and says which modes there are; `--skip_existing`
makes the dataset match the new manifest with calls only for what it lacks (no call and no storage request for a
clip that is current) and removes the clip files no row lists; `--append` keeps the earlier rows, so the errors
table fed back as the manifest retries the failures in place; `--overwrite` fetches everything again;
`--verify_existing` catches a damaged clip of the same size; the modes exclude each other; a first run needs
none; the run record names its tables relative to the dataset, so a copy of it still resolves them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.audio import parse_wav_header
from pipeline.dataset.storage import LocalStore
from pipeline.graph import batches
from pipeline.local.server import LocalServer, ServerSettings
from tests.helpers import (
    check_clips_table,
    clips_table,
    errors_table,
    expect_exit,
    ids,
    local_files,
    one_error,
    run_argv,
    run_build,
    run_pipeline,
    run_record,
    time_rows,
    total_calls,
    write_local_manifest,
)

MODE_FLAGS = ("--skip_existing", "--append", "--overwrite")


# -- helpers -------------------------------------------------------------------------------------------


def table_ids(output: Path) -> list[str]:
    """The clip_ids the clips table lists, sorted, each as often as it is listed."""
    return sorted(clips_table(str(output)).column("clip_id").to_pylist())


def clip_files(output: Path) -> list[str]:
    return sorted(os.listdir(output / "clips"))


def wav_names(clip_ids: list[str]) -> list[str]:
    return sorted(f"{c}.wav" for c in clip_ids)


def file_ids(output: Path) -> dict[str, tuple[int, int]]:
    """clips/ file name -> (inode, mtime_ns): equal before and after a run when the run left the file alone."""
    return {name: _identity(output / "clips" / name) for name in os.listdir(output / "clips")}


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every file under `root` (relative path -> size, mtime_ns) and every folder (path/ -> None)."""
    found: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        for name in dirs:
            found[os.path.normpath(os.path.join(rel, name)) + "/"] = None
        for name in files:
            st = os.stat(os.path.join(folder, name))
            found[os.path.normpath(os.path.join(rel, name))] = (st.st_size, st.st_mtime_ns)
    return found


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def small_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets of about 3 keys: the join and the clip ID count spread these small datasets over many buckets,
    as they spread a large one (with one bucket, a group split between buckets would go unnoticed)."""
    monkeypatch.setattr(batches, "PER_BUCKET", 3)


@pytest.fixture
def clip_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every head or read the runs of this process make on a clip file of a local output (the in-process runner
    uses this process's LocalStore class), as "head PATH" / "read PATH"."""
    seen: list[str] = []
    for name in ("head", "read"):
        original = getattr(LocalStore, name)

        def watch(self: LocalStore, path: str, _original: Any = original, _name: str = name) -> Any:
            if "/clips/" in str(path).replace(os.sep, "/"):
                seen.append(f"{_name} {path}")
            return _original(self, path)

        monkeypatch.setattr(LocalStore, name, watch)
    return seen


@pytest.fixture
def own_store(tmp_path: Path, store: dict[str, str]) -> Path:
    """A store folder of this test's own, holding demo-mono only (an object can be added to it later)."""
    folder = tmp_path / "store"
    folder.mkdir()
    shutil.copy(store["demo-mono"], folder)
    return folder


@pytest.fixture
def own_server(own_store: Path) -> Iterator[LocalServer]:
    with LocalServer(str(own_store), ServerSettings()) as server:
        yield server


# -- no mode over a dataset ----------------------------------------------------------------------------


def test_no_mode_over_existing_dataset_exits_2_and_changes_nothing(server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(10))
    expect_exit(run_build(server, manifest, str(out)), 0)
    before, calls = snapshot(out), total_calls(server)

    proc = run_build(server, manifest, str(out))
    expect_exit(proc, 2)
    error = one_error(proc.stderr)
    for flag in MODE_FLAGS:
        assert flag in error, error
    assert total_calls(server) == calls, f"GetAudio reached: {server.calls}"
    assert snapshot(out) == before, "a run that could not start changed the output"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--append", "--layout=webdataset"], "--layout files"),
        (["--skip_existing", "--layout=hf-parquet"], "--layout files"),
        (["--append", "--clip_format=flac"], "--clip_format wav"),
    ],
)
def test_a_rerun_another_way_stops_naming_how_the_dataset_was_built(
    flags: list[str], named: str, server: LocalServer, tmp_path: Path
) -> None:
    """A rerun keeps the earlier clips where and as they are: another layout or format (for --append) would
    leave them listed by no table, so it stops at launch, saying how the dataset was built, and changes nothing."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(4))
    expect_exit(run_build(server, manifest, str(out)), 0)
    before, calls = snapshot(out), total_calls(server)
    proc = run_build(server, manifest, str(out), *flags)
    expect_exit(proc, 2)
    error = one_error(proc.stderr)
    assert named in error and "--overwrite" in error, error
    if named.startswith("--layout"):  # --skip_existing would stop the same way: not a way out
        assert "--skip_existing" not in error, error
    assert total_calls(server) == calls and snapshot(out) == before, "a run that could not start changed something"


@pytest.mark.parametrize("layout", ["webdataset", "hf-parquet", "lhotse-shar"])
def test_a_stopped_sharded_runs_shards_alone_need_a_mode(layout: str, server: LocalServer, tmp_path: Path) -> None:
    """What a run stopped after publishing shards leaves (shards, no table, no record) is a dataset: a run with
    no mode exits 2 and changes nothing, in every sharded layout's folder (shar/ was not looked at)."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(6))
    expect_exit(run_build(server, manifest, str(out), f"--layout={layout}", "--shards=2"), 0)
    for path in out.iterdir():
        if path.is_dir() and path.name not in ("shards", "data", "shar"):
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    before, calls = snapshot(out), total_calls(server)
    proc = run_build(server, manifest, str(out), f"--layout={layout}", "--shards=2")
    expect_exit(proc, 2)
    assert all(flag in one_error(proc.stderr) for flag in MODE_FLAGS), one_error(proc.stderr)
    assert total_calls(server) == calls and snapshot(out) == before


# -- --append ------------------------------------------------------------------------------------------


def test_retry_failures_with_append_keeps_every_row(
    own_server: LocalServer, own_store: Path, store: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rows = time_rows(9, objects=("demo-mono",)) + time_rows(3, first=9, objects=("demo-stereo",))
    failing = ids(rows[9:])
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)

    # Run 1: the server has no demo-stereo yet: its rows fail with NOT_FOUND.
    expect_exit(run_build(own_server, manifest, str(out), "--max_error_ratio=0.5"), 0)
    assert total_calls(own_server) == 12
    assert table_ids(out) == ids(rows[:9])
    errors = errors_table(str(out)).to_pylist()
    assert sorted((e["clip_id"], e["error_code"]) for e in errors) == [(c, "NOT_FOUND") for c in failing]
    kept_files = file_ids(out)
    assert sorted(kept_files) == wav_names(ids(rows[:9]))

    # The object appears; run 2 retries the errors table in place.
    shutil.copy(store["demo-stereo"], own_store)
    proc = run_build(own_server, str(out / "metadata" / "errors-*.parquet"), str(out), "--append")
    expect_exit(proc, 0)
    assert total_calls(own_server) == 12 + 3, f"only the failed rows may be fetched: {own_server.calls}"
    assert own_server.calls["demo-stereo"] == 3 + 3 and own_server.calls["demo-mono"] == 9

    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows), "every row's clip_id exactly once"
    assert errors_table(str(out)).num_rows == 0
    assert len(clips) + errors_table(str(out)).num_rows == len(rows)
    check_clips_table(clips, store, str(out))
    by_id = {r["clip_id"]: r for r in clips}
    assert {c for c, r in by_id.items() if r["attempts"] > 0} == set(failing)
    assert clip_files(out) == wav_names(ids(rows))
    assert {name: file_ids(out)[name] for name in kept_files} == kept_files, "kept clip files were rewritten"

    record = run_record(out)
    assert record["mode"] == "append"
    assert (record["rows"], record["clips_written"], record["clips_kept"], record["clips_skipped"]) == (3, 3, 9, 0)
    assert (record["errors"], record["errors_kept"], record["clips_removed"]) == (0, 0, 0)
    assert record["clips"] + record["errors"] + record["errors_kept"] == len(rows)


# -- --skip_existing -----------------------------------------------------------------------------------


def test_skip_existing_rerun_makes_no_call_and_matches_the_manifest(
    server: LocalServer, store: dict[str, str], tmp_path: Path, clip_lookups: list[str]
) -> None:
    out = tmp_path / "out"
    a = time_rows(20)
    b = a[:15] + time_rows(5, prefix="n", first=20)
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", a), str(out)), 0)
    assert total_calls(server) == 20
    before = file_ids(out)

    clip_lookups.clear()
    proc = run_build(server, write_local_manifest(tmp_path / "b.parquet", b), str(out), "--skip_existing")
    expect_exit(proc, 0)
    assert total_calls(server) == 20 + 5, f"calls beyond the 5 new rows: {server.calls}"
    assert clip_lookups == [], "a storage request per clip"

    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(b)
    assert errors_table(str(out)).num_rows == 0
    check_clips_table(clips, store, str(out))
    assert {r["clip_id"] for r in clips if r["attempts"] == 0} == set(ids(a[:15]))
    assert clip_files(out) == wav_names(ids(b)), "clip files of rows B does not list are still there"
    after = file_ids(out)
    assert {n: after[n] for n in wav_names(ids(a[:15]))} == {n: before[n] for n in wav_names(ids(a[:15]))}

    record = run_record(out)
    assert record["mode"] == "skip_existing"
    assert (record["rows"], record["clips_skipped"], record["clips_written"], record["clips_removed"]) == (20, 15, 5, 5)
    assert (record["clips_kept"], record["errors"]) == (0, 0)


def test_skip_existing_refetches_a_clip_whose_request_changed(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rows = time_rows(10)
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", rows), str(out)), 0)
    before = file_ids(out)

    changed = dict(rows[4], start_ms=rows[4]["start_ms"] + 1000)  # same clip_id, duration and so file size
    rows[4] = changed
    calls = total_calls(server)
    proc = run_build(server, write_local_manifest(tmp_path / "b.parquet", rows), str(out), "--skip_existing")
    expect_exit(proc, 0)
    assert total_calls(server) - calls == 1

    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows)
    row = next(r for r in clips if r["clip_id"] == changed["clip_id"])
    assert (row["clip_start_ms"], row["clip_duration_ms"]) == (changed["start_ms"], changed["duration_ms"])
    assert row["attempts"] > 0
    check_clips_table(clips, store, str(out))  # the changed clip holds the new range's samples
    after = file_ids(out)
    name = f"{changed['clip_id']}.wav"
    assert {n: v for n, v in after.items() if n != name} == {n: v for n, v in before.items() if n != name}
    record = run_record(out)
    assert (record["clips_written"], record["clips_skipped"], record["clips_removed"]) == (1, 9, 0)


def test_verify_existing_replaces_a_same_size_damaged_clip(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rows = time_rows(10)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    expect_exit(run_build(server, manifest, str(out)), 0)
    first = {r["clip_id"]: r for r in clips_table(str(out)).to_pylist()}

    damaged = out / "clips" / "c003.wav"
    data = bytearray(damaged.read_bytes())
    offset = parse_wav_header(bytes(data[:4096])).data_offset
    data[offset + 100 : offset + 400] = bytes(b ^ 0x5A for b in data[offset + 100 : offset + 400])
    damaged.write_bytes(bytes(data))
    assert damaged.stat().st_size == first["c003"]["num_bytes"]
    assert sha256_of(damaged) != first["c003"]["sha256"]

    # Without --verify_existing the decision is the tables' and the listing's: the damaged clip stays.
    calls = total_calls(server)
    expect_exit(run_build(server, manifest, str(out), "--skip_existing"), 0)
    assert total_calls(server) == calls
    assert damaged.read_bytes() == bytes(data)
    assert run_record(out)["clips_skipped"] == 10

    before = file_ids(out)
    expect_exit(run_build(server, manifest, str(out), "--skip_existing", "--verify_existing"), 0)
    assert total_calls(server) - calls == 1, f"calls: {server.calls}"
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows)
    check_clips_table(clips, store, str(out))  # the damaged clip's samples are the source's again
    row = next(r for r in clips if r["clip_id"] == "c003")
    assert row["sha256"] == sha256_of(damaged) == first["c003"]["sha256"]
    assert row["attempts"] > 0
    after = file_ids(out)
    assert {n: v for n, v in after.items() if n != "c003.wav"} == {n: v for n, v in before.items() if n != "c003.wav"}
    record = run_record(out)
    assert (record["clips_written"], record["clips_skipped"], record["clips_removed"]) == (1, 9, 0)


# -- --overwrite ---------------------------------------------------------------------------------------


def test_overwrite_replaces_the_dataset(server: LocalServer, store: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    a, b = time_rows(12, prefix="a"), time_rows(12, prefix="b", first=12)
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", a), str(out)), 0)

    manifest_b = write_local_manifest(tmp_path / "b.parquet", b)
    calls = total_calls(server)
    expect_exit(run_build(server, manifest_b, str(out), "--overwrite"), 0)
    assert total_calls(server) - calls == len(b)
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(b)
    assert errors_table(str(out)).num_rows == 0
    assert clip_files(out) == wav_names(ids(b)), "clip files of the replaced dataset are still there"
    check_clips_table(clips, store, str(out))
    assert run_record(out)["mode"] == "overwrite"

    # The same manifest again: everything is fetched again, nothing kept.
    calls = total_calls(server)
    expect_exit(run_build(server, manifest_b, str(out), "--overwrite"), 0)
    assert total_calls(server) - calls == len(b)
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(b) and {r["attempts"] for r in clips} == {1}
    check_clips_table(clips, store, str(out))
    record = run_record(out)
    assert (record["clips_written"], record["clips_skipped"], record["clips_kept"]) == (len(b), 0, 0)


# -- the run record ------------------------------------------------------------------------------------


def test_record_names_are_relative_and_survive_a_copy(server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = [*time_rows(8), {"clip_id": "gone", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 300}]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    flags = ("--max_error_ratio=0.5", "--with_transcripts", "--export=nemo")
    expect_exit(run_build(server, manifest, str(out), *flags), 0)
    record = run_record(out)
    assert record["mode"] == "new"
    assert record["clips_table"] and record["errors_table"] and record["exports"]
    names = [*record["clips_table"], *record["errors_table"], *record["exports"]]
    for name in names:
        assert not name.startswith("/") and "://" not in name and not os.path.isabs(name), name
    assert all(n.startswith("metadata/clips-") for n in record["clips_table"]), record["clips_table"]
    assert all(n.startswith("metadata/errors-") for n in record["errors_table"]), record["errors_table"]

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(out)  # a name that only resolves under the original fails now
    assert sum(pq.read_table(copy / name).num_rows for name in record["clips_table"]) == 8
    errors = [pq.read_table(copy / name) for name in record["errors_table"]]
    assert [r["clip_id"] for t in errors for r in t.to_pylist()] == ["gone"]
    for name in record["exports"]:
        assert (copy / name).is_file(), name
    tables = {*record["clips_table"], *record["errors_table"]}
    assert {n for n in local_files(copy) if n.startswith("metadata/")} == tables


# -- the options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--skip_existing", "--append"],
        ["--append", "--overwrite"],
        ["--skip_existing", "--overwrite"],
        ["--skip_existing", "--append", "--overwrite"],
        ["--verify_existing"],
        ["--verify_existing", "--overwrite"],
    ],
    ids=["skip+append", "append+overwrite", "skip+overwrite", "all-three", "verify-alone", "verify+overwrite"],
)
def test_modes_are_exclusive_and_verify_needs_one(flags: list[str], server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(3))
    proc = run_pipeline("run", *run_argv(server, manifest, out, *flags, "--dry_run"))
    expect_exit(proc, 2)
    error = one_error(proc.stderr)
    # The line names what clashes: the modes given, or --verify_existing and the modes it works with.
    named = ["--verify_existing", "--skip_existing", "--append"] if flags[0] == "--verify_existing" else flags
    for flag in named:
        assert flag in error, error
    assert total_calls(server) == 0
    assert not out.exists()


@pytest.mark.parametrize("how", ["flag-new-folder", "config-empty-folder"])
def test_first_run_needs_no_mode_and_makes_no_probe(
    how: str, server: LocalServer, store: dict[str, str], tmp_path: Path, clip_lookups: list[str]
) -> None:
    out = tmp_path / "out"
    rows = time_rows(12)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    if how == "flag-new-folder":
        flags = ["--skip_existing"]
    else:  # a scheduled build's config (configs/dataflow.yaml sets skip_existing: true), into an empty folder
        out.mkdir()
        config = tmp_path / "scheduled.yaml"
        config.write_text("skip_existing: true\nmax_in_flight: 8\n")
        flags = [f"--config={config}"]
    expect_exit(run_build(server, manifest, str(out), *flags), 0)
    assert total_calls(server) == len(rows)
    assert clip_lookups == [], "a first run looked up clips one by one"
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows)
    check_clips_table(clips, store, str(out))
    record = run_record(out)
    assert record["mode"] == "new"
    assert (record["clips_written"], record["clips_skipped"], record["clips_removed"]) == (len(rows), 0, 0)


# -- tar shards ------------------------------------------------------------------------------------------


def shard_files(output: Path) -> dict[str, tuple[int, int]]:
    """shards/ file name -> (inode, mtime_ns)."""
    return {name: _identity(output / "shards" / name) for name in os.listdir(output / "shards")}


def shard_members(output: Path) -> dict[str, list[str]]:
    """shards/ file name -> its members' names."""
    found = {}
    for name in os.listdir(output / "shards"):
        with tarfile.open(output / "shards" / name) as tar:
            found[name] = sorted(tar.getnames())
    return found


def test_sharded_rerun_rebuilds_only_the_shard_with_a_stale_clip(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    """--skip_existing with --shards: a shard whose clips are all current is left as it is; the one shard
    holding a clip whose request changed is rebuilt (its other clips copied from its earlier version, not
    fetched) and published in one write; a dropped clip leaves its shard too."""
    out = tmp_path / "out"
    rows = time_rows(24)
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", rows), str(out), "--shards=4"), 0)
    before, members = shard_files(out), shard_members(out)
    assert len(before) == 4
    calls = total_calls(server)

    changed = dict(rows[5], start_ms=rows[5]["start_ms"] + 100)
    proc = run_build(
        server,
        write_local_manifest(tmp_path / "b.parquet", [*rows[:5], changed, *rows[6:]]),
        str(out),
        "--shards=4",
        "--skip_existing",
    )
    expect_exit(proc, 0)
    assert total_calls(server) - calls == 1, "only the changed clip is fetched"
    after = shard_files(out)
    rebuilt = sorted(name for name in after if after[name] != before[name])
    assert len(rebuilt) == 1, f"exactly one shard is written again: {rebuilt}"
    assert shard_members(out) == members, "the rebuilt shard holds the same clips"
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows)
    by_id = {r["clip_id"]: r for r in clips}
    assert by_id[changed["clip_id"]]["clip_start_ms"] == changed["start_ms"]
    assert by_id[changed["clip_id"]]["attempts"] > 0 and f"shards/{rebuilt[0]}" == by_id[changed["clip_id"]]["path"]
    check_clips_table(clips, store, str(out))  # every clip read out of its shard equals the source
    record = run_record(out)
    assert (record["clips_written"], record["clips_skipped"], record["clips_removed"]) == (1, 23, 0)

    # Drop a shard's every clip and one clip of another: the first shard goes, the other is rebuilt without it.
    first_shard = sorted(before)[0]
    gone = {r["clip_id"] for r in clips if r["path"] == f"shards/{first_shard}"}
    left = [r for r in [*rows[:5], changed, *rows[6:]] if r["clip_id"] not in gone]
    dropped = left.pop()
    proc = run_build(
        server, write_local_manifest(tmp_path / "c.parquet", left), str(out), "--shards=4", "--skip_existing"
    )
    expect_exit(proc, 0)
    assert total_calls(server) - calls == 1, "nothing fetched: a dropped clip needs no call"
    assert first_shard not in os.listdir(out / "shards")
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(left)
    check_clips_table(clips, store, str(out))
    assert not any(dropped["clip_id"].replace(".", "~") in m for ms in shard_members(out).values() for m in ms)
    assert run_record(out)["clips_removed"] == 1


def test_append_into_shards_keeps_the_earlier_clips_in_their_shards(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first, second = time_rows(10), time_rows(6, first=10)
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", first), str(out), "--shards=3"), 0)
    calls = total_calls(server)
    proc = run_build(server, write_local_manifest(tmp_path / "b.parquet", second), str(out), "--shards=3", "--append")
    expect_exit(proc, 0)
    assert total_calls(server) - calls == len(second)
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(first + second)
    check_clips_table(clips, store, str(out))
    record = run_record(out)
    assert (record["rows"], record["clips_written"], record["clips_kept"]) == (6, 6, 10)


def as_an_earlier_version_named_it(out: Path) -> None:
    """The dataset as the version before NeMo-readable shard names left it: `shards/shard-NNNNN.tar`, in the
    files and in the clips table's `path`."""
    for shard in (out / "shards").glob("audio_*.tar"):
        shard.rename(shard.with_name(shard.name.replace("audio_", "shard-")))
    for path in (out / "metadata").glob("clips-*.parquet"):
        table = pq.read_table(path)
        paths = [p.replace("/audio_", "/shard-") for p in table.column("path").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths)), path)


def test_a_rerun_renames_shards_an_earlier_version_named_without_a_call(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    """Each shard is rebuilt under its new name from its earlier file's members (no call), then the earlier
    file is removed; the tables name the new files."""
    out = tmp_path / "out"
    rows = time_rows(12)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    expect_exit(run_build(server, manifest, str(out), "--shards=3"), 0)
    members = shard_members(out)
    as_an_earlier_version_named_it(out)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-0000{i}.tar" for i in range(3)]
    calls = total_calls(server)
    expect_exit(run_build(server, manifest, str(out), "--shards=3", "--skip_existing"), 0)
    assert total_calls(server) == calls, "every clip copied from its earlier shard"
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"audio_0000{i}.tar" for i in range(3)]
    assert shard_members(out) == members
    clips = clips_table(str(out)).to_pylist()
    assert ids(clips) == ids(rows) and all(row["path"].startswith("shards/audio_") for row in clips)
    check_clips_table(clips, store, str(out))


# -- exports -------------------------------------------------------------------------------------------


def nemo_paths(output: Path) -> list[str]:
    lines = (output / "nemo_manifest.jsonl").read_text().splitlines()
    return sorted(json.loads(line)["audio_filepath"] for line in lines)


def test_exports_are_listed_kept_current_and_replaced(server: LocalServer, tmp_path: Path) -> None:
    """`python -m pipeline export` adds its manifests to the record and the card; a --skip_existing rerun
    writes them again for the new tables (no --export needed); --overwrite without --export removes them."""
    out = tmp_path / "out"
    first, second = time_rows(6), time_rows(4, first=3)
    transcripts = "--with_transcripts"
    expect_exit(run_build(server, write_local_manifest(tmp_path / "a.parquet", first), str(out), transcripts), 0)
    assert "nemo_manifest.jsonl" not in (out / "README.md").read_text()

    done = run_pipeline("export", str(out), "--formats=nemo")
    expect_exit(done, 0)
    assert run_record(out)["exports"] == ["nemo_manifest.jsonl"]
    card = (out / "README.md").read_text()
    assert "  nemo_manifest.jsonl" in card and "manifest_filepath: {root}/nemo_manifest.jsonl" in card, card
    assert card.count("## Files") == 1 and card.count("## Loading") == 1 and not card.endswith("\n\n")
    assert nemo_paths(out) == wav_names_in_clips(ids(first))

    manifest = write_local_manifest(tmp_path / "b.parquet", second)
    done = run_build(server, manifest, str(out), "--skip_existing")
    expect_exit(done, 2)  # the manifest it keeps current would hold no text
    assert "the dataset has nemo manifests" in done.stderr and "--with_transcripts" in done.stderr, done.stderr
    expect_exit(run_build(server, manifest, str(out), "--skip_existing", transcripts), 0)
    assert nemo_paths(out) == wav_names_in_clips(ids(second)), "the rerun refreshed the NeMo manifest"
    assert run_record(out)["exports"] == ["nemo_manifest.jsonl"]

    expect_exit(run_build(server, manifest, str(out), "--overwrite"), 0)
    assert not (out / "nemo_manifest.jsonl").exists() and run_record(out)["exports"] == []
    assert "nemo_manifest.jsonl" not in (out / "README.md").read_text()


def test_a_rerun_moves_lhotse_manifests_an_earlier_version_wrote_under_lhotse(
    server: LocalServer, tmp_path: Path
) -> None:
    """An earlier version wrote `lhotse/*.jsonl.gz` (NeMo's cuts_path resolved their sources against that
    folder): a rerun keeps the export current under the root's names and removes the earlier files."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(4))
    expect_exit(run_build(server, manifest, str(out), "--with_transcripts", "--export=lhotse"), 0)
    (out / "lhotse").mkdir()
    for part in ("recordings", "supervisions", "cuts"):
        (out / f"lhotse_{part}.jsonl.gz").rename(out / "lhotse" / f"{part}.jsonl.gz")
    record = json.loads((out / "_RUN.json").read_text())
    record["exports"] = [f"lhotse/{part}.jsonl.gz" for part in ("cuts", "recordings", "supervisions")]
    (out / "_RUN.json").write_text(json.dumps(record))
    expect_exit(run_build(server, manifest, str(out), "--with_transcripts", "--skip_existing"), 0)
    assert not list((out / "lhotse").iterdir()) and len(list(out.glob("lhotse_*.jsonl.gz"))) == 3
    assert sorted(run_record(out)["exports"]) == sorted(
        f"lhotse_{p}.jsonl.gz" for p in ("recordings", "supervisions", "cuts")
    )


def wav_names_in_clips(clip_ids: list[str]) -> list[str]:
    return sorted(f"clips/{c}.wav" for c in clip_ids)


def test_a_clip_whose_size_or_file_changed_is_fetched_again(
    server: LocalServer, store: dict[str, str], tmp_path: Path, clip_lookups: list[str]
) -> None:
    """Without --verify_existing: a truncated clip (its listed size is not its row's) and a deleted one are
    fetched again, each with one call; the others cost nothing."""
    out = tmp_path / "out"
    rows = time_rows(8)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    expect_exit(run_build(server, manifest, str(out)), 0)
    truncated, deleted = out / "clips" / "c001.wav", out / "clips" / "c002.wav"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    deleted.unlink()
    calls = total_calls(server)
    expect_exit(run_build(server, manifest, str(out), "--skip_existing"), 0)
    assert total_calls(server) - calls == 2
    assert clip_lookups == [], "a clip was looked at"
    check_clips_table(clips_table(str(out)).to_pylist(), store, str(out))
    assert (run_record(out)["clips_written"], run_record(out)["clips_skipped"]) == (2, 6)


def test_verify_existing_finds_a_damaged_member_of_a_shard(
    server: LocalServer, store: dict[str, str], tmp_path: Path
) -> None:
    """A shard member whose samples changed (the shard's size the same): --verify_existing fetches that clip
    again and rewrites only its shard; the other shards are read but left as they were."""
    out = tmp_path / "out"
    manifest = write_local_manifest(tmp_path / "m.parquet", time_rows(12))
    expect_exit(run_build(server, manifest, str(out), "--shards=3"), 0)
    row = clips_table(str(out)).to_pylist()[0]
    shard = out / row["path"]
    with tarfile.open(shard) as tar:
        offset = tar.getmember(row["member"]).offset_data
    data = bytearray(shard.read_bytes())
    data[offset + 200 : offset + 260] = bytes(60)  # samples, past the WAV header
    shard.write_bytes(bytes(data))
    before, calls = shard_files(out), total_calls(server)

    expect_exit(run_build(server, manifest, str(out), "--shards=3", "--skip_existing", "--verify_existing"), 0)
    assert total_calls(server) - calls == 1
    after = shard_files(out)
    assert sorted(n for n in after if after[n] != before[n]) == [shard.name]
    check_clips_table(clips_table(str(out)).to_pylist(), store, str(out))


@pytest.mark.parametrize("shards", [0, 4])
def test_on_a_cluster_what_a_bucket_fetches_or_verifies_is_spread_over_the_workers(shards: int, tmp_path: Path) -> None:
    """A bucket of the join is decided on one worker (one bucket per 20,000 rows: a whole 15,000-row --append is
    one): the clips it sends to be fetched or verified are reshuffled, or they would all be fetched there."""
    import apache_beam as beam

    from pipeline.dataset.record import SKIP_EXISTING
    from pipeline.dataset.storage import StoreSettings
    from pipeline.graph.reconcile import Over, Plan, reconcile

    p = beam.Pipeline()
    plan = Plan(str(tmp_path), SKIP_EXISTING, "wav", shards, True, StoreSettings())
    decided = reconcile(p | beam.Create([]), Over(plan, (), ()), spread=True)
    graph = p.to_runner_api().components.transforms.values()
    spread = {t.unique_name for t in graph if t.unique_name in ("SpreadFetch", "SpreadVerify")}
    assert spread == {"SpreadFetch", "SpreadVerify"}, spread
    assert decided.fetch.producer.full_label.startswith("SpreadFetch/"), decided.fetch.producer.full_label
