"""The Dataflow Flex Template files (configs/flex-template/): the parameters are the pipeline's own options,
the image's entry points exist, and the launcher builds the Dataflow job detached (offline, --dry_run)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.launch.options import ClipOptions, option_names
from tests.helpers import REPO, child_env

TEMPLATE = REPO / "configs" / "flex-template"


def metadata() -> dict:
    return json.loads((TEMPLATE / "metadata.json").read_text())


def test_parameters_are_the_pipelines_options():
    params = metadata()["parameters"]
    names = [p["name"] for p in params]
    assert len(names) == len(set(names)) and set(names) <= set(option_names())
    required = {p["name"] for p in params if not p["isOptional"]}
    assert required == {"manifest", "output", "api_key_file"}  # the key never as a parameter, only its file
    for p in params:
        assert p["label"] and p["helpText"]
        for regex in p.get("regexes", []):
            re.compile(regex)


def test_each_parameter_parses_as_the_launcher_passes_it():
    """A Flex Template launch passes every parameter as --name=value, booleans as true/false."""
    examples = {
        "manifest": "gs://b/m/*.parquet", "output": "gs://b/out", "api_key_file": "gs://locked/key",
        "api_host": "https://api.soniox.com:443", "clip_format": "flac", "channels": "mix",
        "layout": "hf-parquet", "shards": "8", "max_in_flight": "32",
        "max_attempts": "4", "max_error_ratio": "0.1", "skip_existing": "true", "append": "false",
        "overwrite": "false", "verify_existing": "true",
        "with_transcripts": "false", "rate_limit_service": "10.128.0.9:8081", "rate_limit_domain": "speech",
    }  # fmt: skip
    params = metadata()["parameters"]
    assert {p["name"] for p in params} == set(examples)
    for p in params:
        for regex in p.get("regexes", []):
            assert re.match(regex, examples[p["name"]]), p["name"]
    opts = PipelineOptions([f"--{k}={v}" for k, v in examples.items()]).view_as(ClipOptions)
    assert (opts.skip_existing, opts.with_transcripts, opts.max_in_flight) == (True, False, 32)
    assert (opts.append, opts.overwrite, opts.verify_existing) == (False, False, True)
    assert (opts.clip_format, opts.channels, opts.max_error_ratio) == ("flac", "mix", 0.1)
    assert (opts.layout, opts.shards) == ("hf-parquet", 8)
    assert (opts.rate_limit_service, opts.rate_limit_domain) == ("10.128.0.9:8081", "speech")


def test_the_image_points_at_files_that_exist():
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", (TEMPLATE / "Dockerfile").read_text(), re.MULTILINE))
    assert env["FLEX_TEMPLATE_PYTHON_PY_FILE"] == "/template/configs/flex-template/launch.py"
    assert env["FLEX_TEMPLATE_PYTHON_SETUP_FILE"] == "/template/setup.py"
    for path in env.values():
        assert (REPO / path.removeprefix("/template/")).is_file(), path


@pytest.mark.latest
def test_the_launcher_builds_the_dataflow_job_detached(gcs_server, server, tmp_path):
    """launch.py with a Flex Template's flags (offline: --dry_run, the key file and output on the GCS emulator)
    builds the job and does not wait for it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.local.storage_servers import gcs_bucket

    gcs_bucket(gcs_server).blob("locked/key").upload_from_string("any")

    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"object_id": ["a"], "start_ms": [0], "duration_ms": [100]}), manifest)
    flags = [
        f"--manifest={manifest}", "--output=gs://test-bucket/out", "--api_key_file=gs://test-bucket/locked/key",
        "--skip_existing=true", "--runner=DataflowRunner", "--dry_run=True", "--project=test-project",
        "--region=us-central1", "--temp_location=gs://test-bucket/tmp",
        f"--api_host={server.address}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(TEMPLATE / "launch.py"), *flags],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=child_env(**gcs_server.env),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the job graph was built" in proc.stdout and "nothing was fetched, written or deleted" in proc.stdout
    assert not server.calls
