"""Benchmarks run on the CPU: torch.compile is decided before anything imports moshi."""

from procs.model.torch_setup import prepare_torch

prepare_torch("cpu")
