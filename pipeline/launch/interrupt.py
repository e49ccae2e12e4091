"""Ctrl-C and SIGTERM during a run: stop within a second, leave no scratch, and say how to resume.

The process ends from the signal handler itself, with `os._exit`: calls in flight are abandoned rather than
waited for (a deadline of a minute each), Beam's worker processes are killed, and nothing of Beam's shutdown
runs, whose tracebacks of the broken job would bury the one line that matters. No partial file can be at a
final path: a clip reaches it only whole (a rename on local disk, one PUT on a bucket).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(clean_up: Callable[[], str]) -> Iterator[None]:
    """Within the block (in the main thread), SIGINT and SIGTERM end the process with the shell's code (130,
    143) after `clean_up`, which removes the run's scratch and returns the line to print: what is left and how
    to resume. Beam's worker processes are killed first, so that no clip lands after it is counted."""

    def stop(signum: int, frame) -> None:
        logging.disable(logging.CRITICAL)
        threading.excepthook = lambda args: None  # the threads' errors of the broken job say nothing more
        kill_descendants()  # first: they would write clips while the line counts them
        try:
            line = clean_up()
        except Exception as e:  # the line must still be printed, and the process end
            line = f"the scratch could not all be removed ({type(e).__name__}: {e})"
        print(f"stopped by {signal.Signals(signum).name}: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # a run in a thread (the tests): no handlers
        yield
        return
    saved = {s: signal.signal(s, stop) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def kill_descendants(wait_s: float = 2.0) -> None:
    """SIGKILL this process's descendants (Beam's worker processes of --direct_running_mode multi_processing,
    each under a shell) and wait until they are gone: else they see this process go, and print about it."""
    pids = descendants()
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    for pid in pids:
        with contextlib.suppress(OSError):
            os.waitpid(pid, os.WNOHANG)  # reaps a child; a grandchild is reaped by its own (killed) parent
        while os.path.exists(f"/proc/{pid}/stat") and _state(pid) != b"Z" and time.monotonic() < deadline:
            time.sleep(0.01)


def descendants() -> list[int]:
    """Every process under this one, from /proc (none where there is no /proc)."""
    parents = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{entry.name}/stat", "rb") as f:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ")"
                parents[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
    found, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _state(pid: int) -> bytes:
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0]
    return b"X"
