"""`python -m pipeline export`: the manifests of a dataset already built (and copied), the same as a run's
`--export` writes; what it refuses."""

from __future__ import annotations

import gzip
import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.dataset.layout import LHOTSE_FILES
from tests.helpers import ROWS, SCHEMA, Result, build, read_bytes, read_table_file, run_build, run_cli, run_pipeline


def export(*args: str) -> Result:
    return run_cli("export", *args)


def manifests(root: str) -> dict[str, list[bytes]]:
    """Each manifest's lines, sorted (lines follow the clips table's files, whose names are random)."""
    with open(os.path.join(root, "nemo_manifest.jsonl"), "rb") as f:
        found = {"nemo": sorted(f)}
    for name in ("recordings", "supervisions", "cuts"):
        with gzip.open(os.path.join(root, f"lhotse_{name}.jsonl.gz")) as f:
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
    lhotse = [os.path.join(plain, f"lhotse_{name}.jsonl.gz") for name in LHOTSE_FILES]
    for path in lhotse:
        os.remove(path)
    assert export(plain, "--formats=nemo").returncode == 0 and not any(map(os.path.exists, lhotse))


def test_export_refuses_what_it_cannot_write(make_server, tmp_path) -> None:
    sharded = build(make_server, tmp_path, "sharded", "--shards=2", "--with_transcripts")
    done = export(sharded, "--formats=lhotse")
    assert done.returncode == 2 and "tar shards" in done.stderr
    done = export(sharded, "--formats=kaldi")
    assert done.returncode == 2 and done.stderr.startswith("error: --formats takes") and "kaldi" in done.stderr
    done = export(str(tmp_path / "nothing"))
    assert done.returncode == 2 and "no clips table" in done.stderr
    plain = build(make_server, tmp_path, "plain")  # no transcripts: no text to pair with the audio
    done = export(plain, "--formats=nemo")
    assert done.returncode == 2 and "built without --with_transcripts" in done.stderr, done.stderr
    assert not os.path.exists(os.path.join(plain, "nemo_manifest.jsonl"))


def test_a_run_refuses_lhotse_with_shards_and_unknown_exports(tmp_path) -> None:
    for flags, message in [
        (["--shards=2", "--with_transcripts", "--export=lhotse"], "Lhotse does not read tar shards"),
        (["--layout=webdataset", "--with_transcripts", "--export=lhotse"], "Lhotse does not read tar shards"),
        (["--export=kaldi"], "--export takes"),
        (["--export=nemo"], "--export needs --with_transcripts"),
    ]:
        done = run_pipeline("run", f"--manifest={tmp_path}/m.parquet", f"--output={tmp_path}/o", *flags)
        assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_export_of_a_dataset_in_a_bucket(make_server, tmp_path, request, kind) -> None:
    """`python -m pipeline export s3://…` (or gs://) on a dataset built there: the manifests are written into the
    bucket beside the tables, with the clips' relative paths, from the environment's credentials."""
    server = request.getfixturevalue(f"{kind}_server")
    output = f"{server.bucket_url}export-{uuid.uuid4().hex[:8]}"
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS, SCHEMA), manifest)
    flags = ["--with_transcripts", "--max_error_ratio=0.5", *server.flags]
    assert run_build(make_server(), str(manifest), output, *flags, env=server.env).returncode == 0
    done = run_pipeline("export", output, env=server.env)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(
        [f"{output}/nemo_manifest.jsonl", *(f"{output}/lhotse_{name}.jsonl.gz" for name in LHOTSE_FILES)]
    )
    FileSystems.set_options(PipelineOptions(server.flags))
    record = json.loads(read_bytes(f"{output}/_RUN.json"))
    clips = [row for name in record["clips_table"] for row in read_table_file(f"{output}/{name}").to_pylist()]
    assert len(clips) == record["clips"] > 0
    transcribed = [c for c in clips if c["transcript_text"] is not None]
    assert len(transcribed) == len(clips) - 1  # the object without a transcript: in no supervised manifest
    lines = [json.loads(line) for line in read_bytes(f"{output}/nemo_manifest.jsonl").splitlines()]
    assert sorted(line["audio_filepath"] for line in lines) == sorted(c["path"] for c in transcribed)
    assert all(line["audio_filepath"].startswith("clips/") for line in lines)
    cuts = [json.loads(line) for line in gzip.decompress(read_bytes(f"{output}/lhotse_cuts.jsonl.gz")).splitlines()]
    assert sorted(cut["id"] for cut in cuts) == sorted(c["clip_id"] for c in transcribed)
