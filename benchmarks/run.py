"""`python -m benchmarks.run`: the performance benchmark, in one run, on this machine.

Against one local GetAudio server (`python -m pipeline serve`, a separate process, so its CPU is not in
the measured processes) over one temporary store (mono 16 kHz objects and one long stereo object), it
measures, each as a child process timed from launch to exit (start-up included, as users see it):

- limit: a bare gRPC client (generated stubs, one channel, threads) that reads the manifest's ranges and
  throws the bytes away, at several concurrency levels; the best is reported;
- essentials: what every clip needs and nothing more (fetch, sha256, an atomic file write) on 64 threads,
  the floor under the pipeline's CPU per clip;
- peer 1: the Soniox SDK's documented pattern, one `get_audio` call after another, each saved as a WAV;
- peer 2: the same on a ThreadPoolExecutor(32);
- pipeline: `python -m pipeline run` with default settings (the in-process FnApiRunner);

in two regimes (the server adding no latency, and adding 100 ms to every call), then the pipeline's
peak RSS for one long stereo clip against one 5-second clip, and its wall time at two manifest sizes.
Each client's CPU per clip is its process's user + sys time over the clips it wrote; for the essentials, peer 2
and the pipeline, also after start-up (less the CPU of the same client on one row).

All of it runs in passes (`--pinning`), each with its own servers: pinned (with 2 CPUs or more: the server
and this process on one CPU, each measured client alone on another, by `taskset`) and unpinned (no
affinity set); the memory and scaling runs only in the first pass. The issue's targets are checked on the
pinned pass.

Prints a table and the machine to stdout, progress to stderr, and writes benchmarks/results/latest.json
(child logs go to benchmarks/results/logs/).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LOGS = os.path.join(RESULTS, "logs")
PY = sys.executable
PHASES = ("limit", "essentials", "peer1", "peer2", "pipeline", "rss", "scale")
THROUGHPUT_PHASES = PHASES[:5]
PEER_THREADS = 32
ESSENTIAL_THREADS = 64  # as many as the pipeline's streams (--max_in_flight)
MIB = 1024 * 1024
_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- child processes ---------------------------------------------------------------------------------------
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
    output: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_pct(self) -> float:
        return 100 * (self.user_s + self.sys_s) / self.wall_s

    @property
    def server_cpu_pct(self) -> float:
        return 100 * self.server_cpu_s / self.wall_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(cpu_pct=round(self.cpu_pct, 1), server_cpu_pct=round(self.server_cpu_pct, 1))
        for k in ("wall_s", "user_s", "sys_s", "max_rss_mib", "server_cpu_s"):
            d[k] = round(d[k], 3)
        return d


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a running process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(
    name: str,
    cmd: list[str],
    server: Server | None,
    env: dict[str, str] | None = None,
    cwd: str = ROOT,
    prefix: tuple[str, ...] = (),
) -> Child:
    """Run `cmd` from `cwd` (the repository root) through the measure.py trampoline (see there why), the
    trampoline under `prefix` (`taskset -c N`: the trampoline and the child it spawns on core N);
    stdout and stderr go to logs/{name}.out / .err."""
    measured = os.path.join(LOGS, f"{name}.measure.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(measured)
    server_cpu = server.cpu_s() if server else 0.0
    with open(os.path.join(LOGS, f"{name}.out"), "wb") as out, open(os.path.join(LOGS, f"{name}.err"), "wb") as err:
        started = time.monotonic()
        trampoline = [*prefix, PY, os.path.join(ROOT, "benchmarks", "measure.py"), measured, "--", *cmd]
        subprocess.run(trampoline, stdout=out, stderr=err, cwd=cwd, env={**os.environ, **(env or {})})
        wall = time.monotonic() - started
    try:
        with open(measured, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError):  # the trampoline itself failed
        m = {"rc": -1, "wall_s": wall, "user_s": 0.0, "sys_s": 0.0, "max_rss_kib": 0}
    child = Child(
        name=name,
        rc=m["rc"],
        wall_s=m["wall_s"],
        user_s=m["user_s"],
        sys_s=m["sys_s"],
        max_rss_mib=m["max_rss_kib"] / 1024,  # KiB on Linux
        server_cpu_s=(server.cpu_s() - server_cpu) if server else 0.0,
    )
    with open(os.path.join(LOGS, f"{name}.out"), encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.startswith("{")]
    if lines:
        with contextlib.suppress(json.JSONDecodeError):
            child.output = json.loads(lines[-1])
    if child.rc != 0:
        with open(os.path.join(LOGS, f"{name}.err"), encoding="utf-8", errors="replace") as f:
            tail = f.read().splitlines()[-15:]
        progress(f"{name}: FAILED with exit code {child.rc}; stderr ends:\n    " + "\n    ".join(tail))
    return child


class Server:
    """`python -m pipeline serve` as a child process on a free loopback port."""

    def __init__(self, store: str, latency_ms: float, prefix: tuple[str, ...] = (), name: str = "server"):
        self.latency_ms = latency_ms
        self._err = open(os.path.join(LOGS, f"{name}-{latency_ms:g}ms.err"), "wb")  # noqa: SIM115
        cmd = [*prefix, PY, "-m", "pipeline", "serve", "--store", store, "--port", "0", f"--latency_ms={latency_ms:g}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._err, cwd=ROOT, text=True)
        line = self.proc.stdout.readline()
        if " on http://" not in line:
            self.stop()
            raise RuntimeError(f"the server did not start (see {self._err.name}): {line!r}")
        self.address = line.strip().rsplit(" on ", 1)[1]  # http://127.0.0.1:PORT
        self.target = self.address.removeprefix("http://")

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def warm_up(self, object_ids: list[str]) -> None:
        """One short call per object: the server's file index and descriptions, and the page cache."""
        import grpc

        from pipeline.wire import speech_service_pb2 as pb
        from pipeline.wire import speech_service_pb2_grpc as pb_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.SpeechServiceStub(channel)
            for object_id in object_ids:
                request = pb.GetAudioRequest(object_id=object_id)
                request.time_segment.start_ms, request.time_segment.duration_ms = 0, 10
                for _ in stub.GetAudio(request, timeout=30):
                    pass

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM, not SIGINT: a process started in the background by a shell ignores SIGINT, and so
            # would the server it starts.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._err.close()


# -- pinning -------------------------------------------------------------------------------------------------
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
        return () if self.client_cpu is None else ("taskset", "-c", str(self.client_cpu))

    def server_prefix(self) -> tuple[str, ...]:
        return () if self.server_cpu is None else ("taskset", "-c", str(self.server_cpu))

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
def on_cpu(cpu: int | None):
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


# -- the measurements ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: str, passes: list[Pass]):
        self.args = args
        self.work = work
        self.store = os.path.join(work, "store")
        self.passes = passes
        self.pass_ = Pass("unpinned")  # the pass running
        self.results: dict[str, Any] = {}

    def child(self, name: str, cmd: list[str], server: Server, env: dict[str, str] | None = None) -> Child:
        """A measured client in the pass running: pinned as the pass says, its logs named for the pass."""
        return run_child(f"{self.pass_.name}-{name}", cmd, server, env, prefix=self.pass_.client_prefix())

    def manifest(self, name: str, table) -> str:
        return data.write_manifest(os.path.join(self.work, f"{name}.parquet"), table)

    def clips_manifest(self, rows: int) -> str:
        path = os.path.join(self.work, f"clips-{rows}.parquet")
        if not os.path.exists(path):
            data.write_manifest(path, data.clip_rows(rows, self.args.objects, self.args.object_s))
        return path

    def scratch(self, name: str) -> str:
        path = os.path.join(self.work, "out", name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    # -- one regime of the throughput phases ---------------------------------------------------------------
    def regime(self, server: Server, phases: list[str]) -> dict[str, Any]:
        a, lat = self.args, server.latency_ms
        tag = f"{lat:g}ms"
        manifest = self.clips_manifest(a.rows)
        out: dict[str, Any] = {"latency_ms": lat, "rows": a.rows}
        if "limit" in phases:
            levels = {}
            for c in a.limit_levels:
                child = self.child(
                    f"limit-{tag}-c{c}",
                    [PY, "-m", "benchmarks.limit", "--host", server.target, "--manifest", manifest, "-c", str(c)],
                    server,
                )
                levels[c] = self._rate(child, a.rows, f"limit c={c}", tag)
            best = max(levels, key=lambda c: levels[c]["clips_per_s"])
            out["limit"] = {"best_concurrency": best, **levels[best], "levels": levels}
        if "essentials" in phases:

            def essentials(manifest: str, dest: str, name: str, rows: int) -> Child:
                cmd = [PY, "-m", "benchmarks.essentials", "--host", server.target, "--manifest", manifest]
                cmd += ["--output", dest, "-c", str(ESSENTIAL_THREADS), "--rows", str(rows)]
                return self.child(name, cmd, server)

            out["essentials"] = self._client("essentials", tag, essentials, a.rows, "clips", marginal=True)
        for phase, threads in (("peer1", 1), ("peer2", PEER_THREADS)):
            if phase not in phases:
                continue

            def peer(manifest: str, dest: str, name: str, rows: int, threads: int = threads) -> Child:
                cmd = [PY, "-m", "benchmarks.peer", "--manifest", manifest, "--output", dest]
                cmd += ["--threads", str(threads), "--rows", str(rows)]
                return self.child(name, cmd, server, {"SONIOX_API_HOST": server.address, "SONIOX_API_KEY": "bench"})

            rows = a.rows if (phase == "peer2" or lat == 0) else min(a.rows, a.peer1_rows)
            out[phase] = self._client(phase, tag, peer, rows, "", marginal=phase == "peer2")
        if "pipeline" in phases:

            def pipeline(manifest: str, dest: str, name: str, rows: int) -> Child:
                return self.pipeline(name, manifest, dest, server)  # every row of the manifest

            out["pipeline"] = self._client("pipeline", tag, pipeline, a.rows, "clips", marginal=True)
        return out

    def _client(self, phase: str, tag: str, start, rows: int, clips_dir: str, marginal: bool) -> dict[str, Any]:
        """One client over `rows` rows (`start(manifest, dest, child name, rows)` runs it): its rate and CPU, its
        clips checked (under `dest/clips_dir`) and removed; with `marginal`, run again on a one-row manifest,
        whose CPU taken out gives the CPU per clip after start-up."""
        dest = self.scratch(f"{phase}-{tag}")
        m = self._rate(start(self.clips_manifest(self.args.rows), dest, f"{phase}-{tag}", rows), rows, phase, tag)
        m["check"] = check_clips(os.path.join(dest, clips_dir), rows)
        shutil.rmtree(dest, ignore_errors=True)
        if marginal:
            dest = self.scratch(f"{phase}-{tag}-one-row")
            _add_marginal(m, start(self.clips_manifest(1), dest, f"{phase}-{tag}-one-row", 1))
            shutil.rmtree(dest, ignore_errors=True)
        return m

    def pipeline(self, name: str, manifest: str, dest: str, server: Server) -> Child:
        cmd = [PY, "-m", "pipeline", "run", "--manifest", manifest, "--output", dest, "--api_host", server.address]
        cmd += self.args.pipeline_args
        child = self.child(name, cmd, server)
        with contextlib.suppress(OSError, json.JSONDecodeError), open(os.path.join(dest, "_RUN.json")) as f:
            record = json.load(f)
            child.output = {
                "clips": record.get("clips_written", 0),
                "errors": record.get("errors", 0),
                "bytes": record.get("bytes", 0),
                "seconds": record.get("wall_seconds"),  # inside the process, from graph construction
            }
        return child

    def _rate(self, child: Child, rows: int, label: str, tag: str) -> dict[str, Any]:
        clips = child.output.get("clips", 0) if child.rc == 0 else 0
        errors = child.output.get("errors", 0) if child.rc == 0 else rows
        rate = clips / child.wall_s
        cpu_ms = cpu_ms_per_clip(child, clips)
        progress(
            f"{self.pass_.name:<8} {tag:>6} {label:<12} {clips:>6} clips, {errors} errors in {child.wall_s:6.1f} s "
            f"= {rate:7.1f} clips/s, {cpu_ms or 0:.2f} CPU ms/clip  (cpu {child.cpu_pct:3.0f}%, "
            f"server cpu {child.server_cpu_pct:3.0f}%, rss {child.max_rss_mib:.0f} MiB)"
        )
        return {
            "rows": rows,
            "clips": clips,
            "errors": errors,
            "clips_per_s": round(rate, 2),
            "cpu_ms_per_clip": cpu_ms,
            **child.as_dict(),
        }

    # -- memory and scaling ---------------------------------------------------------------------------------
    def rss(self, server: Server) -> dict[str, Any]:
        out = {}
        for name, object_id, duration_ms in (
            ("one_5s_clip", data.mono_ids(1)[0], data.CLIP_MS),
            ("one_long_stereo_clip", data.LONG_OBJECT, self.args.long_s * 1000),
        ):
            manifest = self.manifest(name, data.single_row(object_id, 0, duration_ms, name))
            dest = self.scratch(name)
            child = self.pipeline(f"rss-{name}", manifest, dest, server)
            clip = os.path.join(dest, "clips", f"{name}.wav")
            size = os.path.getsize(clip) if os.path.exists(clip) else 0
            complete = size >= duration_ms * 16 * 2 * (2 if object_id == data.LONG_OBJECT else 1)
            out[name] = {"duration_ms": duration_ms, "file_bytes": size, "complete": complete, **child.as_dict()}
            progress(
                f"{self.pass_.name} rss: {name}: peak RSS {child.max_rss_mib:.1f} MiB, {size / MIB:.1f} MiB written "
                f"in {child.wall_s:.1f} s (rc {child.rc})"
            )
            shutil.rmtree(dest, ignore_errors=True)
        return out

    def scale(self, server: Server) -> dict[str, Any]:
        out = {}
        for rows in self.args.scale_rows:
            dest = self.scratch(f"scale-{rows}")
            child = self.pipeline(f"scale-{rows}", self.clips_manifest(rows), dest, server)
            out[str(rows)] = self._rate(child, rows, f"{rows} rows", "scale")
            out[str(rows)]["check"] = check_clips(os.path.join(dest, "clips"), rows)
            shutil.rmtree(dest, ignore_errors=True)
        return out

    def run(self) -> dict[str, Any]:
        a = self.args
        progress(
            f"store: {a.objects} mono objects of {a.object_s} s" + (f", one {a.long_s} s stereo" * ("rss" in a.phases))
        )
        data.write_store(self.store, a.objects, a.object_s, a.long_s if "rss" in a.phases else 0)
        for i, pass_ in enumerate(self.passes):
            self.pass_ = pass_
            progress(f"pass {pass_.describe()}")
            with on_cpu(pass_.server_cpu):
                cpus = {"client_cpu": pass_.client_cpu, "server_cpu": pass_.server_cpu}
                self.results[pass_.name] = {**cpus, **self.run_pass(first=i == 0)}
        return self.results

    def run_pass(self, first: bool) -> dict[str, Any]:
        """The throughput regimes, each against its own server; the memory and scaling runs in the first pass
        only (they have no peer to compare with, and their targets are the same in either pass)."""
        a, out = self.args, {}
        throughput = [p for p in a.phases if p in THROUGHPUT_PHASES]
        extra = {"rss", "scale"} & set(a.phases) if first else set()
        for lat in a.latencies_ms:
            if not (throughput or (lat == 0 and extra)):
                continue
            server = Server(self.store, lat, self.pass_.server_prefix(), f"{self.pass_.name}-server")
            try:
                server.warm_up(data.mono_ids(a.objects))
                progress(f"{self.pass_.name}: server {server.address}, {lat:g} ms added latency")
                if throughput:
                    out[f"regime_{lat:g}ms"] = self.regime(server, throughput)
                if lat == 0 and "rss" in extra:
                    out["rss"] = self.rss(server)
                if lat == 0 and "scale" in extra:
                    out["scale"] = self.scale(server)
            finally:
                server.stop()
        return out


def _add_marginal(m: dict[str, Any], one_row: Child) -> None:
    """The CPU per clip after start-up, from the same client run on one row: (CPU of the run - CPU of the
    one-row run) / (clips - 1), what a clip costs a worker that is already running."""
    if one_row.rc != 0 or one_row.output.get("clips") != 1:  # a failed run's CPU would make a figure
        progress(f"{one_row.name}: the one-row run gave no clip; no CPU per clip after start-up")
        return
    m["one_row_cpu_s"] = round(one_row.user_s + one_row.sys_s, 3)
    if m["clips"] > 1:
        cpu_ms = (m["user_s"] + m["sys_s"] - m["one_row_cpu_s"]) * 1000
        m["marginal_cpu_ms_per_clip"] = round(cpu_ms / (m["clips"] - 1), 3)


def cpu_ms_per_clip(child: Child, clips: int) -> float | None:
    """The client process's own CPU (user + sys, start-up included) per clip it wrote, in ms."""
    return round((child.user_s + child.sys_s) * 1000 / clips, 3) if clips else None


def check_clips(folder: str, expected: int) -> dict[str, Any]:
    """The clip files there, and the first one's shape (5 s mono at 16 kHz)."""
    import soundfile as sf

    names = sorted(n for n in os.listdir(folder) if n.endswith(".wav")) if os.path.isdir(folder) else []
    check: dict[str, Any] = {"files": len(names), "expected": expected}
    if names:
        info = sf.info(os.path.join(folder, names[0]))
        check.update(first=names[0], frames=info.frames, channels=info.channels, rate=info.samplerate)
    check["ok"] = len(names) == expected and check.get("frames") == data.CLIP_MS * 16
    return check


# -- the report ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
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
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "beam": apache_beam.__version__,
        "grpcio": grpc.__version__,
        "soniox_sdk": soniox,
        "platform": platform.platform(),
    }


def _fmt_rate(m: dict[str, Any] | None) -> str:
    return f"{m['clips_per_s']:.1f} clips/s" if m else "-"


def _fmt_cpu(m: dict[str, Any] | None) -> str:
    return f"{m['cpu_ms_per_clip']:.2f}" if m and m.get("cpu_ms_per_clip") is not None else "-"


def _checked(m: dict[str, Any]) -> bool:
    """The run's clips were all there and whole (a run with no check, such as the limit's, passes)."""
    return m.get("check", {}).get("ok", True)


def _ok(value: float | None, target: str, *runs: dict[str, Any]) -> str:
    """yes or NO against `target`; FAIL when a run behind the value did not write every clip whole."""
    if not all(_checked(m) for m in runs):
        return "FAIL"
    if value is None:
        return "-"
    op, number = target.split()
    good = {">=": value >= float(number), "<=": value <= float(number), "<": value < float(number)}[op]
    return "yes" if good else "NO"


def _client_rows(r: dict[str, Any], tag: str) -> list[list[str]]:
    """One row per client of a latency regime: its clips/s and its CPU ms per clip."""
    rows: list[list[str]] = []
    for key, name in NAMES.items():
        m = r.get(key)
        if not m:
            continue
        label = f"{name}, {tag}"
        if key == "limit":
            levels = "/".join(str(c) for c in m["levels"])
            label += f" (best of c={levels}: c={m['best_concurrency']})"
        elif key == "pipeline":
            label += " (wall incl. start-up)"
        if m["rows"] != r["rows"]:
            label += f" [{m['rows']} of {r['rows']} rows; rates comparable]"
        problems = ([f"{m['errors']} errors"] if m["errors"] else []) + ([] if _checked(m) else ["clips check failed"])
        rows.append([label, _fmt_rate(m), _fmt_cpu(m), "", "", "", "; ".join(problems)])
    return rows


def _ratio_rows(r: dict[str, Any], lat: float, tag: str, targets: bool) -> list[list[str]]:
    """The pipeline against each baseline: clips/s, then CPU per clip against peer 2's (with the issue's
    targets if `targets`) and the essentials'."""
    p, rows = r["pipeline"], []
    for key in ("limit", "peer2", "peer1"):
        b = r.get(key)
        if not b:
            continue
        ratio = p["clips_per_s"] / b["clips_per_s"] if b["clips_per_s"] else None
        target = TARGETS.get(int(lat), {}).get(key, "") if targets else ""
        ok = _ok(ratio, target, p, b) if target else ""
        ratio_s = f"{ratio:.2f}" if ratio is not None else "-"
        rows.append([f"pipeline / {NAMES[key]}, {tag}", _fmt_rate(p), "", _fmt_rate(b), ratio_s, target, ok])
    rows += _cpu_rows(p, r.get("peer2"), "peer2", tag, targets)
    rows += _cpu_rows(p, r.get("essentials"), "essentials", tag, False)
    return rows


def _cpu_rows(p: dict[str, Any], b: dict[str, Any] | None, key: str, tag: str, targets: bool) -> list[list[str]]:
    """The pipeline's CPU per clip against a baseline's, with start-up and after it."""
    if not b:
        return []
    mine, theirs = p.get("cpu_ms_per_clip"), b.get("cpu_ms_per_clip")
    ratio = mine / theirs if mine is not None and theirs else None
    label = f"CPU per clip, pipeline / {NAMES[key]}, {tag}"
    ratio_s = f"{ratio:.2f}" if ratio is not None else "-"
    target, ok = (CPU_TARGET, _ok(ratio, CPU_TARGET, p, b)) if targets else ("", "")
    rows = [[label, f"{_fmt_cpu(p)} ms", "", f"{_fmt_cpu(b)} ms", ratio_s, target, ok]]
    mine, theirs = p.get("marginal_cpu_ms_per_clip"), b.get("marginal_cpu_ms_per_clip")
    if mine is not None and theirs:
        label = f"CPU per clip after start-up (less a one-row run), pipeline / {NAMES[key]}, {tag}"
        rows.append([label, f"{mine:.2f} ms", "", f"{theirs:.2f} ms", f"{mine / theirs:.2f}", "", ""])
    return rows


def _regime_rows(r: dict[str, Any], lat: float, targets: bool) -> list[list[str]]:
    """The rows of one latency regime: each client, then the pipeline against each baseline."""
    tag = f"{lat:g} ms latency"
    rows = _client_rows(r, tag)
    if r.get("pipeline"):
        rows += _ratio_rows(r, lat, tag, targets)
    return rows


NAMES = {
    "limit": "limit",
    "essentials": f"essentials (fetch, hash, write; {ESSENTIAL_THREADS} threads)",
    "peer1": "peer 1 (SDK sequential)",
    "peer2": f"peer 2 ({PEER_THREADS}-thread pool)",
    "pipeline": "pipeline",
}
TARGETS = {0: {"limit": ">= 0.7"}, 100: {"peer2": ">= 1.5", "peer1": ">= 50"}}
CPU_TARGET = "<= 1.0"  # the pipeline's CPU per clip at most peer 2's (issue 11), in every regime
HEADER = ["pass", "measurement", "value", "CPU ms/clip", "baseline", "ratio", "target", "ok"]


def _rss_rows(rss: dict[str, Any]) -> list[list[str]]:
    base, long = rss["one_5s_clip"], rss["one_long_stereo_clip"]
    delta = long["max_rss_mib"] - base["max_rss_mib"]
    hours = long["duration_ms"] / 3_600_000
    ok = _ok(delta, "< 64") if long["complete"] and base["complete"] else "FAIL"
    return [
        [
            f"peak RSS, pipeline, one {hours:g} h stereo clip ({long['file_bytes'] / MIB:.0f} MiB)",
            f"{long['max_rss_mib']:.1f} MiB",
            "",
            f"{base['max_rss_mib']:.1f} MiB (one 5 s clip)",
            f"{delta:+.1f} MiB",
            "< +64 MiB",
            ok,
        ],
        [
            "pipeline wall time, one 5 s clip (~ start-up + teardown)",
            f"{base['wall_s']:.2f} s",
            f"{(base['user_s'] + base['sys_s']) * 1000:.0f}",
            "",
            "",
            "",
            "",
        ],
    ]


def _scale_rows(sc: dict[str, Any], base: dict[str, Any] | None, scale_rows: list[int]) -> list[list[str]]:
    small, big = (sc[str(n)] for n in scale_rows)
    n_small, n_big = scale_rows
    ratio = big["wall_s"] / small["wall_s"]
    ok = _ok(ratio, "<= 12") if big["errors"] == 0 and small["errors"] == 0 else "FAIL"
    return [
        [
            f"peak RSS, pipeline, {n_big:,}-row run",
            f"{big['max_rss_mib']:.1f} MiB",
            "",
            f"{base['max_rss_mib']:.1f} MiB (one 5 s clip)" if base else "-",
            f"{big['max_rss_mib'] - base['max_rss_mib']:+.1f} MiB" if base else "-",
            "",
            "",
        ],
        [
            f"wall time, pipeline, {n_big:,} rows",
            f"{big['wall_s']:.1f} s ({_fmt_rate(big)})",
            _fmt_cpu(big),
            f"{small['wall_s']:.1f} s ({n_small:,} rows)",
            f"{ratio:.2f}",
            "<= 12",
            ok,
        ],
    ]


def table_rows(results: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    """Each pass's rows, the pass first; the issue's throughput and CPU targets on the pinned pass (on the
    unpinned one when it ran alone)."""
    checked = "pinned" if "pinned" in results else next(iter(results), None)
    rows: list[list[str]] = []
    for name, r in results.items():
        rows += [[name, *row] for row in _pass_rows(r, args, targets=name == checked)]
    return rows


def _pass_rows(results: dict[str, Any], args: argparse.Namespace, targets: bool) -> list[list[str]]:
    rows: list[list[str]] = []
    for lat in args.latencies_ms:
        r = results.get(f"regime_{lat:g}ms")
        if r:
            rows += _regime_rows(r, lat, targets)
    rss = results.get("rss")
    if rss:
        rows += _rss_rows(rss)
    if results.get("scale"):
        rows += _scale_rows(results["scale"], rss["one_5s_clip"] if rss else None, args.scale_rows)
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    return "\n".join(lines)


def _detail_items(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, measurement) of every child process of every pass, the pass first in the name."""
    return [(f"{name} {child}", m) for name, r in results.items() for child, m in _pass_items(r)]


def _pass_items(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    items = []
    for key, r in results.items():
        if key.startswith("regime_"):
            for phase in THROUGHPUT_PHASES:
                if phase == "limit" and phase in r:
                    items += [(f"limit c={c} {r['latency_ms']:g}ms", m) for c, m in r["limit"]["levels"].items()]
                elif phase in r:
                    items.append((f"{phase} {r['latency_ms']:g}ms", r[phase]))
        elif key == "rss":
            items += [(f"pipeline {name}", m) for name, m in r.items()]
        elif key == "scale":
            items += [(f"pipeline {n} rows", m) for n, m in r.items()]
    return items


def detail_lines(results: dict[str, Any]) -> list[str]:
    """Where the time goes: each child's wall time (and the part after its imports, as it reports it),
    its CPU (user, system, per clip, share of one core), the server's CPU share and the child's peak RSS."""
    items = _detail_items(results)
    width = max([len("child process"), *(len(name) for name, _ in items)])
    head = f"{'child process':<{width}} {'wall s':>7} {'in-proc s':>9} {'clips/s':>8} {'user s':>7} {'sys s':>6}"
    lines = [f"{head} {'CPU ms/clip':>11} {'cpu%':>5} {'server cpu%':>11} {'peak RSS MiB':>12}"]
    for name, m in items:
        rate = f"{m['clips_per_s']:8.1f}" if "clips_per_s" in m else f"{'-':>8}"
        inproc = m.get("output", {}).get("seconds")
        inproc = f"{inproc:9.2f}" if isinstance(inproc, (int, float)) else f"{'-':>9}"
        lines.append(
            f"{name:<{width}} {m['wall_s']:7.2f} {inproc} {rate} {m['user_s']:7.2f} {m['sys_s']:6.2f} "
            f"{_fmt_cpu(m):>11} {m['cpu_pct']:5.0f} {m['server_cpu_pct']:11.0f} {m['max_rss_mib']:12.1f}"
        )
    return lines


# -- command line ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="5-second clips per throughput run (default 5000)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 500 rows, smaller subsets (~1-2 minutes)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--latencies_ms", default="0,100", help="server latency regimes, comma-separated")
    p.add_argument(
        "--pinning",
        default=",".join(PINNINGS),
        help="passes, in order, each with its own servers: pinned (server on one CPU, each client alone on "
        "another, by taskset; skipped with 1 CPU) and/or unpinned (default: both; memory and scaling runs in the "
        "first only)",
    )
    p.add_argument("--limit_levels", default="8,32,64", help="concurrency levels of the limit client")
    p.add_argument("--peer1_rows", type=int, default=None, help="rows of peer 1 under added latency (default 200)")
    p.add_argument("--scale_rows", default=None, help="two manifest sizes for the scaling run (default 1000,10000)")
    p.add_argument("--objects", type=int, default=20, help="mono objects in the store")
    p.add_argument("--object_s", type=int, default=60, help="seconds per mono object")
    p.add_argument("--long_s", type=int, default=3600, help="seconds of the long stereo object")
    p.add_argument("--pipeline_args", default="", help="extra flags for every pipeline run (default: none)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store and outputs")
    p.add_argument("--json", default=os.path.join(RESULTS, "latest.json"), help="where to write the results")
    a = p.parse_args(argv)
    a.rows = a.rows or (500 if a.quick else 5000)
    a.peer1_rows = a.peer1_rows or (50 if a.quick else 200)
    a.scale_rows = [int(n) for n in (a.scale_rows or ("100,1000" if a.quick else "1000,10000")).split(",")]
    if len(a.scale_rows) != 2:
        p.error("--scale_rows takes two sizes")
    a.phases = [s.strip() for s in a.phases.split(",") if s.strip()]
    unknown = set(a.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {sorted(unknown)}; choose from {','.join(PHASES)}")
    a.pinning = [s.strip() for s in a.pinning.split(",") if s.strip()]
    if not a.pinning or set(a.pinning) - set(PINNINGS) or len(set(a.pinning)) != len(a.pinning):
        p.error(f"--pinning takes one or both of {','.join(PINNINGS)}")
    a.pipeline_args = shlex.split(a.pipeline_args)
    a.latencies_ms = [float(x) for x in a.latencies_ms.split(",")]
    a.limit_levels = [int(x) for x in a.limit_levels.split(",")]
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    progress(f"machine: {info['nproc']} CPUs ({info['cpu_model']}), python {info['python']}, beam {info['beam']}")
    passes, notes = plan_passes(args.pinning)
    for note in notes:
        progress(note)
    if not passes:
        sys.exit("no pass to run: " + "; ".join(notes))
    shutil.rmtree(LOGS, ignore_errors=True)
    os.makedirs(LOGS)
    work = tempfile.mkdtemp(prefix="soniox-bench-")
    started = time.monotonic()
    try:
        results = Bench(args, work, passes).run()
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rows = table_rows(results, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "keep")}
    report = {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": round(time.monotonic() - started, 1),
        "machine": info,
        "settings": settings,
        "passes": [p.describe() for p in passes],
        "notes": notes,
        "table": [dict(zip(HEADER, r, strict=True)) for r in rows],
        "results": results,
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, {info['memory_gib']} GiB; python {info['python']}, "
        f"apache-beam {info['beam']}, grpcio {info['grpcio']}, soniox SDK {info['soniox_sdk']}"
    )
    print(
        f"{args.rows} rows of 5 s mono clips over {args.objects} objects of {args.object_s} s; "
        f"server: `python -m pipeline serve` in its own process; rates = clips / child wall time (start-up included); "
        f"CPU ms/clip = (user + sys of the client's process) x 1000 / clips"
    )
    for line in [*(p.describe() for p in passes), *notes]:
        print(f"- {line}")
    print()
    print(format_table(rows))
    print()
    print("\n".join(detail_lines(results)))
    print()
    print(f"total {report['total_seconds']:.0f} s; results in {os.path.relpath(args.json, ROOT)}")


if __name__ == "__main__":
    main()
