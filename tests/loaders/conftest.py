"""Datasets for the training loaders, built as a user builds them: `python -m pipeline demo` run by the product's
own venv (its lock's Beam, gRPC and pyarrow) against the bundled GetAudio server, copied to a new folder and the
original deleted. The tests then load the copy in the loader venv (torch, torchcodec, Lhotse, NeMo, datasets),
as a trainer would, from another working directory.

Run with `make test-loaders` (tests/loaders/install.sh makes the venv). This folder's conftest is the only one
loaded (`--confcutdir`): the product's test fixtures need its test extras, which a training venv does not have.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.loaders.helpers import build


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
