"""Whole builds through the command line: `python -m pipeline run` (in this process, and in a child where it is
killed) against a LocalServer.

Each test asserts what a user of a build relies on: the clips are there once, complete and sample-identical
to the source; the tables describe them; `_RUN.json` is written last and tells the truth; reruns with
`--skip_existing` make no call for what is already there; a run killed at any moment leaves no partial clip;
the errors table works as a manifest; the exit code follows `--max_error_ratio`; a wrong key stops the run
before it starts; no secret reaches any output.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.core.audio import parse_wav_header
from pipeline.local.server import Faults
from pipeline.local.storage_servers import StorageServer
from tests.helpers import (
    CARD,
    OBJECTS,
    TABLES,
    as_globs,
    check_clip,
    check_clips_table,
    check_record_adds_up,
    clips_table,
    errors_table,
    expect_exit,
    local_files,
    manifest_table,
    one_error,
    run_argv,
    run_build,
    run_record,
    start_cli,
    total_calls,
    write_local_manifest,
)

# -- 1. object storage ---------------------------------------------------------------------------------


@pytest.fixture(params=["s3_server", "gcs_server"], ids=["s3", "gcs"])
def storage(request: pytest.FixtureRequest) -> StorageServer:
    srv: StorageServer = request.getfixturevalue(request.param)
    FileSystems.set_options(PipelineOptions(srv.flags))  # global: set for this test's own reads and writes
    return srv


def test_object_storage_build(storage: StorageServer, make_server, store: dict[str, str]) -> None:
    server = make_server()
    base = f"{storage.bucket_url}{uuid.uuid4().hex}"
    ds = f"{base}/ds"
    extra = {"speaker": pa.string()}
    parts = [
        [
            {"clip_id": "m0", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 1000, "speaker": "ann"},
            {"object_id": "demo-stereo", "start_ms": 1500, "duration_ms": 700, "speaker": "bob"},
            {"clip_id": "f1", "object_id": "demo-flac-3ch", "start_ms": 4000, "duration_ms": 1000},
        ],
        [
            {"clip_id": "k1", "object_id": "demo-mono", "token_start": 2, "token_end": 5, "speaker": "cy"},
            {"clip_id": "gone", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 100, "speaker": "dee"},
        ],
    ]
    for i, rows in enumerate(parts):
        buf = io.BytesIO()
        pq.write_table(manifest_table(rows, extra), buf)
        with FileSystems.create(f"{base}/in/part-{i}.parquet") as f:
            f.write(buf.getvalue())

    proc = run_build(
        server,
        f"{base}/in/*.parquet",
        ds,
        "--max_error_ratio=0.5",
        *storage.flags,
        env=storage.env,
    )
    expect_exit(proc, 0)

    clips = clips_table(ds).to_pylist()
    by_id = {r["clip_id"]: r for r in clips}
    assert set(by_id) == {"m0", "demo-stereo.t1500+700", "f1", "k1"}
    for clip_id, row in by_id.items():
        assert row["path"] == f"clips/{clip_id}.wav"
    assert by_id["m0"]["speaker"] == "ann" and by_id["f1"]["speaker"] is None
    check_clips_table(clips, store, ds)

    errors = errors_table(ds).to_pylist()
    assert [(e["clip_id"], e["error_code"], e["speaker"]) for e in errors] == [("gone", "NOT_FOUND", "dee")]

    record = run_record(ds)
    check_record_adds_up(record, rows=5)
    assert (record["clips"], record["errors"], record["errors_by_code"]) == (4, 1, {"NOT_FOUND": 1})
    assert record["bytes"] == sum(r["num_bytes"] for r in clips)

    expected_objects = sorted([f"clips/{c}.wav" for c in by_id] + [*TABLES, "_RUN.json"] + list(CARD))
    (tmp,) = FileSystems.match([f"{ds}/_tmp/*"])
    assert tmp.metadata_list == [], "clip temporaries left under _tmp/"
    (everything,) = FileSystems.match([f"{ds}/**"])
    assert sorted(as_globs(m.path[len(ds) + 1 :] for m in everything.metadata_list)) == expected_objects, (
        "the output holds exactly the clips, both tables and the record"
    )

    # A rerun with --skip_existing reads the clips back from the bucket and makes no GetAudio call.
    calls = total_calls(server)
    proc = run_build(
        server,
        f"{base}/in/*.parquet",
        ds,
        "--max_error_ratio=0.5",
        "--skip_existing",
        *storage.flags,
        env=storage.env,
    )
    expect_exit(proc, 0)
    assert total_calls(server) == calls + 1, "only the NOT_FOUND row may be called again"
    rerun = {r["clip_id"]: r for r in clips_table(ds).to_pylist()}
    assert set(rerun) == set(by_id)
    for clip_id, row in rerun.items():
        assert row["attempts"] == 0
        assert (row["sha256"], row["num_bytes"], row["path"]) == (
            by_id[clip_id]["sha256"],
            by_id[clip_id]["num_bytes"],
            by_id[clip_id]["path"],
        )
    assert run_record(ds)["clips_skipped"] == 4
    (everything,) = FileSystems.match([f"{ds}/**"])
    assert sorted(as_globs(m.path[len(ds) + 1 :] for m in everything.metadata_list)) == expected_objects


# -- 2. --skip_existing --------------------------------------------------------------------------------


def test_skip_existing_makes_no_call_for_current_clips(make_server, store: dict[str, str], tmp_path: Path) -> None:
    server = make_server()
    out = str(tmp_path / "out")
    rows = [
        {"clip_id": "m0", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 1000},
        {"object_id": "demo-mono", "start_ms": 5000, "duration_ms": 700},
        {"clip_id": "s1", "object_id": "demo-stereo", "start_ms": 1000, "duration_ms": 1500},
        {"clip_id": "f1", "object_id": "demo-flac-3ch", "start_ms": 2000, "duration_ms": 500},
        {"clip_id": "k1", "object_id": "demo-mono", "token_start": 2, "token_end": 5},
        {"object_id": "demo-stereo", "token_start": 0, "token_end": 3},
    ]
    ids = {"m0", "demo-mono.t5000+700", "s1", "f1", "k1", "demo-stereo.k0-3"}
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)

    expect_exit(run_build(server, manifest, out, "--skip_existing"), 0)
    assert total_calls(server) == 6
    first = {r["clip_id"]: r for r in clips_table(out).to_pylist()}
    assert set(first) == ids
    stats = {f: os.stat(os.path.join(out, "clips", f)) for f in os.listdir(os.path.join(out, "clips"))}

    # Rerun, nothing changed: no call, every clip still listed, as already there, files untouched.
    expect_exit(run_build(server, manifest, out, "--skip_existing"), 0)
    assert total_calls(server) == 6, f"the rerun made calls: {server.calls}"
    second = {r["clip_id"]: r for r in clips_table(out).to_pylist()}
    assert set(second) == ids
    assert {r["attempts"] for r in second.values()} == {0}
    for clip_id, row in second.items():
        assert (row["sha256"], row["num_bytes"], row["path"]) == (
            first[clip_id]["sha256"],
            first[clip_id]["num_bytes"],
            first[clip_id]["path"],
        )
        assert (row["clip_start_ms"], row["clip_duration_ms"]) == (
            first[clip_id]["clip_start_ms"],
            first[clip_id]["clip_duration_ms"],
        )
    after = {f: os.stat(os.path.join(out, "clips", f)) for f in os.listdir(os.path.join(out, "clips"))}
    assert {f: (s.st_ino, s.st_mtime_ns) for f, s in after.items()} == {
        f: (s.st_ino, s.st_mtime_ns) for f, s in stats.items()
    }
    record = run_record(out)
    check_record_adds_up(record, rows=6)
    assert (record["clips_written"], record["clips_skipped"]) == (0, 6)

    # Grow by two rows, change one range under an existing clip_id, truncate one clip: exactly those are fetched.
    rows[2] = {"clip_id": "s1", "object_id": "demo-stereo", "start_ms": 2000, "duration_ms": 800}
    rows += [
        {"clip_id": "g1", "object_id": "demo-mono", "start_ms": 8000, "duration_ms": 400},
        {"object_id": "demo-flac-3ch", "start_ms": 0, "duration_ms": 300},
    ]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    truncated = os.path.join(out, "clips", "m0.wav")
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    before = dict(server.calls)
    expect_exit(run_build(server, manifest, out, "--skip_existing"), 0)
    made = {k: v - before.get(k, 0) for k, v in server.calls.items() if v != before.get(k, 0)}
    # demo-mono: g1 and the truncated m0; demo-stereo: the changed s1; demo-flac-3ch: the new derived row.
    assert made == {"demo-mono": 2, "demo-stereo": 1, "demo-flac-3ch": 1}
    third = {r["clip_id"]: r for r in clips_table(out).to_pylist()}
    assert set(third) == ids | {"g1", "demo-flac-3ch.t0+300"}
    fetched = {c for c, r in third.items() if r["attempts"] > 0}
    assert fetched == {"m0", "s1", "g1", "demo-flac-3ch.t0+300"}
    assert (third["s1"]["clip_start_ms"], third["s1"]["clip_duration_ms"]) == (2000, 800)
    check_clips_table(list(third.values()), store, out)
    assert sorted(os.listdir(os.path.join(out, "clips"))) == sorted(f"{c}.wav" for c in third)


# -- 3. crash safety -----------------------------------------------------------------------------------


def _crash_manifest(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        object_id = rng.choice(sorted(OBJECTS))
        duration = rng.randint(200, 800)
        start = rng.randint(0, OBJECTS[object_id][0] - duration)
        rows.append({"clip_id": f"c{i:04d}", "object_id": object_id, "start_ms": start, "duration_ms": duration})
    return rows


def test_killed_run_then_rerun_completes_dataset(make_server, store: dict[str, str], tmp_path: Path) -> None:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(2**32)))
    print(f"crash test seed: {seed} (rerun with CRASH_SEED={seed})")
    rng = random.Random(seed)
    server = make_server(faults=Faults(latency_s=0.02))
    out = tmp_path / "out"
    rows = _crash_manifest(300, seed)
    wanted = {r["clip_id"]: r for r in rows}
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    out.mkdir()
    (out / "_RUN.json").write_text('{"stale": "record of an earlier run"}')
    clips_dir = out / "clips"
    with open(tmp_path / "killed.log", "w") as log:  # a child: SIGKILL needs a process of its own
        proc = start_cli(
            "run",
            *run_argv(server, manifest, out, "--max_in_flight=4", "--overwrite"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while not (clips_dir.is_dir() and len(os.listdir(clips_dir)) >= 3):
                assert proc.poll() is None, f"the run ended early: {(tmp_path / 'killed.log').read_text()}"
                assert time.monotonic() < deadline, "no clip appeared"
                time.sleep(0.005)
            delay = rng.uniform(0.0, 1.0)
            time.sleep(delay)
            assert proc.poll() is None, f"the run ended before the kill (seed {seed}, delay {delay:.3f} s)"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    print(f"killed {delay:.3f} s after the first clips appeared, with {len(os.listdir(clips_dir))} clips published")

    # After the kill: the old record is gone and no new one was written; every published clip is whole.
    assert not (out / "_RUN.json").exists(), "a killed run must not leave a run record"
    survivors = sorted(os.listdir(clips_dir))
    assert 3 <= len(survivors) < 300, f"{len(survivors)} clips at the kill (seed {seed}): not killed mid-run"
    for name in survivors:
        assert name.endswith(".wav") and name[:-4] in wanted, f"not a final clip name: {name}"
        data = (clips_dir / name).read_bytes()
        header = parse_wav_header(data[:4096])
        assert len(data) == header.data_offset + header.data_bytes, f"partial file at a final path: {name}"
        info = sf.info(str(clips_dir / name))
        assert info.frames == header.data_bytes // (2 * header.channels)
        assert len(sf.read(str(clips_dir / name), dtype="int16")[0]) == info.frames
        row = wanted[name[:-4]]
        check_clip(data, store, row["object_id"], row["start_ms"], row["duration_ms"])

    # The rerun, with --skip_existing and no faults: calls only for what is missing, and the dataset is whole.
    server.settings.faults = Faults()
    before = total_calls(server)
    proc2 = run_build(server, manifest, str(out), "--max_in_flight=4", "--skip_existing")
    expect_exit(proc2, 0)
    assert total_calls(server) - before == 300 - len(survivors)

    table = clips_table(str(out)).to_pylist()
    ids = [r["clip_id"] for r in table]
    assert len(ids) == len(set(ids)) == 300 and set(ids) == set(wanted)
    skipped = {r["clip_id"] for r in table if r["attempts"] == 0}
    assert skipped == {name[:-4] for name in survivors}
    for r in table:
        assert r["path"] == f"clips/{r['clip_id']}.wav"
        assert (r["clip_start_ms"], r["clip_duration_ms"]) == (
            wanted[r["clip_id"]]["start_ms"],
            wanted[r["clip_id"]]["duration_ms"],
        )
    check_clips_table(table, store, out)
    assert errors_table(str(out)).num_rows == 0
    assert set(as_globs(local_files(out))) == {f"clips/{c}.wav" for c in wanted} | {
        *TABLES,
        "_RUN.json",
        *CARD,
    }, "leftovers (partial clips, _tmp/, beam-temp-*) after the rerun"
    assert not (out / "_tmp").exists()
    # No beam-temp-* file is left (local_files above); the empty folders the killed run made are: see
    # test_rerun_removes_what_a_killed_run_left.
    assert not [d for d in (out / "metadata").glob("beam-temp-*") if any(d.iterdir())]
    record = run_record(str(out))
    check_record_adds_up(record, rows=300)
    assert (record["clips"], record["errors"]) == (300, 0)
    assert (record["clips_written"], record["clips_skipped"]) == (300 - len(survivors), len(survivors))


def test_rerun_removes_what_a_killed_run_left(make_server, store: dict[str, str], tmp_path: Path) -> None:
    """What a run killed while writing its tables leaves (Beam's temporary folders with a partial shard, a clip
    temporary, the previous record) is gone after the next run, as the README promises."""
    server = make_server()
    out = tmp_path / "out"
    for name in ("beam-temp-clips-9d2f0c4ae7c811f1b413", "beam-temp-errors-9d2f0c4be7c811f1b413"):
        folder = out / "metadata" / name
        folder.mkdir(parents=True)
        (folder / "0b1e7a52-partial-shard").write_bytes(b"PAR1 half a shard")
    (out / "_tmp").mkdir()
    (out / "_tmp" / "c0.5e1f.wav").write_bytes(b"RIFF half a clip")
    (out / "clips").mkdir()
    manifest = write_local_manifest(
        tmp_path / "m.parquet", [{"clip_id": "c0", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 300}]
    )
    expect_exit(run_build(server, manifest, str(out), "--skip_existing"), 0)
    check_clips_table(clips_table(str(out)).to_pylist(), store, out)
    assert set(as_globs(local_files(out))) == {
        "clips/c0.wav",
        *TABLES,
        "_RUN.json",
        *CARD,
    }
    assert not (out / "_tmp").exists()
    assert as_globs(sorted(f"metadata/{p.name}" for p in (out / "metadata").iterdir())) == list(TABLES), (
        "Beam's temporary folders of the killed run are still there"
    )


# -- 4. retry only the failures ------------------------------------------------------------------------


def test_errors_table_as_manifest_retries_only_failures(make_server, store: dict[str, str], tmp_path: Path) -> None:
    server = make_server(faults=Faults(fail_fraction=1.0))
    out1, out2 = str(tmp_path / "out1"), str(tmp_path / "out2")
    extra = {"speaker": pa.string(), "take": pa.int32(), "score": pa.float64()}
    rows = [
        {"clip_id": "m0", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 900, "speaker": "ann", "take": 1},
        {"object_id": "demo-mono", "start_ms": 3000, "duration_ms": 500, "speaker": "bob", "take": 2, "score": 0.5},
        {"clip_id": "s1", "object_id": "demo-stereo", "start_ms": 100, "duration_ms": 400, "take": 3, "score": 1.5},
        {"object_id": "demo-stereo", "token_start": 4, "token_end": 7, "speaker": "éva", "take": -4},
        {"clip_id": "f1", "object_id": "demo-flac-3ch", "start_ms": 1000, "duration_ms": 250, "speaker": "cy"},
    ]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows, extra)

    proc1 = run_build(server, manifest, out1, "--max_attempts=2")
    expect_exit(proc1, 1)
    assert "max_error_ratio" in proc1.stderr
    assert clips_table(out1).num_rows == 0
    failed = errors_table(out1).to_pylist()
    assert len(failed) == len(rows)
    assert {(e["error_code"], e["attempts"]) for e in failed} == {("UNAVAILABLE", 2)}
    failed_ids = {e["clip_id"] for e in failed}
    assert failed_ids == {"m0", "demo-mono.t3000+500", "s1", "demo-stereo.k4-7", "f1"}
    assert total_calls(server) == 2 * len(rows)

    server.settings.faults.fail_fraction = 0
    proc2 = run_build(server, f"{out1}/metadata/errors-*.parquet", out2)
    expect_exit(proc2, 0)
    table = clips_table(out2)
    assert not {"error_code", "error_message"} & set(table.schema.names)
    for name, type_ in extra.items():
        assert table.schema.field(name).type == type_, name
    clips = table.to_pylist()
    assert sorted(r["clip_id"] for r in clips) == sorted(failed_ids)
    assert {r["attempts"] for r in clips} == {1}
    by_id = {r["clip_id"]: r for r in clips}
    original = {e["clip_id"]: e for e in failed}  # run 1's error rows carry the manifest columns
    for clip_id, row in by_id.items():
        for name in ("object_id", "start_ms", "duration_ms", "token_start", "token_end", *extra):
            assert row[name] == original[clip_id][name], (clip_id, name)
    assert by_id["demo-stereo.k4-7"]["speaker"] == "éva" and by_id["demo-stereo.k4-7"]["take"] == -4
    assert by_id["m0"]["score"] is None and by_id["s1"]["speaker"] is None
    check_clips_table(clips, store, out2)
    assert errors_table(out2).num_rows == 0
    record = run_record(out2)
    check_record_adds_up(record, rows=len(rows))
    assert sorted(os.listdir(os.path.join(out2, "clips"))) == sorted(f"{c}.wav" for c in failed_ids)


# -- 5. the run record and secrets ---------------------------------------------------------------------


def test_run_record_holds_no_secret(make_server, store: dict[str, str], tmp_path: Path) -> None:
    api_key, s3_secret = "sk-MARKER-456", "SECRET-MARKER-123"
    server = make_server(api_key=api_key)
    out = tmp_path / "out"
    rows = [
        {"clip_id": "m0", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 600},
        {"clip_id": "s1", "object_id": "demo-stereo", "start_ms": 100, "duration_ms": 400},
        {"clip_id": "k1", "object_id": "demo-flac-3ch", "token_start": 0, "token_end": 3},
        {"clip_id": "gone", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 100},
    ]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    proc = run_build(
        server,
        manifest,
        str(out),
        f"--s3_secret_access_key={s3_secret}",
        "--max_error_ratio=0.5",
        env={"SONIOX_API_KEY": api_key},
    )
    expect_exit(proc, 0)

    record = run_record(str(out))
    check_record_adds_up(record, rows=4)
    assert (record["clips"], record["errors"], record["errors_by_code"]) == (3, 1, {"NOT_FOUND": 1})
    clips = clips_table(str(out)).to_pylist()
    check_clips_table(clips, store, out)
    assert record["bytes"] == sum(r["num_bytes"] for r in clips)
    assert record["audio_seconds"] == pytest.approx(sum(r["clip_duration_ms"] for r in clips) / 1000)
    assert record["options"]["output"] == str(out) and record["options"]["manifest"] == manifest
    assert record["options"]["max_error_ratio"] == 0.5
    assert record["options"].get("s3_secret_access_key") in (None, "<redacted>")

    for where, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        assert api_key not in text and s3_secret not in text, f"a secret in {where}"
    files = local_files(out)
    assert "_RUN.json" in files and len(files) == 3 + 3 + 2  # 3 clips, 2 tables, the record, the card
    for name in files:
        data = (out / name).read_bytes()
        assert api_key.encode() not in data, f"the API key is in {name}"
        assert s3_secret.encode() not in data, f"the S3 secret is in {name}"


# -- 6. --max_error_ratio ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "code"),
    [([], 1), (["--max_error_ratio=0.2"], 0), (["--max_error_ratio=0.1"], 0)],
    ids=["default-0.05", "0.2", "0.1-equal"],
)
def test_max_error_ratio(flags: list[str], code: int, make_server, store: dict[str, str], tmp_path: Path) -> None:
    server = make_server()
    out = str(tmp_path / "out")
    rows = [
        {"clip_id": f"c{i}", "object_id": "demo-mono", "start_ms": 500 * i, "duration_ms": 300} for i in range(9)
    ] + [{"clip_id": "gone", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 300}]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    proc = run_build(server, manifest, out, *flags)
    expect_exit(proc, code)
    assert ("max_error_ratio" in proc.stderr) == (code == 1), proc.stderr
    clips = clips_table(out).to_pylist()
    assert sorted(r["clip_id"] for r in clips) == [f"c{i}" for i in range(9)]
    check_clips_table(clips, store, out)
    errors = errors_table(out).to_pylist()
    assert [(e["clip_id"], e["error_code"]) for e in errors] == [("gone", "NOT_FOUND")]
    record = run_record(out)
    check_record_adds_up(record, rows=10)
    assert (record["clips"], record["errors"]) == (9, 1)


# -- 7. a wrong key ------------------------------------------------------------------------------------


def test_wrong_key_stops_before_any_clip(make_server, tmp_path: Path) -> None:
    server = make_server(api_key="right")
    out = tmp_path / "out"
    rows = [{"clip_id": f"c{i}", "object_id": "demo-mono", "start_ms": 100 * i, "duration_ms": 300} for i in range(5)]
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    proc = run_build(server, manifest, str(out), env={"SONIOX_API_KEY": "wrong"})
    expect_exit(proc, 2)
    error = one_error(proc.stderr)
    assert "UNAUTHENTICATED" in error, proc.stderr
    assert "wrong" not in error, "the message must not echo the key"
    assert total_calls(server) == 0, f"GetAudio reached: {server.calls}"
    assert not out.exists(), f"a refused key wrote output: {local_files(out)}"
