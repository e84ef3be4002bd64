"""One batched step of the demo checkpoint held as stored (fp32 on the CPU) and with int8 weights (and with
int8 weights + an fp8 KV cache + a reduced context), at batch 8 and 32, one torch thread.

Each footprint is timed in the same run as the model as stored, and the table prints its median against
that baseline: these machines are shared and noisy, so only the ratio means something. bench/RESULTS.md
(issue 17) has the figures and why int8 is not faster here.

Run: .venv/bin/pytest bench/test_bench_footprint.py   (the table is printed at the end)
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pytest
import torch

from procs.inference.loader import load_engine
from procs.model.footprint import Footprint
from procs.model.moshi_engine import MoshiEngine
from procs.model.source import ModelSource

ROUNDS = 20
WARMUP_ROUNDS = 3
FOOTPRINTS = {
    "as stored": Footprint(),
    "int8": Footprint(weights="int8"),
    "int8+fp8+ctx1500": Footprint(weights="int8", context=1500, kv="fp8"),
}


@pytest.fixture(scope="module")
def medians(request: pytest.FixtureRequest):
    found: dict[tuple[str, int], float] = {}
    yield found
    if not found:  # a --benchmark-disable smoke run: nothing was timed
        return
    lines = ["", f"Demo step by footprint, one thread (medians over {ROUNDS} steps; ratio: against as "
             "stored)"]
    for (name, batch), ms in sorted(found.items(), key=lambda item: (item[0][1], item[0][0])):
        base = found.get(("as stored", batch))
        ratio = f"{ms / base:.2f}x" if base else "-"
        lines.append(f"  batch {batch:>2}  {name:<18} {ms:7.1f} ms  {ratio}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [8, 32])
@pytest.mark.parametrize("name", list(FOOTPRINTS))
def test_bench_footprint_step(benchmark, medians: dict, one_thread: None, name: str, batch: int) -> None:
    engine = load_engine("moshi", source=ModelSource(), device="cpu", batch_size=batch,
                         log=logging.getLogger("bench"), footprint=FOOTPRINTS[name])
    assert isinstance(engine, MoshiEngine)
    engine.warmup()
    rng = np.random.default_rng(batch)
    inputs = [(0.1 * rng.standard_normal((batch, engine.frame_samples))).astype(np.float32) for _ in range(4)]
    ready = np.ones(batch, dtype=bool)
    steps: list[bool] = []

    def one_step() -> None:
        steps.append(bool(engine.step_batch(inputs[len(steps) % len(inputs)], ready).has_audio.all()))

    benchmark.pedantic(one_step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    assert all(steps[1:])
    if benchmark.disabled:
        return
    medians[(name, batch)] = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update({"footprint": name, "batch": batch})


@pytest.fixture(scope="module")
def linear_medians(request: pytest.FixtureRequest):
    found: dict[tuple[str, int], float] = {}
    yield found
    if not found:
        return
    lines = ["", f"One 4096 x 4096 linear layer, one thread (medians over {ROUNDS * 5} calls; ratio: against "
             "bf16)"]
    for (kind, rows), ms in sorted(found.items(), key=lambda item: (item[0][1], item[0][0])):
        base = found.get(("bf16", rows))
        lines.append(f"  rows {rows:>2}  {kind:<5} {ms:7.2f} ms  {f'{ms / base:.2f}x' if base else '-'}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_bench_linear_at_real_width(benchmark, linear_medians: dict, one_thread: None, kind: str,
                                    rows: int) -> None:
    """The 7B's width: where int8 rows save reads, as on a GPU (bf16 activations; on the CPU the int8 layer
    takes torch._weight_int8pack_mm)."""
    from torch import nn

    from procs.model.int8 import Int8Linear

    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    layer = Int8Linear.from_linear(linear.to(dtype)) if kind == "int8" else linear.to(dtype)
    x = torch.randn(rows, 4096, dtype=dtype)
    with torch.no_grad():
        benchmark.pedantic(layer, args=(x,), rounds=ROUNDS * 5, iterations=1, warmup_rounds=WARMUP_ROUNDS)
        assert layer(x).shape == (rows, 4096)
    if not benchmark.disabled:
        linear_medians[(kind, rows)] = benchmark.stats.stats.median * 1e3
