"""What every benchmark runs on: child processes run and measured (wall, CPU, peak RSS), `taskset` pinning,
the results and logs folders, progress lines on stderr.

A measured child runs under benchmarks/measure.py (a small trampoline, see there why), which writes the child's
wall time, user + sys CPU and peak RSS; its stdout and stderr go to benchmarks/results/logs/{name}.out / .err, and
its last stdout line that is JSON is its own report (`ChildReport`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LOGS = os.path.join(RESULTS, "logs")
PY = sys.executable
MIB = 1024 * 1024
_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- measured child processes ----------------------------------------------------------------------------------
class CpuMeter(Protocol):
    """Something whose CPU is read before and after a child runs (the GetAudio server's process)."""

    def cpu_s(self) -> float: ...


@dataclass(frozen=True)
class ChildReport:
    """What a benchmark client prints as its last line (`{"clips", "bytes", "errors", "seconds"}`), or what is
    read from a pipeline run's record: its own count of what it did, and its time after its imports."""

    clips: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float | None = None  # inside the process, from after its imports (the pipeline: graph construction)

    @classmethod
    def from_json(cls, line: str) -> ChildReport | None:
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            return None
        seconds = d.get("seconds")
        return cls(
            clips=int(d.get("clips", 0)),
            bytes=int(d.get("bytes", 0)),
            errors=int(d.get("errors", 0)),
            seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
        )


@dataclass
class Child:
    """One measured child process: wall time from launch to exit, its CPU, its peak RSS, the server's CPU."""

    name: str
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mib: float
    server_cpu_s: float
    report: ChildReport | None = None  # None: it printed no JSON line

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.wall_s

    @property
    def server_cpu_pct(self) -> float:
        return 100 * self.server_cpu_s / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        """For the JSON results: the measurements rounded, the shares of a core, the child's own report."""
        d: dict[str, Any] = {"name": self.name, "rc": self.rc}
        for k in ("wall_s", "user_s", "sys_s", "max_rss_mib", "server_cpu_s"):
            d[k] = round(getattr(self, k), 3)
        d["output"] = asdict(self.report) if self.report else {}
        d.update(cpu_pct=round(self.cpu_pct, 1), server_cpu_pct=round(self.server_cpu_pct, 1))
        return d


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(
    name: str,
    cmd: list[str],
    server: CpuMeter | None,
    env: dict[str, str] | None = None,
    cwd: str = ROOT,
    prefix: tuple[str, ...] = (),
) -> Child:
    """Run `cmd` from `cwd` (the repository root) through the measure.py trampoline (see there why), the
    trampoline under `prefix` (`taskset -c N`: the trampoline and the child it spawns on core N);
    stdout and stderr go to logs/{name}.out / .err. `server`'s CPU is read before and after."""
    measured = os.path.join(LOGS, f"{name}.measure.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(measured)
    server_cpu = server.cpu_s() if server else 0.0
    out_path, err_path = os.path.join(LOGS, f"{name}.out"), os.path.join(LOGS, f"{name}.err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        trampoline = [*prefix, PY, os.path.join(ROOT, "benchmarks", "measure.py"), measured, "--", *cmd]
        subprocess.run(trampoline, stdout=out, stderr=err, cwd=cwd, env={**os.environ, **(env or {})})
        wall = time.monotonic() - started
    try:
        with open(measured, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError):  # the trampoline itself failed
        m = {"rc": -1, "wall_s": wall, "user_s": 0.0, "sys_s": 0.0, "max_rss_kib": 0}
    with open(out_path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    child = Child(
        name=name,
        rc=m["rc"],
        wall_s=m["wall_s"],
        user_s=m["user_s"],
        sys_s=m["sys_s"],
        max_rss_mib=m["max_rss_kib"] / 1024,  # KiB on Linux
        server_cpu_s=(server.cpu_s() - server_cpu) if server else 0.0,
        report=ChildReport.from_json(lines[-1]) if lines else None,
    )
    if child.rc != 0:
        with open(err_path, encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-15:]
        progress(f"{name}: FAILED with exit code {child.rc}; stderr ends:\n    " + "\n    ".join(tail))
    return child


# -- pinning -------------------------------------------------------------------------------------------------
def taskset(cpu: int | None) -> tuple[str, ...]:
    """The prefix that runs a command on `cpu` alone (none when `cpu` is None)."""
    return () if cpu is None else ("taskset", "-c", str(cpu))


PINNINGS = ("pinned", "unpinned")


@dataclass(frozen=True)
class Pass:
    """One pass of the measurements, with its own servers. Pinned: the server on one CPU and each measured
    client alone on another (`taskset`), so a client's CPU per clip is its own and it never waits for the
    server's; unpinned: no affinity set, clients and server share every CPU."""

    name: str
    client_cpu: int | None = None
    server_cpu: int | None = None

    def client_prefix(self) -> tuple[str, ...]:
        return taskset(self.client_cpu)

    def server_prefix(self) -> tuple[str, ...]:
        return taskset(self.server_cpu)

    def describe(self) -> str:
        if self.client_cpu is None:
            return f"{self.name}: no CPU affinity set (clients and server share every CPU)"
        return f"{self.name}: server on CPU {self.server_cpu}, each client alone on CPU {self.client_cpu} (taskset)"


def plan_passes(names: list[str]) -> tuple[list[Pass], list[str]]:
    """The passes to run, in the order asked, and a note for each one skipped."""
    cpus = sorted(os.sched_getaffinity(0))
    passes, notes = [], []
    for name in names:
        if name == "unpinned":
            passes.append(Pass(name))
        elif len(cpus) < 2:
            notes.append(f"pinned pass skipped: {len(cpus)} CPU available, pinning needs 2")
        elif not shutil.which("taskset"):
            notes.append("pinned pass skipped: no taskset on PATH")
        else:
            passes.append(Pass(name, client_cpu=cpus[0], server_cpu=cpus[1]))
    return passes, notes


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """This process (it warms the server up and checks the clips between runs) on the server's CPU, so that
    the measured client is alone on its own; the affinity it had before afterwards."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def fresh_logs() -> None:
    """An empty logs folder for this run's children."""
    shutil.rmtree(LOGS, ignore_errors=True)
    os.makedirs(LOGS)
