"""How many shards a sharded layout gets: `--shards N`, or enough for shards of about `--shard_mb` each, estimated
at launch from the manifest's time ranges (one column read; no call); Lhotse Shar's, 1,000 clips each by default.

The estimate takes 16 kHz 16-bit audio of one channel (`--channels mix`, or mono objects; a multi-channel object's
clips are as many times larger), FLAC at about 55 % of WAV, and a token range as long as the mean time range (5 s
in a manifest of token ranges only). The count is fixed when a dataset is first built: a rerun over it keeps its
shards (a clip's shard is its clip_id's hash modulo the count), so a dataset that grows far past its first size
has larger shards until it is rebuilt with --overwrite.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.core.audio import BYTES_PER_SAMPLE, SAMPLES_PER_MS
from pipeline.dataset.layout import FILES, HF_PARQUET, LHOTSE_SHAR, resolve_layout
from pipeline.graph.read import Manifest
from pipeline.launch.existing import Existing

SHARD_MB = {HF_PARQUET: 500}  # the default target, where it is not 1,000 MB (the Hub's advice for Parquet)
DEFAULT_SHARD_MB = 1000
SHARD_CLIPS = {LHOTSE_SHAR: 1000}  # a count of clips by default instead (Lhotse's own default shard size)
FLAC_RATIO = 0.55  # of a speech clip's WAV size
TOKEN_RANGE_MS = 5000  # a token range's length, when no row gives a time range


def shard_count(opts, manifest: Manifest, existing: Existing) -> int:
    """The number of shards this run writes (0 for the files layout)."""
    if opts.layout == FILES or opts.shards:
        return opts.shards
    before = existing.record.options if existing.record else {}
    shards = int(before.get("shards") or 0)
    if (opts.skip_existing or opts.append) and resolve_layout(before.get("layout") or FILES, shards) == opts.layout:
        return shards  # its clips stay in their shards
    if opts.layout in SHARD_CLIPS and not opts.shard_mb:
        return max(1, round(manifest.num_rows / SHARD_CLIPS[opts.layout]))
    target = (opts.shard_mb or SHARD_MB.get(opts.layout, DEFAULT_SHARD_MB)) * 1e6
    return max(1, round(estimated_bytes(manifest, opts.clip_format) / target))  # shards within 1/2N of it


def estimated_bytes(manifest: Manifest, clip_format: str) -> float:
    """The clips' audio bytes, from the time ranges' durations (see the module's docstring)."""
    time_ms, time_rows = 0, 0
    if "duration_ms" in manifest.schema.names:
        for path in manifest.files:
            with FileSystems.open(path) as f:
                durations = pq.read_table(f, columns=["duration_ms"]).column("duration_ms")
            time_ms += pc.sum(durations).as_py() or 0
            time_rows += len(durations) - durations.null_count
    mean_ms = time_ms / time_rows if time_rows else TOKEN_RANGE_MS
    audio_ms = time_ms + (manifest.num_rows - time_rows) * mean_ms
    return audio_ms * SAMPLES_PER_MS * BYTES_PER_SAMPLE * (FLAC_RATIO if clip_format == "flac" else 1.0)
