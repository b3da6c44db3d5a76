"""Benchmarks: `python -m bench.run` (see README and docs/benchmarks.md)."""
