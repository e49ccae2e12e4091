"""The dataset card: its numbers match the tables, its snippet runs, its histogram is drawn, on a
local disk and on GCS (the emulator)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from pipeline.card import BACKGROUND, SIZE, ClipStats, write_card
from pipeline.elements import ClipError, ClipRecord
from pipeline.finish import RunStats
from pipeline.storage import open_store
from pipeline.tables import clips_schema, errors_schema
from tests.helpers import read_bytes, read_table_file
from tests.storage_fixtures import gcs_server  # noqa: F401
from tests.storage_servers import StorageServer

MANIFEST = pa.schema([("clip_id", pa.string()), ("object_id", pa.string()), ("speaker", pa.string())])
# (clip_id, object_id, duration_ms, channels)
CLIPS = [("a", "obj-1", 500, 1), ("b", "obj-1", 1250, 1), ("c", "obj-2", 3000, 2)]
ERRORS = [("d", "obj-3", "NOT_FOUND"), ("e", "obj-3", "NOT_FOUND"), ("f", "obj-1", "INVALID_RANGE")]


def summary(rows: int, written: int, skipped: int) -> dict:
    """A `Summary.as_dict()` (the card uses rows, clips_written and clips_skipped)."""
    return {"rows": rows, "clips": written + skipped, "clips_written": written, "clips_skipped": skipped}


def join(root: str, *parts: str) -> str:
    return FileSystems.join(root, *parts)


def write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def wav(frames: int, channels: int) -> bytes:
    audio = (np.arange(frames * channels, dtype=np.int64) % 2000 - 1000).astype(np.int16).reshape(frames, channels)
    buffer = io.BytesIO()
    sf.write(buffer, audio, 16_000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def write_table(path: str, rows: list[dict], schema: pa.Schema) -> None:
    with FileSystems.create(path) as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)


def make_card(output: str, numbers: dict, clips_tables: list[str], errors_tables: list[str]) -> str:
    """The card as the job's last step writes it: its numbers counted by the job's own combiner (RunStats)
    over the rows the tables hold."""
    stats, objects = RunStats(), set()
    fields = {f.name for f in dataclasses.fields(ClipRecord)} - {"columns", "stats"}
    for path in clips_tables:
        for row in read_table_file(path).to_pylist():
            stats.add(ClipRecord(**{k: v for k, v in row.items() if k in fields}, columns={}))
            objects.add(row["object_id"])
    for path in errors_tables:
        for row in read_table_file(path).to_pylist():
            stats.add(ClipError(row["clip_id"], row["object_id"], row["error_code"], "", row["attempts"], {}))
    clip_stats = ClipStats(stats.written + stats.skipped, len(objects), stats.clip_bytes,
                           dict(stats.channels), dict(stats.durations_ms))  # fmt: skip
    errors = dict(sorted(stats.errors_by_code.items(), key=lambda kv: (-kv[1], kv[0])))
    return write_card(open_store(output), output, numbers, clip_stats, errors)


def write_dataset(output: str, clips: list[tuple], errors: list[tuple]) -> tuple[list[str], list[str]]:
    """Real WAV clips at the paths the clips table names, and both tables in the metadata/ layout: the
    clips table in two files (the first clip in one, the rest in the other)."""
    rows = []
    for clip_id, object_id, ms, channels in clips:
        path, data = join(output, "clips", f"{clip_id}.wav"), wav(ms * 16, channels)
        write_bytes(path, data)
        rows.append(
            dict(
                clip_id=clip_id, object_id=object_id, path=f"clips/{clip_id}.wav", clip_start_ms=0, clip_duration_ms=ms
            )
            | dict(object_duration_ms=10_000, num_channels=channels, sample_rate=16_000, num_samples=ms * 16)
            | dict(num_bytes=len(data), sha256="0" * 64, attempts=1, speaker="s1")
        )
    clips_tables = [join(output, "metadata", f"clips-0000{i}-of-00002.parquet") for i in range(2)]
    errors_table = join(output, "metadata", "errors-00000-of-00001.parquet")
    write_table(clips_tables[0], rows[:1], clips_schema(MANIFEST))
    write_table(clips_tables[1], rows[1:], clips_schema(MANIFEST))
    write_table(
        errors_table,
        [
            dict(clip_id=c, object_id=o, error_code=code, error_message="x", attempts=1, speaker="s1")
            for c, o, code in errors
        ],
        errors_schema(MANIFEST),
    )
    return clips_tables, [errors_table]


def snippet(card: str) -> str:
    """The card's first snippet: pyarrow and soundfile (the second is Hugging Face's, see test_loaders.py)."""
    return re.findall(r"```python\n(.*?)```", card, re.DOTALL)[0]


def run_snippet(card: str, cwd: str | None = None) -> list[tuple[str, int, int]]:
    """Run the card's loading snippet (from the dataset's folder `cwd`, for a local dataset: the snippet's
    root is "."); what it printed, one (clip_id, frames, rate) per clip."""
    out = io.StringIO()
    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        with contextlib.redirect_stdout(out):
            exec(snippet(card), {})
    finally:
        os.chdir(here)
    return [(c, int(n), int(r)) for c, n, r in (line.split() for line in out.getvalue().splitlines())]


def assert_histogram(png: bytes) -> None:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == SIZE
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert (pixels != BACKGROUND).any(axis=1).sum() > 500, "the histogram is blank"


@pytest.fixture
def local(tmp_path: Path) -> tuple[str, str, str]:
    output = str(tmp_path / "out")
    return (output, *write_dataset(output, CLIPS, ERRORS))


def test_card_numbers_match_the_tables(local: tuple[str, str, str]) -> None:
    output, clips_table, errors_table = local
    path = make_card(output, summary(rows=6, written=2, skipped=1), clips_table, errors_table)
    assert path == join(output, "README.md")
    card = Path(path).read_text()
    table = pa.concat_tables(read_table_file(path) for path in clips_table)  # both files
    seconds = table.column("clip_duration_ms").to_numpy().sum() / 1000
    sizes = sum(table.column("num_bytes").to_pylist())
    for line in [
        "- Manifest rows in: 6",
        "- Clips: 3 (2 written by the last run, 1 already there)",
        "- Errors: 3",
        "- Distinct objects: 2",
        f"- Audio: {seconds / 3600:.3f} h ({seconds:,.3f} s)",
        f"({sizes:,} bytes)",
        "- Channels: 1 channel: 2 clips, 2 channels: 1 clip",
        "| 0.500 s | 1.250 s | 1.583 s | 3.000 s |",
        "![clip durations](duration_histogram.png)",
        "| NOT_FOUND | 2 |\n| INVALID_RANGE | 1 |",
        "metadata/clips-*.parquet",
        """soundfile.read(f"{root}/{row['path']}", dtype="int16")""",
        'pq.read_table(sorted(glob.glob(f"{root}/metadata/clips-*.parquet")))',
        "root = '.'",
        "path: metadata/clips-*.parquet",
    ]:
        assert line in card, line
    assert not list(Path(output).rglob("*.tmp"))


def test_snippet_loads_every_clip(local: tuple[str, str, str]) -> None:
    output, clips_table, errors_table = local
    card = Path(make_card(output, summary(6, 3, 0), clips_table, errors_table)).read_text()
    assert run_snippet(card, output) == [(c, ms * 16, 16_000) for c, _, ms, _ in CLIPS]


def test_histogram_is_drawn(local: tuple[str, str, str]) -> None:
    output, clips_table, errors_table = local
    make_card(output, summary(6, 3, 0), clips_table, errors_table)
    assert_histogram((Path(output) / "duration_histogram.png").read_bytes())


@pytest.mark.parametrize("durations", [[1500], [2000, 2000, 2000]], ids=["one-clip", "all-equal"])
def test_one_duration(tmp_path: Path, durations: list[int]) -> None:
    output = str(tmp_path / "out")
    clips = [(f"c{i}", "obj", ms, 1) for i, ms in enumerate(durations)]
    card = Path(make_card(output, summary(len(clips), len(clips), 0), *write_dataset(output, clips, []))).read_text()
    s = f"{durations[0] / 1000:.3f} s"
    assert f"| {s} | {s} | {s} | {s} |" in card
    assert "## Errors by code\n\nnone" in card
    assert_histogram((Path(output) / "duration_histogram.png").read_bytes())


def test_zero_clips(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    card = Path(make_card(output, summary(0, 0, 0), *write_dataset(output, [], []))).read_text()
    assert "- Clips: 0 (0 written" in card and "There are no clips." in card
    assert "- Audio: 0.000 h" in card and "- Channels: none" in card
    assert "![clip durations]" not in card and "## Errors by code\n\nnone" in card
    assert_histogram((Path(output) / "duration_histogram.png").read_bytes())  # the "no clips" image
    assert run_snippet(card, output) == []
    assert not list(Path(output).rglob("*.tmp"))


def test_a_rerun_replaces_the_card(local: tuple[str, str, str]) -> None:
    output, clips_table, errors_table = local
    make_card(output, summary(6, 3, 0), clips_table, errors_table)
    card = Path(make_card(output, summary(7, 0, 3), clips_table, errors_table)).read_text()
    assert "- Manifest rows in: 7" in card and "(0 written by the last run, 3 already there)" in card


@pytest.fixture
def gcs(gcs_server: StorageServer) -> str:  # noqa: F811
    """A fresh gs:// prefix; FileSystems options are global, so set them for this test."""
    FileSystems.set_options(PipelineOptions(gcs_server.flags))
    return f"{gcs_server.bucket_url}{uuid.uuid4().hex}/out"


def test_card_on_gcs(gcs: str) -> None:
    clips_table, errors_table = write_dataset(gcs, CLIPS, ERRORS)
    path = make_card(gcs, summary(6, 3, 0), clips_table, errors_table)
    assert path == gcs + "/README.md"
    card = read_bytes(path).decode()
    assert "- Clips: 3 (3 written" in card and "| NOT_FOUND | 2 |" in card
    assert run_snippet(card) == [(c, ms * 16, 16_000) for c, _, ms, _ in CLIPS]
    assert_histogram(read_bytes(gcs + "/duration_histogram.png"))
    (found,) = FileSystems.match([gcs + "/*"])
    names = sorted(m.path[len(gcs) + 1 :] for m in found.metadata_list if "/" not in m.path[len(gcs) + 1 :])
    assert names == ["README.md", "duration_histogram.png"]  # and no .tmp left
