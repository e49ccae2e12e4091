"""The dataset card: its numbers match the tables, its snippet runs, its histogram is drawn, on a
local disk and on S3 and GCS (moto and the emulator). On a bucket the snippet runs as a user runs it: in a
fresh interpreter, as written, with only the environment pointing it at the bucket."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from PIL import Image

from pipeline.core.elements import ClipError, ClipRecord
from pipeline.core.tables import clips_schema, errors_schema
from pipeline.dataset.card import BACKGROUND, SIZE, ClipStats, write_card
from pipeline.dataset.record import RunRecord
from pipeline.dataset.storage import StoreSettings, open_store
from pipeline.graph.beam_internals import process_options_kept
from pipeline.graph.finish import RunStats
from pipeline.local.storage_servers import StorageServer
from tests.helpers import CHILD_TIMEOUT_S, expect_exit, read_bytes, read_table_file, run_build, write_local_manifest
from tests.helpers import clips_table as built_clips

MANIFEST = pa.schema([("clip_id", pa.string()), ("object_id", pa.string()), ("speaker", pa.string())])
# (clip_id, object_id, duration_ms, channels)
CLIPS = [("a", "obj-1", 500, 1), ("b", "obj-1", 1250, 1), ("c", "obj-2", 3000, 2)]
ERRORS = [("d", "obj-3", "NOT_FOUND"), ("e", "obj-3", "NOT_FOUND"), ("f", "obj-1", "INVALID_RANGE")]
STORE_VARIABLES = ("AWS_", "GOOGLE_", "STORAGE_EMULATOR_HOST")  # what a child must not inherit from this process


def summary(rows: int, written: int, skipped: int) -> RunRecord:
    """A run record with the numbers the card shows (rows, clips written and already there)."""
    return RunRecord(rows=rows, clips_written=written, clips_skipped=skipped)


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


def make_card(
    output: str,
    numbers: dict,
    clips_tables: list[str],
    errors_tables: list[str],
    store: StoreSettings | None = None,
) -> str:
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
    return write_card(open_store(output, store or StoreSettings()), output, numbers, clip_stats, errors)


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
        "- Manifest rows in the last run: 6",
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
    assert "- Manifest rows in the last run: 7" in card and "(0 written by the last run, 3 already there)" in card


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A fresh prefix on a loopback bucket, and what a user of that bucket has in the environment."""

    server: StorageServer
    output: str
    env: dict[str, str]


def user_env(server: StorageServer) -> dict[str, str]:
    """Credentials and endpoint as environment variables only, so the card's snippets run unchanged: for S3
    the AWS_* variables boto3 reads (AWS_ENDPOINT_URL as for any S3-compatible store), for GCS the emulator's
    host and an ADC file."""
    if server.bucket_url.startswith("s3://"):
        names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        return {"AWS_ENDPOINT_URL": server.endpoint_url, **{name: server.env[name] for name in names}}
    return dict(server.env)


@pytest.fixture(params=["s3_server", "gcs_server"], ids=["s3", "gcs"])
def bucket(request: pytest.FixtureRequest) -> Iterator[Bucket]:
    """FileSystems options are global: set for this test's own reads and writes, and restored after."""
    server: StorageServer = request.getfixturevalue(request.param)
    with process_options_kept():
        FileSystems.set_options(PipelineOptions(server.flags))
        yield Bucket(server, f"{server.bucket_url}{uuid.uuid4().hex}/out", user_env(server))


def loading_snippets(card: str) -> list[str]:
    """The ```python blocks of the card's "## Loading" section, as written."""
    section = card.split("\n## Loading\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def run_as_user(code: str, bucket: Bucket, cwd: Path) -> list[str]:
    """`code` run by a fresh interpreter from an empty folder, with no store setting of this process's (no
    FileSystems options, no inherited AWS_* or Google variables) but the bucket's environment: its output lines."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(STORE_VARIABLES)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**inherited, **bucket.env},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def printed_clips(lines: list[str]) -> list[tuple[str, int, int]]:
    """The loading snippet's lines: (clip_id, frames, rate) per clip."""
    return [(c, int(n), int(r)) for c, n, r in (line.split() for line in lines)]


def test_card_on_a_bucket(bucket: Bucket, tmp_path: Path) -> None:
    """The card and its histogram on a bucket, and its loading snippet loading every clip as written (on S3 it
    once failed: Beam's S3 filesystem refuses to work without pipeline options)."""
    clips_table, errors_table = write_dataset(bucket.output, CLIPS, ERRORS)
    store = StoreSettings.from_options(PipelineOptions(bucket.server.flags))
    path = make_card(bucket.output, summary(6, 3, 0), clips_table, errors_table, store)
    assert path == bucket.output + "/README.md"
    card = read_bytes(path).decode()
    assert "- Clips: 3 (3 written" in card and "| NOT_FOUND | 2 |" in card
    loading = loading_snippets(card)[0]
    assert printed_clips(run_as_user(loading, bucket, tmp_path)) == [(c, ms * 16, 16_000) for c, _, ms, _ in CLIPS]
    assert_histogram(read_bytes(bucket.output + "/duration_histogram.png"))
    (found,) = FileSystems.match([bucket.output + "/*"])
    names = sorted(m.path[len(bucket.output) + 1 :] for m in found.metadata_list)
    assert [name for name in names if "/" not in name] == ["README.md", "duration_histogram.png"]  # no .tmp left


def test_sharded_build_on_a_bucket(bucket: Bucket, make_server, tmp_path: Path) -> None:
    """The real job's tar shards on a bucket: the card's snippet reads every clip out of its shard."""
    rows = [
        {"clip_id": "m0", "object_id": "demo-mono", "start_ms": 0, "duration_ms": 1000},
        {"clip_id": "s0", "object_id": "demo-stereo", "start_ms": 1500, "duration_ms": 700},
        {"clip_id": "f0", "object_id": "demo-flac-3ch", "start_ms": 4000, "duration_ms": 500},
    ]
    manifest = write_local_manifest(tmp_path / "manifest.parquet", rows)
    argv = (manifest, bucket.output, "--shards=2", "--clip_format=flac", *bucket.server.flags)
    expect_exit(run_build(make_server(), *argv, env=bucket.server.env), 0)
    card = read_bytes(bucket.output + "/README.md").decode()
    table = built_clips(bucket.output).to_pylist()
    assert len(table) == 3 and all(row["path"].startswith("shards/") for row in table)
    printed = printed_clips(run_as_user(loading_snippets(card)[0], bucket, tmp_path))
    assert printed == [(row["clip_id"], row["num_samples"], 16_000) for row in table]
