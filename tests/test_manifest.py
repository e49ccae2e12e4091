"""The manifest: row checks (validate_row), whole-file checks (inspect_manifest), and ValidateRows on Beam.

Every bad row must become an error with its code and its place in the manifest; every whole-file
problem must stop the run with a message naming the file and the column.
"""

from __future__ import annotations

from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.core import elements as el
from pipeline.core.ids import clip_id_problem, derive_clip_id
from pipeline.core.rows import validate_row
from pipeline.core.tables import RANGE_COLUMNS
from pipeline.graph.read import Manifest, ManifestReadError, Piece, ReadManifest, ReadManifestRows, ValidateRows
from pipeline.launch.manifest import ManifestError, first_object_id, inspect_manifest
from tests.helpers import UNREADABLE, garble

pytestmark = pytest.mark.timeout(60)

WHERE = "gs://bucket/manifest/part-7.parquet row 41"
INT32_MAX = 2**31 - 1
FLOAT64 = pa.float64()


def row(**values) -> dict:
    """A good time-range row of a manifest that has every range column, with `values` changed."""
    base = {
        "clip_id": "clip-1",
        "object_id": "demo-mono",
        "start_ms": 1000,
        "duration_ms": 500,
        "token_start": None,
        "token_end": None,
        "speaker": "alice",
    }
    base.update(values)
    return base


def token_row(**values) -> dict:
    return row(**{"start_ms": None, "duration_ms": None, "token_start": 2, "token_end": 5, **values})


def check(r: dict, where: str = WHERE) -> el.ClipRequest | el.ClipError:
    return validate_row((where, r))


def assert_error(r: dict, code: str) -> el.ClipError:
    out = check(r)
    assert isinstance(out, el.ClipError), f"row {r} was accepted as {out}"
    assert out.error_code == code, out.error_message
    assert out.error_message.startswith(f"{WHERE}: "), out.error_message
    assert out.attempts == 0
    assert out.columns == r  # the row travels on unchanged, for the errors table
    return out


# -- validate_row: bad rows -------------------------------------------------------------------------


def test_null_object_id_is_missing_value():
    err = assert_error(row(object_id=None), el.MISSING_VALUE)
    assert "object_id" in err.error_message


@pytest.mark.parametrize(
    "object_id",
    ["/", "..", "a/b", "../etc/passwd", "demo\0mono", "demo mono", " demo-mono", "démo", "日本", "", "x" * 257],
    ids=["slash", "dotdot", "a-slash-b", "traversal", "nul", "space", "leading-space", "accent", "cjk", "empty", "257"],
)
def test_invalid_object_ids(object_id):
    assert_error(row(object_id=object_id), el.INVALID_OBJECT_ID)


@pytest.mark.parametrize("object_id", ["auto:abc", "x" * 256, "A-z_09", "auto:" + "y" * 251])
def test_valid_object_ids(object_id):
    out = check(row(object_id=object_id))
    assert isinstance(out, el.ClipRequest), out
    assert out.object_id == object_id


@pytest.mark.parametrize(
    "values",
    [
        {"token_start": 0, "token_end": 3},  # both a time and a token range
        {"start_ms": None, "duration_ms": None},  # neither
        {"start_ms": -1},
        {"duration_ms": 0},
        {"duration_ms": -5},
        {"start_ms": None, "duration_ms": None, "token_start": 4, "token_end": 4},
        {"start_ms": None, "duration_ms": None, "token_start": 5, "token_end": 4},
        {"start_ms": None, "duration_ms": None, "token_start": -1, "token_end": 4},
        {"start_ms": INT32_MAX - 499, "duration_ms": 500},  # ends past int32
        {"start_ms": 0, "duration_ms": INT32_MAX + 1},
        {"start_ms": 2**40, "duration_ms": 500},
        {"start_ms": None, "duration_ms": None, "token_start": 0, "token_end": INT32_MAX + 1},
    ],
    ids=[
        "both",
        "neither",
        "negative-start",
        "zero-duration",
        "negative-duration",
        "token-end-eq-start",
        "token-end-lt-start",
        "negative-token",
        "time-end-past-int32",
        "duration-past-int32",
        "start-past-int32",
        "token-end-past-int32",
    ],
)
def test_invalid_ranges(values):
    assert_error(row(**values), el.INVALID_RANGE)


def test_ranges_at_the_int32_limit_are_valid():
    time = check(row(start_ms=INT32_MAX - 500, duration_ms=500))
    token = check(token_row(token_start=0, token_end=INT32_MAX))
    assert time.segment == el.TimeRange(INT32_MAX - 500, 500)
    assert token.segment == el.TokenRange(0, INT32_MAX)


@pytest.mark.parametrize(
    "values, column",
    [
        ({"start_ms": None}, "start_ms"),
        ({"duration_ms": None}, "duration_ms"),
        ({"start_ms": None, "duration_ms": None, "token_start": None, "token_end": 5}, "token_start"),
        ({"start_ms": None, "duration_ms": None, "token_start": 2, "token_end": None}, "token_end"),
    ],
)
def test_null_in_one_of_a_pair_is_missing_value(values, column):
    err = assert_error(row(**values), el.MISSING_VALUE)
    assert column in err.error_message


@pytest.mark.parametrize(
    "clip_id",
    ["a/b", "/abs", "..", ".hidden", "_tmp", "-flag", "", "a b", "a\\b", "x" * 201],
    ids=[
        "slash",
        "leading-slash",
        "dotdot",
        "leading-dot",
        "leading-underscore",
        "dash",
        "empty",
        "space",
        "bs",
        "201",
    ],
)
def test_invalid_clip_ids(clip_id):
    assert_error(row(clip_id=clip_id), el.INVALID_CLIP_ID)


@pytest.mark.parametrize("object_id", ["", " ", "\t"], ids=["empty", "space", "tab"])
@pytest.mark.parametrize("values", [{}, {"start_ms": -1}], ids=["good-range", "bad-range"])
def test_a_bad_object_id_without_clip_id_is_one_error(object_id, values):
    """No clip ID is derived from an invalid object ID (deriving one from "" raised IndexError and killed the
    run): the row is one INVALID_OBJECT_ID error, its clip_id left null."""
    err = assert_error(row(object_id=object_id, clip_id=None, **values), el.INVALID_OBJECT_ID)
    assert err.clip_id is None


@pytest.mark.parametrize("object_id", ["", " ", "a/b"])
def test_no_clip_id_is_derived_from_an_invalid_object_id(object_id):
    with pytest.raises(ValueError, match="invalid object_id"):
        derive_clip_id(object_id, "t0+1")


def test_a_row_with_several_problems_is_one_error():
    out = check(row(object_id=None, clip_id="a/b", start_ms=-1))
    assert isinstance(out, el.ClipError)
    assert out.error_code in (el.MISSING_VALUE, el.INVALID_RANGE, el.INVALID_CLIP_ID)
    assert out.clip_id == "a/b" and out.error_message.startswith(f"{WHERE}: ")


# -- validate_row: good rows and derived clip IDs ---------------------------------------------------


def test_good_rows_become_requests():
    time = check(row())
    token = check(token_row(clip_id="k"))
    assert time == el.ClipRequest("clip-1", "demo-mono", el.TimeRange(1000, 500), {}, WHERE)
    assert time.source == WHERE and time.columns == row()
    assert token.segment == el.TokenRange(2, 5) and token.clip_id == "k"
    # a manifest with only the time columns has no token keys at all
    only_time = check({"object_id": "demo-mono", "start_ms": 0, "duration_ms": 10})
    assert isinstance(only_time, el.ClipRequest)


def derived(r: dict) -> str:
    out = check({**r, "clip_id": None})
    assert isinstance(out, el.ClipRequest), out
    return out.clip_id


def test_derived_clip_id_is_deterministic_and_a_valid_file_name():
    first = derived(row())
    assert first == derived(row())
    assert first == derived(row(speaker="bob"))  # other columns do not matter
    assert clip_id_problem(first) is None
    assert check(row(clip_id=first)).clip_id == first  # and it would be accepted if given explicitly


def test_derived_clip_ids_are_distinct():
    ids = [
        derived(row()),
        derived(row(start_ms=1000, duration_ms=501)),
        derived(row(start_ms=1001, duration_ms=500)),
        derived(row(start_ms=100, duration_ms=1500)),
        derived(row(start_ms=None, duration_ms=None, token_start=1000, token_end=1500)),
        derived(token_row()),
        derived(token_row(token_start=2, token_end=6)),
        derived(row(object_id="demo-stereo")),
        derived(row(object_id="auto:x")),
        derived(row(object_id="auto_x")),
        derived(row(object_id="auto-x")),
        derived(row(object_id="a" * 256)),
        derived(row(object_id="a" * 255 + "b")),
        derived(row(object_id="a" * 255)),
    ]
    assert len(set(ids)) == len(ids), ids
    for clip_id in ids:
        assert clip_id_problem(clip_id) is None, clip_id


def test_derived_time_and_token_ids_differ_for_the_same_numbers():
    assert derived(row(start_ms=2, duration_ms=5)) != derived(token_row(token_start=2, token_end=5))


@pytest.mark.parametrize("object_id", ["_x", "-x"])
def test_derived_clip_id_obeys_the_clip_id_rule_for_any_valid_object_id(object_id):
    clip_id = derived(row(object_id=object_id))
    # the errors table carries this clip_id; fed back as a manifest to retry the row, it must be accepted
    retried = check(row(object_id=object_id, clip_id=clip_id))
    assert isinstance(retried, el.ClipRequest), f"derived {clip_id!r} is rejected when given: {retried}"
    assert clip_id_problem(clip_id) is None


# -- inspect_manifest ---------------------------------------------------------------------------------


def write(file: Path, /, **columns: pa.Array) -> str:
    pq.write_table(pa.table(columns), file)
    return str(file)


def good_columns(n: int = 2, **extra: pa.Array) -> dict[str, pa.Array]:
    return {
        "object_id": pa.array(["demo-mono"] * n, pa.string()),
        "start_ms": pa.array(range(n), pa.int32()),
        "duration_ms": pa.array([100] * n, pa.int32()),
        **extra,
    }


def manifest_error(pattern: str) -> str:
    with pytest.raises(ManifestError) as e:
        inspect_manifest(pattern)
    return str(e.value)


def test_not_parquet(tmp_path):
    path = tmp_path / "manifest.parquet"
    path.write_text("object_id,start_ms,duration_ms\ndemo-mono,0,100\n")
    assert str(path) in manifest_error(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    assert str(path) in manifest_error(str(path))


@pytest.mark.parametrize(
    "columns, named",
    [
        ({"clip_id": pa.array(["a"]), "start_ms": pa.array([0]), "duration_ms": pa.array([1])}, "object_id"),
        (good_columns(object_id=pa.array([1, 2], pa.int64())), "object_id"),
        (good_columns(clip_id=pa.array([1, 2], pa.int32())), "clip_id"),
        (good_columns(start_ms=pa.array([0.0, 1.5], pa.float64())), "start_ms"),
        (good_columns(start_ms=pa.array([True, False])), "start_ms"),
        (good_columns(duration_ms=pa.array(["100", "200"], pa.string())), "duration_ms"),
        (good_columns(token_start=pa.array([0, 1], pa.int32())), "token_start"),  # without token_end
        ({"object_id": pa.array(["x"]), "start_ms": pa.array([0], pa.int32())}, "start_ms"),  # no duration_ms
        ({"object_id": pa.array(["x"]), "token_end": pa.array([3], pa.int32())}, "token_end"),
        ({"object_id": pa.array(["x"]), "speaker": pa.array(["a"])}, "start_ms"),  # no range columns at all
        (good_columns(sha256=pa.array(["a", "b"])), "sha256"),
        (good_columns(path=pa.array(["a", "b"])), "path"),
        (good_columns(error_code=pa.array(["a", "b"])), "error_code"),
    ],
    ids=[
        "no-object_id",
        "int-object_id",
        "int-clip_id",
        "fractional-start_ms",
        "bool-start_ms",
        "string-duration_ms",
        "token_start-alone",
        "start_ms-alone",
        "token_end-alone",
        "no-range",
        "reserved-sha256",
        "reserved-path",
        "reserved-error_code",
    ],
)
def test_whole_file_problems_name_file_and_column(tmp_path, columns, named):
    path = write(tmp_path / "m.parquet", **columns)
    message = manifest_error(path)
    assert path in message, message
    assert named in message.replace(str(tmp_path), ""), message  # (the test's folder name may hold it too)


@pytest.mark.parametrize("name", ["object_id", "start_ms", "speaker"])
def test_two_columns_of_one_name_stop_the_launch(tmp_path, name):
    """Parquet (and pyarrow) allow it; the output tables do not, so it is found before any call."""
    columns = good_columns(speaker=pa.array(["a", "b"]))
    path = str(tmp_path / "m.parquet")
    table = pa.Table.from_arrays([*columns.values(), columns[name]], names=[*columns, name])
    pq.write_table(table, path)
    assert pq.read_schema(path).names.count(name) == 2  # the file really has both
    message = manifest_error(path)
    assert message.startswith(f"manifest {path}: "), message
    assert f"'{name}'" in message and "more than one column" in message, message


def test_a_bad_file_among_good_ones_stops_the_run(tmp_path):
    write(tmp_path / "a.parquet", **good_columns())
    bad = write(tmp_path / "b.parquet", **good_columns(start_ms=pa.array([0.5, 1.0])))
    message = manifest_error(str(tmp_path / "*.parquet"))
    assert bad in message and "start_ms" in message.replace(str(tmp_path), ""), message


def test_files_with_conflicting_types_name_the_column(tmp_path):
    write(tmp_path / "a.parquet", **good_columns(speaker=pa.array([1, 2], pa.int64())))
    write(tmp_path / "b.parquet", **good_columns(speaker=pa.array(["x", "y"], pa.string())))
    assert "speaker" in manifest_error(str(tmp_path / "*.parquet")).replace(str(tmp_path), "")


def test_files_with_conflicting_types_name_a_file(tmp_path):
    a = write(tmp_path / "a.parquet", **good_columns(speaker=pa.array([1, 2], pa.int64())))
    b = write(tmp_path / "b.parquet", **good_columns(speaker=pa.array(["x", "y"], pa.string())))
    message = manifest_error(str(tmp_path / "*.parquet"))
    assert a in message or b in message, message


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "nothing-*.parquet")
    assert pattern in manifest_error(pattern)


def test_a_relative_glob_with_no_folder_matches_like_dot_slash(tmp_path, monkeypatch):
    for name in ("cp-a", "cp-b", "other"):
        write(tmp_path / f"{name}.parquet", **good_columns())
    monkeypatch.chdir(tmp_path)
    assert inspect_manifest("cp-*.parquet").files == inspect_manifest("./cp-*.parquet").files
    assert inspect_manifest("cp-*.parquet").files == ("./cp-a.parquet", "./cp-b.parquet")
    assert inspect_manifest("cp-a.parquet").files == ("cp-a.parquet",)  # no glob: as before


@pytest.mark.parametrize("prefix", ["file://", "file://localhost"])
def test_file_uris_read_the_local_files(tmp_path, prefix):
    paths = [write(tmp_path / f"cp-{n}.parquet", **good_columns()) for n in "ab"]
    assert inspect_manifest(f"{prefix}{tmp_path}/cp-*.parquet").files == tuple(paths)
    assert inspect_manifest(f"{prefix}{paths[0]}").files == (paths[0],)
    assert f"file://elsewhere{tmp_path}" in manifest_error(f"file://elsewhere{tmp_path}/cp-*.parquet")


def test_zero_row_manifest_is_fine(tmp_path):
    path = write(tmp_path / "m.parquet", **good_columns(0))
    manifest = inspect_manifest(path)
    assert manifest.num_rows == 0 and manifest.files == (path,)


def test_files_are_unified(tmp_path):
    a = write(tmp_path / "a.parquet", **good_columns(3, speaker=pa.array(["x", "y", None])))
    b = write(
        tmp_path / "b.parquet",
        object_id=pa.array(["demo-mono"] * 2),
        token_start=pa.array([0, 1], pa.int32()),
        token_end=pa.array([2, 3], pa.int32()),
    )
    manifest = inspect_manifest(str(tmp_path / "*.parquet"))
    assert manifest.files == (a, b)
    assert manifest.num_rows == 5
    assert manifest.schema.names == ["object_id", "start_ms", "duration_ms", "speaker", "token_start", "token_end"]
    assert manifest.schema.field("start_ms").type == pa.int32()


def test_row_groups_are_read_as_pieces_with_their_file_row_numbers(tmp_path):
    """A one-file manifest of 50 rows in row groups of 7: 8 pieces read separately (spread over the workers
    by a Reshuffle), and every row keeps its place in the file for messages."""
    path = str(tmp_path / "m.parquet")
    table = pa.table({"object_id": [f"obj-{i}" for i in range(50)], "start_ms": list(range(50))})
    table = table.append_column("duration_ms", pa.array([100] * 50))
    pq.write_table(table, path, row_group_size=7)
    manifest = inspect_manifest(path)
    assert manifest.pieces == tuple(Piece(path, g, 7 * g) for g in range(8))
    with BeamPipeline() as p:
        rows = p | ReadManifest(manifest) | beam.Map(lambda item: (item[0], item[1]["object_id"]))
        assert_that(rows, equal_to([(f"{path} row {i}", f"obj-{i}") for i in range(50)]))
        # the clip-ID pass reads only the columns it needs, whatever else the manifest carries
        keys = p | "Narrow" >> ReadManifest(manifest, ["object_id", "clip_id"]) | beam.Map(lambda item: sorted(item[1]))
        assert_that(keys, equal_to([["object_id"]] * 50), label="narrow read")


# -- float range columns (pandas makes an int column with a null float64) ------------------------------


def floats(values: list[float | None], type_: pa.DataType = FLOAT64) -> pa.Array:
    """A float column with real NaNs (not nulls) where `values` has nan, and nulls where it has None."""
    numbers = np.array([0.0 if v is None else v for v in values], dtype=type_.to_pandas_dtype())
    return pa.array(numbers, type_, mask=np.array([v is None for v in values]))


def read_rows(manifest: Manifest) -> list[tuple[str, dict]]:
    """Every (where, row) of the manifest as the Beam job reads them, piece by piece."""
    read = ReadManifestRows(manifest.schema.names)
    return [item for piece in manifest.pieces for item in read.process(piece)]


@pytest.mark.parametrize("type_", [pa.float16(), pa.float32(), pa.float64()], ids=str)
def test_whole_float_ranges_are_read_as_integers(tmp_path, type_):
    nan = float("nan")
    path = write(
        tmp_path / "m.parquet",
        object_id=pa.array(["demo-mono"] * 4),
        start_ms=floats([0.0, nan, 1500.0, -0.0], type_),
        duration_ms=floats([1000.0, nan, None, 20.0], type_),
        token_start=floats([None, 2.0, None, None], type_),
        token_end=floats([nan, 5.0, None, None], type_),
        score=pa.array([0.5, 1.5, None, 2.0]),  # not a range column: any float, left as it is
    )
    manifest = inspect_manifest(path)
    assert [manifest.schema.field(n).type for n in RANGE_COLUMNS] == [pa.int64()] * 4
    assert manifest.schema.field("score").type == pa.float64()
    rows = read_rows(manifest)
    assert [where for where, _ in rows] == [f"{path} row {i}" for i in range(4)]
    for _, r in rows:
        assert all(r[n] is None or type(r[n]) is int for n in RANGE_COLUMNS), r
    assert [r["score"] for _, r in rows] == [0.5, 1.5, None, 2.0]
    checked = [validate_row(item) for item in rows]
    assert [c.segment for c in checked[:2]] == [el.TimeRange(0, 1000), el.TokenRange(2, 5)]
    assert checked[2].error_code == el.MISSING_VALUE and "duration_ms is null" in checked[2].error_message
    assert checked[3].segment == el.TimeRange(0, 20)


def test_float_and_int_files_unify_as_int64(tmp_path):
    write(tmp_path / "a.parquet", **good_columns())
    write(tmp_path / "b.parquet", **good_columns(start_ms=floats([5.0, None]), duration_ms=floats([100.0, 7.0])))
    manifest = inspect_manifest(str(tmp_path / "*.parquet"))
    assert manifest.schema.field("start_ms").type == pa.int64()
    assert [r["start_ms"] for _, r in read_rows(manifest)] == [0, 1, 5, None]


@pytest.mark.parametrize(
    "column, value, problem",
    [
        ("start_ms", 1.5, "not a whole number"),
        ("duration_ms", -0.25, "not a whole number"),
        ("token_start", float("inf"), "not a whole number"),
        ("token_end", float("-inf"), "not a whole number"),
        ("start_ms", 1e19, "outside int64"),
        ("token_end", 2.0**63, "outside int64"),  # int64's largest is 2**63 - 1
    ],
    ids=["fraction", "negative-fraction", "inf", "minus-inf", "1e19", "2**63"],
)
def test_a_float_range_that_is_not_a_whole_number_stops_the_launch(tmp_path, column, value, problem):
    """The bad value sits in row 8, in the third row group of 3: the message counts rows across groups."""
    n = 10
    columns = {
        "object_id": pa.array(["demo-mono"] * n),
        "start_ms": floats([float(i) for i in range(n)]),
        "duration_ms": floats([100.0] * n),
        "token_start": floats([None] * n),
        "token_end": floats([float("nan")] * n),
    }
    values = columns[column].to_pylist()
    values[8] = value
    columns[column] = floats(values)
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=3)
    assert manifest_error(path) == f"manifest {path}: column '{column}' row 8 is {value}, {problem}"


def test_the_smallest_int64_is_read_and_refused_as_a_range(tmp_path):
    path = write(tmp_path / "m.parquet", **good_columns(1, start_ms=floats([-(2.0**63)]), duration_ms=floats([1.0])))
    ((where, r),) = read_rows(inspect_manifest(path))
    assert r["start_ms"] == -(2**63)
    assert validate_row((where, r)).error_code == el.INVALID_RANGE


def test_only_float_range_columns_are_read_past_the_first_row_group_at_launch(tmp_path):
    """Integer range columns are checked from the schema alone: their pages past the first row group, garbled
    here, are never read at launch; the same pages of float range columns are (and fail)."""
    ints = str(tmp_path / "ints.parquet")
    pq.write_table(pa.table(good_columns(100)), ints, row_group_size=50)
    float_ranges = good_columns(100, start_ms=floats([float(i) for i in range(100)]))
    float_ranges["duration_ms"] = floats([100.0] * 100)
    floats_path = str(tmp_path / "floats.parquet")
    pq.write_table(pa.table(float_ranges), floats_path, row_group_size=50)
    for path in (ints, floats_path):
        garble(path, {"start_ms", "duration_ms"}, {1})
    assert inspect_manifest(ints).num_rows == 100
    message = manifest_error(floats_path)
    assert message.startswith(f"manifest {floats_path}: not a readable Parquet file"), message


@pytest.mark.parametrize("name", ["object_id", "duration_ms", "speaker"])
def test_garbled_pages_in_the_first_row_group_stop_the_launch(tmp_path, name):
    """A valid footer over garbled pages: the launch decodes the first row group and names file and column."""
    path = str(tmp_path / "m.parquet")
    columns = good_columns(300, speaker=pa.array([f"speaker {i}" for i in range(300)]))
    pq.write_table(pa.table(columns), path, row_group_size=100)
    garble(path, {name}, {0})
    message = manifest_error(path)
    assert message.startswith(f"manifest {path}: column '{name}' of row group 0 cannot be read"), message


def test_a_garbled_later_row_group_is_named_when_read(tmp_path):
    """Past the first row group, the worker that reads a garbled group names the file and the group."""
    path = str(tmp_path / "m.parquet")
    pq.write_table(pa.table(good_columns(300)), path, row_group_size=100)
    garble(path, groups={2})
    manifest = inspect_manifest(path)  # only the first row group is read at launch
    read = ReadManifestRows(manifest.schema.names)
    assert len([item for piece in manifest.pieces[:2] for item in read.process(piece)]) == 200
    with pytest.raises(ManifestReadError) as e:
        list(read.process(manifest.pieces[2]))
    assert str(e.value).startswith(f"manifest {path}: row group 2 (from file row 200) cannot be read"), e.value


def test_the_key_check_gets_the_first_valid_object_id(tmp_path):
    write(tmp_path / "a.parquet", **good_columns(3, object_id=pa.array([None, " ", ""], pa.string())))
    write(tmp_path / "b.parquet", **good_columns(2, object_id=pa.array(["bad/id", "demo-stereo"])))
    assert first_object_id(inspect_manifest(str(tmp_path / "*.parquet"))) == "demo-stereo"
    assert first_object_id(inspect_manifest(str(tmp_path / "a.parquet"))) is None


# -- one footer parse per file (a footer of 10,000 row groups is megabytes) ----------------------------------


class CountingParquetFile(pq.ParquetFile):
    """pq.ParquetFile, counting the footers it parses (those not handed to it as `metadata`)."""

    parses = 0

    def __init__(self, source, *args, metadata=None, **kwargs):
        CountingParquetFile.parses += metadata is None
        super().__init__(source, *args, metadata=metadata, **kwargs)


@pytest.fixture
def count_parses(monkeypatch) -> type[CountingParquetFile]:
    monkeypatch.setattr(CountingParquetFile, "parses", 0)
    monkeypatch.setattr(pq, "ParquetFile", CountingParquetFile)
    return CountingParquetFile


def many_groups(path: Path, groups: int) -> str:
    """A manifest of `groups` one-row row groups, its object named for the file (so clip IDs differ by file)."""
    columns = good_columns(groups, object_id=pa.array([path.stem] * groups))
    pq.write_table(pa.table(columns), path, row_group_size=1)
    return str(path)


def test_the_launch_parses_each_footer_once(tmp_path, count_parses):
    files = [many_groups(tmp_path / f"{n}.parquet", 200) for n in "ab"]
    manifest = inspect_manifest(str(tmp_path / "*.parquet"))
    assert first_object_id(manifest) == "a"
    assert len(manifest.pieces) == 400 and manifest.files == tuple(files)
    assert count_parses.parses == 2


def test_a_reader_parses_each_footer_once(tmp_path, count_parses):
    """A reader keeps each file's footer for its life: with the footer destroyed after the first row group
    was read, the rest still read."""
    path = many_groups(tmp_path / "m.parquet", 200)
    manifest = inspect_manifest(path)
    read = ReadManifestRows(manifest.schema.names)
    first = list(read.process(manifest.pieces[0]))
    size = pq.ParquetFile(path).metadata.serialized_size
    data = bytearray(Path(path).read_bytes())
    data[-8 - size : -8] = bytes(size)  # the footer; its length and the magic bytes kept
    Path(path).write_bytes(bytes(data))
    with pytest.raises(UNREADABLE):
        pq.ParquetFile(path)
    count_parses.parses = 0
    rest = [item for piece in manifest.pieces[1:] for item in read.process(piece)]
    assert [where for where, _ in first + rest] == [f"{path} row {i}" for i in range(200)]
    assert [r["start_ms"] for _, r in first + rest] == list(range(200))
    assert count_parses.parses == 0


def test_a_job_parses_each_footer_once_per_reader(tmp_path, count_parses):
    """On Beam, both reads of ValidateRows (the clip-ID pass and the full one) parse each footer once per
    instance of their reader (the in-process runner makes one of each), not once per row group (400 here)."""
    files = [many_groups(tmp_path / f"{n}.parquet", 100) for n in "ab"]
    manifest = inspect_manifest(str(tmp_path / "*.parquet"))
    count_parses.parses = 0
    with BeamPipeline() as p:
        out = p | ValidateRows(lambda columns: ReadManifest(manifest, columns))
        assert_that(out["requests"] | beam.combiners.Count.Globally(), equal_to([200]))
    assert count_parses.parses == 2 * len(files)


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string(), pa.string_view()], ids=str)
def test_string_columns_of_every_writer(tmp_path, type_):
    """pyarrow and pandas' object columns write string, polars and pandas 3 large_string; string_view is read
    as large_string, which every reader of the output tables knows and which unifies with string."""
    path = write(
        tmp_path / "m.parquet",
        **good_columns(
            object_id=pa.array(["demo-mono", "demo-stereo"], type_),
            clip_id=pa.array(["a", None], type_),
            speaker=pa.array(["ann", "bob"], type_),
        ),
    )
    write(tmp_path / "other.parquet", **good_columns(speaker=pa.array(["cy", None], pa.string())))
    manifest = inspect_manifest(str(tmp_path / "*.parquet"))
    expected = pa.string() if type_ == pa.string() else pa.large_string()
    assert [manifest.schema.field(n).type for n in ("object_id", "clip_id", "speaker")] == [expected] * 3
    rows = [r for where, r in read_rows(manifest) if where.startswith(path)]
    assert [(r["object_id"], r["clip_id"], r["speaker"]) for r in rows] == [
        ("demo-mono", "a", "ann"),
        ("demo-stereo", None, "bob"),
    ]


def test_columns_of_nulls_only_are_accepted(tmp_path):
    """Every writer types a column that holds only nulls as null: a manifest of time ranges that keeps the
    token columns, or leaves every clip_id to be derived, loads."""
    nulls = pa.nulls(2)
    path = write(tmp_path / "m.parquet", **good_columns(clip_id=nulls, token_start=nulls, token_end=nulls))
    manifest = inspect_manifest(path)
    assert manifest.schema.field("clip_id").type == pa.string()
    assert manifest.schema.field("token_start").type == manifest.schema.field("token_end").type == pa.int64()
    checked = [validate_row(item) for item in read_rows(manifest)]
    assert [c.segment for c in checked] == [el.TimeRange(0, 100), el.TimeRange(1, 100)]


def test_an_object_id_column_of_nulls_only_gives_an_error_per_row(tmp_path):
    """One bad row is one error row, whatever its values: a file whose object_ids are all null (typed null by
    every writer) among good ones runs, each of its rows a MISSING_VALUE."""
    good = write(tmp_path / "a.parquet", **good_columns())
    nulls = write(tmp_path / "b.parquet", **good_columns(object_id=pa.nulls(2), clip_id=pa.nulls(2)))
    manifest = inspect_manifest(str(tmp_path / "*.parquet"))
    assert manifest.schema.field("object_id").type == pa.string()
    checked = [validate_row(item) for item in read_rows(manifest)]
    assert [type(c) for c in checked] == [el.ClipRequest] * 2 + [el.ClipError] * 2
    assert [(c.error_code, c.error_message) for c in checked[2:]] == [
        (el.MISSING_VALUE, f"{nulls} row {i}: object_id is null") for i in range(2)
    ]
    assert first_object_id(inspect_manifest(nulls)) is None and first_object_id(inspect_manifest(good))


# -- ValidateRows on Beam -------------------------------------------------------------------------


def test_validate_rows_transform():
    rows = [
        row(clip_id="a"),
        token_row(clip_id="b", object_id="demo-stereo"),
        row(clip_id="dup", start_ms=0),
        token_row(clip_id="dup", object_id="demo-flac-3ch"),
        row(clip_id=None, object_id="auto:abc"),
        row(clip_id="bad/id"),
        row(object_id=None, clip_id="c"),
        row(clip_id="d", duration_ms=0),
        row(clip_id="e", token_start=1, token_end=2),
    ]
    items = [(f"m.parquet row {i}", r) for i, r in enumerate(rows)]
    with BeamPipeline() as p:
        out = p | ValidateRows(lambda columns: beam.Create(items))
        requests = out["requests"] | "Requests" >> beam.Map(lambda r: (r.source, r.clip_id, r.object_id, r.segment))
        errors = out["errors"] | "Errors" >> beam.Map(
            lambda e: (e.error_message.split(":")[0], e.clip_id, e.error_code)
        )
        assert_that(
            requests,
            equal_to(
                [
                    ("m.parquet row 0", "a", "demo-mono", el.TimeRange(1000, 500)),
                    ("m.parquet row 1", "b", "demo-stereo", el.TokenRange(2, 5)),
                    ("m.parquet row 4", "auto=abc.t1000+500", "auto:abc", el.TimeRange(1000, 500)),
                ]
            ),
            label="requests",
        )
        assert_that(
            errors,
            equal_to(
                [
                    ("m.parquet row 2", "dup", el.DUPLICATE_CLIP_ID),
                    ("m.parquet row 3", "dup", el.DUPLICATE_CLIP_ID),
                    ("m.parquet row 5", "bad/id", el.INVALID_CLIP_ID),
                    ("m.parquet row 6", "c", el.MISSING_VALUE),
                    ("m.parquet row 7", "d", el.INVALID_RANGE),
                    ("m.parquet row 8", "e", el.INVALID_RANGE),
                ]
            ),
            label="errors",
        )
        # nothing dropped, nothing doubled: every row in comes out once, as a request or an error
        places = (
            (out["requests"] | "RequestPlaces" >> beam.Map(lambda r: r.source), errors | beam.Map(lambda e: e[0]))
            | beam.Flatten()
            | beam.combiners.Count.PerElement()
        )
        assert_that(places, equal_to([(where, 1) for where, _ in items]), label="rows in = requests + errors")


def test_duplicate_messages_name_every_row():
    items = [(f"m.parquet row {i}", row(clip_id="same", start_ms=i)) for i in range(3)]
    with BeamPipeline() as p:
        out = p | ValidateRows(lambda columns: beam.Create(items))
        assert_that(out["requests"], equal_to([]), label="no requests")
        messages = out["errors"] | beam.Map(lambda e: (e.error_code, e.columns["start_ms"], e.error_message))

        def every_row_named(actual):
            assert sorted(m[:2] for m in actual) == [(el.DUPLICATE_CLIP_ID, i) for i in range(3)], actual
            for _, _, message in actual:
                assert all(f"m.parquet row {i}" in message for i in range(3)), message

        assert_that(messages, every_row_named)
