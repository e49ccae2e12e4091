"""The run record, `{output}/_RUN.json`: what a run did, written last so a scheduler can take it as done.

It holds the options with anything secret-looking redacted (the API key is never an option at all).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import __version__
from pipeline.options import option_names
from pipeline.storage import Store

RECORD_NAME = "_RUN.json"
_SECRET = re.compile(r"secret|password|passwd|token|credential|key", re.IGNORECASE)
_SAFE = re.compile(r"_file$|_path$|^api_key_file$")


def record_path(output: str) -> str:
    return f"{output.rstrip('/')}/{RECORD_NAME}"


def safe_options(options: PipelineOptions) -> dict[str, Any]:
    """This pipeline's options and every other option that was set, secret-looking values redacted."""
    every = options.get_all_options()
    chosen = {name: every.get(name) for name in option_names()}
    chosen.update(options.get_all_options(drop_default=True, retain_unknown_options=True))
    return {
        name: "<redacted>" if value is not None and _SECRET.search(name) and not _SAFE.search(name) else value
        for name, value in sorted(chosen.items())
    }


def write_record(store: Store, output: str, record: dict[str, Any]) -> str:
    """Write the record in one write (a bucket publishes it whole; a local disk renames it into place)."""
    body = dict(record, version=__version__)
    store.put(record_path(output), json.dumps(body, indent=2, default=str).encode(), content_type="application/json")
    return record_path(output)


def remove_record(store: Store, output: str) -> None:
    """Remove the previous run's record at the start of a run: its done marker no longer holds."""
    if store.head(record_path(output)) is not None:
        store.delete([record_path(output)])


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
