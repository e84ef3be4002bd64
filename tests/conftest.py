"""Shared fixtures: the demo checkpoint (built once per machine, cached) and Telugu test speech."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.harness import ROOT

os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    """Build the demo checkpoint before any server starts, so start-up times exclude the first build."""
    out = subprocess.run(
        [sys.executable, "-m", "procs.model.demo"], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
