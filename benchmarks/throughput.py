"""The throughput benchmark's measurements (`python -m benchmarks.run` is its command line and report).

Against one local GetAudio server per latency regime and pass (benchmarks/server.py) over one temporary store, each
client runs as a measured child process (benchmarks/harness.py): the limit at several concurrency levels, the
essentials, peer 1, peer 2 and the pipeline; then, in the first pass, the pipeline's peak RSS over one long stereo
clip against one 5-second clip, and its wall time at two manifest sizes. Every figure comes back typed
(benchmarks/results.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks import data
from benchmarks.harness import MIB, PY, Child, ChildReport, Pass, on_cpu, progress, run_child
from benchmarks.results import CLIENTS, ClientRun, ClipsCheck, LimitRun, Memory, OneClipRun, PassResult, Regime
from benchmarks.server import Server

PHASES = (*CLIENTS, "rss", "scale")
THROUGHPUT_PHASES = CLIENTS
PEER_THREADS = 32
ESSENTIAL_THREADS = 64  # as many as the pipeline's streams (--max_in_flight)

# start(manifest, dest, child name, rows) runs one client over the manifest's first `rows` rows into `dest`.
Start = Callable[[str, str, str, int], Child]


@dataclass(frozen=True)
class Settings:
    """What to measure, from the command line (see `python -m benchmarks.run --help`)."""

    rows: int
    quick: bool
    phases: list[str]
    latencies_ms: list[float]
    pinning: list[str]
    limit_levels: list[int]
    peer1_rows: int
    scale_rows: list[int]  # two sizes
    objects: int
    object_s: int
    long_s: int
    pipeline_args: list[str]


class Bench:
    def __init__(self, settings: Settings, work: str, passes: list[Pass]):
        self.settings = settings
        self.work = work
        self.store = os.path.join(work, "store")
        self.passes = passes
        self.pass_ = Pass("unpinned")  # the pass running

    def child(self, name: str, cmd: list[str], server: Server, env: dict[str, str] | None = None) -> Child:
        """A measured client in the pass running: pinned as the pass says, its logs named for the pass."""
        return run_child(f"{self.pass_.name}-{name}", cmd, server, env, prefix=self.pass_.client_prefix())

    def manifest(self, name: str, table) -> str:
        return data.write_manifest(os.path.join(self.work, f"{name}.parquet"), table)

    def clips_manifest(self, rows: int) -> str:
        path = os.path.join(self.work, f"clips-{rows}.parquet")
        if not os.path.exists(path):
            data.write_manifest(path, data.clip_rows(rows, self.settings.objects, self.settings.object_s))
        return path

    def scratch(self, name: str) -> str:
        path = os.path.join(self.work, "out", name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    # -- one regime of the throughput phases ---------------------------------------------------------------
    def regime(self, server: Server, phases: list[str]) -> Regime:
        s, lat = self.settings, server.latency_ms
        tag = f"{lat:g}ms"
        out = Regime(latency_ms=lat, rows=s.rows)
        if "limit" in phases:
            out.limit = self.limit(server, tag)
        if "essentials" in phases:

            def essentials(manifest: str, dest: str, name: str, rows: int) -> Child:
                cmd = [PY, "-m", "benchmarks.essentials", "--host", server.target, "--manifest", manifest]
                cmd += ["--output", dest, "-c", str(ESSENTIAL_THREADS), "--rows", str(rows)]
                return self.child(name, cmd, server)

            out.essentials = self._client("essentials", tag, essentials, s.rows, "clips", marginal=True)
        for phase, threads in (("peer1", 1), ("peer2", PEER_THREADS)):
            if phase not in phases:
                continue

            def peer(manifest: str, dest: str, name: str, rows: int, threads: int = threads) -> Child:
                cmd = [PY, "-m", "benchmarks.peer", "--manifest", manifest, "--output", dest]
                cmd += ["--threads", str(threads), "--rows", str(rows)]
                return self.child(name, cmd, server, {"SONIOX_API_HOST": server.address, "SONIOX_API_KEY": "bench"})

            rows = s.rows if (phase == "peer2" or lat == 0) else min(s.rows, s.peer1_rows)
            setattr(out, phase, self._client(phase, tag, peer, rows, "", marginal=phase == "peer2"))
        if "pipeline" in phases:

            def pipeline(manifest: str, dest: str, name: str, rows: int) -> Child:
                return self.pipeline(name, manifest, dest, server)  # every row of the manifest

            out.pipeline = self._client("pipeline", tag, pipeline, s.rows, "clips", marginal=True)
        return out

    def limit(self, server: Server, tag: str) -> LimitRun:
        """The bare gRPC client at each concurrency level."""
        manifest, rows, levels = self.clips_manifest(self.settings.rows), self.settings.rows, {}
        for c in self.settings.limit_levels:
            cmd = [PY, "-m", "benchmarks.limit", "--host", server.target, "--manifest", manifest, "-c", str(c)]
            levels[c] = self._rate(self.child(f"limit-{tag}-c{c}", cmd, server), rows, f"limit c={c}", tag)
        return LimitRun(levels)

    def _client(self, phase: str, tag: str, start: Start, rows: int, clips_dir: str, marginal: bool) -> ClientRun:
        """One client over `rows` rows: its rate and CPU, its clips checked (under `dest/clips_dir`) and removed;
        with `marginal`, run again on a one-row manifest, whose CPU taken out gives the CPU per clip after
        start-up."""
        dest = self.scratch(f"{phase}-{tag}")
        run = self._rate(start(self.clips_manifest(self.settings.rows), dest, f"{phase}-{tag}", rows), rows, phase, tag)
        run.check = check_clips(os.path.join(dest, clips_dir), rows)
        shutil.rmtree(dest, ignore_errors=True)
        if marginal:
            dest = self.scratch(f"{phase}-{tag}-one-row")
            one_row = start(self.clips_manifest(1), dest, f"{phase}-{tag}-one-row", 1)
            if not run.add_one_row_run(one_row):
                progress(f"{one_row.name}: the one-row run gave no clip; no CPU per clip after start-up")
            shutil.rmtree(dest, ignore_errors=True)
        return run

    def pipeline(self, name: str, manifest: str, dest: str, server: Server) -> Child:
        cmd = [PY, "-m", "pipeline", "run", "--manifest", manifest, "--output", dest, "--api_host", server.address]
        cmd += self.settings.pipeline_args
        child = self.child(name, cmd, server)
        with contextlib.suppress(OSError, json.JSONDecodeError), open(os.path.join(dest, "_RUN.json")) as f:
            record = json.load(f)
            child.report = ChildReport(
                clips=record.get("clips_written", 0),
                errors=record.get("errors", 0),
                bytes=record.get("bytes", 0),
                seconds=record.get("wall_seconds"),  # inside the process, from graph construction
            )
        return child

    def _rate(self, child: Child, rows: int, label: str, tag: str) -> ClientRun:
        report = child.report or ChildReport()
        clips, errors = (report.clips, report.errors) if child.rc == 0 else (0, rows)
        run = ClientRun(child=child, rows=rows, clips=clips, errors=errors)
        progress(
            f"{self.pass_.name:<8} {tag:>6} {label:<12} {run.clips:>6} clips, {run.errors} errors in "
            f"{child.wall_s:6.1f} s = {run.clips_per_s:7.1f} clips/s, {run.cpu_ms_per_clip or 0:.2f} CPU ms/clip  "
            f"(cpu {child.cpu_pct:3.0f}%, server cpu {child.server_cpu_pct:3.0f}%, rss {child.max_rss_mib:.0f} MiB)"
        )
        return run

    # -- memory and scaling ---------------------------------------------------------------------------------
    def memory(self, server: Server) -> Memory:
        runs = {}
        for name, object_id, duration_ms in (
            ("one_5s_clip", data.mono_ids(1)[0], data.CLIP_MS),
            ("one_long_stereo_clip", data.LONG_OBJECT, self.settings.long_s * 1000),
        ):
            manifest = self.manifest(name, data.single_row(object_id, 0, duration_ms, name))
            dest = self.scratch(name)
            child = self.pipeline(f"rss-{name}", manifest, dest, server)
            clip = os.path.join(dest, "clips", f"{name}.wav")
            size = os.path.getsize(clip) if os.path.exists(clip) else 0
            complete = size >= duration_ms * 16 * 2 * (2 if object_id == data.LONG_OBJECT else 1)
            runs[name] = OneClipRun(child, duration_ms, size, complete)
            progress(
                f"{self.pass_.name} rss: {name}: peak RSS {child.max_rss_mib:.1f} MiB, {size / MIB:.1f} MiB written "
                f"in {child.wall_s:.1f} s (rc {child.rc})"
            )
            shutil.rmtree(dest, ignore_errors=True)
        return Memory(**runs)

    def scale(self, server: Server) -> dict[int, ClientRun]:
        out = {}
        for rows in self.settings.scale_rows:
            dest = self.scratch(f"scale-{rows}")
            child = self.pipeline(f"scale-{rows}", self.clips_manifest(rows), dest, server)
            out[rows] = self._rate(child, rows, f"{rows} rows", "scale")
            out[rows].check = check_clips(os.path.join(dest, "clips"), rows)
            shutil.rmtree(dest, ignore_errors=True)
        return out

    def run(self) -> list[PassResult]:
        s = self.settings
        progress(
            f"store: {s.objects} mono objects of {s.object_s} s" + (f", one {s.long_s} s stereo" * ("rss" in s.phases))
        )
        data.write_store(self.store, s.objects, s.object_s, s.long_s if "rss" in s.phases else 0)
        results = []
        for i, pass_ in enumerate(self.passes):
            self.pass_ = pass_
            progress(f"pass {pass_.describe()}")
            with on_cpu(pass_.server_cpu):
                results.append(self.run_pass(first=i == 0))
        return results

    def run_pass(self, first: bool) -> PassResult:
        """The throughput regimes, each against its own server; the memory and scaling runs in the first pass
        only (they have no peer to compare with, and their targets are the same in either pass)."""
        s = self.settings
        out = PassResult(self.pass_.name, self.pass_.client_cpu, self.pass_.server_cpu)
        throughput = [p for p in s.phases if p in THROUGHPUT_PHASES]
        extra = {"rss", "scale"} & set(s.phases) if first else set()
        for lat in s.latencies_ms:
            if not (throughput or (lat == 0 and extra)):
                continue
            server = Server(self.store, lat, self.pass_.server_prefix(), f"{self.pass_.name}-server")
            try:
                server.warm_up(data.mono_ids(s.objects))
                progress(f"{self.pass_.name}: server {server.address}, {lat:g} ms added latency")
                if throughput:
                    out.regimes.append(self.regime(server, throughput))
                if lat == 0 and "rss" in extra:
                    out.memory = self.memory(server)
                if lat == 0 and "scale" in extra:
                    out.scale = self.scale(server)
            finally:
                server.stop()
        return out


def check_clips(folder: str, expected: int) -> ClipsCheck:
    """The clip files there, and the first one's shape (5 s mono at 16 kHz)."""
    import soundfile as sf

    names = sorted(n for n in os.listdir(folder) if n.endswith(".wav")) if os.path.isdir(folder) else []
    if not names:
        return ClipsCheck(files=0, expected=expected, ok=False)
    info = sf.info(os.path.join(folder, names[0]))
    ok = len(names) == expected and info.frames == data.CLIP_MS * 16
    return ClipsCheck(len(names), expected, ok, names[0], info.frames, info.channels, info.samplerate)
