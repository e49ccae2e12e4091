"""One run per output at a time (issue 24): the lease `{output}/_LEASE.json`, on local disk, moto (S3) and the
GCS emulator.

What a user relies on: a second run on a busy output stops at launch (exit 2) naming the holder, having called
and deleted nothing, and the first completes untouched; a killed run's lease is taken over (at once on this
machine, where its pid is seen gone; after it expires elsewhere); the lease is gone after a run however it
ended; a dry run takes none; and of runs racing for one lease, the store lets exactly one through.

gcp-storage-emulator ignores ifGenerationMatch (probed: a second create-only upload replaces the object, a
delete of a wrong generation deletes it), so `gcs_preconditions` teaches it what GCS answers (412 unless the
object's generation is the one given, 0 meaning "no object"), checked inside its single-threaded request loop
so that the check and the write are one step, as on GCS. moto honours S3's If-None-Match, If-Match on
PutObject and If-Match on DeleteObject as AWS documents them, unaided.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.dataset.layout import lease_path
from pipeline.dataset.lease import DETACHED_LEASE_S, LEASE_S_ENV, Holder, Lease, LeaseHeld, take
from pipeline.dataset.record import now
from pipeline.dataset.storage import Precondition, Store, StoreSettings, open_store
from pipeline.graph.build import build
from pipeline.graph.finish import RunInfo
from pipeline.launch import manifest as mf
from pipeline.launch.options import ClipOptions
from pipeline.launch.run import fetch_settings
from pipeline.local.server import Faults, LocalServer
from pipeline.local.storage_servers import StorageServer, gcs_bucket
from tests.helpers import (
    CARD,
    CHILD_TIMEOUT_S,
    TABLES,
    Result,
    as_globs,
    check_clips_table,
    child_env,
    clips_table,
    errors_table,
    expect_exit,
    explain,
    local_files,
    read_bytes,
    run_argv,
    run_build,
    run_cli,
    run_record,
    start_cli,
    tree,
    write_local_manifest,
)

LATENCY_S = 0.5  # per GetAudio call: the first run is still fetching when the second starts
IN_FLIGHT = 4
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


# -- the GCS emulator, taught GCS's preconditions --------------------------------------------------------


def _generation(request, storage) -> str:
    """The generation of the object a request names, "0" when there is none."""
    from gcp_storage_emulator.exceptions import NotFound

    name = request.params.get("object_id") or (request.query.get("name") or [None])[0]
    if name is None:  # a multipart upload names its object in the body's metadata part
        name = request.data["meta"]["name"]
    try:
        return str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
    except NotFound:
        return "0"


def _honouring(handler):
    def handle(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        if wanted and _generation(request, storage) != wanted[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json(
                {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}}
            )
            return None
        return handler(request, response, storage, *args, **kwargs)

    return handle


@pytest.fixture(autouse=True)
def gcs_preconditions(monkeypatch: pytest.MonkeyPatch) -> None:
    """For this module's tests: the emulator's object uploads, reads and deletes honour ifGenerationMatch."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    conditional = (objects.insert, objects.get, objects.download, objects.delete)
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in conditional:
                monkeypatch.setitem(handlers, method, _honouring(handler))


# -- outputs on each store ----------------------------------------------------------------------------------


@dataclass
class Target:
    """An output on one store: its path, and the flags and environment a run needs to write it."""

    kind: str
    path: str
    flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    server: StorageServer | None = None

    def store(self) -> Store:
        """The pipeline's store for it (what takes and releases the lease)."""
        return open_store(self.path, StoreSettings.from_options(PipelineOptions(self.flags)))

    def lease(self) -> dict[str, Any] | None:
        """The lease as this test reads it, with Beam's filesystems (not the code under test), or None."""
        path = lease_path(self.path)
        if self.kind == "local":
            return json.loads(Path(path).read_bytes()) if os.path.exists(path) else None
        if self.kind == "gcs":  # by the emulator's endpoint: this process's environment may name another
            blob = gcs_bucket(self.server).blob(path.split("/", 3)[3])
            return json.loads(blob.download_as_bytes()) if blob.exists() else None
        return json.loads(read_bytes(path)) if FileSystems.exists(path) else None

    def names(self) -> list[str]:
        """Every object under the output, relative to it, each table file as its table's glob."""
        if self.kind == "local":
            found = local_files(self.path) if os.path.isdir(self.path) else set()
        elif self.kind == "gcs":
            prefix = self.path.split("/", 3)[3] + "/"
            found = {b.name[len(prefix) :] for b in gcs_bucket(self.server).list_blobs(prefix=prefix)}
        else:
            (matched,) = FileSystems.match([f"{self.path}/**"])
            found = {m.path[len(self.path) + 1 :] for m in matched.metadata_list}
        return sorted(as_globs(found))

    def clips_in_place(self) -> int:
        return sum(1 for name in self.names() if name.startswith("clips/"))


@pytest.fixture(params=["local", "s3", "gcs"])
def target(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Target:
    if request.param == "local":
        return Target("local", str(tmp_path / "out"))
    server: StorageServer = request.getfixturevalue(f"{request.param}_server")
    if request.param == "gcs":  # this process's reads: an earlier test may have left the environment elsewhere
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
    FileSystems.set_options(PipelineOptions(server.flags))  # global: this test's own reads
    return Target(request.param, f"{server.bucket_url}{uuid.uuid4().hex}/out", server.flags, server.env, server)


def manifest_rows(n: int) -> list[dict[str, Any]]:
    """n clips of the sample store, then one row naming an object it does not have."""
    objects = [("demo-mono", 12_000), ("demo-stereo", 9_000), ("demo-flac-3ch", 5_000)]
    rows = []
    for i in range(n):
        object_id, length = objects[i % 3]
        rows.append(
            {"clip_id": f"c{i:04d}", "object_id": object_id, "start_ms": 97 * i % (length - 400), "duration_ms": 400}
        )
    return [*rows, {"clip_id": "gone", "object_id": "no-such-object", "start_ms": 0, "duration_ms": 100}]


def check_dataset(target: Target, rows: list[dict[str, Any]], store: dict[str, str]) -> None:
    """A complete, exact dataset: rows in = clips + errors, every clip sample-identical to its source, and the
    output holds exactly the clips, the tables, the card and the record (no lease, no scratch)."""
    record = run_record(target.path)
    assert record["rows"] == len(rows) == record["clips"] + record["errors"], record
    clips = clips_table(target.path).to_pylist()
    assert sorted(c["clip_id"] for c in clips) == sorted(r["clip_id"] for r in rows[:-1])
    check_clips_table(clips, store, target.path)
    assert [(e["clip_id"], e["error_code"]) for e in errors_table(target.path).to_pylist()] == [("gone", "NOT_FOUND")]
    expected = sorted([f"clips/{c['clip_id']}.wav" for c in clips] + [*TABLES, *CARD, "_RUN.json"])
    assert target.names() == expected


def refusal_pattern(output: str, run_id: str, pid: int) -> str:
    """The one line of a refused run."""
    return (
        rf"error: --output {re.escape(output)} is in use by run {run_id} on {re.escape(socket.gethostname())} "
        rf"\(pid {pid}\), started {TIME}; its lease expires at {TIME} \(a run that was killed leaves it until then\)"
    )


def last_line(result: Result) -> str:
    return result.stderr.strip().splitlines()[-1]


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc is None or proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.2)


def start_child(
    target: Target, server: LocalServer, manifest: str, logs: Path, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python -m pipeline run` in a child, its output into files (a pipe could fill and stall it)."""
    argv = run_argv(server, manifest, target.path, f"--max_in_flight={IN_FLIGHT}", *target.flags, *flags)
    out, err = open(f"{logs}.out", "w"), open(f"{logs}.err", "w")  # noqa: SIM115  (closed by the child's end)
    return start_cli("run", *argv, env=child_env(**target.env, **(env or {})), stdout=out, stderr=err)


def child_output(logs: Path) -> str:
    return Path(f"{logs}.out").read_text() + Path(f"{logs}.err").read_text()


# -- the stores' conditional writes -------------------------------------------------------------------------


def test_the_store_decides_who_creates_replaces_and_deletes(target: Target) -> None:
    """Create-only, replace-only-this-version and delete-only-this-version, each refused (Precondition) when the
    object is not as the caller last saw it: what the lease's every step relies on."""
    store, path = target.store(), lease_path(target.path)
    assert store.read_versioned(path) is None
    first = store.create(path, b"one")
    with pytest.raises(Precondition):
        store.create(path, b"two")
    assert store.read_versioned(path) == (b"one", first)
    second = store.replace(path, b"three", first)
    assert second != first and store.read_versioned(path) == (b"three", second)
    with pytest.raises(Precondition):
        store.replace(path, b"four", first)
    with pytest.raises(Precondition):
        store.delete_version(path, first)
    assert store.read_versioned(path) == (b"three", second)
    store.delete_version(path, second)
    assert store.read_versioned(path) is None
    with pytest.raises(Precondition):
        store.delete_version(path, second)
    with pytest.raises(Precondition):
        store.replace(path, b"five", second)


def test_of_runs_racing_for_a_stale_lease_exactly_one_wins(target: Target) -> None:
    """Six takers at once, over a lease whose holder expired a minute ago (three rounds): one lease, five
    refusals naming the winner; the stale lease is replaced, never shared."""
    store = target.store()
    for round_ in range(3):
        store.create(lease_path(target.path), Holder.new(f"killed{round_}", -60, False, False).to_bytes())
        barrier = threading.Barrier(6)
        results: list[Lease | Exception] = []

        def taker(run_id: str, barrier: threading.Barrier = barrier, results: list = results) -> None:
            barrier.wait()
            try:
                results.append(take(store, target.path, run_id))
            except Exception as e:
                results.append(e)

        threads = [threading.Thread(target=taker, args=(f"r{round_}t{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        winners = [r for r in results if isinstance(r, Lease)]
        assert len(winners) == 1, results
        (winner,) = winners
        assert target.lease()["run_id"] == winner.holder.run_id
        for refused in results:
            if refused is not winner:
                assert isinstance(refused, LeaseHeld) and f"by run {winner.holder.run_id} on" in str(refused)
        winner.release()
        assert target.lease() is None


def test_a_held_lease_is_renewed_and_a_renewal_never_overwrites_a_taker(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 1.5 s lease, renewed every 0.5 s: three lease times later it is still held and unexpired. Once
    another run holds it (as after a takeover), the old holder's renewals and release leave it alone."""
    monkeypatch.setenv(LEASE_S_ENV, "1.5")
    store = target.store()
    held = take(store, target.path, "first")
    written = target.lease()["expires_at"]
    time.sleep(4.5)
    now_ = datetime.now(timezone.utc)
    found = target.lease()
    assert found["run_id"] == "first" and datetime.fromisoformat(found["expires_at"]) > now_
    assert found["expires_at"] > written
    with pytest.raises(LeaseHeld, match="in use by run first on"):
        take(store, target.path, "second")

    _, version = store.read_versioned(lease_path(target.path))
    store.delete_version(lease_path(target.path), version)  # as a taker does, then creates its own
    other = take(store, target.path, "taker")
    time.sleep(1.5)  # the first holder's renewals are refused meanwhile
    assert target.lease()["run_id"] == "taker"
    held.release()
    assert target.lease()["run_id"] == "taker"
    other.release()
    assert target.lease() is None


def test_an_unreadable_lease_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A lease cut short (a process killed while writing it on a local disk) holds nothing: taken over, said so."""
    target = Target("local", str(tmp_path / "out"))
    os.makedirs(target.path)
    Path(lease_path(target.path)).write_bytes(b'{"run_id": "cut')
    held = take(target.store(), target.path, "next")
    assert target.lease()["run_id"] == "next" and "(unreadable)" in caplog.text
    held.release()
    assert target.lease() is None


# -- two runs on one output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gap_s", [0.5, 5.0])
def test_a_second_run_stops_at_launch_and_the_first_completes_untouched(
    gap_s: float, target: Target, make_server, store, tmp_path: Path
) -> None:
    """Two runs of `python -m pipeline` started gap_s apart on one output, each against its own slow server:
    one exits 2 with one line naming the other (its run id, host and pid), having made no GetAudio call (only
    the key check), while the other is still running; that one completes with an exact dataset, its lease
    gone. 5 s apart, the refused run is the second. 0.5 s apart it may be either: each launch spends about
    3 s importing and checking on two cores, so which reaches the lease first is a real race, which the
    store settles."""
    servers = [make_server(Faults(latency_s=LATENCY_S)) for _ in range(2)]
    rows = manifest_rows(int((gap_s + 10) * IN_FLIGHT / LATENCY_S))  # fetching outlasts the other's launch
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    secret = f"sk-{uuid.uuid4().hex}"
    flags = ["--skip_existing"]  # a scheduled command: so a dataset already in place is no reason to stop
    runs = [start_child(target, servers[0], manifest, tmp_path / "run0", *flags, env={"SONIOX_API_KEY": secret})]
    try:
        time.sleep(gap_s)
        runs.append(
            start_child(target, servers[1], manifest, tmp_path / "run1", *flags, env={"SONIOX_API_KEY": secret})
        )
        wait_for(lambda: any(run.poll() is not None for run in runs), "one of the runs ends", timeout_s=120)
        ended = next(i for i, run in enumerate(runs) if run.poll() is not None)
        assert runs[1 - ended].poll() is None, "both runs ended: make them longer"
        holder = target.lease()
    finally:
        codes = [run.wait(CHILD_TIMEOUT_S) for run in runs]
    refused, ran = ended, 1 - ended
    assert codes[refused] == 2, child_output(tmp_path / f"run{refused}")
    assert codes[ran] == 0, child_output(tmp_path / f"run{ran}")
    assert gap_s < 2 or refused == 1, "5 s later, the second run is the one refused"
    line = child_output(tmp_path / f"run{refused}").strip().splitlines()[-1]
    assert re.fullmatch(refusal_pattern(target.path, holder["run_id"], runs[ran].pid), line), line
    assert "Traceback" not in child_output(tmp_path / f"run{refused}")
    assert not servers[refused].calls and sum(servers[refused].servicer.object_calls.values()) == 1
    assert holder["pid"] == runs[ran].pid and holder["detached"] is False and secret not in json.dumps(holder)
    check_dataset(target, rows, store)


# -- killed runs ----------------------------------------------------------------------------------------------


def _unshare_works() -> bool:
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "--pid", "--fork", "true"]).returncode == 0


def test_a_killed_runs_lease_expires_and_is_then_taken_over(target: Target, make_server, store, tmp_path: Path) -> None:
    """A run SIGKILLed where this machine cannot see its process (its own pid namespace, as another machine or
    container), with an 8 s lease: a rerun at once is refused naming it; once the lease has expired, a rerun
    with --skip_existing takes it over and completes the dataset, and releases it."""
    if not _unshare_works():
        pytest.skip("cannot start a process in its own pid namespace here (unshare --pid)")
    server = make_server(Faults(latency_s=LATENCY_S))
    rows = manifest_rows(200)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    argv = run_argv(server, manifest, target.path, f"--max_in_flight={IN_FLIGHT}", *target.flags)
    env = child_env(**target.env, **{LEASE_S_ENV: "8"})
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(
            ["unshare", "--pid", "--fork", sys.executable, "-m", "pipeline", "run", *argv],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: target.lease() and target.clips_in_place() >= 10, "10 clips are in place", killed)
        finally:
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait(30)
    holder = target.lease()
    assert holder is not None and holder["pid"] == 1, "the killed run's lease is left, from its own namespace"

    other = make_server()
    refused = run_build(other, manifest, target.path, "--skip_existing", *target.flags, env=target.env)
    expect_exit(refused, 2)
    assert re.fullmatch(refusal_pattern(target.path, holder["run_id"], 1), last_line(refused)), explain(refused)
    assert not other.calls

    time.sleep(max(0.0, datetime.fromisoformat(target.lease()["expires_at"]).timestamp() - time.time()) + 0.2)
    rerun = run_build(server, manifest, target.path, "--skip_existing", *target.flags, env=target.env)
    expect_exit(rerun, 0)
    assert re.search(rf"taking over the lease \S+ \(run {holder['run_id']} .*, expired\)", rerun.stderr), explain(rerun)
    check_dataset(target, rows, store)


def test_a_run_killed_on_this_machine_is_taken_over_at_once(make_server, store, tmp_path: Path) -> None:
    """SIGKILL leaves the lease, with 10 minutes to run; the next run on this machine sees the pid gone and
    takes it over at once (the job of a local runner died with it)."""
    target = Target("local", str(tmp_path / "out"))
    server = make_server(Faults(latency_s=LATENCY_S))
    rows = manifest_rows(120)
    manifest = write_local_manifest(tmp_path / "m.parquet", rows)
    killed = start_child(target, server, manifest, tmp_path / "killed")
    try:
        wait_for(lambda: target.lease() and target.clips_in_place() >= 10, "10 clips are in place", killed)
    finally:
        killed.kill()
        killed.wait(30)
    holder = target.lease()
    assert holder is not None and holder["pid"] == killed.pid
    assert datetime.fromisoformat(holder["expires_at"]).timestamp() - time.time() > 500
    rerun = run_build(server, manifest, target.path, "--skip_existing")
    expect_exit(rerun, 0)
    assert re.search(rf"taking over the lease \S+ \(run {holder['run_id']} .*, gone\)", rerun.stderr), explain(rerun)
    check_dataset(target, rows, store)


# -- the lease is gone however a run ends --------------------------------------------------------------------


def test_the_lease_is_released_when_a_signal_stops_the_run(make_server, tmp_path: Path) -> None:
    target = Target("local", str(tmp_path / "out"))
    server = make_server(Faults(latency_s=LATENCY_S))
    manifest = write_local_manifest(tmp_path / "m.parquet", manifest_rows(120))
    proc = start_child(target, server, manifest, tmp_path / "stopped")
    try:
        wait_for(lambda: target.lease() and target.clips_in_place() >= 5, "5 clips are in place", proc)
        proc.send_signal(signal.SIGINT)
    finally:
        code = proc.wait(30)
    assert code == 130, child_output(tmp_path / "stopped")
    assert "stopped by SIGINT: " in child_output(tmp_path / "stopped")
    assert target.lease() is None and sorted(os.listdir(target.path)) == ["clips"]


def _planted_bug(*args, **kwargs):
    raise RuntimeError("a planted bug in the card")


@pytest.mark.parametrize("how", ["failed", "too many errors"])
def test_the_lease_is_released_when_a_run_fails(how: str, server, tmp_path: Path, monkeypatch) -> None:
    """Exit 3 (the job's last step fails) and exit 1 (past --max_error_ratio): no lease left behind."""
    target = Target("local", str(tmp_path / "out"))
    manifest = write_local_manifest(tmp_path / "m.parquet", manifest_rows(3))
    if how == "failed":
        monkeypatch.setattr("pipeline.graph.finish.write_card", _planted_bug)
    done = run_build(server, manifest, target.path)
    expect_exit(done, 3 if how == "failed" else 1)
    assert target.lease() is None and os.path.isdir(target.path)


# -- a dry run; a detached run ------------------------------------------------------------------------------


def test_a_dry_run_takes_no_lease_and_says_the_output_is_in_use(server, tmp_path: Path) -> None:
    """While a run holds the output, a dry run still checks everything and exits 0 (it writes nothing, so it
    harms no one), adding that a run now would stop; the output, lease included, is left as it was."""
    target = Target("local", str(tmp_path / "out"))
    manifest = write_local_manifest(tmp_path / "m.parquet", manifest_rows(3))
    expect_exit(run_build(server, manifest, target.path, "--max_error_ratio=0.5"), 0)
    holding = take(target.store(), target.path, "holder")
    try:
        before = tree(Path(target.path))
        time.sleep(0.05)  # a write in the dry run would show a later mtime
        done = run_cli("run", *run_argv(server, manifest, target.path, "--dry_run", "--skip_existing"))
        expect_exit(done, 0)
        assert "nothing was fetched, written or deleted" in done.stdout
        note = done.stdout.strip().splitlines()[-1]
        pattern = refusal_pattern(target.path, "holder", os.getpid()).removeprefix("error: ")
        assert re.fullmatch(rf"note: a run now would stop \(exit 2\): {pattern}", note), explain(done)
        assert tree(Path(target.path)) == before
    finally:
        holding.release()
    done = run_cli("run", *run_argv(server, manifest, target.path, "--dry_run", "--skip_existing"))
    expect_exit(done, 0)
    assert "note:" not in done.stdout and target.lease() is None


def test_a_detached_jobs_last_step_releases_its_lease(server, store, tmp_path: Path) -> None:
    """A detached launch writes a 24 h lease that nothing renews; the job's last step (here the graph run on
    its own, as a detached Dataflow job runs with no launcher) deletes it, and only if it is still its own."""
    target = Target("local", str(tmp_path / "out"))
    manifest = mf.inspect_manifest(write_local_manifest(tmp_path / "m.parquet", manifest_rows(4)))
    os.makedirs(target.path)

    def run_job(run_id: str) -> None:
        options = PipelineOptions([f"--output={target.path}", f"--api_host={server.address}"])
        settings = fetch_settings(options.view_as(ClipOptions), manifest, StoreSettings())
        info = RunInfo(target.path, StoreSettings(), now(), time.time(), manifest.files, {}, lease_run_id=run_id)
        p = beam.Pipeline(options=options)
        build(p, settings, manifest, info)
        p.run().wait_until_finish()

    take(target.store(), target.path, "detached1", detached=True)
    with pytest.raises(LeaseHeld) as refused:
        take(target.store(), target.path, "next")
    assert f"(pid {os.getpid()}, detached)" in str(refused.value)
    assert str(refused.value).endswith(
        f"(the job's last step releases it; delete {lease_path(target.path)} only once that job is gone)"
    )
    holder = target.lease()
    span = datetime.fromisoformat(holder["expires_at"]) - datetime.fromisoformat(holder["started_at"])
    assert holder["detached"] is True and holder["process_space"] is None
    assert abs(span.total_seconds() - DETACHED_LEASE_S) < 5 and DETACHED_LEASE_S == 24 * 3600
    assert not [t for t in threading.enumerate() if t.name == "lease-detached1"], "the launcher cannot renew it"
    run_job("detached1")
    assert target.lease() is None and os.path.exists(os.path.join(target.path, "_RUN.json"))

    other = take(target.store(), target.path, "someone-else", detached=True)
    run_job("detached1")
    assert target.lease()["run_id"] == "someone-else", "the step deleted another run's lease"
    other.release()
