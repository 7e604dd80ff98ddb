"""Benchmarks: scripts with a same-run baseline, never pass/fail tests."""
