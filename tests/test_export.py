"""`python -m pipeline export`: the manifests of a dataset already built (and copied), the same as a run's
`--export` writes; what it refuses."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

from tests.helpers import CHILD_TIMEOUT_S, REPO, child_env, run_pipeline
from tests.test_loaders import build


def export(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline", "export", *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def manifests(root: str) -> dict[str, list[bytes]]:
    """Each manifest's lines, sorted (lines follow the clips table's files, whose names are random)."""
    with open(os.path.join(root, "nemo_manifest.jsonl"), "rb") as f:
        found = {"nemo": sorted(f)}
    for name in ("recordings", "supervisions", "cuts"):
        with gzip.open(os.path.join(root, "lhotse", f"{name}.jsonl.gz")) as f:
            found[name] = sorted(f)
    return found


def test_export_of_a_copied_dataset_equals_the_runs_own(make_server, tmp_path) -> None:
    exported = build(make_server, tmp_path, "with", "--with_transcripts", "--export=lhotse,nemo")
    plain = build(make_server, tmp_path, "without", "--with_transcripts")
    assert not os.path.exists(os.path.join(plain, "nemo_manifest.jsonl"))
    done = export(plain)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == 4 and not os.path.exists(os.path.join(plain, "_tmp"))
    assert manifests(plain) == manifests(exported)
    shutil.rmtree(os.path.join(plain, "lhotse"))
    assert export(plain, "--formats=nemo").returncode == 0 and not os.path.exists(os.path.join(plain, "lhotse"))


def test_export_refuses_what_it_cannot_write(make_server, tmp_path) -> None:
    sharded = build(make_server, tmp_path, "sharded", "--shards=2")
    done = export(sharded, "--formats=lhotse")
    assert done.returncode == 2 and "tar shards" in done.stderr
    assert export(sharded, "--formats=kaldi").returncode == 2
    done = export(str(tmp_path / "nothing"))
    assert done.returncode == 2 and "no clips table" in done.stderr


def test_a_run_refuses_lhotse_with_shards_and_unknown_exports(tmp_path) -> None:
    for flags, message in [
        (["--shards=2", "--export=lhotse"], "Lhotse does not read tar shards"),
        (["--export=kaldi"], "--export takes"),
    ]:
        done = run_pipeline("run", f"--manifest={tmp_path}/m.parquet", f"--output={tmp_path}/o", *flags)
        assert done.returncode == 2 and message in done.stderr, done.stderr
