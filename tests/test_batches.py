"""Keyed elements carried across a shuffle in batches (pipeline/graph/batches.py), in a real Beam pipeline."""

from __future__ import annotations

import subprocess
import sys

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from pipeline.graph.batches import batched, bucket_count, bucket_of, by_key

KEYS = ["clip-a", "clip-b", 7, None, "x" * 200]


def test_a_keys_bucket_is_the_same_in_every_process() -> None:
    """Workers bucket apart: a key must land in the same bucket whatever the process's hash seed."""
    code = f"from pipeline.graph.batches import bucket_of; print([bucket_of(k, 97) for k in {KEYS!r}])"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True, text=True, check=True
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {str([bucket_of(k, 97) for k in KEYS])}


def test_bucket_count_grows_with_the_elements_within_bounds() -> None:
    assert bucket_count(0) == 1
    assert bucket_count(1_000_000) == 50
    assert bucket_count(10**12) == 10_000


def test_each_key_meets_its_values_from_every_input_in_one_bucket_and_batches_cross() -> None:
    """5,000 clips' requests and rows and one listed file each, over 7 buckets: each key's group holds exactly
    its own values from each input, and the shuffle carries batches (at most one partial per bucket, input and
    bundle), not 15,000 elements."""
    n, buckets = 5_000, 7
    requests = [(f"c{i}", f"request {i}") for i in range(n)]
    rows = [(f"c{i}", {"row": i}) for i in range(n)]
    listed = [(f"c{i}", (f"clips/c{i}.wav", i)) for i in range(0, n, 2)] + [("stray.txt", ("stray.txt", 1))]
    with beam.Pipeline() as p:
        inputs = {"requests": requests, "rows": rows, "listed": listed}
        groups = {
            tag: p | f"Create{tag}" >> beam.Create(items) | f"Batch{tag}" >> batched(buckets)
            for tag, items in inputs.items()
        }
        crossing = [groups[tag] | f"Count{tag}" >> beam.combiners.Count.Globally() for tag in groups]
        decided = (
            groups
            | beam.CoGroupByKey()
            | beam.FlatMap(lambda item: sorted(by_key(item[1]).items(), key=lambda kv: str(kv[0])))
        )
        listed_of = {f"c{i}": {"listed": [(f"clips/c{i}.wav", i)]} for i in range(0, n, 2)}
        expected = [
            (f"c{i}", {"requests": [f"request {i}"], "rows": [{"row": i}], **listed_of.get(f"c{i}", {})})
            for i in range(n)
        ] + [("stray.txt", {"listed": [("stray.txt", 1)]})]
        assert_that(decided, equal_to(expected), label="Groups")
        most = n // 100  # batches of 1,000 (BATCH), and a partial one per bucket: 12
        for tag, count in zip(groups, crossing, strict=True):
            assert_that(count, at_most(most), label=f"Few{tag}")


def at_most(most: int):
    def check(counts: list[int]) -> None:
        assert counts[0] <= most, f"{counts[0]} elements crossed the shuffle; batches would be at most {most}"

    return check
