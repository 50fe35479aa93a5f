"""Throughput and scaling benchmarks (not tests): `python -m benchmarks` runs them all; see __main__.py."""
