"""Benchmarks and measuring scripts. Not installed; the scripts run from the repository root as modules
(`python -m bench.capacity_cpu ...`), so they import the test tooling as tests.support, and each other as
bench.x."""
