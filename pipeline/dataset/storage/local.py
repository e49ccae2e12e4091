"""The local-disk store: a folder written through `{output}/_tmp/` and renames, and the conditional writes of
the lease done with O_EXCL, a folder's flock and a content hash for a version. No storage library."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pipeline.dataset.layout import TMP_DIR
from pipeline.dataset.storage.base import Precondition, Scratch, StorageError, StoredObject, translated


class LocalStore:
    """A folder: each write goes to `{root}/_tmp/` and is renamed into place, so no reader sees half a file.
    Its OSErrors are raised as StorageError (NotFound for a missing file)."""

    local = True

    def __init__(self, root: str):
        self.tmp = os.path.join(root, TMP_DIR)
        self._tmp_made = False
        # Scratch names: a prefix unique to this store object, then a counter (its next() is atomic under the
        # GIL), so no random bytes are read per clip.
        self._prefix, self._count = uuid.uuid4().hex[:12], itertools.count()

    def put(self, path, data=None, *, file=None, content_type="", metadata=None) -> None:
        """Renamed into place: `file` (this store's scratch, on the same disk), or `data` written into a scratch
        file first. No metadata: a local file has none (a clip says what it is in its header)."""
        with translated(path, OSError):
            if file is not None:
                _rename(file, path)
                return
            with self.scratch_file(os.path.splitext(path)[1]) as scratch:
                _write_file(scratch.path, data)
                _rename(scratch, path)

    def head(self, path: str) -> StoredObject | None:
        with translated(path, OSError):
            try:
                return StoredObject(path, os.stat(path).st_size)
            except FileNotFoundError:
                return None

    def list(self, prefix: str) -> Iterator[StoredObject]:
        folder = prefix if prefix.endswith(os.sep) else os.path.dirname(prefix)
        with translated(prefix, OSError):
            for dirpath, _, names in os.walk(folder or "."):
                for name in names:
                    path = os.path.join(dirpath, name)
                    if path.startswith(prefix):
                        yield StoredObject(path, os.stat(path).st_size)

    def read(self, path: str) -> bytes:
        with self.open_for_read(path) as f, translated(path, OSError):
            return f.read()

    def open_for_read(self, path: str) -> BinaryIO:
        with translated(path, OSError):
            return open(path, "rb")

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            with translated(path, OSError):
                os.remove(path)

    def remove_all(self, prefix: str) -> None:
        """Each file and folder whose path starts with `prefix`, with what is in it (a folder is no object).
        What cannot be removed stays, as a leftover's leftover, not a reason to stop."""
        self._tmp_made = False  # `_tmp/` may be among them
        folder, start = os.path.split(prefix)
        try:
            paths = [e.path for e in os.scandir(folder or ".") if e.name.startswith(start)] if start else [folder]
        except OSError:  # no such folder: nothing to remove
            return
        for path in paths:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)

    def remove_scratch(self) -> None:
        """The output's `_tmp/` with all in it (a run's export parts too)."""
        self.remove_all(self.tmp + os.sep)

    def check_writable(self, root: str, folders: Iterable[str]) -> None:
        """No file where `root` or one of its `folders` should be a folder, and a writable folder to make it in."""
        for path in (root, *(os.path.join(root, f) for f in folders)):
            if os.path.exists(path) and not os.path.isdir(path):
                raise StorageError(f"{path} is a file, not a folder")
        existing = os.path.dirname(os.path.abspath(root))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise StorageError(f"{existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{existing} is not writable")

    def concat(self, path: str, parts: list[StoredObject], content_type: str = "") -> None:
        with self.scratch_file(os.path.splitext(path)[1]) as scratch:
            with translated(path, OSError), open(scratch.path, "wb") as out:
                for part in parts:
                    with open(part.path, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            self.put(path, file=scratch)
        self.delete(p.path for p in parts)

    def abort_uploads(self, prefix: str) -> int:
        return 0

    def create(self, path: str, data: bytes) -> str:
        with translated(path, OSError):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with _folder_lock(path):
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError as e:
                    raise Precondition(f"{path}: exists") from e
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
        return _local_version(data)

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        if not os.path.isdir(os.path.dirname(path) or "."):
            return None
        with translated(path, OSError), _folder_lock(path):
            data = _read_if_there(path)
        return None if data is None else (data, _local_version(data))

    def replace(self, path: str, data: bytes, version: str) -> str:
        with translated(path, OSError), _folder_lock(path):
            _check_version(path, version)
            staged = f"{path}.{uuid.uuid4().hex}"  # renamed over it: a reader without the lock sees old or new
            _write_file(staged, data)
            os.replace(staged, path)
        return _local_version(data)

    def delete_version(self, path: str, version: str) -> None:
        with translated(path, OSError), _folder_lock(path):
            _check_version(path, version)
            os.remove(path)

    def scratch_file(self, suffix: str) -> Scratch:
        """In the output's `_tmp/`, so that `put` renames it into place. Named, not created: one open per clip,
        not two."""
        if not self._tmp_made:
            with translated(self.tmp, OSError):
                os.makedirs(self.tmp, exist_ok=True)
            self._tmp_made = True
        return Scratch(os.path.join(self.tmp, f"{self._prefix}-{next(self._count)}{suffix}"))


def _rename(scratch: Scratch, path: str) -> None:
    try:
        scratch.rename_to(path)
    except FileNotFoundError:  # the first file in a new folder: no makedirs call for every clip
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        scratch.rename_to(path)


@contextlib.contextmanager
def _folder_lock(path: str) -> Iterator[None]:
    """An exclusive flock on the folder holding `path`, for one conditional operation: O_EXCL makes a creation
    atomic, but a compare-then-replace or compare-then-delete is two steps, and the lock makes them one
    among processes and threads (each open of the folder is its own lock holder). The folder, not a lock
    file, so nothing is left behind. On a filesystem without flock (some network mounts) only the creation
    stays atomic."""
    import fcntl

    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _local_version(data: bytes) -> str:
    """A local file's version is its content's hash: every lease written differs (run id, expiry)."""
    return hashlib.sha256(data).hexdigest()


def _read_if_there(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _check_version(path: str, version: str) -> None:
    data = _read_if_there(path)
    if data is None or _local_version(data) != version:
        raise Precondition(f"{path}: {'gone' if data is None else 'replaced'}")


def _write_file(path: str, data: bytes) -> None:
    """`data` into a new file with open, write and close only: Python's buffered `open` adds a stat, a
    terminal check and a seek, about a tenth of the system time of writing a 5-second clip."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
