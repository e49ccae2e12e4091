"""`python -m benchmarks.rerun`: a scheduled `--skip_existing` rerun over a local dataset that is already complete.

For each row count it synthesizes the dataset a first run would have left (fetching a million clips through
GetAudio would take hours): the manifest, one small WAV per row under `clips/` with the header the pipeline
writes, the clips table in files of 10,000 rows named for their content, an empty errors table and `_RUN.json`.
Then it runs `python -m pipeline run --skip_existing` over it, pinned to CPU 0, against a local GetAudio server
held in this process, pinned to CPU 1, so that the server's call counts are read directly.

Such a rerun must make no GetAudio call, read no clip and make no request per clip: each clip is decided
from the earlier table rows and one listing of `clips/` (pipeline/graph/reconcile.py). The table gives, per row
count, the wall time, the run's CPU (user + sys, start-up included), CPU per existing clip, peak RSS, the
server's GetAudio calls and the clips the run reported skipped; then the marginal CPU per existing clip
between the smallest and the largest row count, which takes start-up out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.harness import LOGS, PY, ROOT, run_child, taskset
from pipeline.core import tables
from pipeline.core.audio import BYTES_PER_SAMPLE, SAMPLES_PER_MS, wav_header
from pipeline.dataset.layout import clip_name, record_path, table_prefix
from pipeline.dataset.record import RunRecord, now
from pipeline.dataset.storage import open_store
from pipeline.graph.table_files import table_path, write_empty
from pipeline.local.samples import SAMPLES, write_sample_store
from pipeline.local.server import LocalServer

WORK = "/tmp/bench-rerun"
RUN_CPU, SERVER_CPU = 0, 1
OBJECT_ID = "demo-mono"  # a sample object of 12 s: every range below lies inside it
OBJECT_MS = int(SAMPLES[OBJECT_ID][0] * 1000)
CLIP_MS = 10
WARM_UP_ROWS = 100
TABLE_ROWS = 10_000  # rows per clips table file, as the pipeline writes a bundle's rows
# The --skip_existing issue's target (docs/performance.md, "Rerun over an existing dataset"): one more existing clip
# costs a rerun at most 0.1 ms of CPU, start-up taken out (the marginal cost between the smallest and largest runs).
MARGINAL_CPU_MS_TARGET = 0.1


@dataclass(frozen=True)
class Rerun:
    """One measured rerun over a dataset of `rows` clips, all already there."""

    rows: int
    rc: int
    wall_s: float
    cpu_s: float  # user + sys of the run's process and its children
    max_rss_mib: float
    get_audio_calls: int  # counted by the server
    written: int  # from _RUN.json
    skipped: int
    load: str  # the machine's load average just before the run (the synthesis, on the server's CPU, adds 1)
    others_s: float  # CPU time that anything else took on the run's CPU while it ran (0: it was alone)

    @property
    def cpu_ms_per_clip(self) -> float:
        return 1000 * self.cpu_s / self.rows

    @property
    def ok(self) -> bool:
        """What a rerun over a complete dataset must do: succeed, call nothing, write nothing, keep every clip."""
        return self.rc == 0 and self.get_audio_calls == 0 and self.written == 0 and self.skipped == self.rows


def progress(message: str) -> None:
    print(f"[rerun] {message}", file=sys.stderr, flush=True)


# -- the dataset a first run would have left ------------------------------------------------------------------
def manifest_table(rows: int) -> pa.Table:
    """`rows` 10 ms ranges of the mono sample object, each with its own clip_id."""
    return pa.table(
        {
            "clip_id": pa.array([f"c{i:07d}" for i in range(rows)], pa.string()),
            "object_id": pa.array([OBJECT_ID] * rows, pa.string()),
            "start_ms": pa.array([i % 10_000 for i in range(rows)], pa.int64()),
            "duration_ms": pa.array([CLIP_MS] * rows, pa.int64()),
        }
    )


def clip_bytes(start_ms: int) -> bytes:
    """A clip as the pipeline writes it on a local disk: the WAV header with its request and what was served
    in a LIST/INFO comment (pipeline/dataset/clips.py), then silence. The rerun reads none of it, only its size."""
    served = {
        "request": f"{OBJECT_ID}/t{start_ms}+{CLIP_MS}",
        "clip_start_ms": start_ms,
        "clip_duration_ms": CLIP_MS,
        "object_duration_ms": OBJECT_MS,
    }
    frames = CLIP_MS * SAMPLES_PER_MS
    return wav_header(frames, 1, json.dumps(served, separators=(",", ":"))) + bytes(frames * BYTES_PER_SAMPLE)


def write_clips(root: str, manifest: pa.Table) -> tuple[list[int], list[str]]:
    """One file per row under clips/; returns each file's size and sha256, which its table row holds."""
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    sizes, hashes = [], []
    for clip_id, start_ms in zip(manifest["clip_id"].to_pylist(), manifest["start_ms"].to_pylist(), strict=True):
        data = clip_bytes(start_ms)
        fd = os.open(os.path.join(root, clip_name(clip_id)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        sizes.append(len(data))
        hashes.append(hashlib.sha256(data).hexdigest())
    return sizes, hashes


def clips_rows(manifest: pa.Table, sizes: list[int], hashes: list[str]) -> pa.Table:
    """The clips table of a first run that wrote every clip in one attempt (tables.clips_schema's columns)."""
    n = manifest.num_rows
    columns = {
        "clip_id": manifest["clip_id"],
        "object_id": manifest["object_id"],
        "path": [clip_name(c) for c in manifest["clip_id"].to_pylist()],
        "clip_start_ms": manifest["start_ms"],
        "clip_duration_ms": manifest["duration_ms"],
        "object_duration_ms": [OBJECT_MS] * n,
        "num_channels": [1] * n,
        "sample_rate": [16_000] * n,
        "num_samples": [CLIP_MS * SAMPLES_PER_MS] * n,
        "num_bytes": sizes,
        "sha256": hashes,
        "attempts": [1] * n,
        "start_ms": manifest["start_ms"],
        "duration_ms": manifest["duration_ms"],
    }
    return pa.Table.from_pydict(columns, schema=tables.clips_schema(manifest.schema))


def write_tables(root: str, manifest: pa.Table, clips: pa.Table) -> tuple[list[str], list[str]]:
    """The clips table in files of TABLE_ROWS rows and an empty errors table, each file named for its content
    as the pipeline names it; returns the names of the files, relative to the root."""
    store = open_store(root)
    os.makedirs(os.path.dirname(table_prefix(root, "clips")), exist_ok=True)
    clip_files = []
    for start in range(0, clips.num_rows, TABLE_ROWS):
        with store.scratch_file(".parquet") as scratch:  # under the root's _tmp/, removed below
            pq.write_table(clips.slice(start, TABLE_ROWS), scratch.path)
            path = table_path(root, "clips", scratch.path)
            store.put(path, file=scratch)
        clip_files.append(os.path.relpath(path, root))
    errors = write_empty(store, root, "errors", tables.errors_schema(manifest.schema))
    shutil.rmtree(os.path.join(root, "_tmp"), ignore_errors=True)
    return clip_files, [os.path.relpath(errors, root)]


def write_run_record(root: str, manifest_path: str, rows: int, clip_files: list[str], error_files: list[str]) -> None:
    """_RUN.json of the first run: every clip written, no error."""
    record = RunRecord(
        rows=rows,
        clips_written=rows,
        started_at=now(),
        finished_at=now(),
        manifest=[manifest_path],
        clips_table=sorted(clip_files),
        errors_table=error_files,
        options={"clip_format": "wav", "shards": 0, "skip_existing": False},
    )
    with open(record_path(root), "wb") as f:
        f.write(record.to_bytes())


def synthesize(work: str, rows: int) -> tuple[str, str]:
    """The manifest and the dataset of `rows` clips, all current; returns (manifest path, dataset root)."""
    manifest_path, root = os.path.join(work, f"manifest-{rows}.parquet"), os.path.join(work, f"dataset-{rows}")
    shutil.rmtree(root, ignore_errors=True)
    manifest = manifest_table(rows)
    pq.write_table(manifest, manifest_path)
    sizes, hashes = write_clips(root, manifest)
    clip_files, error_files = write_tables(root, manifest, clips_rows(manifest, sizes, hashes))
    write_run_record(root, manifest_path, rows, clip_files, error_files)
    return manifest_path, root


# -- the measured rerun ---------------------------------------------------------------------------------------
def rerun(server: LocalServer, manifest: str, root: str, rows: int) -> Rerun:
    """`python -m pipeline run --skip_existing` over the dataset, alone on RUN_CPU, timed by benchmarks/measure.py
    (wall, CPU and peak RSS of the run's own process); the GetAudio calls are the server's own count."""
    calls_before, load, busy_before = sum(server.calls.values()), load_average(), busy_s(RUN_CPU)
    cmd = [PY, "-m", "pipeline", "run", f"--manifest={manifest}", f"--output={root}", f"--api_host={server.address}"]
    child = run_child(
        f"rerun-{rows}",
        [*cmd, "--skip_existing"],
        None,
        env={"SONIOX_API_KEY": "any"},
        prefix=taskset(RUN_CPU),
    )
    busy = busy_s(RUN_CPU) - busy_before
    try:
        with open(record_path(root), "rb") as f:
            record = RunRecord.from_bytes(f.read())
    except FileNotFoundError:  # a failed run writes none
        record = RunRecord(clips_written=-1, clips_skipped=-1)
    return Rerun(
        rows=rows,
        rc=child.rc,
        wall_s=child.wall_s,
        cpu_s=child.user_s + child.sys_s,
        max_rss_mib=child.max_rss_mib,
        get_audio_calls=sum(server.calls.values()) - calls_before,
        written=record.clips_written,
        skipped=record.clips_skipped,
        load=load,
        others_s=busy - child.user_s - child.sys_s,
    )


def warm_up(server: LocalServer, work: str) -> None:
    """One rerun, not measured, before the others: the first run after a checkout compiles the modules'
    bytecode and reads them from disk, which would count against the smallest row count alone."""
    manifest, root = synthesize(work, WARM_UP_ROWS)
    rerun(server, manifest, root, WARM_UP_ROWS)
    shutil.rmtree(root)
    os.remove(manifest)


def busy_s(cpu: int) -> float:
    """Seconds the CPU has been busy since boot (/proc/stat: all but idle and iowait; steal included)."""
    with open("/proc/stat", encoding="utf-8") as f:
        ticks = next(line.split()[1:] for line in f if line.startswith(f"cpu{cpu} "))
    user, nice, system, _, _, irq, softirq, steal = map(int, ticks[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    """The load average, to show what else ran on the machine during a measurement."""
    with open("/proc/loadavg", encoding="utf-8") as f:
        return " ".join(f.read().split()[:3])


# -- the report -----------------------------------------------------------------------------------------------
def table(results: list[Rerun]) -> list[str]:
    head = "| rows | wall s | CPU s | CPU ms per existing clip | peak RSS MiB | GetAudio calls | clips skipped | ok "
    head += "| load before | others on its CPU, s |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.rows:,} | {r.wall_s:.1f} | {r.cpu_s:.1f} | {r.cpu_ms_per_clip:.3f} | {r.max_rss_mib:,.0f} | "
            f"{r.get_audio_calls} | {r.skipped:,} | {'yes' if r.ok else 'NO'} | {r.load} | {r.others_s:.1f} |"
        )
    return lines


def marginal(results: list[Rerun]) -> str:
    """CPU per existing clip between the smallest and the largest row count: what one more clip costs a rerun."""
    small, large = min(results, key=lambda r: r.rows), max(results, key=lambda r: r.rows)
    if small.rows == large.rows:
        return "marginal CPU per existing clip: needs two row counts"
    ms = 1000 * (large.cpu_s - small.cpu_s) / (large.rows - small.rows)
    verdict = "met" if ms <= MARGINAL_CPU_MS_TARGET else "not met"
    return (
        f"marginal CPU per existing clip, {small.rows:,} -> {large.rows:,} rows: "
        f"({large.cpu_s:.1f} - {small.cpu_s:.1f}) s / {large.rows - small.rows:,} = {ms:.4f} ms "
        f"(target: at most {MARGINAL_CPU_MS_TARGET} ms, {verdict})"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerun", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="10000,1000000", help="comma-separated row counts (default: %(default)s)")
    p.add_argument("--work", default=WORK, help="where the store, manifests and datasets go (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the datasets (default: each is removed once measured)")
    a = p.parse_args(argv)
    a.rows = sorted(int(n) for n in a.rows.split(","))
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if not {RUN_CPU, SERVER_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"needs CPUs {RUN_CPU} and {SERVER_CPU}: the run and the server are each pinned to one")
    os.sched_setaffinity(0, {SERVER_CPU})  # the server's threads, and the synthesis, stay off the run's CPU
    os.makedirs(LOGS, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    write_sample_store(os.path.join(a.work, "store"))
    results = []
    with LocalServer(os.path.join(a.work, "store")) as server:
        warm_up(server, a.work)
        for rows in a.rows:
            progress(f"{rows:,} rows: writing the dataset under {a.work}")
            manifest, root = synthesize(a.work, rows)
            progress(f"{rows:,} rows: rerun")
            result = rerun(server, manifest, root, rows)
            progress(f"{rows:,} rows: {result}; logs in {os.path.relpath(LOGS, ROOT)}/rerun-{rows}.*")
            results.append(result)
            if not a.keep:
                shutil.rmtree(root, ignore_errors=True)
                os.remove(manifest)
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    print(f"--skip_existing rerun over a complete local dataset; run on CPU {RUN_CPU}, server on CPU {SERVER_CPU}\n")
    print("\n".join(table(results)))
    print(f"\n{marginal(results)}")
    if not all(r.ok for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
