"""What is checked and prepared before a run starts: the runner, the key, the output's leftovers.

Each check stops the launch with a LaunchError (exit 2) before anything is fetched or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    PortableOptions,
    StandardOptions,
    WorkerOptions,
)

from pipeline.core.errors import LaunchError
from pipeline.core.messages import GetAudioError
from pipeline.dataset.layout import CLIPS_DIR, METADATA_DIR, SHARDS_DIR, TMP_DIR, path_of, root_of, tmp_path
from pipeline.dataset.lease import alive
from pipeline.dataset.record import remove_record
from pipeline.dataset.storage import StorageError, Store
from pipeline.graph.read import Manifest
from pipeline.graph.settings import ClientSettings, FetchSettings
from pipeline.launch import manifest as mf
from pipeline.launch.options import ClipOptions
from pipeline.service.api_key import key_source, read_api_key
from pipeline.service.client import DEFAULT_API_HOST, resolve_host

log = logging.getLogger(__name__)


class KeyRejected(LaunchError):
    """The service refused the API key: every call would fail, so the run stops before it starts."""


# Runners whose workers run on this machine, in this process or its children, and so see its environment.
LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner")


def workers_share_environment(options: PipelineOptions) -> bool:
    if runner_name(options) in LOCAL_RUNNERS:
        return True
    return (options.view_as(PortableOptions).environment_type or "").upper() == "LOOPBACK"


# Runners that return once the job is submitted and leave it running elsewhere.
DETACHABLE = ("DataflowRunner", "PortableRunner")


def runner_name(options: PipelineOptions) -> str:
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    return (runner if isinstance(runner, str) else type(runner).__name__).rsplit(".", 1)[-1]


def check_detach(opts: ClipOptions, options: PipelineOptions) -> None:
    """--detach only where the job runs on after this process ends: on the in-process runners it would wait
    for the whole job and then say "submitted", hiding its exit code."""
    if not opts.detach:
        return
    name = runner_name(options)
    embedded = name == "PortableRunner" and options.view_as(PortableOptions).job_endpoint in (None, "embed")
    if name not in DETACHABLE or embedded:
        raise LaunchError(
            f"--detach needs a runner that runs the job elsewhere (DataflowRunner, or PortableRunner with the "
            f"--job_endpoint of a job service); {name} runs it in this process, so the run waits for it"
        )


def local_form(output: str) -> str:
    """`file:///abs/path` (or `file://localhost/abs/path`) as the plain path it names: the store, the clips,
    the tables and the record must all be at the same place, not some under `$PWD/file:`."""
    if not output.startswith("file://"):
        return output
    url = urllib.parse.urlparse(output)
    if url.netloc not in ("", "localhost"):
        raise LaunchError(f"--output {output}: a file:// URI names a path on this machine (file:///path)")
    return urllib.parse.unquote(url.path)


def probe_output(store: Store, output: str) -> None:
    """Write and delete a marker in the output's scratch folder: a read-only folder, a missing bucket or refused
    credentials stop the launch here, before any call, not after every clip was fetched."""
    marker = path_of(output, f"{TMP_DIR}/probe-{uuid.uuid4().hex}")
    try:
        store.put(marker, b"")
        store.delete([marker])
    except StorageError as e:
        raise LaunchError(f"--output {output}: cannot write to it ({_one_line(e)})") from None


def check_output(store: Store, output: str) -> None:
    """The output can be written: a folder (or one that can be made) on local disk, a bucket that can be
    listed with the credentials given. Found here, before any call, not after every clip is fetched."""
    try:
        store.check_writable(root_of(output), (TMP_DIR, METADATA_DIR, CLIPS_DIR, SHARDS_DIR))
    except StorageError as e:
        raise LaunchError(f"--output {output}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def check_workers_get_the_key(opts: ClipOptions, options: PipelineOptions) -> None:
    """On Dataflow (or a portable runner's containers) SONIOX_API_KEY set here never reaches the workers,
    which would fail every row UNAUTHENTICATED after a key check here had passed: refuse at launch."""
    if not opts.api_key_file and not workers_share_environment(options):
        raise LaunchError(
            "this runner's workers do not see this machine's environment, so SONIOX_API_KEY would not reach "
            "them: put the key in a file they can read (e.g. a locked-down gs:// object) and pass --api_key_file"
        )


def stream_bound(options: PipelineOptions, max_in_flight: int) -> str:
    """The most GetAudio streams the job can open at once, as a sentence for the launch log."""
    if workers_share_environment(options):
        processes = options.view_as(DirectOptions).direct_num_workers or 1
        return f"{processes} process(es) x --max_in_flight {max_in_flight} = {processes * max_in_flight} streams"
    workers = options.view_as(WorkerOptions)
    machines = workers.max_num_workers or workers.num_workers
    machine = workers.machine_type or "n1-standard-1"
    vcpus = machine_vcpus(machine)
    if machines is None or vcpus is None:
        unknown = "the runner's worker count" if machines is None else f"{machine}'s vCPUs"
        return (
            f"--max_in_flight {max_in_flight} streams per worker process, times {unknown}, which this launch "
            "does not know: bound the job with --max_num_workers (and a machine type of n vCPUs)"
        )
    return (
        f"{machines} worker(s) x {vcpus} process(es) ({machine}) x --max_in_flight {max_in_flight} = "
        f"{machines * vcpus * max_in_flight} streams at most"
    )


# Google Cloud's shared-core types: the number of vCPUs is not in the name.
SHARED_CORE_VCPUS = {"e2-micro": 2, "e2-small": 2, "e2-medium": 2, "f1-micro": 1, "g1-small": 1}


def machine_vcpus(machine_type: str) -> int | None:
    """vCPUs of a Compute Engine machine type (one SDK process each on Dataflow): `n2-standard-4` -> 4,
    `n2-custom-8-32768` or `custom-8-32768` -> 8, `e2-medium` -> 2; None when the name does not say."""
    name = machine_type.rsplit("/", 1)[-1]
    if name in SHARED_CORE_VCPUS:
        return SHARED_CORE_VCPUS[name]
    custom = re.search(r"custom-(\d+)-\d+", name)
    if custom:
        return int(custom.group(1))
    standard = re.fullmatch(r"[a-z0-9]+-[a-z]+(?:gpu)?-(\d+)(?:-[a-z]+)?", name)
    return int(standard.group(1)) if standard else None


def key_given(settings: ClientSettings) -> bool:
    """Whether a key was given; read here, so that a key file that cannot be read stops the launch (exit 2)
    rather than every worker."""
    try:
        return bool(read_api_key(settings.api_key_file).reveal())
    except Exception as e:  # any filesystem's "cannot read": missing, no permission, no credentials
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
        raise LaunchError(f"{key_source(settings.api_key_file)}: cannot read the API key ({reason})") from None


KEY_CHECK_TIMEOUT_S = 20.0
# Answers from the service about the object (or its load): it was reached, with a key it took, so the run starts.
ANSWERS = ("NOT_FOUND", "OUT_OF_RANGE", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED")


def check_key(settings: ClientSettings, object_id: str) -> GetAudioError | None:
    """One GetObject attempt with the key the workers will use: the error, or None when answered."""
    quick = dataclasses.replace(settings, rpc_timeout_s=min(settings.rpc_timeout_s, KEY_CHECK_TIMEOUT_S))
    client = quick.client(max_attempts=1)
    try:
        client.get_object(object_id)
    except GetAudioError as e:
        return e
    finally:
        client.close()
    return None


def preflight(settings: FetchSettings, manifest: Manifest) -> None:
    """One GetObject call with the key, so a wrong or missing key, or a service that cannot be reached at all,
    stops the run with one message, not one error per row after every row's retries."""
    given = key_given(settings.client)
    object_id = mf.first_object_id(manifest)
    if object_id is None:
        return
    error = check_key(settings.client, object_id)
    host = settings.client.api_host or DEFAULT_API_HOST
    code = error.code if error else None
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") and not given:
        raise LaunchError(
            f"no API key was given and {host} requires one ({code}): set SONIOX_API_KEY (or SONIOX_API_KEY_FILE) "
            "or pass --api_key_file"
        )
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        raise KeyRejected(f"the API key was refused by {host} ({code})")
    if error is not None and code not in ANSWERS:
        raise LaunchError(f"cannot talk to {host}: {unreachable_cause(host, error)}")
    if code is not None:
        log.info("key check: GetObject %s answered %s; the service is reachable and took the key", object_id, code)


def unreachable_cause(host: str, error: GetAudioError) -> str:
    """What stopped the key check from reaching the service, and what to write instead, in one line."""
    text = error.message
    target, tls = resolve_host(host)
    if tls and re.search(r"(?i)handshake|WRONG_VERSION_NUMBER|SSL", text):
        return (
            f"the TLS handshake failed, so {target} does not speak TLS; for a plaintext server write "
            f"--api_host http://{target}"
        )
    if "Connection refused" in text:
        return f"connection refused: nothing listens at {target}"
    if re.search(r"(?i)resolv|DNS|Domain name", text):
        return f"the host name of {target} cannot be resolved"
    if not tls and re.search(r"(?i)Socket closed|Connection reset|EOF", text):
        return f"{target} closed a plaintext connection; for a server that speaks TLS write --api_host https://{target}"
    return f"{error.code}: {' '.join(text.split())[:300]}"


def remove_leftovers(store: Store, output: str) -> None:
    """What a killed run left: scratch files, unfinished multipart uploads, the old run record.

    Older versions also staged clips and Beam's table files under `_tmp/` and `metadata/beam-temp-*`."""
    root = root_of(output)
    store.remove_all(tmp_path(root) + "/")
    store.remove_all(path_of(root, f"{METADATA_DIR}/beam-temp-"))
    aborted = store.abort_uploads(f"{root}/")
    if aborted:
        log.info("aborted %d unfinished multipart upload(s) under %s", aborted, root)
    remove_record(store, output)


TEMPDIR_PREFIX = "clip-pipeline-"


@contextlib.contextmanager
def own_tempdir() -> Iterator[str]:
    """A folder of the run's own, removed at its end: Beam leaves folders in the temporary folder after every run
    (its job server's, the staged dependencies'), and a bucket store's scratch files go there too.

    The one place the pipeline sets tempfile's default folder for its whole process (`tempfile.tempdir`) and
    the worker processes it starts (`TMPDIR`), put back on exit; `run.main` holds it for the run. No folder can
    be passed instead: Beam's job server, artifact staging and stager take tempfile's default, with no option
    for it. The folder is named for the process, so the next run removes those of runs killed (SIGKILL)."""
    remove_dead_tempdirs(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=f"{TEMPDIR_PREFIX}{os.getpid()}-")
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = folder
    try:
        yield folder
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(folder, ignore_errors=True)


def remove_dead_tempdirs(parent: str) -> None:
    """Remove the run folders in `parent` whose process is gone."""
    for entry in os.scandir(parent):
        match = re.fullmatch(rf"{TEMPDIR_PREFIX}(\d+)-\w+", entry.name)
        if match and entry.is_dir(follow_symlinks=False) and not alive(int(match.group(1))):
            shutil.rmtree(entry.path, ignore_errors=True)
            log.info("removed %s, left by a run that was killed", entry.path)
