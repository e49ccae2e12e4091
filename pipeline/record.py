"""The run record, `{output}/_RUN.json`: what a run did, written last so a scheduler can take it as done.

It holds the options with anything secret-looking redacted (the API key is never an option at all).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import __version__
from pipeline.options import option_names

RECORD_NAME = "_RUN.json"
_SECRET = re.compile(r"secret|password|passwd|token|credential|key", re.IGNORECASE)
_SAFE = re.compile(r"_file$|_path$|^api_key_file$")


def record_path(output: str) -> str:
    return FileSystems.join(output, RECORD_NAME)


def safe_options(options: PipelineOptions) -> dict[str, Any]:
    """This pipeline's options and every other option that was set, secret-looking values redacted."""
    every = options.get_all_options()
    chosen = {name: every.get(name) for name in option_names()}
    chosen.update(options.get_all_options(drop_default=True, retain_unknown_options=True))
    return {
        name: "<redacted>" if value is not None and _SECRET.search(name) and not _SAFE.search(name) else value
        for name, value in sorted(chosen.items())
    }


def write_record(output: str, record: dict[str, Any]) -> str:
    """Write the record through a temporary name, so a reader never sees half of it."""
    path, tmp = record_path(output), record_path(output) + ".tmp"
    body = dict(record, version=__version__)
    with FileSystems.create(tmp, mime_type="application/json") as f:
        f.write(json.dumps(body, indent=2, default=str).encode())
    FileSystems.rename([tmp], [path])
    return path


def remove_record(output: str) -> None:
    """Remove the previous run's record at the start of a run: its done marker no longer holds."""
    if FileSystems.exists(record_path(output)):
        FileSystems.delete([record_path(output)])


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
