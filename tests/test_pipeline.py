"""End to end: `python -m pipeline run` (in this process; the demo and the Dataflow dry run in a child) against
a LocalServer.

`server.calls` counts the GetAudio calls the run makes. Each test makes one or two runs and checks many
outcomes of them:
clips sample-identical to the source, the tables' schemas and values, every bad row in the errors
table with its code and place, rows in = clips + errors, exit codes, calls made (or not), the key
nowhere in any output.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline.core.tables import CLIP_FIELDS, ERROR_FIELDS
from tests.helpers import (
    Result,
    check_clip_row,
    child_env,
    explain,
    read_table,
    run_cli,
    run_pipeline,
    summary_numbers,
    write_manifest,
)

pytestmark = pytest.mark.timeout(300)

KEY = f"sk-MARKER-{uuid.uuid4().hex}"  # the API key given to every child; must never come out
VALIDATION_CODES = {"MISSING_VALUE", "INVALID_RANGE", "INVALID_OBJECT_ID", "INVALID_CLIP_ID", "DUPLICATE_CLIP_ID"}
PASSTHROUGH = [
    ("row_key", pa.string()),
    ("speaker", pa.string()),
    ("n_words", pa.int64()),
    ("score", pa.float64()),
    ("verified", pa.bool_()),
    ("tags", pa.list_(pa.string())),
    ("notes", pa.string()),
]
FULL_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("object_id", pa.string()),
        ("start_ms", pa.int64()),
        ("duration_ms", pa.int64()),
        ("token_start", pa.int32()),
        ("token_end", pa.int32()),
        *PASSTHROUGH,
    ]
)
TIME_ONLY_SCHEMA = pa.schema(
    [("object_id", pa.string()), ("start_ms", pa.int64()), ("duration_ms", pa.int64()), *PASSTHROUGH]
)


# -- helpers -------------------------------------------------------------------------------------------


def key_env() -> dict[str, str]:
    return {"SONIOX_API_KEY": KEY}


def no_key_out(proc: Result) -> Result:
    assert KEY not in proc.stdout, "the API key is in stdout"
    assert KEY not in proc.stderr, "the API key is in stderr"
    return proc


def keyed_run(*flags: str, expect: int = 0) -> Result:
    """`python -m pipeline run *flags` with the key in SONIOX_API_KEY, in this process."""
    proc = no_key_out(run_pipeline("run", *flags, env=key_env()))
    if proc.returncode != expect:
        pytest.fail(f"expected exit {expect}\n{explain(proc)}")
    return proc


def assert_key_nowhere(root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), f"the API key is in {path}"


def keyed_server(make_server, **settings):
    """A server that requires KEY, so every clip proves the key was sent (it counts transfer formats)."""
    return make_server(api_key=KEY, **settings)


def manifest_row(
    schema: pa.Schema,
    key: str,
    object_id: str | None,
    clip_id: str | None = None,
    time: tuple[int | None, int | None] | None = None,
    token: tuple[int | None, int | None] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    n = sum(map(ord, key))
    row = {
        "clip_id": clip_id,
        "object_id": object_id,
        "start_ms": time[0] if time else None,
        "duration_ms": time[1] if time else None,
        "token_start": token[0] if token else None,
        "token_end": token[1] if token else None,
        "row_key": key,
        "speaker": None if n % 5 == 0 else f"speaker-{n % 7}",
        "n_words": n * 1_000_003 - 2**40,
        "score": n / 7,
        "verified": [True, False, None][n % 3],
        "tags": [key, "ünïcode", None] if n % 2 else [],
        "notes": f"notes of {key}",
    }
    row.update(extra)
    return {name: row[name] for name in schema.names}


def assert_passthrough(table_row: dict[str, Any], row: dict[str, Any], names: list[str]) -> None:
    for name in names:
        assert table_row[name] == row.get(name), (row["row_key"], name, table_row[name], row.get(name))


def passthrough_names(schema: pa.Schema) -> list[str]:
    return [n for n in schema.names if n not in ("clip_id", "object_id")]


def assert_schema(table: pa.Table, fixed: pa.Schema, manifest: pa.Schema) -> None:
    """Fixed columns first, then the manifest's columns under their own names and types."""
    expected = list(fixed) + [manifest.field(n) for n in passthrough_names(manifest)]
    assert table.schema.names == [f.name for f in expected]
    assert [str(t) for t in table.schema.types] == [str(f.type) for f in expected]


# -- a manifest with every kind of row ---------------------------------------------------------------


def big_manifest(tmp_path: Path) -> tuple[str, dict[str, tuple[str, int, dict, str]]]:
    """Two files (one with every range column, one with time columns only and no clip_id).

    Returns the glob and row_key -> (file, row index, row, expected outcome: "clip" or an error code).
    """
    (tmp_path / "manifest").mkdir()
    big = "ü" + "n" * 99_999  # a 100 KB string
    a = [
        # good rows: time and token ranges, mono, stereo, 3 channels, a resampled object, a derived clip_id
        ("g-mono-t", "clip", dict(object_id="demo-mono", clip_id="mono-t", time=(1000, 2500), notes=big)),
        ("g-stereo-t", "clip", dict(object_id="demo-stereo", clip_id="stereo-t", time=(500, 3000))),
        ("g-flac-t", "clip", dict(object_id="demo-flac-3ch", clip_id="flac-t", time=(0, 5000))),
        ("g-mono-k", "clip", dict(object_id="demo-mono", token=(2, 7))),
        ("g-stereo-k", "clip", dict(object_id="demo-stereo", clip_id="stereo-k", token=(0, 3))),
        ("g-flac-k", "clip", dict(object_id="demo-flac-3ch", clip_id="flac-k", token=(1, 4))),
        ("g-44k", "clip", dict(object_id="demo-44k-notokens", clip_id="resampled", time=(500, 1000))),
        # bad rows, found by validation
        ("e-null-object", "MISSING_VALUE", dict(object_id=None, clip_id="e1", time=(0, 1000))),
        ("e-slash-object", "INVALID_OBJECT_ID", dict(object_id="demo/mono", clip_id="e2", time=(0, 1000))),
        ("e-both", "INVALID_RANGE", dict(object_id="demo-mono", clip_id="e3", time=(0, 1000), token=(0, 2))),
        ("e-neither", "INVALID_RANGE", dict(object_id="demo-mono", clip_id="e4")),
        ("e-negative", "INVALID_RANGE", dict(object_id="demo-mono", clip_id="e5", time=(-1, 1000))),
        ("e-zero", "INVALID_RANGE", dict(object_id="demo-mono", clip_id="e6", time=(0, 0))),
        ("e-token-order", "INVALID_RANGE", dict(object_id="demo-mono", clip_id="e7", token=(5, 5))),
        ("e-int32", "INVALID_RANGE", dict(object_id="demo-mono", clip_id="e8", time=(2**31, 1000))),
        ("e-null-duration", "MISSING_VALUE", dict(object_id="demo-mono", clip_id="e9", time=(0, None))),
        ("e-null-token-end", "MISSING_VALUE", dict(object_id="demo-mono", clip_id="e10", token=(3, None))),
        ("e-slash-clip", "INVALID_CLIP_ID", dict(object_id="demo-mono", clip_id="x/y", time=(0, 1000))),
        ("e-dot-clip", "INVALID_CLIP_ID", dict(object_id="demo-mono", clip_id=".hidden", time=(0, 1000))),
        ("e-dup-1", "DUPLICATE_CLIP_ID", dict(object_id="demo-mono", clip_id="dup", time=(0, 1000))),
        ("e-dup-2", "DUPLICATE_CLIP_ID", dict(object_id="demo-stereo", clip_id="dup", token=(0, 2))),
        # bad rows, found by the service
        ("e-not-found", "NOT_FOUND", dict(object_id="no-such-object", clip_id="e11", time=(0, 1000))),
        ("e-past-end", "OUT_OF_RANGE", dict(object_id="demo-mono", clip_id="e12", time=(11_000, 2000))),
        ("e-no-tokens", "FAILED_PRECONDITION", dict(object_id="demo-44k-notokens", clip_id="e13", token=(0, 2))),
        ("e-token-past-end", "OUT_OF_RANGE", dict(object_id="demo-stereo", clip_id="e14", token=(0, 100_000))),
    ]
    b = [
        ("g-b-stereo-end", "clip", dict(object_id="demo-stereo", time=(7000, 2000))),  # ends at the object's end
        ("g-b-mono-1ms", "clip", dict(object_id="demo-mono", time=(0, 1))),
        ("e-b-space-object", "INVALID_OBJECT_ID", dict(object_id="demo mono", time=(0, 1000))),
    ]
    rows: dict[str, tuple[str, int, dict, str]] = {}
    for name, schema, spec in (("part-a", FULL_SCHEMA, a), ("part-b", TIME_ONLY_SCHEMA, b)):
        built = [manifest_row(schema, key, **kw) for key, _, kw in spec]
        path = write_manifest(tmp_path / "manifest" / f"{name}.parquet", built, schema)
        for index, ((key, outcome, _), row) in enumerate(zip(spec, built, strict=True)):
            rows[key] = (path, index, row, outcome)
    return str(tmp_path / "manifest" / "*.parquet"), rows


# -- tests ---------------------------------------------------------------------------------------------


def test_every_kind_of_row(make_server, store, tmp_path):
    """Good rows give exact clips and table rows; every bad row gives one error with its code and place."""
    pad = 150  # not the default, so the table must report what the server served
    server = keyed_server(make_server, token_padding_ms=pad)
    pattern, rows = big_manifest(tmp_path)
    out = tmp_path / "out"
    proc = keyed_run(f"--manifest={pattern}", f"--output={out}", f"--api_host={server.address}", expect=1)
    assert "max_error_ratio" in proc.stderr  # more than 5% of rows failed

    good = {k for k, (*_, outcome) in rows.items() if outcome == "clip"}
    bad = {k: outcome for k, (*_, outcome) in rows.items() if outcome != "clip"}
    clips, errors = read_table(out, "clips"), read_table(out, "errors")

    # rows in = clips + errors, each row exactly once
    assert clips.num_rows + errors.num_rows == len(rows) == 28
    assert sorted(clips.column("row_key").to_pylist()) == sorted(good)
    assert sorted(errors.column("row_key").to_pylist()) == sorted(bad)
    assert summary_numbers(proc.stdout) == {"rows": 28, "clips": 9, "written": 9, "already": 0, "errors": 19}
    for code, n in collections.Counter(bad.values()).items():
        assert re.search(rf"^\s+{code}\s+{n}\b", proc.stdout, re.MULTILINE), f"{code} {n} not in the summary"

    # schemas: fixed columns, then every manifest column with its own type (the files' union)
    files = sorted({path for path, *_ in rows.values()})
    manifest_schema = pa.unify_schemas([pq.read_schema(f) for f in files])  # as stored (Parquet names list items)
    assert manifest_schema.names == [*FULL_SCHEMA.names]
    assert_schema(clips, CLIP_FIELDS, manifest_schema)
    assert_schema(errors, ERROR_FIELDS, manifest_schema)
    names = passthrough_names(manifest_schema)

    # clips: exact audio, and a table row that describes the file
    for clip in clips.to_pylist():
        _, _, row, _ = rows[clip["row_key"]]
        check_clip_row(out, clip, row, store, pad)
        assert clip["attempts"] >= 1
        assert_passthrough(clip, row, names)
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(f"{c}.wav" for c in clips["clip_id"].to_pylist())
    notes = {c["row_key"]: c["notes"] for c in clips.to_pylist()}
    assert len(notes["g-mono-t"].encode()) > 100_000

    # errors: the code, the file and row of the manifest, the row's columns, the calls made
    for error in errors.to_pylist():
        path, index, row, code = rows[error["row_key"]]
        assert error["error_code"] == code, (error["row_key"], error["error_message"])
        assert error["error_message"].startswith(f"{path} row {index}: "), error["error_message"]
        assert error["object_id"] == row["object_id"]
        if row.get("clip_id") is not None:
            assert error["clip_id"] == row["clip_id"]
        assert error["attempts"] == (0 if code in VALIDATION_CODES else 1), error
        assert_passthrough(error, row, names)

    # only rows that passed validation were fetched, each once
    assert server.calls == collections.Counter(
        {"demo-mono": 4, "demo-stereo": 4, "demo-flac-3ch": 2, "demo-44k-notokens": 2, "no-such-object": 1}
    )
    assert set(server.formats) == {"pcm_s16le"}  # the default transfer format
    # nothing left over: no temporary clips, only the two tables under metadata/
    assert not [p for p in (out / "_tmp").rglob("*") if p.is_file()]
    assert {p.name.split("-")[0] for p in (out / "metadata").iterdir()} == {"clips", "errors"}
    assert_key_nowhere(out)


def test_config_file_flags_and_transfer_formats(make_server, store, tmp_path):
    """A --config YAML applies, a flag overrides it; wav and pcm_s16le transfers give identical clips;
    multi-process runs give the same clips; an all-good run writes an empty errors table."""
    server = keyed_server(make_server)
    rows = [
        manifest_row(FULL_SCHEMA, "m-t", "demo-mono", "m-t", time=(250, 3000)),
        manifest_row(FULL_SCHEMA, "m-k", "demo-mono", None, token=(4, 9)),
        manifest_row(FULL_SCHEMA, "s-k", "demo-stereo", "s-k", token=(1, 6)),
        manifest_row(FULL_SCHEMA, "f-t", "demo-flac-3ch", "f-t", time=(1234, 2345)),
        manifest_row(FULL_SCHEMA, "r-t", "demo-44k-notokens", "r-t", time=(0, 4000)),
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows, FULL_SCHEMA)
    by_key = {r["row_key"]: r for r in rows}
    config = tmp_path / "run.yaml"
    config.write_text("max_in_flight: 4\naudio_format: wav\nmax_error_ratio: 0.0\nskip_existing: false\n")
    common = [f"--config={config}", f"--manifest={manifest}", f"--api_host={server.address}"]

    wav_out = tmp_path / "wav"
    proc = keyed_run(*common, f"--output={wav_out}")
    assert server.formats == collections.Counter(wav=len(rows)), "the config's audio_format did not reach the server"
    assert summary_numbers(proc.stdout) == {"rows": 5, "clips": 5, "written": 5, "already": 0, "errors": 0}

    pcm_out = tmp_path / "pcm"
    server.formats.clear()
    proc = keyed_run(
        *common,
        f"--output={pcm_out}",
        "--audio_format=pcm_s16le",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    )
    expected = collections.Counter(pcm_s16le=len(rows))
    assert server.formats == expected, "the --audio_format flag did not override the config"
    assert summary_numbers(proc.stdout) == {"rows": 5, "clips": 5, "written": 5, "already": 0, "errors": 0}
    assert sum(server.calls.values()) == 2 * len(rows)

    tables = {}
    for out in (wav_out, pcm_out):
        clips, errors = read_table(out, "clips"), read_table(out, "errors")
        assert clips.num_rows == len(rows)
        assert errors.num_rows == 0  # the table exists, empty, with its schema
        assert_schema(errors, ERROR_FIELDS, pq.read_schema(manifest))
        assert_schema(clips, CLIP_FIELDS, pq.read_schema(manifest))
        for clip in clips.to_pylist():
            check_clip_row(out, clip, by_key[clip["row_key"]], store, 100)
        tables[out] = {c["clip_id"]: {k: v for k, v in c.items() if k != "path"} for c in clips.to_pylist()}
        assert_key_nowhere(out)
    assert tables[wav_out] == tables[pcm_out]
    for clip_id in tables[wav_out]:
        wav_bytes = (wav_out / "clips" / f"{clip_id}.wav").read_bytes()
        assert wav_bytes == (pcm_out / "clips" / f"{clip_id}.wav").read_bytes(), clip_id


def test_skip_existing_and_error_ratio(make_server, store, tmp_path):
    """A rerun with --skip_existing calls only for what is missing, stale or broken, and still lists every
    clip; an error ratio equal to --max_error_ratio exits 0."""
    server = keyed_server(make_server)
    rows = [
        manifest_row(FULL_SCHEMA, "m", "demo-mono", "m", time=(0, 2000)),
        manifest_row(FULL_SCHEMA, "m-k", "demo-mono", "m-k", token=(2, 7)),
        manifest_row(FULL_SCHEMA, "s", "demo-stereo", "s", time=(1000, 1000)),
        manifest_row(FULL_SCHEMA, "f", "demo-flac-3ch", "f", time=(500, 2000)),
        manifest_row(FULL_SCHEMA, "x", "no-such-object", "x", time=(0, 1000)),
    ]
    manifest = tmp_path / "m.parquet"
    write_manifest(manifest, rows, FULL_SCHEMA)
    out = tmp_path / "out"
    flags = [f"--manifest={manifest}", f"--output={out}", f"--api_host={server.address}", "--max_error_ratio=0.2"]

    proc = keyed_run(*flags)  # 1 error in 5 rows: exactly the limit, so exit 0
    assert summary_numbers(proc.stdout) == {"rows": 5, "clips": 4, "written": 4, "already": 0, "errors": 1}
    first = {c["clip_id"]: c for c in read_table(out, "clips").to_pylist()}
    assert set(first) == {"m", "m-k", "s", "f"}
    assert read_table(out, "errors").column("error_code").to_pylist() == ["NOT_FOUND"]
    mtimes = {c: os.stat(out / "clips" / f"{c}.wav").st_mtime_ns for c in first}

    # change the range of "s" under the same clip_id, and break "f" (a truncated file)
    rows[2] = manifest_row(FULL_SCHEMA, "s", "demo-stereo", "s", time=(3000, 1500))
    write_manifest(manifest, rows, FULL_SCHEMA)
    f_path = out / "clips" / "f.wav"
    f_path.write_bytes(f_path.read_bytes()[:-3000])
    before = collections.Counter(server.calls)

    proc = keyed_run(*flags, "--skip_existing")
    made = server.calls - before
    assert made == collections.Counter({"demo-stereo": 1, "demo-flac-3ch": 1, "no-such-object": 1}), made
    assert summary_numbers(proc.stdout) == {"rows": 5, "clips": 4, "written": 2, "already": 2, "errors": 1}

    clips = {c["clip_id"]: c for c in read_table(out, "clips").to_pylist()}
    assert set(clips) == {"m", "m-k", "s", "f"}  # skipped clips are still listed
    by_key = {r["row_key"]: r for r in rows}
    for clip in clips.values():
        check_clip_row(out, clip, by_key[clip["row_key"]], store, 100)
    for clip_id in ("m", "m-k"):  # already there: untouched, and described as before
        assert clips[clip_id]["attempts"] == 0
        assert os.stat(out / "clips" / f"{clip_id}.wav").st_mtime_ns == mtimes[clip_id]
        assert {k: v for k, v in clips[clip_id].items() if k != "attempts"} == {
            k: v for k, v in first[clip_id].items() if k != "attempts"
        }
    assert clips["s"]["clip_start_ms"] == 3000 and clips["s"]["attempts"] >= 1  # the new range, fetched again
    assert clips["f"]["sha256"] == first["f"]["sha256"] and clips["f"]["attempts"] >= 1  # repaired
    assert read_table(out, "errors").column("error_code").to_pylist() == ["NOT_FOUND"]
    assert_key_nowhere(out)


@pytest.mark.parametrize(
    "columns, column",
    [
        ({"start_ms": pa.array([0.0, 1.5], pa.float64()), "duration_ms": pa.array([100, 100], pa.int32())}, "start_ms"),
        ({"start_ms": pa.array([0, 1], pa.int32()), "duration_ms": pa.array([100, 100], pa.int32())}, "sha256"),
    ],
    ids=["float-start_ms", "reserved-sha256"],
)
def test_whole_file_problem_exits_2_before_any_call(make_server, tmp_path, columns, column):
    server = keyed_server(make_server)
    good = tmp_path / "manifest" / "a.parquet"
    good.parent.mkdir()
    write_manifest(good, [manifest_row(TIME_ONLY_SCHEMA, "ok", "demo-mono", time=(0, 1000))], TIME_ONLY_SCHEMA)
    bad = tmp_path / "manifest" / "b.parquet"
    table = pa.table({"object_id": pa.array(["demo-mono", "demo-stereo"]), **columns})
    if column == "sha256":
        table = table.append_column("sha256", pa.array(["a", "b"]))
    pq.write_table(table, bad)
    out = tmp_path / "out"
    proc = keyed_run(
        f"--manifest={tmp_path / 'manifest' / '*.parquet'}", f"--output={out}", f"--api_host={server.address}", expect=2
    )
    assert str(bad) in proc.stderr, proc.stderr
    assert column in proc.stderr.replace(str(tmp_path), ""), proc.stderr  # (the test's folder name has it too)
    assert "Traceback" not in proc.stderr
    assert not server.calls
    assert not out.exists()


@pytest.mark.parametrize("case", ["all-rows-bad", "zero-rows"])
def test_both_tables_are_written_when_empty(make_server, tmp_path, case):
    server = keyed_server(make_server)
    rows = []
    if case == "all-rows-bad":
        rows = [
            manifest_row(FULL_SCHEMA, "a", "no-such-object", "a", time=(0, 1000)),
            manifest_row(FULL_SCHEMA, "b", "demo-mono", "b", time=(0, 0)),
        ]
    manifest = write_manifest(tmp_path / "m.parquet", rows, FULL_SCHEMA)
    out = tmp_path / "out"
    proc = keyed_run(
        f"--manifest={manifest}", f"--output={out}", f"--api_host={server.address}", expect=1 if rows else 0
    )
    clips, errors = read_table(out, "clips"), read_table(out, "errors")
    assert_schema(clips, CLIP_FIELDS, pq.read_schema(manifest))
    assert_schema(errors, ERROR_FIELDS, pq.read_schema(manifest))
    assert clips.num_rows == 0
    assert sorted(errors.column("error_code").to_pylist()) == (["INVALID_RANGE", "NOT_FOUND"] if rows else [])
    assert not list((out / "clips").glob("*"))
    assert summary_numbers(proc.stdout) == {
        "rows": len(rows),
        "clips": 0,
        "written": 0,
        "already": 0,
        "errors": len(rows),
    }
    assert server.calls == collections.Counter({"no-such-object": 1} if rows else {})


@pytest.mark.latest
def test_demo(tmp_path):
    proc = no_key_out(run_cli("demo", f"--output={tmp_path / 'demo'}", env=child_env(**key_env())))  # a child
    assert proc.returncode == 0, proc.stderr[-4000:]
    dataset = tmp_path / "demo" / "dataset"
    clips, errors = read_table(dataset, "clips"), read_table(dataset, "errors")
    rows = pq.read_metadata(tmp_path / "demo" / "manifest.parquet").num_rows
    assert clips.num_rows + errors.num_rows == rows and clips.num_rows >= 1 and errors.num_rows >= 1
    for clip in clips.to_pylist():
        data = (dataset / clip["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == clip["sha256"]
        assert sf.info(dataset / clip["path"]).frames == clip["num_samples"] > 0
    numbers = summary_numbers(proc.stdout)
    assert (numbers["rows"], numbers["clips"], numbers["errors"]) == (rows, clips.num_rows, errors.num_rows)


# -- Dataflow, offline --------------------------------------------------------------------------------

# The output and the key file are in the GCS emulator's bucket: a dry run checks both.
DATAFLOW_FLAGS = [
    "--runner=DataflowRunner",
    "--dry_run=True",
    "--api_key_file=gs://test-bucket/soniox-key",  # SONIOX_API_KEY would not reach Dataflow's workers
    "--project=test-project",
    "--region=us-central1",
    "--temp_location=gs://test-bucket/tmp",
    "--max_num_workers=2",
    "--machine_type=n2-standard-4",
    "--output=gs://test-bucket/out",
]

DRY_RUN = """
import json, logging, sys
import apache_beam as beam
from pipeline.launch.run import main

logging.basicConfig(level=logging.INFO)

results = []
run = beam.Pipeline.run


def capture(self, *args, **kwargs):
    result = run(self, *args, **kwargs)
    results.append(result)
    return result


beam.Pipeline.run = capture
main(sys.argv[1:])  # what `python -m pipeline run` runs
job = results[-1].job  # --dry_run: the DataflowRunner built this job and did not submit it
print(json.dumps({
    "state": str(results[-1].state),
    "job_name": job.proto.name,
    "transforms": sorted(t.unique_name for t in job.proto_pipeline.components.transforms.values()),
    "environments": [e.urn for e in job.proto_pipeline.components.environments.values()],
    "job": job.proto_pipeline.SerializeToString().hex(),
}))
"""


def test_dataflow_dry_run_builds_the_job_offline(make_server, gcs_server, tmp_path):
    """--runner=DataflowRunner --dry_run=True with a local manifest: the key file and the output are checked
    (on the GCS emulator), the job is built with no Google Cloud credentials and no network, nothing is fetched
    or written, and the key is not in the job."""
    from pipeline.local.storage_servers import gcs_bucket

    server = keyed_server(make_server)
    bucket = gcs_bucket(gcs_server)
    bucket.blob("soniox-key").upload_from_string(KEY)
    before = sorted(b.name for b in bucket.list_blobs())
    rows = [manifest_row(FULL_SCHEMA, "a", "demo-mono", "a", time=(0, 1000))]
    manifest = write_manifest(tmp_path / "m.parquet", rows, FULL_SCHEMA)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", DRY_RUN, f"--manifest={manifest}", f"--api_host={server.address}", *DATAFLOW_FLAGS],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=child_env(**key_env(), **gcs_server.env),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "DefaultCredentialsError" not in proc.stderr, "the dry run reached for Google Cloud credentials"
    assert sorted(b.name for b in bucket.list_blobs()) == before  # nothing staged or written
    assert time.monotonic() - started < 60
    assert KEY not in proc.stdout + proc.stderr
    job = json.loads(proc.stdout.strip().splitlines()[-1])
    assert job["state"] == "DONE" and job["job_name"]
    for name in ("ValidateRows/Read/Spread", "ValidateRows/Read/ReadRows", "SpreadRequests", "Fetch"):
        assert name in job["transforms"], name
    # The tables are written a file per bundle as rows come: no grouping of rows, no single-key file sink.
    assert "WriteClips/WriteFiles" in job["transforms"] and "WriteErrors/WriteFiles" in job["transforms"]
    assert not [t for t in job["transforms"] if t.startswith(("WriteClips/", "WriteErrors/")) and "Group" in t]
    assert not [t for t in job["transforms"] if "WriteToParquet" in t or "WriteImpl" in t]
    assert job["environments"] == ["beam:env:docker:v1"]
    assert KEY.encode() not in bytes.fromhex(job["job"])  # the key is not in the serialized job
    assert not server.calls  # no GetAudio call (the key check is one GetObject)
    assert sorted(os.listdir(tmp_path)) == ["m.parquet"]  # nothing written locally
    assert "2 worker(s) x 4 process(es) (n2-standard-4) x --max_in_flight 64 = 512 streams" in proc.stderr


@pytest.mark.parametrize(
    "runner", [["--runner=DataflowRunner"], ["--runner=PortableRunner", "--environment_type=DOCKER"]]
)
def test_a_key_only_in_the_launchers_environment_is_refused(runner, make_server, tmp_path):
    """SONIOX_API_KEY set where the job is launched never reaches Dataflow's (or a container's) workers:
    the launch stops with exit 2 and points at --api_key_file, before anything is called or written."""
    server = keyed_server(make_server)
    manifest = write_manifest(
        tmp_path / "m.parquet", [manifest_row(FULL_SCHEMA, "a", "demo-mono", "a", time=(0, 1000))], FULL_SCHEMA
    )
    flags = [f for f in DATAFLOW_FLAGS if not f.startswith(("--runner", "--api_key_file"))]
    proc = keyed_run(f"--manifest={manifest}", f"--api_host={server.address}", *runner, *flags, expect=2)
    assert "--api_key_file" in proc.stderr and "Traceback" not in proc.stderr
    assert not server.calls


def test_the_api_host_is_resolved_at_launch(monkeypatch):
    """SONIOX_API_HOST set where the job is launched goes to the workers inside the job's settings."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.dataset.storage import StoreSettings
    from pipeline.graph.read import Manifest
    from pipeline.launch.options import ClipOptions
    from pipeline.launch.run import fetch_settings

    monkeypatch.setenv("SONIOX_API_HOST", "http://10.0.0.7:5000")
    opts = PipelineOptions(["--manifest=m", "--output=o"]).view_as(ClipOptions)
    settings = fetch_settings(opts, Manifest(("m",), None, 1), StoreSettings())
    assert settings.client.api_host == "http://10.0.0.7:5000"
    opts = PipelineOptions(["--manifest=m", "--output=o", "--api_host=http://127.0.0.1:1"]).view_as(ClipOptions)
    assert fetch_settings(opts, Manifest(("m",), None, 1), StoreSettings()).client.api_host == "http://127.0.0.1:1"
