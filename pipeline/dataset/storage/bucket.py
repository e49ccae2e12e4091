"""What the two bucket stores share: their client, built once per process and settings, and the operations
a bucket does alike whatever its library (scratch in the machine's temporary folder, reads into memory).

The per-process client cache (`_clients`, this module's only process-wide state): one boto3 client and one
google-cloud-storage client per worker process (per settings), built on first use and shared by every
thread, step and clip; both are thread-safe. A client cannot be a step's own: one costs about 119 ms of CPU
and holds the process's connection pool, and stores are opened outside any step too (the launcher, the last
step). `clear_clients` empties it, as a new process would.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterable
from typing import BinaryIO

from pipeline.dataset.storage.base import Scratch, StorageError, StoreSettings, translated

CONNECTIONS = 128  # per process: above the default 64 streams, so no thread waits for a connection
ATTEMPTS = 5  # of each storage request, the libraries' own retries with backoff

_clients: dict[tuple[str, StoreSettings], object] = {}
_clients_lock = threading.Lock()


def clear_clients() -> None:
    """Forget the clients built so far, as a new process would (a test pointing the same settings at another
    server)."""
    with _clients_lock:
        _clients.clear()


def _client(scheme: str, settings: StoreSettings, build: Callable[[StoreSettings], object]):
    """The per-process client cache (see the module's docstring)."""
    key = (scheme, settings)
    client = _clients.get(key)  # the common case takes no lock
    if client is None:
        with _clients_lock:
            if key not in _clients:
                _clients[key] = build(settings)
            client = _clients[key]
    return client


class BucketStore:
    """A bucket store's client, built on first use (a dry run, or a launcher that only names the output,
    needs no credentials)."""

    local = False
    scheme = ""
    build_client: Callable[[StoreSettings], object]  # each bucket store's: a new client of its library

    def __init__(self, settings: StoreSettings):
        self.settings = settings

    @property
    def client(self):
        return _client(self.scheme, self.settings, self.build_client)

    def scratch_file(self, suffix: str) -> Scratch:
        """A file in the machine's temporary folder: bytes bound for a bucket need no room beside the output."""
        import tempfile

        with translated(f"a scratch file *{suffix}", OSError):
            fd, path = tempfile.mkstemp(prefix="clip-", suffix=suffix)
            os.close(fd)
        return Scratch(path)

    def remove_scratch(self) -> None:
        """Nothing: each scratch file is in the machine's temporary folder and removed by its Scratch (the
        exports' parts under the bucket's `_tmp/` are the last step's to join, or the next run's to remove)."""

    def open_for_read(self, path: str) -> BinaryIO:
        return io.BytesIO(self.read(path))

    def remove_all(self, prefix: str) -> None:
        left = [o.path for o in self.list(prefix)]
        if left:
            self.delete(left)

    def check_writable(self, root: str, folders: Iterable[str]) -> None:
        """A listing works: the bucket is there and the credentials are taken (what a write needs is probed)."""
        try:
            next(iter(self.list(root + "/")), None)
        except StorageError as e:
            raise StorageError(f"cannot list it: {e}") from e
