"""Manifests that broke whole runs (issue 23), run end to end against a LocalServer.

A bad row is one error row, whatever its values; a bad file stops the launch (exit 2, one line naming the file,
nothing called); a file that goes bad past what the launch reads fails naming the file and the row group; a
relative glob and a file:// URI read the files they name.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core import elements as el
from pipeline.local.server import LocalServer
from tests.helpers import (
    Result,
    expect_exit,
    garble,
    one_error,
    read_table,
    run_argv,
    run_cli,
    run_pipeline,
    summary_numbers,
    write_manifest,
)

pytestmark = pytest.mark.timeout(300)

SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("object_id", pa.string()), ("start_ms", pa.int64()), ("duration_ms", pa.int64())]
)
IDS = [  # (clip_id, object_id, the row's error code: None for a clip)
    (None, "demo-mono", None),
    (None, "", el.INVALID_OBJECT_ID),
    (None, "   ", el.INVALID_OBJECT_ID),
    (None, None, el.MISSING_VALUE),
    ("", "demo-mono", el.INVALID_CLIP_ID),
    ("  ", "demo-mono", el.INVALID_CLIP_ID),
    ("", "", el.INVALID_OBJECT_ID),
    ("n", None, el.MISSING_VALUE),
]


def good_table(n: int) -> pa.Table:
    """`n` good rows of two objects, in time ranges."""
    objects = ["demo-mono", "demo-stereo"]
    return pa.table(
        {
            "object_id": pa.array([objects[i % 2] for i in range(n)]),
            "start_ms": pa.array([100 * i for i in range(n)], pa.int64()),
            "duration_ms": pa.array([500] * n, pa.int64()),
        }
    )


def assert_stopped_at_launch(proc: Result, server: LocalServer, out: Path) -> str:
    """Exit 2 with one error line and no traceback, no call made, nothing written; the line."""
    expect_exit(proc, 2)
    line = one_error(proc.stderr)
    assert not server.calls
    assert not out.exists()
    return line


# -- 3: empty, blank and null IDs ----------------------------------------------------------------------


def test_empty_blank_and_null_ids_are_one_error_row_each(server, tmp_path):
    folder = tmp_path / "manifest"
    folder.mkdir()
    rows = [dict(clip_id=c, object_id=o, start_ms=100 * i, duration_ms=500) for i, (c, o, _) in enumerate(IDS)]
    ids = write_manifest(folder / "a.parquet", rows, SCHEMA)
    nulls = folder / "b.parquet"  # object_id and clip_id columns of nulls only, typed null by the writer
    pq.write_table(good_table(2).append_column("clip_id", pa.nulls(2)).set_column(0, "object_id", pa.nulls(2)), nulls)
    assert pq.read_schema(nulls).field("object_id").type == pa.null()
    out = tmp_path / "out"

    proc = run_pipeline("run", *run_argv(server, folder / "*.parquet", out))
    expect_exit(proc, 1)  # 9 errors in 10 rows, past --max_error_ratio: the tables are written
    assert summary_numbers(proc.stdout) == {"rows": 10, "clips": 1, "written": 1, "already": 0, "errors": 9}
    assert read_table(out, "clips").column("clip_id").to_pylist() == ["demo-mono.t0+500"]
    errors = read_table(out, "errors").to_pylist()
    codes = {e["error_message"].split(": ")[0]: e["error_code"] for e in errors}
    assert len(errors) == len(codes) == 9
    assert codes == {f"{ids} row {i}": code for i, (_, _, code) in enumerate(IDS) if code} | {
        f"{nulls} row {i}": el.MISSING_VALUE for i in range(2)
    }
    assert server.calls == Counter({"demo-mono": 1})


# -- 4: two columns of one name -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["speaker", "object_id"])
def test_two_columns_of_one_name_stop_the_launch(server, tmp_path, name):
    """Before, a second `speaker` failed the table write after every clip was fetched (on every rerun), and a
    second `object_id` stopped the launch with a KeyError traceback."""
    table = good_table(2).append_column("speaker", pa.array(["ann", "bob"]))
    table = table.append_column(name, table.column(name))
    manifest, out = tmp_path / "m.parquet", tmp_path / "out"
    pq.write_table(table, manifest)
    assert pq.read_schema(manifest).names.count(name) == 2

    line = assert_stopped_at_launch(run_pipeline("run", *run_argv(server, manifest, out)), server, out)
    assert line == f"error: manifest {manifest}: more than one column is named '{name}'; rename or drop the copies"


# -- 5: garbled pages behind a valid footer -----------------------------------------------------------------


def garbled_manifest(path: Path, groups: set[int]) -> Path:
    """Six good rows in row groups of two, the pages of `groups` garbled (the footer intact)."""
    pq.write_table(good_table(6), path, row_group_size=2)
    garble(str(path), groups=groups)
    return path


def test_garbled_pages_in_the_first_row_group_stop_the_launch(server, tmp_path):
    manifest, out = garbled_manifest(tmp_path / "m.parquet", {0}), tmp_path / "out"
    line = assert_stopped_at_launch(run_pipeline("run", *run_argv(server, manifest, out)), server, out)
    assert line.startswith(f"error: manifest {manifest}: column 'object_id' of row group 0 cannot be read ("), line


def test_a_garbled_later_row_group_fails_naming_file_and_group(server, tmp_path):
    """Found only when a worker reads it: the run fails (exit 3) with one line, no traceback, naming the file and
    the group."""
    manifest, out = garbled_manifest(tmp_path / "m.parquet", {2}), tmp_path / "out"
    proc = run_cli("run", *run_argv(server, manifest, out))
    expect_exit(proc, 3)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the run failed (manifest {manifest}: row group 2 (from file row 4) cannot be")
    assert "Traceback" not in proc.stderr, proc.stderr


# -- 10a: a relative glob with no folder, a file:// URI ---------------------------------------------------


def two_files(folder: Path) -> None:
    """cp-a.parquet and cp-b.parquet, a row each; and a file the glob must not match."""
    folder.mkdir()
    pq.write_table(good_table(1), folder / "cp-a.parquet")
    pq.write_table(good_table(2).slice(1), folder / "cp-b.parquet")
    (folder / "notes.txt").write_text("not a manifest")


def assert_both_files_read(proc: Result, server: LocalServer, out: Path) -> None:
    expect_exit(proc, 0)
    assert summary_numbers(proc.stdout)["clips"] == 2
    assert sorted(read_table(out, "clips").column("object_id").to_pylist()) == ["demo-mono", "demo-stereo"]
    assert server.calls == Counter({"demo-mono": 1, "demo-stereo": 1})


def test_a_relative_glob_with_no_folder(server, tmp_path):
    """`--manifest 'cp-*.parquet'` reads the files of the current folder, as `./cp-*.parquet` does."""
    two_files(tmp_path / "manifests")
    out = tmp_path / "out"
    proc = run_cli("run", *run_argv(server, "cp-*.parquet", out), cwd=tmp_path / "manifests")
    assert_both_files_read(proc, server, out)


def test_a_file_uri(server, tmp_path):
    two_files(tmp_path / "manifests")
    out = tmp_path / "out"
    proc = run_pipeline("run", *run_argv(server, f"file://{tmp_path / 'manifests'}/cp-*.parquet", out))
    assert_both_files_read(proc, server, out)
