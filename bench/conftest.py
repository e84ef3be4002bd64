"""Benchmarks run on the CPU: torch.compile is decided before anything imports moshi. The tests' shared
fixtures (tests/support/fixtures.py) serve the benchmarks too."""

from procs.model.torch_setup import prepare_torch
from tests.support.fixtures import loopback_server as loopback_server

prepare_torch("cpu")
