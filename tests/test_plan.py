"""`voice-agent plan` (procs/plan.py): sessions per card from a checkpoint's config alone, priced by the
code the engine clamps its capacity with (the two agree on a built model: tests/test_footprint.py and
tests/test_server.py)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from procs.model.demo import LM_FILE, MIMI_FILE, demo_checkpoint_dir
from procs.model.source import ModelSource
from procs.model.variants import build_finetune, write_hub_cache
from procs.plan import GPUS, PlanRow, plan

REPO = "telugu-voice-agent/plan-demo"


def sessions(rows: list[PlanRow], gpu: str, weights: str, kv: str, context: int) -> int:
    (row,) = [r for r in rows if (r.gpu, r.weights, r.kv, r.context) == (gpu, weights, kv, context)]
    return row.sessions


@pytest.fixture(scope="module")
def moshi_7b() -> list[PlanRow]:
    rows, described = plan(ModelSource(random_model="moshi-7b"))
    assert described == "random moshi-7b"
    return rows


def test_the_7b_as_stored_holds_four_sessions_on_an_l4(moshi_7b: list[PlanRow]) -> None:
    # 15.76 GB of weights (LM bf16 + Mimi fp32), 1.59 GB per session at 3,000 steps, 5% of 24 GB kept
    assert sessions(moshi_7b, "L4", "bf16", "bf16", 3000) == 4
    row = next(r for r in moshi_7b if r.weights == "bf16" and r.kv == "bf16" and r.context == 3000)
    assert row.weights_gb == pytest.approx(15.76, abs=0.01) and row.session_mb == pytest.approx(1589, abs=1)


def test_the_7b_reaches_the_briefs_sessions_per_card_held_small(moshi_7b: list[PlanRow]) -> None:
    # the goals of issue 17: L4 >= 10, A40 >= 20, H100 >= 48, H200 >= 96, each by some footprint
    best = {gpu: max(r.sessions for r in moshi_7b if r.gpu == gpu) for gpu, _ in GPUS}
    assert best["L4"] >= 10 and best["A40"] >= 20 and best["H100 80GB"] >= 48 and best["H200"] >= 96
    # and at moshi's full 4 minutes of context, int8 weights with an fp8 cache alone get there
    assert sessions(moshi_7b, "L4", "int8", "fp8", 3000) >= 10
    assert sessions(moshi_7b, "A40", "int8", "fp8", 3000) >= 20
    assert sessions(moshi_7b, "H100 80GB", "int8", "fp8", 3000) >= 48
    assert sessions(moshi_7b, "H200", "int8", "fp8", 3000) >= 96
    for gpu, _ in GPUS:  # every saving only adds sessions
        for weights in ("bf16", "int8"):
            full = sessions(moshi_7b, gpu, weights, "bf16", 3000)
            assert full <= sessions(moshi_7b, gpu, weights, "bf16", 1500) <= sessions(
                moshi_7b, gpu, weights, "fp8", 1500)
            assert full <= sessions(moshi_7b, gpu, weights, "fp8", 3000)
        assert sessions(moshi_7b, gpu, "bf16", "bf16", 3000) <= sessions(moshi_7b, gpu, "int8", "bf16", 3000)


def test_a_hub_repo_is_planned_from_its_config_without_its_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = write_hub_cache(demo_checkpoint_dir(), tmp_path / "hub", REPO)
    for weights in (LM_FILE, MIMI_FILE):
        (snapshot / weights).unlink()  # the planner must not need them: a 15 GB download to plan nothing
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub, described = plan(ModelSource(hf_repo=REPO), dtype=torch.float32, reduced_context=64)
    assert described == f"hf://{REPO} with local overrides"
    from_directory, _ = plan(ModelSource(checkpoint=str(demo_checkpoint_dir())), dtype=torch.float32,
                             reduced_context=64)
    assert [(r.weights_gb, r.session_mb, r.sessions) for r in from_hub] == [
        (r.weights_gb, r.session_mb, r.sessions) for r in from_directory]
    # a LoRA fine-tune directory on that base: fused, its shapes are the base's
    lora = build_finetune(demo_checkpoint_dir(), tmp_path / "ft" / "consolidated", "lora")
    from_finetune, described = plan(ModelSource(checkpoint=str(lora), hf_repo=REPO), dtype=torch.float32,
                                    reduced_context=64)
    assert "fine-tune" in described
    assert [r.session_mb for r in from_finetune] == [r.session_mb for r in from_directory]


@pytest.mark.parametrize("argv", [["--gpu-memory-gb", "0"], ["--random-model", "demo", "--checkpoint", "/x"],
                                  ["--dtype", "int4"], ["--context", "3"], ["--gpu-memory-fraction", "1.5"]])
def test_bad_plan_arguments_are_refused_with_usage(argv: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from procs.plan import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "usage:" in capsys.readouterr().err
