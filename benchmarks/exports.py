"""`python -m benchmarks.exports`: what `--export nemo,lhotse` costs the job's last step, before and after the
workers write the manifests in parts.

It synthesizes a transcribed clips table of `--rows` rows in files of 10,000 rows (a bundle's worth), then, in
one process pinned to one CPU, one after the other:

- before: the last step as it was, `export.export_dataset` (the export command's path today): every table file
  read back and every manifest line written, on one worker;
- after, workers: each bundle's rows through a `ManifestWriter` into its parts (what each worker now does as it
  writes its table file; spread over the job's workers, so its wall time is divided among them);
- after, last step: `export.assemble_exports` joining the parts (a local copy here; in a bucket, requests only).

Both give the same lines (checked). Figures are wall and CPU (user + sys) seconds and CPU per row.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import tables
from pipeline.dataset.export import ManifestWriter, assemble_exports, export_dataset
from pipeline.dataset.layout import EXPORT_PARTS_DIR, clip_name, export_names, export_part_name, path_of
from pipeline.dataset.storage import open_store
from pipeline.graph.table_files import content_digest, table_path

WORK = "/tmp/bench-exports"
FORMATS = ("nemo", "lhotse")
TABLE_ROWS = 10_000
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "again")


@dataclass(frozen=True)
class Step:
    name: str
    rows: int
    wall_s: float
    cpu_s: float


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measured(name: str, rows: int, work: Callable[[], object]) -> Step:
    wall, cpu = time.perf_counter(), cpu_s()
    work()
    return Step(name, rows, time.perf_counter() - wall, cpu_s() - cpu)


def clips_table(start: int, n: int) -> pa.Table:
    """Rows as a transcribed first run writes them: one-second mono clips, 8 words each with their tokens."""
    manifest = pa.schema([("clip_id", pa.string()), ("object_id", pa.string()), ("language", pa.string())])
    schema = tables.clips_schema(manifest, with_transcripts=True)
    rows = []
    for i in range(start, start + n):
        words = [WORDS[(i + k) % len(WORDS)] for k in range(8)]
        tokens = [
            {"text": (" " if k else "") + w, "start_ms": 100 * k, "duration_ms": 90, "speaker": 1, "confidence": 0.9}
            for k, w in enumerate(words)
        ]
        clip_id = f"c{i:08d}"
        rows.append(
            {
                "clip_id": clip_id,
                "object_id": f"obj-{i // 100:06d}",
                "path": clip_name(clip_id),
                "clip_start_ms": 1000 * (i % 100),
                "clip_duration_ms": 1000,
                "object_duration_ms": 100_000,
                "num_channels": 1,
                "sample_rate": 16_000,
                "num_samples": 16_000,
                "num_bytes": 32_044,
                "sha256": f"{i:064x}",
                "attempts": 1,
                "transcript_text": " ".join(words),
                "transcript_tokens": tokens,
                "language": "en",
            }
        )
    return pa.Table.from_pylist(rows, schema)


def synthesize(root: str, rows: int) -> list[str]:
    """The clips table in files of TABLE_ROWS rows named as the pipeline names them; their paths."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "metadata"))
    store, files = open_store(root), []
    for start in range(0, rows, TABLE_ROWS):
        with store.scratch_file(".parquet") as scratch:
            pq.write_table(clips_table(start, min(TABLE_ROWS, rows - start)), scratch.path)
            files.append(table_path(root, "clips", scratch.path))
            store.put(files[-1], file=scratch)
    return files


def write_parts(root: str, bundles: list[list[dict]]) -> None:
    """What each worker does for its bundle: its rows into a part of every manifest, each part published."""
    store = open_store(root)
    for rows in bundles:
        writer = ManifestWriter(store, FORMATS, sharded=False)
        for row in rows:
            writer.add(row)
        writer.publish(lambda name, scratch: path_of(root, export_part_name(name, content_digest(scratch))))


def lines_of(root: str) -> dict[str, list[bytes]]:
    found = {}
    for name in export_names(FORMATS):
        with (gzip.open if name.endswith(".gz") else open)(path_of(root, name), "rb") as f:
            found[name] = sorted(f)
    return found


def run(rows: int) -> list[Step]:
    root = os.path.join(WORK, "dataset")
    files = synthesize(root, rows)
    store = open_store(root)
    before = measured(
        "before: last step (reads the table, writes every line)",
        rows,
        lambda: export_dataset(store, root, FORMATS, files, sharded=False),
    )
    expected = lines_of(root)
    for name in export_names(FORMATS):
        os.remove(path_of(root, name))
    bundles = [pq.read_table(f).to_pylist() for f in files]  # in the job, the rows are in hand already
    workers = measured(
        "after: workers' parts (all bundles, spread over the workers)", rows, lambda: write_parts(root, bundles)
    )
    parts = [o.path for o in store.list(path_of(root, EXPORT_PARTS_DIR) + "/")]
    last = measured("after: last step (joins the parts)", rows, lambda: assemble_exports(store, root, FORMATS, parts))
    if lines_of(root) != expected:
        sys.exit("the joined manifests differ from the one-pass ones")
    print(f"{len(parts)} parts from {len(bundles)} bundles; manifests identical", flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    return [before, workers, last]


def table(steps: list[Step]) -> list[str]:
    lines = [
        f"| {'step':<62} | {'rows':>10} | {'wall s':>7} | {'CPU s':>7} | {'CPU µs/row':>10} |",
        f"|{'-' * 64}|{'-' * 12}:|{'-' * 8}:|{'-' * 8}:|{'-' * 11}:|",
    ]
    for s in steps:
        lines.append(
            f"| {s.name:<62} | {s.rows:>10,} | {s.wall_s:>7.2f} | {s.cpu_s:>7.2f} | {1e6 * s.cpu_s / s.rows:>10.1f} |"
        )
    before, last = steps[0], steps[-1]
    lines.append(
        f"\nlast step: {before.wall_s / last.wall_s:.0f}x less wall, {before.cpu_s / last.cpu_s:.0f}x less CPU"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exports", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--cpu", type=int, default=0, help="the CPU this process is pinned to")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.cpu})
    print("\n".join(table(run(args.rows))))


if __name__ == "__main__":
    main()
