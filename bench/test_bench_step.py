"""Cost of one batched Moshi step (Mimi encode + LM step + Mimi decode) on the demo checkpoint.

Batch sizes 1, 2, 4, 8 with torch.set_num_threads(1) and (2). A step must take under 80 ms (one Mimi frame)
for the sessions to be served in real time; "RT x" is 80 ms / median step, above 1 is faster than real time.

Run: .venv/bin/pytest bench/test_bench_step.py   (the table is printed at the end)
Builds the demo checkpoint in the cache directory on first use.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from procs.inference.loader import load_engine
from procs.model.demo import demo_checkpoint_dir
from procs.model.engine import StepResult
from procs.model.moshi_engine import MoshiEngine
from procs.model.source import ModelSource
from protocol import BLOCK_MS

FRAME_MS = float(BLOCK_MS)  # one step: a Mimi frame
ROUNDS = 40
WARMUP_ROUNDS = 5


@dataclass
class Row:
    threads: int
    batch: int
    step_ms: float
    max_ms: float
    encode_ms: float
    lm_ms: float
    decode_ms: float


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest):
    rows: list[Row] = []
    yield rows
    if not rows:  # nothing was timed (a --benchmark-disable smoke run)
        return
    lines = [
        "",
        f"Moshi step on the demo checkpoint (medians over {ROUNDS} steps, all slots ready; max = worst step)",
        f"{'threads':>7} {'batch':>5} {'step ms':>8} {'max ms':>8} {'ms/session':>10} {'RT x':>6} "
        f"{'enc ms':>7} {'lm ms':>7} {'dec ms':>7}",
    ]
    for row in sorted(rows, key=lambda r: (r.threads, r.batch)):
        lines.append(
            f"{row.threads:>7} {row.batch:>5} {row.step_ms:>8.1f} {row.max_ms:>8.1f} "
            f"{row.step_ms / row.batch:>10.1f} "
            f"{FRAME_MS / row.step_ms:>6.2f} {row.encode_ms:>7.1f} {row.lm_ms:>7.1f} {row.decode_ms:>7.1f}"
        )
    # Printed past pytest's output capture, so the table shows without -s.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines), flush=True)


@pytest.fixture
def torch_threads(request: pytest.FixtureRequest):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True, ids=lambda n: f"threads{n}")
def test_bench_step(benchmark, table: list[Row], torch_threads: int, batch: int) -> None:
    engine = load_engine("moshi", source=ModelSource(checkpoint=str(demo_checkpoint_dir())), device="cpu",
                         dtype=None, batch_size=batch, log=logging.getLogger("bench"))
    assert isinstance(engine, MoshiEngine)
    engine.warmup()
    rng = np.random.default_rng(batch)
    inputs = [(0.1 * rng.standard_normal((batch, engine.frame_samples))).astype(np.float32) for _ in range(8)]
    ready = np.ones(batch, dtype=bool)
    results: list[StepResult] = []

    def one_step() -> None:
        results.append(engine.step_batch(inputs[len(results) % len(inputs)], ready))

    benchmark.pedantic(one_step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    assert all(r.has_audio.all() for r in results[1:])
    if benchmark.disabled:  # a smoke run (--benchmark-disable): the body ran once, nothing was timed
        return
    measured = results[WARMUP_ROUNDS:]
    step_ms = benchmark.stats.stats.median * 1e3
    table.append(Row(
        threads=torch_threads, batch=batch, step_ms=step_ms, max_ms=benchmark.stats.stats.max * 1e3,
        encode_ms=float(np.median([r.encode_s for r in measured])) * 1e3,
        lm_ms=float(np.median([r.lm_s for r in measured])) * 1e3,
        decode_ms=float(np.median([r.decode_s for r in measured])) * 1e3,
    ))
    benchmark.extra_info.update(
        {"threads": torch_threads, "batch": batch, "ms_per_session": step_ms / batch,
         "realtime_ratio": FRAME_MS / step_ms})
