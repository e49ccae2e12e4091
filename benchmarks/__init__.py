"""The performance benchmark: `python -m benchmarks.run` (or `make bench`)."""
