"""What the loader tests share: a dataset built as a user builds it, its clips table, a clip's samples as soundfile
reads them. Test modules import these from here, and the fixtures in conftest.py use them."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PYTHON = os.environ.get("PRODUCT_PYTHON", str(ROOT / ".venv" / "bin" / "python"))


def build(tmp: Path, name: str, *flags: str) -> Path:
    """The demo's dataset built with `--with_transcripts` and `flags`, copied to `{name}-copy`, the original
    deleted: the copy's root."""
    work = tmp / name
    command = [PRODUCT_PYTHON, "-m", "pipeline", "demo", f"--output={work}", "--with_transcripts", *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    copy = tmp / f"{name}-copy"
    shutil.copytree(work / "dataset", copy)
    shutil.rmtree(work)
    return copy


def clips(root: Path) -> dict[str, dict]:
    """The clips table's rows by clip_id."""
    table = pq.read_table(sorted((root / "metadata").glob("clips-*.parquet")))
    return {row["clip_id"]: row for row in table.to_pylist()}


def samples(root: Path, row: dict) -> np.ndarray:
    """A clip's samples as soundfile reads them from the dataset (a file, or its member of a tar shard), as
    float32 in [-1, 1), (frames, channels)."""
    if row["path"].endswith(".parquet"):
        shard = pq.read_table(root / row["path"], columns=["member", "audio"]).to_pylist()
        (data,) = [io.BytesIO(r["audio"]["bytes"]) for r in shard if r["member"] == row["member"]]
        audio, rate = sf.read(data, dtype="float32", always_2d=True)
    elif row.get("member"):  # a WebDataset or Shar tar
        with tarfile.open(root / row["path"]) as tar:
            data = io.BytesIO(tar.extractfile(row["member"]).read())
        audio, rate = sf.read(data, dtype="float32", always_2d=True)
    else:
        audio, rate = sf.read(root / row["path"], dtype="float32", always_2d=True)
    assert rate == 16_000
    return audio
