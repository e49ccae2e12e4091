"""`python -m benchmarks.layouts`: the same first run into each layout, at `--rows` one-second clips (100,000 by
default), one after another in one go.

Each run is `python -m pipeline run` pinned to CPU 0 against the local GetAudio server (`python -m pipeline
serve`) pinned to CPU 1, into a new output, with the sharded layouts sized by their default `--shard_mb`. The table
gives, per layout: wall time, clips/s, the run's CPU (user + sys) and CPU per clip, its ratio to the `files`
layout's (the baseline of the same go), peak RSS, the files the layout wrote, clips per file, and the shards' sizes
(smallest and largest) against the target. Each output is removed before the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import LOGS, PY, progress, run_child, taskset
from benchmarks.server import Server
from pipeline.dataset.layout import FILES, LAYOUTS, LHOTSE_SHAR, record_path, shards_dir
from pipeline.dataset.record import RunRecord
from pipeline.launch.sizing import DEFAULT_SHARD_MB, SHARD_MB
from pipeline.local.samples import write_sample_store

WORK = "/tmp/bench-layouts"
RUN_CPU, SERVER_CPU = 0, 1
OBJECT_ID, OBJECT_MS, CLIP_MS = "demo-mono", 12_000, 1000


@dataclass(frozen=True)
class Build:
    """One measured first run into one layout."""

    layout: str
    rows: int
    rc: int
    clips: int  # from _RUN.json
    wall_s: float
    cpu_s: float
    max_rss_mib: float
    files: int  # what the layout wrote under its folder
    smallest_mb: float
    largest_mb: float

    @property
    def cpu_ms_per_clip(self) -> float:
        return 1000 * self.cpu_s / max(self.clips, 1)

    @property
    def target_mb(self) -> float | None:
        return None if self.layout in (FILES, LHOTSE_SHAR) else SHARD_MB.get(self.layout, DEFAULT_SHARD_MB)


def manifest(path: str, rows: int) -> str:
    """`rows` one-second time ranges over one 12 s mono object."""
    starts = [(i * 977) % (OBJECT_MS - CLIP_MS) for i in range(rows)]
    table = pa.table(
        {
            "clip_id": [f"c{i:07d}" for i in range(rows)],
            "object_id": [OBJECT_ID] * rows,
            "start_ms": pa.array(starts, pa.int32()),
            "duration_ms": pa.array([CLIP_MS] * rows, pa.int32()),
        }
    )
    pq.write_table(table, path)
    return path


def build(server: Server, manifest_path: str, layout: str, rows: int) -> Build:
    output = os.path.join(WORK, f"out-{layout}")
    shutil.rmtree(output, ignore_errors=True)
    cmd = [
        *(PY, "-m", "pipeline", "run", f"--manifest={manifest_path}", f"--output={output}"),
        *(f"--api_host={server.address}", f"--layout={layout}"),
    ]
    progress(f"{layout}: {rows:,} clips")
    child = run_child(f"layout-{layout}-{rows}", cmd, server, {"SONIOX_API_KEY": "any"}, prefix=taskset(RUN_CPU))
    try:
        with open(record_path(output), "rb") as f:
            clips = RunRecord.from_bytes(f.read()).clips
    except FileNotFoundError:
        clips = 0
    folder = os.path.join(output, shards_dir(layout))
    sizes = [os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)] if clips else [0]
    shutil.rmtree(output, ignore_errors=True)
    return Build(
        layout, rows, child.rc, clips, child.wall_s, child.user_s + child.sys_s, child.max_rss_mib, len(sizes),
        min(sizes) / 1e6, max(sizes) / 1e6,
    )  # fmt: skip


def table(builds: list[Build]) -> list[str]:
    base = next((b for b in builds if b.layout == FILES), None)
    head = "| layout | clips | wall s | clips/s | CPU s | CPU ms/clip | x files | peak RSS MiB | files | clips/file "
    head += "| shard MB min-max | target MB |"
    lines = [head, "|" + "---|" * 12]
    for b in builds:
        ratio = f"{b.cpu_ms_per_clip / base.cpu_ms_per_clip:.2f}" if base and b.clips else "-"
        sizes = f"{b.smallest_mb:,.0f}-{b.largest_mb:,.0f}" if b.target_mb else "-"
        lines.append(
            f"| {b.layout} | {b.clips:,} | {b.wall_s:.1f} | {b.clips / b.wall_s:,.0f} | {b.cpu_s:.1f} | "
            f"{b.cpu_ms_per_clip:.3f} | {ratio} | {b.max_rss_mib:,.0f} | {b.files:,} | "
            f"{b.clips / max(b.files, 1):,.0f} | {sizes} | {b.target_mb or '-'} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layouts", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="one-second clips per run (default 100,000)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(LOGS, exist_ok=True)
    store = os.path.dirname(next(iter(write_sample_store(os.path.join(WORK, "store")).values())))
    manifest_path = manifest(os.path.join(WORK, "manifest.parquet"), args.rows)
    server = Server(store, 0.0, prefix=taskset(SERVER_CPU), name="layouts-server")
    try:
        server.warm_up([OBJECT_ID])
        builds = [build(server, manifest_path, layout, args.rows) for layout in args.layouts.split(",")]
    finally:
        server.stop()
    print("\n".join(table(builds)))
    with open(os.path.join(LOGS, "..", "layouts.json"), "w", encoding="utf-8") as f:
        json.dump([vars(b) for b in builds], f, indent=2)


if __name__ == "__main__":
    main()
