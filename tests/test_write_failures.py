"""A disk that fills up while clips are written (issue 23, case 1): nothing but a complete clip ever sits at a
final path, in WAV, FLAC and shards, on a local disk and s3://; every row is a clip or a WRITE_FAILED error.

Two ways to run out of space, each a real failure of the write(2) calls (libsndfile's own included):

* `tmpfs`: a 2 MiB tmpfs mounted for the test (root only, else those cases skip) and filled by a file so
  that only `FREE_BYTES` are left: write(2) fails with ENOSPC. A local output sits on it; for s3:// the
  run's scratch does ($TMPDIR).
* `fsize`: a file-size limit on this process (RLIMIT_FSIZE, no root needed): write(2) past `FREE_BYTES` in
  any one file fails with EFBIG, as it does on a full disk with ENOSPC.

The runs hold short clips (which fit), whole 9 s stereo clips (576 kB as WAV, published from memory) and a
40 s clip (spilled to a scratch file even on its way to a bucket), which never fit.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.core.elements import WRITE_FAILED
from pipeline.core.messages import StreamInfo
from pipeline.dataset import clips
from pipeline.dataset.layout import CLIPS_DIR, clip_path, table_prefix
from pipeline.dataset.storage import Store, StoreSettings, open_store
from pipeline.local.samples import sample_audio, write_sample_store
from pipeline.local.server import LocalServer
from tests.helpers import Result, explain, run_argv, run_pipeline, source_frames, write_manifest

PAGE = 4096
FREE_BYTES = 256 << 10  # space left for the run: the short clips fit, the 9 s and 40 s ones never do
LONG_MS = 40_000  # 1.28 MB as WAV: past clips.SPILL_BYTES, so it goes through a scratch file even to a bucket
SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("object_id", pa.string()), ("start_ms", pa.int32()), ("duration_ms", pa.int32())]
)


# -- running out of space -----------------------------------------------------------------------------------


class Disk:
    """A folder whose files can be made to run out of space: `limit(free)` leaves `free` bytes."""

    def __init__(self, kind: str, folder: Path):
        self.kind, self.folder = kind, folder

    @contextlib.contextmanager
    def limit(self, free: int) -> Iterator[None]:
        if self.kind == "tmpfs":
            with _filled(self.folder, free):
                yield
        else:
            with _file_size_limit(free):
                yield

    def scratch_left(self) -> list[str]:
        """Files on the disk other than the filler: what a failed write must not leave behind."""
        return sorted(str(p) for p in self.folder.rglob("*") if p.is_file() and p.name != "filler")


@contextlib.contextmanager
def _filled(folder: Path, free: int) -> Iterator[None]:
    """A file that takes all but `free` bytes (whole pages) of the filesystem at `folder`."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free))
    assert os.statvfs(folder).f_bavail * st.f_frsize == free
    try:
        yield
    finally:
        filler.unlink()


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """No file this process writes grows past `limit` bytes: the kernel refuses the write (EFBIG) instead
    of sending SIGXFSZ, which is ignored for the while."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def _tmpfs(folder: Path) -> Iterator[None]:
    folder.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mount.stderr.strip()}; the fsize cases still run")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)  # a file still open: detach it now


@pytest.fixture(params=["tmpfs", "fsize"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    folder = tmp_path / "disk"
    if request.param == "fsize":
        folder.mkdir()
        yield Disk("fsize", folder)
        return
    with _tmpfs(folder):
        yield Disk("tmpfs", folder)


def scratch_on(disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bucket stores stage in $TMPDIR: point it (and Python's cached copy) at the disk."""
    monkeypatch.setenv("TMPDIR", str(disk.folder))
    monkeypatch.setattr(tempfile, "tempdir", str(disk.folder))


# -- one clip writer ------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server) -> tuple[str, PipelineOptions]:
    return f"{s3_server.bucket_url}full-{uuid.uuid4().hex[:8]}", PipelineOptions(s3_server.flags)


def write_clip(sink: clips.ClipFile, audio: np.ndarray) -> clips.WrittenClip:
    """Feed `sink` as the fetch does (its messages, then publish); on a failure drop it as the fetch does."""
    try:
        sink.begin(StreamInfo("obj", 0, len(audio) // 16, 60_000, audio.shape[1]))
        pcm = audio.tobytes()
        for i in range(0, len(pcm), 8000):
            sink.write(pcm[i : i + 8000])
        return sink.publish()
    except OSError:
        sink.discard()
        raise


@pytest.mark.parametrize(
    "where,clip_format,spill_bytes",
    [
        ("local", "wav", 1 << 30),
        ("local", "wav", 16_000),
        ("local", "flac", 1 << 30),
        ("s3", "wav", 16_000),  # a WAV in memory goes to a bucket without touching the disk
        ("s3", "flac", 1 << 30),
    ],
    ids=["local-wav-in-memory", "local-wav-spilled", "local-flac", "s3-wav-spilled", "s3-flac"],
)
def test_a_clip_is_published_whole_or_not_at_all_however_little_space_is_left(
    disk, where, clip_format, spill_bytes, monkeypatch, request
):
    """A 1 s stereo clip written with 0, 1, 2... pages left: it is published complete, or the write raises
    OSError and leaves nothing, neither at its path nor in a scratch file. (A FLAC whose last frame did not
    fit used to be published with its STREAMINFO unwritten.)"""
    monkeypatch.setattr(clips, "SPILL_BYTES", spill_bytes)
    if where == "local":
        output, settings = str(disk.folder / "out"), StoreSettings()
    else:
        output, options = request.getfixturevalue("bucket")
        settings = StoreSettings.from_options(options)
        scratch_on(disk, monkeypatch)
    store = open_store(output, settings)
    audio = sample_audio(1.0, 2, seed=5)
    path = clip_path(output, "c1", clip_format)
    outcomes = {}
    for free in range(0, 2 * len(audio.tobytes()), PAGE):
        sink = clips.clip_file(store, path, "obj/t0+1000", clip_format)
        with disk.limit(free):
            try:
                written = write_clip(sink, audio)
            except OSError:
                outcomes[free] = "failed"
        if outcomes.get(free) == "failed":
            assert store.head(path) is None, f"{free} bytes free: a failed clip is at {path}"
        else:
            data = store.read(path)
            assert sf.info(io.BytesIO(data)).frames == written.num_frames, f"{free} bytes free: {path} is incomplete"
            decoded, _ = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
            assert written.num_frames == len(decoded) and np.array_equal(decoded, audio), f"{free} bytes free"
            store.delete([path])
            outcomes[free] = "published"
        assert disk.scratch_left() == [], f"{free} bytes free: scratch left behind"
    assert outcomes[0] == "failed" and "published" in outcomes.values(), outcomes


# -- whole runs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The sample store plus a 40 s mono object."""
    root = tmp_path_factory.mktemp("long-store")
    objects = write_sample_store(str(root))
    objects["long-mono"] = str(root / "long-mono.wav")
    sf.write(objects["long-mono"], sample_audio(LONG_MS / 1000, 1, seed=9), 16_000, subtype="PCM_16")
    return objects


@pytest.fixture(scope="module")
def long_server(long_store: dict[str, str]) -> Iterator[LocalServer]:
    with LocalServer(os.path.dirname(long_store["long-mono"])) as server:
        yield server


ROWS = [
    *({"clip_id": f"short-{i}", "object_id": "demo-mono", "start_ms": 1000 * i, "duration_ms": 300} for i in range(6)),
    *({"clip_id": f"stereo-{i}", "object_id": "demo-stereo", "start_ms": 0, "duration_ms": 9000} for i in range(2)),
    *({"clip_id": f"long-{i}", "object_id": "long-mono", "start_ms": 0, "duration_ms": LONG_MS} for i in range(2)),
]
NEVER_FIT = {"long-0", "long-1"}  # on every path: local, or spilled to a scratch file on the way to a bucket


def run_short_of_space(disk: Disk, server: LocalServer, tmp_path: Path, output: str, *flags: str) -> Result:
    manifest = write_manifest(tmp_path / "m.parquet", ROWS, SCHEMA)
    argv = run_argv(server, manifest, output, "--max_in_flight=4", "--max_error_ratio=1", *flags)
    with disk.limit(FREE_BYTES):
        done = run_pipeline("run", *argv)
    assert done.returncode == 0, explain(done)
    return done


def table(store: Store, output: str, name: str) -> list[dict]:
    files = [o.path for o in store.list(table_prefix(output, name))]
    assert files, f"no {name} table under {output}"
    return pa.concat_tables(pq.read_table(io.BytesIO(store.read(f))) for f in files).to_pylist()


def check_rows(store: Store, output: str) -> tuple[list[dict], list[dict]]:
    """Rows in = clips + errors, each row once; every error is WRITE_FAILED and the clips too long for the
    space left are among them."""
    written, errors = table(store, output, "clips"), table(store, output, "errors")
    ids = sorted(r["clip_id"] for r in written + errors)
    assert ids == sorted(r["clip_id"] for r in ROWS), "each row is one clip or one error"
    assert {e["error_code"] for e in errors} == {WRITE_FAILED}, errors
    assert {e["clip_id"] for e in errors} >= NEVER_FIT
    assert written, "some clips fit"
    return written, errors


def check_audio(data: bytes, row: dict, objects: dict[str, str]) -> None:
    """The clip opens, has the frames its row says, and they are the source's."""
    source = next(r for r in ROWS if r["clip_id"] == row["clip_id"])
    assert sf.info(io.BytesIO(data)).frames == row["num_samples"], f"{row['clip_id']} is incomplete"
    decoded, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    assert (rate, len(decoded)) == (16_000, row["num_samples"]), row["clip_id"]
    expected = source_frames(objects[source["object_id"]], source["start_ms"], source["duration_ms"])
    assert np.array_equal(decoded, expected), row["clip_id"]


@pytest.mark.parametrize("clip_format", ["wav", "flac"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_run_short_of_space_writes_complete_clips_and_write_failed_rows(
    disk, long_server, long_store, where, clip_format, tmp_path, monkeypatch, request
):
    """Every file at a final path opens, with the frames its row says; the run ends (exit 0)."""
    flags = [f"--clip_format={clip_format}"]
    if where == "local":
        output, settings = str(disk.folder / "out"), StoreSettings()
    else:
        output, options = request.getfixturevalue("bucket")
        flags += request.getfixturevalue("s3_server").flags
        settings = StoreSettings.from_options(options)
        scratch_on(disk, monkeypatch)
    run_short_of_space(disk, long_server, tmp_path, output, *flags)
    store = open_store(output, settings)
    written, _ = check_rows(store, output)
    at_final_paths = {o.path for o in store.list(f"{output}/{CLIPS_DIR}/")}
    assert at_final_paths == {f"{output}/{r['path']}" for r in written}, "only the table's clips are there"
    for row in written:
        check_audio(store.read(f"{output}/{row['path']}"), row, long_store)


@pytest.mark.parametrize("clip_format", ["wav", "flac"])
def test_a_run_of_shards_short_of_space_publishes_only_complete_shards(
    disk, long_server, long_store, clip_format, tmp_path
):
    """A shard that does not fit is not published and each of its rows is WRITE_FAILED; every shard that is
    published is a whole tar whose clips open with their rows' frames."""
    output = str(disk.folder / "out")
    run_short_of_space(disk, long_server, tmp_path, output, f"--clip_format={clip_format}", "--shards=3")
    store = open_store(output)
    written, _ = check_rows(store, output)
    by_member = {(r["path"], r["member"]): r for r in written}
    members = set()
    for shard in store.list(f"{output}/shards/"):
        with tarfile.open(shard.path) as tar:
            for info in tar.getmembers():
                if not info.name.endswith(".json"):
                    key = (os.path.relpath(shard.path, output), info.name)
                    check_audio(tar.extractfile(info).read(), by_member[key], long_store)
                    members.add(key)
    assert members == set(by_member), "every clip row is in a published shard, and only those"
