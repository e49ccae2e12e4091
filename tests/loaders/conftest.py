"""Datasets for the training loaders, built as a user builds them: `python -m pipeline demo` run by the product's
own venv (its lock's Beam, gRPC and pyarrow) against the bundled GetAudio server, copied to a new folder and the
original deleted. The tests then load the copy in the loader venv (torch, torchcodec, Lhotse, NeMo, datasets),
as a trainer would, from another working directory.

Run with `make test-loaders` (tests/loaders/install.sh makes the venv). This folder's conftest is the only one
loaded (`--confcutdir`): the product's test fixtures need its test extras, which a training venv does not have.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
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


@pytest.fixture(scope="session")
def mixed_files(tmp_path_factory) -> Path:
    """WAV clip files, every clip mono (`--channels mix`), with both manifests."""
    return build(tmp_path_factory.mktemp("files"), "files", "--channels=mix", "--export=nemo,lhotse")


@pytest.fixture(scope="session")
def mixed_shards(tmp_path_factory) -> Path:
    """FLAC clips in two tar shards, every clip mono, with the NeMo (tarred) manifest."""
    flags = ("--channels=mix", "--shards=2", "--clip_format=flac", "--export=nemo")
    return build(tmp_path_factory.mktemp("shards"), "shards", *flags)


@pytest.fixture(scope="session")
def hf_parquet(tmp_path_factory) -> Path:
    """Hugging Face Parquet shards (`--layout hf-parquet`), the objects' channels kept."""
    return build(tmp_path_factory.mktemp("hf"), "hf", "--layout=hf-parquet", "--shards=2")


@pytest.fixture(scope="session")
def mixed_shar(tmp_path_factory) -> Path:
    """Lhotse Shar shards (`--layout lhotse-shar`), every clip mono."""
    return build(tmp_path_factory.mktemp("shar"), "shar", "--channels=mix", "--layout=lhotse-shar", "--shards=2")


@pytest.fixture(scope="session")
def kept_files(tmp_path_factory) -> Path:
    """WAV clip files with the objects' channels (1, 2 and 3), with both manifests."""
    return build(tmp_path_factory.mktemp("kept"), "kept", "--export=nemo,lhotse")


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Every test runs from a folder that is not the dataset's: a loader must not need the working directory."""
    monkeypatch.chdir(tmp_path)
