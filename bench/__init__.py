"""Benchmarks: scripts that print a table and write bench/results/*.json (see docs/benchmarks.md)."""
