"""Benchmarks of the data path (see README.md here)."""
