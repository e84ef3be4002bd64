"""Shared fixtures: the demo checkpoint (built once per machine, cached) and Telugu test speech."""

from __future__ import annotations

import subprocess
import sys

import pytest

from procs.model.torch_setup import prepare_torch
from tests.harness import ROOT

prepare_torch("cpu")  # before any test imports moshi


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    """Build the demo checkpoint before any server starts, so start-up times exclude the first build."""
    out = subprocess.run([sys.executable, "-m", "procs.model.build_demo"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
