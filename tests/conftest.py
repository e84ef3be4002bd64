"""Shared fixtures: the demo checkpoint (built once per machine, cached), Telugu test speech, and those of
tests/support/fixtures.py (which bench/conftest.py loads too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from procs.model.torch_setup import prepare_torch
from tests.support.fixtures import loopback_server as loopback_server
from tests.support.fixtures import speech as speech
from tests.support.rings import TEST_PREFIX, segments_with_prefix
from tests.support.speech import conversation_16k, write_wav

prepare_torch("cpu")  # before any test imports moshi

# Property tests assert what holds, not how fast: a loaded 2-core machine may take longer than Hypothesis's
# default 200 ms per example.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")


@pytest.fixture(scope="session")
def demo_checkpoint() -> str:
    """Build the demo checkpoint before any server starts, so start-up times exclude the first build."""
    out = subprocess.run([sys.executable, "-m", "procs.model.build_demo"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


@pytest.fixture(scope="module")
def one_torch_thread():
    """The model steps in these tests are tiny; two intra-op threads on a shared 2-core machine only add
    contention stalls. (Module-scoped: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.)"""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_leaked_segments():
    """The test leaves no shared-memory segment of this process's test rings behind."""
    mine = f"{TEST_PREFIX}-{os.getpid()}"
    before = segments_with_prefix(mine)
    yield
    assert segments_with_prefix(mine) == before


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Telugu utterances with silences between them, 16 kHz mono 16-bit: what Chrome's fake mic plays in the
    browser tests."""
    path = tmp_path_factory.mktemp("microphone") / "telugu_conversation_16k.wav"
    write_wav(path, conversation_16k(), 16_000)
    return path
