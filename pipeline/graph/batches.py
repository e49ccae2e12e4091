"""Keyed elements carried across a shuffle in batches: one element per hash bucket and bundle, not per clip.

A rerun joins a million requests, earlier table rows and listed files by clip_id. As one element each, Beam's
per-element work (the data plane, a coder and a pickle per element, on both sides of the shuffle) was most
of its CPU and every element was held apart in the in-process runner's memory. Batched per bucket of keys
(a stable hash, the same on every worker), a shuffle moves one pickled list per bucket and bundle, and the
step after it groups a bucket's elements by key itself (`by_key`). Beam's own batching does not fit:
`BatchElements` is not keyed, and `GroupIntoBatches` keeps state per element.
"""

from __future__ import annotations

import pickle
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.typehints import Tuple
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

BATCH = 1000  # elements per batch at most: a batch is decoded whole on the other side
PER_BUCKET = 20_000  # elements a bucket holds, about: a step after the shuffle holds one bucket's
MAX_BUCKETS = 10_000


def bucket_count(elements: int) -> int:
    """Buckets for about `elements` keyed elements: enough for every worker of a large job to take some."""
    return max(1, min(MAX_BUCKETS, -(-elements // PER_BUCKET)))


def bucket_of(key: Any, buckets: int) -> int:
    """A key's bucket: a hash that does not change between processes (Python's `hash` of a str does)."""
    return zlib.crc32(str(key).encode()) % buckets


class _Batch(beam.DoFn):
    """(key, value) -> (bucket, pickled [(key, value), ...]) when a bucket's batch is full or the bundle ends."""

    def __init__(self, buckets: int):
        self.buckets = buckets

    def start_bundle(self) -> None:
        self.pending: dict[int, list[tuple[Any, Any]]] = defaultdict(list)

    def process(self, item: tuple[Any, Any]) -> Iterator[tuple[int, bytes]]:
        bucket = bucket_of(item[0], self.buckets)
        batch = self.pending[bucket]
        batch.append(item)
        if len(batch) >= BATCH:
            yield bucket, self._take(bucket)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for bucket in list(self.pending):
            yield WindowedValue((bucket, self._take(bucket)), MIN_TIMESTAMP, [GlobalWindow()])

    def _take(self, bucket: int) -> bytes:
        return pickle.dumps(self.pending.pop(bucket), pickle.HIGHEST_PROTOCOL)


def batched(buckets: int) -> beam.PTransform:
    """(key, value) -> (bucket, batch): ready for a GroupByKey or CoGroupByKey by bucket."""
    return beam.ParDo(_Batch(buckets)).with_output_types(Tuple[int, bytes])


def unbatched(batches: Iterable[bytes]) -> Iterator[tuple[Any, Any]]:
    """A bucket's (key, value) pairs, from its batches."""
    for batch in batches:
        yield from pickle.loads(batch)


def by_key(groups: dict[str, Iterable[bytes]]) -> dict[Any, dict[str, list[Any]]]:
    """A bucket's co-grouped batches as {key: {tag: [values]}}; a tag with no value for a key is left out (a
    million keys' empty lists cost as much as their values)."""
    keyed: dict[Any, dict[str, list[Any]]] = {}
    for tag, batches in groups.items():
        for key, value in unbatched(batches):
            group = keyed.get(key)
            if group is None:
                keyed[key] = {tag: [value]}
            elif tag in group:
                group[tag].append(value)
            else:
                group[tag] = [value]
    return keyed
