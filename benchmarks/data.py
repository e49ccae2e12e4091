"""The benchmark's store and manifests: mono 16 kHz objects, one long stereo object, 5-second clip rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from pipeline.core.audio import SAMPLE_RATE
from pipeline.local.samples import sample_audio

CLIP_MS = 5_000
LONG_OBJECT = "long-stereo"


def mono_ids(n_objects: int) -> list[str]:
    return [f"bench-mono-{i:02d}" for i in range(n_objects)]


def write_store(root: str, n_objects: int, object_s: int, long_s: int) -> dict[str, int]:
    """`n_objects` mono objects of `object_s` seconds and (if long_s) one stereo object of `long_s` seconds.

    The long object is written a minute at a time, so that it is never held whole in memory.
    Returns object_id -> duration in ms.
    """
    os.makedirs(root, exist_ok=True)
    durations = {}
    for seed, object_id in enumerate(mono_ids(n_objects)):
        sf.write(os.path.join(root, f"{object_id}.wav"), sample_audio(object_s, 1, seed), SAMPLE_RATE, "PCM_16")
        durations[object_id] = object_s * 1000
    if long_s:
        path = os.path.join(root, f"{LONG_OBJECT}.wav")
        with sf.SoundFile(path, "w", SAMPLE_RATE, 2, "PCM_16") as f:
            for i, start in enumerate(range(0, long_s, 60)):
                f.write(sample_audio(min(60, long_s - start), 2, 1000 + i))
        durations[LONG_OBJECT] = long_s * 1000
    return durations


def clip_rows(n_rows: int, n_objects: int, object_s: int, seed: int = 0) -> pa.Table:
    """`n_rows` 5-second time ranges, round-robin over the mono objects at random starts (whole ms)."""
    rng = np.random.default_rng(seed)
    ids = mono_ids(n_objects)
    starts = rng.integers(0, object_s * 1000 - CLIP_MS + 1, size=n_rows)
    return pa.table(
        {
            "clip_id": pa.array([f"clip-{i:06d}" for i in range(n_rows)], pa.string()),
            "object_id": pa.array([ids[i % n_objects] for i in range(n_rows)], pa.string()),
            "start_ms": pa.array(starts, pa.int64()),
            "duration_ms": pa.array([CLIP_MS] * n_rows, pa.int64()),
        }
    )


def write_manifest(path: str, table: pa.Table) -> str:
    pq.write_table(table, path)
    return path


def single_row(object_id: str, start_ms: int, duration_ms: int, clip_id: str) -> pa.Table:
    return pa.table(
        {
            "clip_id": pa.array([clip_id], pa.string()),
            "object_id": pa.array([object_id], pa.string()),
            "start_ms": pa.array([start_ms], pa.int64()),
            "duration_ms": pa.array([duration_ms], pa.int64()),
        }
    )
