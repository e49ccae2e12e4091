"""The API key's one reader: `--api_key_file` (any Beam filesystem, e.g. a gs:// object that Dataflow
workers can read), else the file named by SONIOX_API_KEY_FILE (a mounted secret), else SONIOX_API_KEY.

The launcher and the workers read the key the same way, so the launch's key check uses the key the
workers will use.
"""

from __future__ import annotations

import os
import re

from apache_beam.io.filesystems import FileSystems

from pipeline.core.messages import Secret

# What surrounds a key by accident: a newline from `echo`, a heredoc or a copy, spaces, a BOM that an editor
# writes. No key starts or ends with any of it, and a key sent with it is refused.
_AROUND = re.compile(r"\A[\s\ufeff]+|[\s\ufeff]+\Z")


def clean_key(text: str) -> str:
    """The key without the whitespace and BOMs around it, wherever it came from (a file or a variable)."""
    return _AROUND.sub("", text)


def key_file(api_key_file: str | None = None) -> str | None:
    return api_key_file or os.environ.get("SONIOX_API_KEY_FILE") or None


def key_source(api_key_file: str | None = None) -> str:
    """Where the key comes from, for messages (never the key itself)."""
    if api_key_file:
        return f"--api_key_file {api_key_file}"
    path = key_file()
    return f"SONIOX_API_KEY_FILE {path}" if path else "SONIOX_API_KEY"


def read_api_key(api_key_file: str | None = None) -> Secret:
    """The key (may be empty: no key given). A file that cannot be read raises the filesystem's error."""
    path = key_file(api_key_file)
    if path:
        with FileSystems.open(path) as f:
            return Secret(clean_key(f.read().decode()))
    return Secret(clean_key(os.environ.get("SONIOX_API_KEY", "")))
