"""Fixtures the tests and the benchmarks share; tests/conftest.py and bench/conftest.py import them.

`loopback_server`: one real server with the loopback engine per test module. A module that needs more flags
names them once: `pytestmark = pytest.mark.loopback_server("--max-sessions", "2")`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.support.launcher import ServerProcess
from tests.support.speech import telugu_speech_16k, whole_blocks


@pytest.fixture(scope="module")
def loopback_server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    marker = request.node.get_closest_marker("loopback_server")
    flags = marker.args if marker is not None else ()
    with ServerProcess("--engine", "loopback", *flags) as server:
        yield server


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """The default Telugu utterances in whole 80 ms blocks (int16, 16 kHz mono)."""
    return whole_blocks(telugu_speech_16k())
