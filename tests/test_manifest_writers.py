"""Manifests written the usual ways (pyarrow, pandas with NaN in range columns, pandas Int64, polars, DuckDB's
COPY TO) run end to end against a LocalServer, and the snippets of docs/manifest.md write manifests that do.

Each writer types the same rows its own way (pandas makes a range column with a missing value float64, DuckDB
writes INTEGER as int32, polars strings as large_string); the run must not care: the same clips, sample-exact,
the same error, rows in = clips + errors.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.elements import segment_tag
from pipeline.core.ids import derive_clip_id
from pipeline.core.tables import RANGE_COLUMNS
from pipeline.launch.manifest import inspect_manifest
from pipeline.local.server import LocalServer
from tests.helpers import (
    REPO,
    check_clip_row,
    check_record_adds_up,
    expect_exit,
    read_table,
    run_argv,
    run_pipeline,
    run_record,
    segment_of,
    summary_numbers,
    write_manifest,
)

pytestmark = pytest.mark.timeout(300)

COLUMNS = ("clip_id", "object_id", "start_ms", "duration_ms", "token_start", "token_end", "speaker")
ROWS = [
    dict(clip_id="m0", object_id="demo-mono", start_ms=0, duration_ms=1000, speaker="ann"),
    dict(object_id="demo-stereo", start_ms=1500, duration_ms=700, speaker="bob"),
    dict(clip_id="k1", object_id="demo-mono", token_start=2, token_end=5),
    dict(object_id="demo-flac-3ch", token_start=1, token_end=4, speaker="cy"),
    dict(clip_id="half", object_id="demo-mono", start_ms=500, speaker="dee"),  # neither range has both values
]
ROWS = [{name: row.get(name) for name in COLUMNS} for row in ROWS]
CLIP_IDS = {"m0": 0, "demo-stereo.t1500+700": 1, "k1": 2, "demo-flac-3ch.k1-4": 3}  # -> index in ROWS
CALLS = Counter({"demo-mono": 2, "demo-stereo": 1, "demo-flac-3ch": 1})  # the rows that pass validation


# -- the writers ---------------------------------------------------------------------------------------


def by_pandas_nan(path: Path, rows: list[dict[str, Any]]) -> None:
    pd.DataFrame(rows).to_parquet(path)  # a None in an int column makes it float64, the None NaN


def by_pandas_int64(path: Path, rows: list[dict[str, Any]]) -> None:
    pd.DataFrame(rows).astype({name: "Int64" for name in RANGE_COLUMNS}).to_parquet(path)


def by_polars(path: Path, rows: list[dict[str, Any]]) -> None:
    pl.DataFrame(rows).write_parquet(path)


def by_duckdb(path: Path, rows: list[dict[str, Any]]) -> None:
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE m (clip_id VARCHAR, object_id VARCHAR, start_ms BIGINT, duration_ms BIGINT,"
            " token_start INTEGER, token_end INTEGER, speaker VARCHAR)"
        )
        con.executemany("INSERT INTO m VALUES (?, ?, ?, ?, ?, ?, ?)", [tuple(r[c] for c in COLUMNS) for r in rows])
        con.execute(f"COPY m TO '{path}'")


# writer -> the types it gives start_ms, duration_ms, token_start, token_end (so each case is what it claims)
WRITERS: dict[str, tuple[Callable[[Path, list[dict[str, Any]]], Any], tuple[pa.DataType, ...]]] = {
    "pyarrow": (write_manifest, (pa.int64(),) * 4),
    "pandas-nan": (by_pandas_nan, (pa.float64(),) * 4),
    "pandas-Int64": (by_pandas_int64, (pa.int64(),) * 4),
    "polars": (by_polars, (pa.int64(),) * 4),
    "duckdb": (by_duckdb, (pa.int64(), pa.int64(), pa.int32(), pa.int32())),
}


def run(server: LocalServer, manifest: str | Path, out: Path) -> dict[str, int]:
    """A real run (one bad row of five allowed); the summary's numbers."""
    proc = run_pipeline("run", *run_argv(server, manifest, out, "--max_error_ratio=0.5"))
    expect_exit(proc, 0)
    return summary_numbers(proc.stdout)


@pytest.mark.parametrize("writer", WRITERS)
def test_manifest_of_each_writer_runs_end_to_end(writer: str, server, store, tmp_path: Path) -> None:
    write, range_types = WRITERS[writer]
    manifest, out = tmp_path / "manifest.parquet", tmp_path / "out"
    write(manifest, ROWS)
    assert tuple(pq.read_schema(manifest).field(n).type for n in RANGE_COLUMNS) == range_types

    numbers = run(server, manifest, out)
    assert numbers == {"rows": 5, "clips": 4, "written": 4, "already": 0, "errors": 1}
    check_record_adds_up(run_record(str(out)), rows=5)
    assert server.calls == CALLS  # the bad row made no call

    clips = read_table(out, "clips")
    assert [pa.types.is_integer(clips.schema.field(n).type) for n in RANGE_COLUMNS] == [True] * 4
    by_id = {clip["clip_id"]: clip for clip in clips.to_pylist()}
    assert set(by_id) == set(CLIP_IDS)
    for clip_id, index in CLIP_IDS.items():
        row = ROWS[index]
        check_clip_row(out, by_id[clip_id], row, store, server.settings.token_padding_ms)
        assert [by_id[clip_id][n] for n in (*RANGE_COLUMNS, "speaker")] == [row[n] for n in (*RANGE_COLUMNS, "speaker")]

    errors = read_table(out, "errors").to_pylist()
    assert [(e["clip_id"], e["error_code"], e["error_message"]) for e in errors] == [
        ("half", "MISSING_VALUE", f"{manifest} row 4: duration_ms is null")
    ]
    assert (errors[0]["start_ms"], errors[0]["duration_ms"], errors[0]["speaker"]) == (500, None, "dee")


# -- the snippets of docs/manifest.md -------------------------------------------------------------------

DOC = REPO / "docs" / "manifest.md"
SNIPPETS = re.findall(r"^```(python|sql)\n(.*?)^```", DOC.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)


def snippet_id(snippet: tuple[str, str]) -> str:
    """The library a snippet writes with, for the test's name: 'pandas', 'pyarrow', 'polars', 'sql'."""
    language, code = snippet
    found = re.search(r"^import (\w+)", code, re.MULTILINE)
    return found.group(1) if language == "python" and found else language


def test_the_doc_shows_every_writer() -> None:
    assert sorted(map(snippet_id, SNIPPETS)) == ["pandas", "polars", "pyarrow", "sql"]


def execute(snippet: tuple[str, str]) -> None:
    """A doc snippet, run as a reader would run it (in the current folder): Python as a script, SQL in DuckDB."""
    language, code = snippet
    if language == "sql":
        with duckdb.connect() as con:
            con.execute(code)
    else:
        exec(compile(code, f"{DOC.name} ({snippet_id(snippet)})", "exec"), {"__name__": "__main__"})


def as_documented(row: dict[str, Any]) -> dict[str, Any]:
    """A manifest row as the doc says it is read (worked out here, not by the code under test): a range's NaN
    is None, its whole float an int."""
    ranges = {n: None if row[n] is None or math.isnan(row[n]) else int(row[n]) for n in RANGE_COLUMNS if n in row}
    return {**row, **ranges}


@pytest.mark.parametrize("snippet", SNIPPETS, ids=map(snippet_id, SNIPPETS))
def test_doc_snippet_writes_a_manifest_that_runs(
    snippet: tuple[str, str], server, store, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    execute(snippet)
    manifest = tmp_path / "manifest.parquet"
    rows = [as_documented(r) for r in pq.read_table(manifest).to_pylist()]
    assert inspect_manifest(str(manifest)).num_rows == len(rows) >= 2
    if snippet_id(snippet) == "pandas":  # the case the doc explains: NaN in float64 range columns
        assert pq.read_schema(manifest).field("start_ms").type == pa.float64()
        assert any(r["start_ms"] is None for r in rows)

    out = tmp_path / "out"
    numbers = run(server, manifest, out)
    assert (numbers["rows"], numbers["clips"], numbers["errors"]) == (len(rows), len(rows), 0)
    for clip in read_table(out, "clips").to_pylist():
        (row,) = [r for r in rows if _clip_id(r) == clip["clip_id"]]
        check_clip_row(out, clip, row, store, server.settings.token_padding_ms)


def _clip_id(row: dict[str, Any]) -> str:
    """The clip ID a row gets: its own, or the one derived from its object and range."""
    return row.get("clip_id") or derive_clip_id(row["object_id"], segment_tag(segment_of(row)))
