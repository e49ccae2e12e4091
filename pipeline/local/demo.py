"""`python -m pipeline demo`: the whole product on this machine, with nothing to configure.

Makes the sample store, starts the local GetAudio server on a free loopback port, writes a manifest
with time and token ranges (and one bad row, to show the errors table), and runs the pipeline on the
DirectRunner.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.launch.cli import Parser, add_logging_options
from pipeline.launch.run import main as run_main
from pipeline.local.samples import write_sample_store
from pipeline.local.server import LocalServer

DEMO_KEY = "demo-key"  # the local server's key: a demo value, not a secret


def write_demo_manifest(path: str) -> None:
    rows = [
        ("intro", "demo-mono", 0, 2500, None, None, "en", "first words"),
        (None, "demo-mono", 4000, 3000, None, None, "en", None),
        ("stereo-a", "demo-stereo", 1500, 2000, None, None, "en", "two speakers"),
        ("words-2-7", "demo-stereo", None, None, 2, 7, "en", "a token range"),
        ("flac-words", "demo-flac-3ch", None, None, 0, 5, "en", "three channels"),
        ("resampled", "demo-44k-notokens", 500, 1000, None, None, "en", "44.1 kHz source"),
        ("missing", "no-such-object", 0, 1000, None, None, "en", "shows the errors table"),
    ]
    names = ["clip_id", "object_id", "start_ms", "duration_ms", "token_start", "token_end", "language", "note"]
    types = [pa.string(), pa.string(), pa.int32(), pa.int32(), pa.int32(), pa.int32(), pa.string(), pa.string()]
    table = pa.table({n: pa.array([r[i] for r in rows], t) for i, (n, t) in enumerate(zip(names, types, strict=True))})
    pq.write_table(table, path)


MODE_FLAGS = ("--skip_existing", "--append", "--overwrite")  # the ways over a dataset already there


def main(argv: list[str]) -> None:
    """`python -m pipeline demo [--output DIR] [run options]`: what is not a demo option goes to the run."""
    parser = Parser(
        prog="python -m pipeline demo",
        description=__doc__.splitlines()[0],
        epilog="Any other option is passed to the run (see python -m pipeline run --help), e.g. --clip_format flac. "
        "A demo again into the same folder updates its dataset (--skip_existing), unless another mode is given.",
    )
    parser.add_argument(
        "--output", default="demo-output", help="where the store, manifest and dataset (DIR/dataset/) go"
    )
    add_logging_options(parser)
    args, beam_flags = parser.parse_known_args(argv)
    output = os.path.abspath(args.output)
    store = os.path.join(output, "store")
    write_sample_store(store)
    manifest = os.path.join(output, "manifest.parquet")
    write_demo_manifest(manifest)
    os.environ["SONIOX_API_KEY"] = DEMO_KEY
    with LocalServer(store, host="127.0.0.1") as server:
        server.settings.api_key = DEMO_KEY
        print(f"local GetAudio server on {server.address}, store {store}", flush=True)
        run_main(
            [
                f"--manifest={manifest}",
                f"--output={os.path.join(output, 'dataset')}",
                f"--api_host={server.address}",
                "--max_error_ratio=0.5",  # the demo's one bad row is on purpose
                *([] if any(f.split("=")[0] in MODE_FLAGS for f in beam_flags) else ["--skip_existing"]),
                *beam_flags,
            ]
        )
