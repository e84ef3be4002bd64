"""Shared fixtures: the demo checkpoint (built once per machine, cached) and Telugu test speech."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from procs.model.torch_setup import prepare_torch
from tests.ring_helpers import TEST_PREFIX, segments_with_prefix

prepare_torch("cpu")  # before any test imports moshi


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    """Build the demo checkpoint before any server starts, so start-up times exclude the first build."""
    out = subprocess.run([sys.executable, "-m", "procs.model.build_demo"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


@pytest.fixture
def no_leaked_segments():
    """The test leaves no shared-memory segment of this process's test rings behind."""
    mine = f"{TEST_PREFIX}-{os.getpid()}"
    before = segments_with_prefix(mine)
    yield
    assert segments_with_prefix(mine) == before
