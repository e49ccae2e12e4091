"""`python -m pipeline export DATASET [--formats lhotse,nemo]`: the manifests of a dataset already built (and
copied, or not), from its clips table in one process; and the `--export` option's words. The CLI side of
pipeline/dataset/export.py, whose writers run inside the job and know no command line."""

from __future__ import annotations

import io
import os

import pyarrow.parquet as pq

from pipeline.core.errors import LaunchError
from pipeline.dataset.export import clips_table_files, export_dataset, note_in_dataset
from pipeline.dataset.layout import EXPORTS, HF_DATA_DIR, SHAR_DIR
from pipeline.dataset.storage import open_store
from pipeline.launch.cli import Parser, add_logging_options

NO_TEXT = "its training manifests would hold no text (each pairs a clip's audio with its transcript)"


def parse_exports(value: str | None, option: str = "--export") -> tuple[str, ...]:
    """`lhotse,nemo` -> ("lhotse", "nemo"); a name that is not an export is a LaunchError naming `option`."""
    names = tuple(dict.fromkeys(n.strip() for n in (value or "").split(",") if n.strip()))
    unknown = [n for n in names if n not in EXPORTS]
    if unknown:
        raise LaunchError(f"{option} takes a comma-separated list of {', '.join(EXPORTS)}; got {', '.join(unknown)}")
    return names


def main(argv: list[str]) -> None:
    """`python -m pipeline export DATASET [--formats lhotse,nemo]`: write the manifests of a built dataset."""
    parser = Parser(prog="python -m pipeline export", description=main.__doc__)
    parser.add_argument("dataset", help="the dataset's root (a run's --output): a folder, gs:// or s3://")
    parser.add_argument("--formats", default=",".join(EXPORTS), help="comma-separated: lhotse, nemo (default: both)")
    add_logging_options(parser)
    args = parser.parse_args(argv)
    formats = parse_exports(args.formats, "--formats")
    output = args.dataset if "://" in args.dataset else os.path.abspath(args.dataset)
    try:
        store = open_store(output)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    files = clips_table_files(store, output)
    if not files:
        raise LaunchError(f"{output}: no clips table (metadata/clips-*.parquet): not a dataset this pipeline built")
    first = pq.ParquetFile(io.BytesIO(store.read(files[0])))
    columns = first.schema_arrow.names
    if "transcript_text" not in columns:
        raise LaunchError(f"{output} was built without --with_transcripts: {NO_TEXT}")
    paths = first.read(columns=["path"]).column("path").to_pylist()[:1]
    folder = paths[0].split("/", 1)[0] if paths else None
    if folder in (HF_DATA_DIR, SHAR_DIR):  # the layout is its own training format (options.check_values)
        raise LaunchError(
            f"{output}: NeMo and Lhotse manifests are written for clip files or tar shards, not {folder}/"
        )
    try:
        for path in export_dataset(store, output, formats, files, sharded="member" in columns):
            print(path, flush=True)
        note_in_dataset(store, output, formats)
    except ValueError as e:  # Lhotse asked of a sharded dataset, found before anything is written
        raise LaunchError(str(e)) from None
    finally:
        store.remove_scratch()  # what the scratch files left went into place, or is of no use
