"""The throughput benchmark's results, typed: each client's run, each latency regime, the memory and scaling runs,
each pass, and the machine. `as_dict()` gives each as it is written to benchmarks/results/latest.json."""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.harness import Child

# The clients of a latency regime, in the order they run and are reported.
CLIENTS = ("limit", "essentials", "peer1", "peer2", "pipeline")


@dataclass(frozen=True)
class ClipsCheck:
    """The clip files a run wrote, and the first one's shape (5 s mono at 16 kHz when `ok`)."""

    files: int
    expected: int
    ok: bool
    first: str | None = None
    frames: int | None = None
    channels: int | None = None
    rate: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ClientRun:
    """One measured client over `rows` rows: the clips it wrote, its rate and CPU per clip; with a check of its
    clips (None: not checked, as the limit writes none) and, after a one-row run of the same client, its CPU per
    clip after start-up."""

    child: Child
    rows: int
    clips: int
    errors: int
    check: ClipsCheck | None = None
    one_row_cpu_s: float | None = None
    marginal_cpu_ms_per_clip: float | None = None

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.child.wall_s

    @property
    def cpu_ms_per_clip(self) -> float | None:
        """The client process's own CPU (user + sys, start-up included) per clip it wrote, in ms."""
        return self.child.cpu_s * 1000 / self.clips if self.clips else None

    @property
    def checked(self) -> bool:
        """The run's clips were all there and whole (a run with no check, such as the limit's, passes)."""
        return self.check is None or self.check.ok

    def add_one_row_run(self, one_row: Child) -> bool:
        """The CPU per clip after start-up, from the same client run on one row: (CPU of the run - CPU of the
        one-row run) / (clips - 1), what a clip costs a worker that is already running. False when the one-row
        run gave no clip (a failed run's CPU would make a figure)."""
        if one_row.rc != 0 or one_row.report is None or one_row.report.clips != 1:
            return False
        self.one_row_cpu_s = round(one_row.cpu_s, 3)
        if self.clips > 1:
            cpu_ms = (self.child.cpu_s - self.one_row_cpu_s) * 1000
            self.marginal_cpu_ms_per_clip = round(cpu_ms / (self.clips - 1), 3)
        return True

    def as_dict(self) -> dict[str, Any]:
        cpu_ms = self.cpu_ms_per_clip
        d: dict[str, Any] = {
            "rows": self.rows,
            "clips": self.clips,
            "errors": self.errors,
            "clips_per_s": round(self.clips_per_s, 2),
            "cpu_ms_per_clip": round(cpu_ms, 3) if cpu_ms is not None else None,
            **self.child.as_dict(),
        }
        if self.check is not None:
            d["check"] = self.check.as_dict()
        if self.one_row_cpu_s is not None:
            d["one_row_cpu_s"] = self.one_row_cpu_s
        if self.marginal_cpu_ms_per_clip is not None:
            d["marginal_cpu_ms_per_clip"] = self.marginal_cpu_ms_per_clip
        return d


@dataclass
class LimitRun:
    """The bare gRPC client at each concurrency level; the best level is the one reported."""

    levels: dict[int, ClientRun]

    @property
    def best_concurrency(self) -> int:
        return max(self.levels, key=lambda c: self.levels[c].clips_per_s)

    @property
    def best(self) -> ClientRun:
        return self.levels[self.best_concurrency]

    def as_dict(self) -> dict[str, Any]:
        levels = {c: run.as_dict() for c, run in self.levels.items()}
        return {"best_concurrency": self.best_concurrency, **levels[self.best_concurrency], "levels": levels}


@dataclass
class Regime:
    """Every client against one server adding `latency_ms` to each call; a client not asked for is None."""

    latency_ms: float
    rows: int
    limit: LimitRun | None = None
    essentials: ClientRun | None = None
    peer1: ClientRun | None = None
    peer2: ClientRun | None = None
    pipeline: ClientRun | None = None

    def client(self, name: str) -> ClientRun | None:
        """A client's run by its name in CLIENTS (the limit's best level for the limit)."""
        if name == "limit":
            return self.limit.best if self.limit else None
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"latency_ms": self.latency_ms, "rows": self.rows}
        for name in CLIENTS:
            run = getattr(self, name)
            if run is not None:
                d[name] = run.as_dict()
        return d


@dataclass(frozen=True)
class OneClipRun:
    """The pipeline over one clip, for its peak RSS: the clip's length, the bytes written and whether they are all
    there."""

    child: Child
    duration_ms: int
    file_bytes: int
    complete: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "duration_ms": self.duration_ms,
            "file_bytes": self.file_bytes,
            "complete": self.complete,
            **self.child.as_dict(),
        }


@dataclass(frozen=True)
class Memory:
    """The pipeline's peak RSS over one long stereo clip, against one 5-second clip."""

    one_5s_clip: OneClipRun
    one_long_stereo_clip: OneClipRun

    def as_dict(self) -> dict[str, Any]:
        return {"one_5s_clip": self.one_5s_clip.as_dict(), "one_long_stereo_clip": self.one_long_stereo_clip.as_dict()}


@dataclass
class PassResult:
    """One pass (pinned or unpinned): each latency regime in the order run, then the memory and scaling runs
    (first pass only; the scaling runs keyed by their row count, in the order asked)."""

    name: str
    client_cpu: int | None
    server_cpu: int | None
    regimes: list[Regime] = field(default_factory=list)
    memory: Memory | None = None
    scale: dict[int, ClientRun] = field(default_factory=dict)

    def processes(self) -> list[tuple[str, Child, ClientRun | None]]:
        """(name, child, its client run) of every child process of the pass: the regimes', then the memory runs
        (which have no client run: no rate), then the scaling runs."""
        items: list[tuple[str, Child, ClientRun | None]] = []
        for r in self.regimes:
            tag = f"{r.latency_ms:g}ms"
            if r.limit:
                items += [(f"limit c={c} {tag}", run.child, run) for c, run in r.limit.levels.items()]
            items += [(f"{name} {tag}", run.child, run) for name in CLIENTS[1:] if (run := getattr(r, name))]
        if self.memory:
            items.append(("pipeline one_5s_clip", self.memory.one_5s_clip.child, None))
            items.append(("pipeline one_long_stereo_clip", self.memory.one_long_stereo_clip.child, None))
        items += [(f"pipeline {n} rows", run.child, run) for n, run in self.scale.items()]
        return items

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"client_cpu": self.client_cpu, "server_cpu": self.server_cpu}
        d.update({f"regime_{r.latency_ms:g}ms": r.as_dict() for r in self.regimes})
        if self.memory:
            d["rss"] = self.memory.as_dict()
        if self.scale:
            d["scale"] = {str(n): run.as_dict() for n, run in self.scale.items()}
        return d


@dataclass(frozen=True)
class Machine:
    """The machine and the versions the figures were measured with."""

    nproc: int
    cpu_model: str
    memory_gib: float
    python: str
    beam: str
    grpcio: str
    soniox_sdk: str
    platform: str

    @classmethod
    def here(cls) -> Machine:
        import apache_beam
        import grpc

        model = ""
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        try:
            from importlib.metadata import version

            soniox = version("soniox")
        except Exception:
            soniox = "?"
        return cls(
            nproc=len(os.sched_getaffinity(0)),
            cpu_model=model,
            memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            python=platform.python_version(),
            beam=apache_beam.__version__,
            grpcio=grpc.__version__,
            soniox_sdk=soniox,
            platform=platform.platform(),
        )
