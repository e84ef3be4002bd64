"""torch.compile is decided once, before moshi is imported (procs/model/torch_setup.py)."""

from __future__ import annotations

import os
import sys

import pytest

from procs.model.torch_setup import prepare_torch


@pytest.fixture
def before_moshi(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """As in a fresh process: moshi not imported yet, NO_TORCH_COMPILE as the user left it (unset)."""
    monkeypatch.delitem(sys.modules, "moshi.utils.compile", raising=False)
    monkeypatch.delenv("NO_TORCH_COMPILE", raising=False)
    return monkeypatch


def test_compile_is_off_on_the_cpu(before_moshi: pytest.MonkeyPatch) -> None:
    assert prepare_torch("cpu") is False
    assert os.environ["NO_TORCH_COMPILE"] == "1"


def test_compile_stays_on_for_cuda_unless_the_user_turned_it_off(before_moshi: pytest.MonkeyPatch) -> None:
    assert prepare_torch("cuda") is True and "NO_TORCH_COMPILE" not in os.environ
    assert prepare_torch("cuda:1") is True
    before_moshi.setenv("NO_TORCH_COMPILE", "1")
    assert prepare_torch("cuda") is False


def test_an_explicit_choice_wins(before_moshi: pytest.MonkeyPatch) -> None:
    assert prepare_torch("cuda", compile=False) is False and os.environ["NO_TORCH_COMPILE"] == "1"
    assert prepare_torch("cpu", compile=True) is True and "NO_TORCH_COMPILE" not in os.environ


def test_too_late_once_moshi_decided_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import moshi.utils.compile  # noqa: F401  (the tests import moshi with compile off: see conftest)

    monkeypatch.setenv("NO_TORCH_COMPILE", "1")
    assert prepare_torch("cpu") is False  # the same choice again is fine
    with pytest.raises(RuntimeError, match="before anything imports moshi"):
        prepare_torch("cuda", compile=True)
