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
(child logs go to benchmarks/results/logs/). This module is the command line; the measurements are in
benchmarks/throughput.py, the child processes and pinning in benchmarks/harness.py, the results' types in
benchmarks/results.py, the table in benchmarks/report.py and the targets in benchmarks/targets.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, fields

from benchmarks.harness import PINNINGS, RESULTS, ROOT, fresh_logs, plan_passes, progress
from benchmarks.report import HEADER, detail_lines, format_table, table_rows
from benchmarks.results import Machine
from benchmarks.throughput import PHASES, Bench, Settings


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


def settings_of(args: argparse.Namespace) -> Settings:
    """What to measure: every option but where the results go and whether the work folder is kept."""
    return Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_of(args)
    info = Machine.here()
    progress(f"machine: {info.nproc} CPUs ({info.cpu_model}), python {info.python}, beam {info.beam}")
    passes, notes = plan_passes(settings.pinning)
    for note in notes:
        progress(note)
    if not passes:
        sys.exit("no pass to run: " + "; ".join(notes))
    fresh_logs()
    work = tempfile.mkdtemp(prefix="soniox-bench-")
    started = time.monotonic()
    try:
        results = Bench(settings, work, passes).run()
    finally:
        if args.keep:
            progress(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rows = table_rows(results)
    total_s = round(time.monotonic() - started, 1)
    report = {
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_seconds": total_s,
        "machine": asdict(info),
        "settings": asdict(settings),
        "passes": [p.describe() for p in passes],
        "notes": notes,
        "table": [dict(zip(HEADER, r, strict=True)) for r in rows],
        "results": {result.name: result.as_dict() for result in results},
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(
        f"machine: {info.nproc} CPUs, {info.cpu_model}, {info.memory_gib} GiB; python {info.python}, "
        f"apache-beam {info.beam}, grpcio {info.grpcio}, soniox SDK {info.soniox_sdk}"
    )
    print(
        f"{settings.rows} rows of 5 s mono clips over {settings.objects} objects of {settings.object_s} s; "
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
    print(f"total {total_s:.0f} s; results in {os.path.relpath(args.json, ROOT)}")


if __name__ == "__main__":
    main()
