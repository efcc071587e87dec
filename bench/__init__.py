"""Benchmarks: each prints its figures and writes them to bench/results/ (docs/results.md quotes them)."""
