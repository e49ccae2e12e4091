"""One run per output at a time: the lease `{output}/_LEASE.json`.

Two runs on one output damage each other: each deletes the other's scratch at its start, and the last to finish
deletes the other's table files. So a run takes a lease on its output once every launch check has passed and
before it deletes anything, and a second run stops at launch (exit 2), naming the holder.

The lease is one small object written with the store's own create-only condition (O_EXCL on local disk,
If-None-Match on S3, ifGenerationMatch=0 on GCS): of two runs racing for it, the store lets exactly one
through. Its holder rewrites `expires_at` every third of the lease time, each rewrite conditioned on the
version it wrote last, and deletes it (on the same condition) when the run ends, fails or is stopped by a
signal. A run killed outright leaves it behind:

* on this machine, with a job that lived in the killed process (a local runner), the next run sees that the
  holder's pid is gone and takes the lease over at once;
* otherwise (another machine or container, a job that runs on elsewhere) it expires LEASE_S after its last
  renewal, and the next run takes it over then.

A takeover overwrites the stale lease on the condition that it is still the version read (If-Match on S3,
ifGenerationMatch=N on GCS), so of runs taking over together exactly one wins and the others are refused,
naming it. One conditional write rather than a conditional delete and a create: it needs no conditional
delete, which fake-gcs-server ignores (a stale delete there removed a winner's fresh lease, and two runs won).

LEASE_S is 10 minutes, renewed every 200 s (every 50 s after a renewal failed): a run killed elsewhere blocks
its output's next scheduled run by at most that, and a holder whose renewals fail (a storage outage, a stalled
launcher) keeps the lease through more than 6 minutes of failures before anyone can take it. Not an option:
tests shorten it with the environment variable CLIP_PIPELINE_LEASE_S.

A detached launch (--detach: the launcher exits once the job is submitted) cannot renew: its lease is
written for DETACHED_LEASE_S (24 h, longer than any build of this pipeline is expected to take, so it does
not lapse under a running job) and the job's last step deletes it (pipeline/graph/finish.py). A job that fails or
is cancelled leaves it until then; the refusal says so, and which file to delete once that job is gone.

Expiry compares the holder's clock with the taker's: skew of seconds does not matter against minutes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from pipeline.core.errors import LaunchError
from pipeline.dataset.layout import lease_path
from pipeline.dataset.storage import Precondition, Store

log = logging.getLogger(__name__)

LEASE_S = 600.0
LEASE_S_ENV = "CLIP_PIPELINE_LEASE_S"
DETACHED_LEASE_S = 24 * 3600.0
TAKE_ATTEMPTS = 5  # reads and writes of a lease that keeps changing hands, before giving up


class LeaseHeld(LaunchError):
    """Another run holds the output: this one stops before it fetches a clip or deletes anything (exit 2)."""


def lease_seconds() -> float:
    """The lease time of a run waited for: LEASE_S, or CLIP_PIPELINE_LEASE_S (tests)."""
    return float(os.environ.get(LEASE_S_ENV) or LEASE_S)


def _utc(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _shown(iso: str) -> str:
    return iso.split(".")[0].replace("T", " ") + " UTC"


def _process_space() -> str | None:
    """This machine's boot and pid namespace: where a pid names the same process for every run that sees the
    same value (not another container's, not a process before a reboot); None where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """What the lease says: the run holding the output. Never a key or an option."""

    run_id: str
    host: str
    pid: int
    started_at: str  # UTC ISO
    expires_at: str  # UTC ISO
    detached: bool
    # Set only when the job ends with the holder's process (a local runner, not detached): see `dead`.
    process_space: str | None = None

    @classmethod
    def new(cls, run_id: str, seconds: float, detached: bool, job_in_process: bool) -> Holder:
        start = datetime.now(timezone.utc)
        space = _process_space() if job_in_process and not detached else None
        return cls(run_id, socket.gethostname(), os.getpid(), _utc(start), "", detached, space).until(seconds)

    def until(self, seconds: float) -> Holder:
        """The same holder, its lease running `seconds` from now."""
        return dataclasses.replace(self, expires_at=_utc(datetime.now(timezone.utc) + timedelta(seconds=seconds)))

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """None for a lease that cannot be read (a process killed while writing it locally): it holds nothing."""
        try:
            fields = {f.name for f in dataclasses.fields(cls)}
            holder = cls(**{k: v for k, v in json.loads(data).items() if k in fields})
            readable = datetime.fromisoformat(holder.expires_at).tzinfo is not None
        except (ValueError, TypeError, AttributeError):
            return None
        return holder if readable else None

    def expired(self) -> bool:
        return datetime.fromisoformat(self.expires_at) <= datetime.now(timezone.utc)

    def dead(self) -> bool:
        """Its process is gone, seen from the same machine and pid namespace, and its job went with it."""
        return self.process_space is not None and self.process_space == _process_space() and not alive(self.pid)

    def stale(self) -> bool:
        return self.expired() or self.dead()

    def describe(self) -> str:
        return (
            f"run {self.run_id} on {self.host} (pid {self.pid}{', detached' if self.detached else ''}), "
            f"started {_shown(self.started_at)}"
        )


def refusal(output: str, holder: Holder) -> str:
    """The one line of a run refused (exit 2)."""
    until = f"its lease expires at {_shown(holder.expires_at)}"
    if holder.detached:
        why = f"the job's last step releases it; delete {lease_path(output)} only once that job is gone"
    else:
        why = "a run that was killed leaves it until then"
    return f"--output {output} is in use by {holder.describe()}; {until} ({why})"


class Lease:
    """A lease this process holds: renewed by a daemon thread (unless detached), released once."""

    def __init__(self, store: Store, path: str, holder: Holder, version: str, seconds: float):
        self.store, self.path, self.holder, self.version, self.seconds = store, path, holder, version, seconds
        self._lock = threading.RLock()  # reentrant: a signal's release may interrupt the main thread's own
        self._stop = threading.Event()
        self._done = False  # released, or found taken: nothing more to write

    def start_renewing(self) -> None:
        thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.holder.run_id}", daemon=True)
        thread.start()

    def _renew_loop(self) -> None:
        """Every third of the lease time; after a failed renewal every twelfth, so that failures for most of
        the remaining time still let one through before the lease lapses."""
        wait = self.seconds / 3
        while not self._stop.wait(wait):
            wait = self.seconds / 3 if self.renew() else self.seconds / 12

    def renew(self) -> bool:
        """Push expires_at on, if the lease is still this run's; False when the write failed."""
        with self._lock:
            if self._done:
                return True
            renewed = self.holder.until(self.seconds)
            try:
                self.version = self.store.replace(self.path, renewed.to_bytes(), self.version)
                self.holder = renewed
            except Precondition:
                return self._check_ours()
            except Exception as e:  # the store's errors: tried again
                log.warning("could not renew the lease %s (%s); it expires at %s", self.path, e, self.holder.expires_at)
                return False
            return True

    def _check_ours(self) -> bool:
        """A refused renewal: the lease is still ours (a retried write that had landed) or was taken."""
        try:
            found = self.store.read_versioned(self.path)
        except Exception as e:
            log.warning("could not read the lease %s (%s)", self.path, e)
            return False
        holder = Holder.from_bytes(found[0]) if found else None
        if holder is not None and holder.run_id == self.holder.run_id:
            self.holder, self.version = holder, found[1]
            return True
        self._done = True
        taker = holder.describe() if holder else "nobody"
        log.error("the lease %s was lost (now held by %s): another run may be writing this output", self.path, taker)
        return True

    def release(self) -> None:
        """Delete the lease if it is still this run's version; a failure is logged, never raised: the lease
        then expires at its time."""
        self._stop.set()
        with self._lock:
            if self._done:
                return
            self._done = True
            try:
                self.store.delete_version(self.path, self.version)
            except Precondition:
                log.warning("the lease %s was no longer this run's; left as it is", self.path)
            except Exception as e:
                until = self.holder.expires_at
                log.warning("could not release the lease %s (%s); it expires at %s", self.path, e, until)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def take(store: Store, output: str, run_id: str, *, detached: bool = False, job_in_process: bool = True) -> Lease:
    """Take the output's lease (a stale one is taken over), or raise LeaseHeld naming its holder. A run
    waited for is renewed from here on; a detached one is released by its job."""
    seconds = DETACHED_LEASE_S if detached else lease_seconds()
    mine = Holder.new(run_id, seconds, detached, job_in_process)
    for _ in range(TAKE_ATTEMPTS):
        try:
            version = _create_or_find(store, output, mine)
        except OSError as e:  # StorageError too: e.g. a store that refuses conditional writes (501)
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            raise LaunchError(f"--output {output}: cannot take its lease {lease_path(output)} ({reason})") from None
        if version is not None:
            lease = Lease(store, lease_path(output), mine, version, seconds)
            if not detached:
                lease.start_renewing()
            return lease
    raise LaunchError(f"--output {output}: its lease {lease_path(output)} kept changing hands; try again")


def _create_or_find(store: Store, output: str, mine: Holder) -> str | None:
    """The version written for `mine` (created, or a stale lease overwritten); None when it should be tried
    again (released meanwhile, or another run took the stale lease over first); LeaseHeld when another run
    holds it."""
    path = lease_path(output)
    with contextlib.suppress(Precondition):
        return store.create(path, mine.to_bytes())
    found = store.read_versioned(path)
    if found is None:  # released meanwhile
        return None
    data, version = found
    holder = Holder.from_bytes(data)
    if holder is not None and holder.run_id == mine.run_id:  # a retried create whose first attempt landed
        return version
    if holder is not None and not holder.stale():
        raise LeaseHeld(refusal(output, holder))
    why = "unreadable" if holder is None else f"{holder.describe()}, {'gone' if holder.dead() else 'expired'}"
    log.warning("taking over the lease %s (%s)", path, why)
    with contextlib.suppress(Precondition):  # another run took it over first: the next round says who
        return store.replace(path, mine.to_bytes(), version)
    return None


def current_holder(store: Store, output: str) -> Holder | None:
    """The run holding the output now (a stale lease holds nothing); for a dry run, which takes none and
    only reports it, so a lease it cannot read is logged, not raised."""
    try:
        found = store.read_versioned(lease_path(output))
    except Exception as e:
        log.warning("could not read the lease %s (%s)", lease_path(output), e)
        return None
    holder = Holder.from_bytes(found[0]) if found else None
    return holder if holder is not None and not holder.stale() else None


def release_for(store: Store, output: str, run_id: str) -> bool:
    """Delete the output's lease if run `run_id` still holds it (a detached job's last step); whether it did.
    A failure is logged, not raised: the dataset and its record are written, and the lease expires anyway."""
    path = lease_path(output)
    try:
        found = store.read_versioned(path)
        holder = Holder.from_bytes(found[0]) if found else None
        if holder is None or holder.run_id != run_id:
            return False
        store.delete_version(path, found[1])
    except Precondition:  # taken over meanwhile
        return False
    except Exception as e:
        log.warning("could not release the lease %s (%s); it expires by itself", path, e)
        return False
    return True


def alive(pid: int) -> bool:
    """Whether a process of that pid runs on this machine (in this pid namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
