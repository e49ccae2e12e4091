"""`python -m benchmarks.storage`: the pipeline writing to local disk, `s3://` and `gs://`, in one run.

The same 5-second mono clips go to a local folder, to moto's S3 and to the GCS emulator (both on loopback,
each behind `pipeline.local.storage_proxy`, which counts the requests by kind), with default settings; then each
output is rerun with `--skip_existing`. This process (the storage servers and proxies) and the GetAudio
server are pinned to core 0, each pipeline run to core 1 (`taskset`), so a run's CPU is its own: the
table reports clips/s, CPU ms per clip (user + sys of the pipeline process), peak RSS and the requests
per clip, and the rerun's CPU and bytes read. Requests are counted as the server accepted them: the GCS
emulator is a single-threaded server with a listen backlog of 5, so under 64 streams it refuses some
connections, which the client retries (the "refused, retried" column). `--repo DIR` runs the pipeline of
another checkout (the same manifest and servers), for a before/after comparison in one go.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks import data
from benchmarks.harness import PY, RESULTS, ROOT, Child, fresh_logs, progress, run_child, taskset
from benchmarks.server import Server
from pipeline.local.storage_proxy import StorageProxy
from pipeline.local.storage_servers import StorageServer, start_gcs_server, start_s3_server

SERVER_CORE, PIPELINE_CORE = 0, 1
KINDS = ("PUT", "POST_INIT", "COMPLETE", "COPY", "DELETE", "GET", "HEAD", "LIST")


@dataclass(frozen=True)
class Requests:
    """The storage requests of one run, as a bucket's proxy counted them."""

    by_kind: dict[str, int]  # accepted by the server, by kind (PUT, COPY, LIST, ...)
    refused: int  # refused by the server (not a 404), retried by the client
    clip_gets: int  # GETs of a clip: a rerun must make none
    bytes_read: int

    def per_clip(self, kind: str, clips: int) -> float:
        return self.by_kind.get(kind, 0) / clips

    def as_dict(self) -> dict[str, int]:
        return {**self.by_kind, "refused": self.refused, "clip_GET": self.clip_gets, "bytes_read": self.bytes_read}


@dataclass(frozen=True)
class StorageRun:
    """One measured pipeline run into one output: what its run record says, and its requests (None: local)."""

    child: Child
    clips: int
    written: int
    skipped: int
    errors: int  # -1: no run record
    requests: Requests | None

    @property
    def cpu_ms_per_clip(self) -> float:
        return 1000 * self.child.cpu_s / max(self.clips, 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.child.as_dict(),
            "clips": self.clips,
            "written": self.written,
            "skipped": self.skipped,
            "errors": self.errors,
            "requests": self.requests.as_dict() if self.requests else {},
        }


class Output:
    """Where one set of runs writes: a local folder, or a bucket behind a counting proxy."""

    def __init__(self, name: str, work: str, server: StorageServer | None = None):
        self.name, self.server, self.proxy = name, server, None
        self.env: dict[str, str] = {}
        self.flags: list[str] = []
        if server is None:
            self.url = os.path.join(work, "out-local")
            return
        self.proxy = StorageProxy(server.endpoint_url).start()
        self.url = f"{server.bucket_url}{uuid.uuid4().hex}/ds"
        if name == "s3":
            self.flags = [f"--s3_endpoint_url={self.proxy.endpoint_url}", *server.flags[1:]]
        else:
            self.env = {**server.env, "STORAGE_EMULATOR_HOST": self.proxy.endpoint_url}

    def requests(self) -> Requests | None:
        if self.proxy is None:
            return None
        counts = dict(self.proxy.counts())
        refused = 0
        for kind_status, n in self.proxy.upstream_errors().items():
            kind, status = kind_status.split()
            if status != "404":  # a HEAD of a missing object is an answer, not a refusal
                counts[kind] -= n
                refused += n
        clip_gets = sum(1 for r in self.proxy.log if r.kind == "GET" and "/clips/" in r.path)
        return Requests(counts, refused, clip_gets, self.proxy.bytes_read())

    def reset(self) -> None:
        if self.proxy is not None:
            self.proxy.reset()

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()


def run_pipeline(label: str, manifest: str, out: Output, api: Server, repo: str, *flags: str) -> StorageRun:
    out.reset()
    cmd = [*taskset(PIPELINE_CORE), PY, "-m", "pipeline", "run", f"--manifest={manifest}"]
    cmd += [f"--output={out.url}", f"--api_host={api.address}", *out.flags, *flags]
    child = run_child(label, cmd, api, env={**out.env, "PYTHONPATH": repo}, cwd=repo)
    record = read_record(out)
    result = StorageRun(
        child=child,
        clips=record.get("clips", 0),
        written=record.get("clips_written", 0),
        skipped=record.get("clips_skipped", 0),
        errors=record.get("errors", -1),
        requests=out.requests(),
    )
    progress(
        f"{label:<22} rc {child.rc}: {result.clips} clips ({result.written} written, {result.skipped} skipped) "
        f"in {child.wall_s:6.1f} s, cpu {result.cpu_ms_per_clip:.2f} ms/clip, rss {child.max_rss_mib:.0f} MiB, "
        f"{result.requests.as_dict() if result.requests else {}}"
    )
    return result


def read_record(out: Output) -> dict[str, Any]:
    path = f"{out.url}/_RUN.json"
    try:
        if out.server is None:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import PipelineOptions

        FileSystems.set_options(PipelineOptions(out.server.flags))
        with FileSystems.open(path) as f:
            return json.loads(f.read())
    except Exception as e:  # a failed run has no record: the table says so
        progress(f"no run record at {path}: {type(e).__name__}")
        return {}


def median(runs: list[StorageRun]) -> StorageRun:
    """The run of median CPU per clip (a failed run counts as the worst)."""
    return sorted(runs, key=lambda r: r.cpu_ms_per_clip if r.child.rc == 0 else float("inf"))[len(runs) // 2]


def table(results: dict[str, StorageRun], rows: int) -> list[str]:
    head = "| output | run | clips/s | CPU ms/clip | CPU vs local | peak RSS MiB | vs local | "
    head += " | ".join(f"{k}/clip" for k in KINDS) + " | refused, retried | clip bytes read |"
    lines = [head, "|" + "---|" * (7 + len(KINDS) + 2)]
    for run in ("first", "rerun"):
        base = results.get(f"local-{run}")
        for name, m in results.items():
            if not name.endswith(run):
                continue
            n = m.clips or rows
            cpu = m.cpu_ms_per_clip
            ratio = f"{cpu / base.cpu_ms_per_clip:.2f}" if base and base.clips else "-"
            rss = f"{m.child.max_rss_mib - base.child.max_rss_mib:+.0f}" if base else "-"
            req = m.requests
            counts = " | ".join(f"{req.per_clip(k, n):.3f}" if req else "-" for k in KINDS)
            clip_bytes = "-" if not req else ("0" if req.clip_gets == 0 else "some")
            label = "first run" if run == "first" else "--skip_existing rerun"
            lines.append(
                f"| {name.rsplit('-', 1)[0]} | {label} | {m.clips / m.child.wall_s:.1f} | {cpu:.2f} | {ratio} | "
                f"{m.child.max_rss_mib:.0f} | {rss} | {counts} | {req.refused if req else '-'} | {clip_bytes} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1000, help="5-second mono clips per run")
    p.add_argument("--outputs", default="local,s3,gs", help="comma-separated subset of local,s3,gs")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind; the table shows the median CPU")
    p.add_argument("--repo", default=ROOT, help="the checkout whose pipeline runs (default: this one)")
    p.add_argument("--json", default=os.path.join(RESULTS, "storage.json"))
    a = p.parse_args(argv)
    os.sched_setaffinity(0, {SERVER_CORE})  # this process's servers and the GetAudio server: core 0
    fresh_logs()
    work = tempfile.mkdtemp(prefix="soniox-storage-bench-")
    servers = {"s3": start_s3_server, "gs": start_gcs_server}
    data.write_store(os.path.join(work, "store"), 20, 60, 0)
    manifest = data.write_manifest(os.path.join(work, "m.parquet"), data.clip_rows(a.rows, 20, 60))
    api = Server(os.path.join(work, "store"), 0)
    runs: dict[str, list[StorageRun]] = {}
    try:
        api.warm_up(data.mono_ids(20))
        for name in a.outputs.split(","):
            for i in range(a.repeat):  # each repeat: a fresh server (the emulators slow down as they fill)
                bucket = servers[name]() if name in servers else None
                if name == "gs":  # for this process's own reads of the run records
                    os.environ.update(bucket.env)
                out = Output(name, work, bucket)
                try:
                    for run, flags in (("first", []), ("rerun", ["--skip_existing"])):
                        result = run_pipeline(f"{name}-{run}-{i}", manifest, out, api, a.repo, *flags)
                        runs.setdefault(f"{name}-{run}", []).append(result)
                finally:
                    out.stop()
                    if bucket is not None:
                        bucket.stop()
    finally:
        api.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = {key: median(values) for key, values in runs.items()}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w", encoding="utf-8") as f:
        medians = {key: run.as_dict() for key, run in results.items()}
        every = {key: [run.as_dict() for run in values] for key, values in runs.items()}
        json.dump({"rows": a.rows, "repo": a.repo, "median": medians, "runs": every}, f, indent=2)
    print(f"{a.rows} rows of 5 s mono clips; pipeline pinned to core {PIPELINE_CORE}, servers to core {SERVER_CORE}")
    print(f"each row: the run of median CPU per clip out of {a.repeat}; all runs in the JSON")
    print(f"pipeline from {a.repo}; requests per clip counted at a proxy in front of each bucket\n")
    print("\n".join(table(results, a.rows)))
    print(f"\nresults in {os.path.relpath(a.json, ROOT)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
