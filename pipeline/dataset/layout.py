"""The dataset on disk, defined once: the name of everything a dataset holds, and its path under the root.

A name is relative to the dataset's root (`clips/a.wav`, `metadata/clips-0f3a.parquet`); the tables, the record
and the exports hold names, never full paths, so a copied or uploaded dataset still resolves. A path is the
root (`--output`: a folder, gs://bucket/prefix or s3://bucket/prefix) joined with a name.

    {root}/clips/{clip_id}.wav | .flac       one clip per file (the `files` layout)
    {root}/shards/audio_NNNNN.tar            or WebDataset tar shards (`--layout webdataset`), as NeMo names them
    {root}/data/train-NNNNN.parquet          or Hugging Face Parquet shards (`--layout hf-parquet`)
    {root}/metadata/clips-{hash}.parquet     the clips table, one file per bundle
    {root}/metadata/errors-{hash}.parquet    the errors table
    {root}/README.md, duration_histogram.png the dataset card
    {root}/nemo_manifest.jsonl               exports (`--export`), at the root: NeMo resolves a relative path
    {root}/lhotse_{cuts,...}.jsonl.gz        against its manifest's folder
    {root}/_RUN.json                         the run record, written last
    {root}/_LEASE.json                       the run holding the output (pipeline/dataset/lease.py)
    {root}/_tmp/                             a local run's scratch files, and a run's export parts
"""

from __future__ import annotations

import re

FILES, WEBDATASET, HF_PARQUET, LHOTSE_SHAR = "files", "webdataset", "hf-parquet", "lhotse-shar"
LAYOUTS = (FILES, WEBDATASET, HF_PARQUET, LHOTSE_SHAR)  # --layout
CLIPS_DIR = "clips"
SHARDS_DIR = "shards"
HF_DATA_DIR = "data"
SHAR_DIR = "shar"  # only Shar's files: Lhotse takes every name in it for a field
METADATA_DIR = "metadata"
TABLES = ("clips", "errors")
CARD_NAME = "README.md"
HISTOGRAM_NAME = "duration_histogram.png"
NEMO_MANIFEST = "nemo_manifest.jsonl"
LHOTSE_FILES = ("recordings", "supervisions", "cuts")
LHOTSE, NEMO = "lhotse", "nemo"  # the exports' names (--export)
EXPORTS = (LHOTSE, NEMO)
RECORD_NAME = "_RUN.json"
LEASE_NAME = "_LEASE.json"
TMP_DIR = "_tmp"  # scratch (on a bucket only the exports' parts): readers ignore names starting with "_"
EXPORT_PARTS_DIR = f"{TMP_DIR}/exports"  # the manifests' parts, one per bundle, joined by the last step
_SHARD = re.compile(  # shard-NNNNN.tar: an earlier version's name, renamed on a rerun
    r"(?:(?:audio_|shard-|train-)(\d+)\.(?:tar|parquet)|(?:recording|cuts)\.(\d+)\.(?:tar|jsonl\.gz))$"
)


def root_of(output: str) -> str:
    return output.rstrip("/")


def path_of(output: str, name: str) -> str:
    """The path of a dataset's file from its name."""
    return f"{root_of(output)}/{name}"


def name_of(output: str, path: str) -> str:
    """A path under `output` as the dataset names it: relative to its root."""
    root = root_of(output) + "/"
    if not path.startswith(root):
        raise ValueError(f"{path} is not under the output {output}")
    return path[len(root) :]


def clip_name(clip_id: str, clip_format: str = "wav") -> str:
    return f"{CLIPS_DIR}/{clip_id}.{clip_format}"


def resolve_layout(layout: str, shards: int) -> str:
    """The layout a run writes: `--layout`, where `--shards N` alone (an earlier version's flag) is webdataset."""
    return WEBDATASET if layout == FILES and shards > 0 else layout


def shards_dir(layout: str) -> str:
    """The folder of a layout's shards (or clips)."""
    return {FILES: CLIPS_DIR, WEBDATASET: SHARDS_DIR, HF_PARQUET: HF_DATA_DIR, LHOTSE_SHAR: SHAR_DIR}[layout]


def shard_name(shard: int, layout: str = WEBDATASET) -> str:
    """A tar is named as NeMo's Lhotse-based loader asks (`audio[^/]*_(\\d+)[^/]*\\.tar`); a Parquet shard
    as the Hugging Face Hub's train split (the card's `configs` names them)."""
    if layout == HF_PARQUET:
        return f"{HF_DATA_DIR}/train-{shard:05d}.parquet"
    if layout == LHOTSE_SHAR:
        return f"{SHAR_DIR}/recording.{shard:06d}.tar"
    return f"{SHARDS_DIR}/audio_{shard:05d}.tar"


def shard_names(shard: int, layout: str) -> tuple[str, ...]:
    """Every file of one shard: its name (the tables' `path`), and a Lhotse Shar shard's cuts beside it."""
    name = shard_name(shard, layout)
    return (name, f"{SHAR_DIR}/cuts.{shard:06d}.jsonl.gz") if layout == LHOTSE_SHAR else (name,)


def shard_index(name: str) -> int:
    """The number of the shard a table row's `path` names."""
    found = _SHARD.search(name)
    if found is None:
        raise ValueError(f"{name} is not a shard's name")
    return int(found.group(1) or found.group(2))


def table_prefix(output: str, table: str) -> str:
    """What every file of a table starts with (a glob is this plus `*.parquet`)."""
    return path_of(output, f"{METADATA_DIR}/{table}-")


def lhotse_name(part: str) -> str:
    """At the root, as the NeMo manifest is: NeMo's `cuts_path` resolves the sources against the cuts' folder."""
    return f"lhotse_{part}.jsonl.gz"


def export_names(formats: tuple[str, ...]) -> list[str]:
    """The files an export writes, by format name ("nemo", "lhotse")."""
    names = {NEMO: [NEMO_MANIFEST], LHOTSE: [lhotse_name(part) for part in LHOTSE_FILES]}
    return [name for f in formats for name in names[f]]


def export_of(name: str) -> str | None:
    """The format of an export file a record lists, this version's names or an earlier one's (`lhotse/*`)."""
    if name == NEMO_MANIFEST:
        return NEMO
    if name in export_names((LHOTSE,)) or name.startswith("lhotse/"):
        return LHOTSE
    return None


def export_part_name(manifest: str, digest: str) -> str:
    """A worker's part of an export manifest, named for its content (a retried bundle writes the same name)."""
    return f"{EXPORT_PARTS_DIR}/{manifest}/{digest}"


def export_part_of(name: str) -> str:
    """The manifest that a part (by its name) belongs to."""
    return name[len(EXPORT_PARTS_DIR) + 1 :].split("/", 1)[0]


def clip_path(output: str, clip_id: str, clip_format: str = "wav") -> str:
    return path_of(output, clip_name(clip_id, clip_format))


def record_path(output: str) -> str:
    return path_of(output, RECORD_NAME)


def lease_path(output: str) -> str:
    return path_of(output, LEASE_NAME)


def tmp_path(output: str) -> str:
    return path_of(output, TMP_DIR)
