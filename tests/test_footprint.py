"""How a model is held (`--quantize int8`, `--context N`, `--kv-dtype fp8`; procs/model/footprint.py) on real
moshi modules: int8 rows reproduce a linear layer, the fp8 ring keeps moshi's positions, batched masked
steps with per-slot resets give each session what it gets alone, the memory the engine counts is what its
streaming state holds, and the planner's number is the clamp's. (Every checkpoint layout with all three:
tests/test_checkpoints.py.)"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from moshi.modules.transformer import RingKVCache
from torch import nn

from procs.config import DEFAULTS
from procs.inference.loader import load_engine
from procs.model.capacity import held_state_bytes, session_bytes, weight_bytes
from procs.model.compact import apply_footprint
from procs.model.footprint import Footprint
from procs.model.int8 import Int8Linear, _dequantized_linear, quantize_linears
from procs.model.kv_cache import Float8RingKVCache, ServingAttention
from procs.model.moshi_engine import MoshiEngine
from procs.model.source import ModelSource
from protocol import OUT_SAMPLES_PER_BLOCK

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOG = logging.getLogger("test_footprint")
FRAME = OUT_SAMPLES_PER_BLOCK  # one step's audio at 24 kHz
FOOTPRINTS = {
    "int8": Footprint(weights="int8"),
    "fp8": Footprint(kv="fp8"),
    "context": Footprint(context=20),
    "all": Footprint(weights="int8", context=20, kv="fp8"),
}


def engine_for(footprint: Footprint, batch_size: int, source: ModelSource | None = None, **kwargs
               ) -> MoshiEngine:
    engine = load_engine("moshi", source=source or ModelSource(), batch_size=batch_size, log=LOG,
                         greedy=True, seed=0, footprint=footprint, **kwargs)
    assert isinstance(engine, MoshiEngine)
    return engine


# ---- int8 rows ---------------------------------------------------------------------------------------------


def test_int8_rows_reproduce_a_linear_layer() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(5, 3, 256)
    int8 = Int8Linear.from_linear(linear)
    assert int8.weight.dtype == torch.int8 and int8.scale.shape == (96,)
    assert (int8.weight.abs().amax(dim=1) == 127).all()  # each row's largest weight sets its scale
    with torch.no_grad():
        reference, got = linear(x), int8(x)
    assert got.shape == reference.shape and got.dtype == torch.float32
    assert ((got - reference).norm() / reference.norm()).item() < 0.01
    # bf16 activations on the CPU take torch._weight_int8pack_mm: the dequantized formulation's numbers.
    int8_bf16 = Int8Linear.from_linear(copy.deepcopy(linear).bfloat16())
    x16 = x.bfloat16()
    with torch.no_grad():
        packed = int8_bf16(x16)
        dequantized = _dequantized_linear(x16, int8_bf16.weight, int8_bf16.scale) + int8_bf16.bias
    assert packed.dtype == torch.bfloat16
    assert torch.allclose(packed.float(), dequantized.float(), rtol=0.02, atol=0.02)
    # fp16 (the path a CUDA card takes): rows are scaled before the product, so raw int8 values never
    # multiply activations (127 x 4 x 11,264 inputs would pass fp16's 65,504)
    wide = nn.Linear(11264, 8, bias=False)
    int8_fp16 = Int8Linear.from_linear(wide)
    x_fp16 = torch.full((2, 11264), 4.0, dtype=torch.float16)
    with torch.no_grad():
        y = _dequantized_linear(x_fp16, int8_fp16.weight, int8_fp16.scale)
        reference = wide(x_fp16.float())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), reference, rtol=0.02, atol=0.05)


def test_int8_replaces_every_linear_layer_of_the_lm_and_halves_its_weights() -> None:
    from moshi.models import loaders

    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(loaders._lm_kwargs), device="meta", dtype=torch.bfloat16)
    before = weight_bytes(lm)
    linears = sum(isinstance(m, nn.Linear) for m in lm.modules())
    assert quantize_linears(lm) == linears and not any(isinstance(m, nn.Linear) for m in lm.modules())
    after = weight_bytes(lm)
    # 7.37 B linear parameters go from 2 bytes to 1 (plus a float32 scale per row); the rest stays bf16.
    assert 7.30e9 < before - after < 7.40e9


# ---- the fp8 ring ------------------------------------------------------------------------------------------


def test_the_fp8_ring_keeps_moshis_positions_and_values_to_fp8_precision() -> None:
    batch, heads, dim, capacity = 3, 2, 16, 5
    ours = Float8RingKVCache(batch, heads, dim, capacity, respect_exec_mask=True, device=torch.device("cpu"),
                             dtype=torch.float32)
    moshis = RingKVCache(batch, heads, dim, capacity, respect_exec_mask=True, device=torch.device("cpu"),
                         dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    for step in range(9):
        # magnitudes from 1e-3 to 1e3 across heads: each vector has its own scale
        magnitude = torch.logspace(-3, 3, heads)[:, None, None]
        k = torch.randn(batch, heads, 1, dim, generator=generator) * magnitude
        v = torch.randn(batch, heads, 1, dim, generator=generator)
        exec_mask = torch.tensor([True, step % 2 == 0, step >= 4])
        if step == 6:
            reset = torch.tensor([False, False, True])
            ours.reset(reset)
            moshis.reset(reset)
        got, want = ours.complete(k, v, exec_mask), moshis.complete(k, v, exec_mask)
        assert torch.equal(got.positions, want.positions)
        valid = (want.positions >= 0)[:, None, :, None].expand_as(want.keys)
        for ours_values, moshis_values in ((got.keys, want.keys), (got.values, want.values)):
            assert ours_values.dtype == torch.float32
            error = (ours_values - moshis_values).abs()[valid]
            # e4m3 keeps 3 mantissa bits: a value rounds within 1/16 of itself (subnormals: far less)
            bound = moshis_values.abs()[valid] / 16 + 1e-6 * moshis_values.abs().amax()
            assert (error <= bound).all()


# ---- the engine with each footprint ------------------------------------------------------------------------


def staggered_tokens(engine: MoshiEngine, active: list[int], audio: np.ndarray, starts: list[int]
                     ) -> dict[int, list[np.ndarray]]:
    """Greedy tokens of the sessions in `active`, each starting at its step in `starts` (others masked)."""
    slots, steps = audio.shape[0], audio.shape[1]
    for slot in range(slots):
        engine.reset_slot(slot)
    got: dict[int, list[np.ndarray]] = {s: [] for s in active}
    for t in range(steps + max(starts[s] for s in active)):
        ready = np.array([s in active and starts[s] <= t < starts[s] + steps for s in range(slots)])
        if not ready.any():
            continue
        pcm = np.zeros((slots, FRAME), np.float32)
        for s in np.flatnonzero(ready):
            pcm[s] = audio[s, t - starts[s]]
        tokens = engine.step_batch(pcm, ready).tokens
        for s in np.flatnonzero(ready):
            got[int(s)].append(tokens[s].copy())
    return got


@pytest.mark.parametrize("name", FOOTPRINTS)
def test_masked_batched_steps_give_each_session_what_it_gets_alone(name: str) -> None:
    footprint = FOOTPRINTS[name]
    engine = engine_for(footprint, batch_size=3)
    attentions = [m for m in engine.lm.transformer.modules() if isinstance(m, ServingAttention)]
    assert len(attentions) == 2 and all(a.kv_format == footprint.kv for a in attentions)
    assert engine.lm.context == (footprint.context or 3000)
    assert any(isinstance(m, Int8Linear) for m in engine.lm.modules()) == (footprint.weights == "int8")
    steps = 30  # past the reduced context of 20
    audio = (0.1 * np.random.default_rng(7).standard_normal((3, steps, FRAME))).astype(np.float32)
    starts = [0, 3, 7]
    together = staggered_tokens(engine, [0, 1, 2], audio, starts)
    for slot in range(3):
        alone = staggered_tokens(engine, [slot], audio, starts)[slot]
        assert np.array_equal(np.stack(together[slot]), np.stack(alone)), f"slot {slot}"
    # and the footprint changes what the model says: it is not a no-op
    plain = staggered_tokens(engine_for(Footprint(), batch_size=3), [0], audio, starts)[0]
    assert not np.array_equal(np.stack(plain), np.stack(together[0]))


# ---- memory: counted, held, planned ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain", *FOOTPRINTS])
def test_the_engine_counts_the_state_its_sessions_hold(name: str) -> None:
    """`session_bytes` (what the clamp and the planner use) against what a streaming engine holds: the KV
    rings exactly, per session (holdings at batch 2 and 4, so batch-independent state cancels)."""
    footprint = FOOTPRINTS.get(name, Footprint())
    held = {}
    for batch in (2, 4):
        engine = engine_for(footprint, batch_size=batch)
        held[batch] = held_state_bytes([engine.lm_gen, *engine.lm.modules(), *engine.mimi.modules()])
        counted = session_bytes(engine.mimi, engine.lm)
    rings_per_session = (held[4][0] - held[2][0]) // 2
    assert rings_per_session == counted.lm_kv + counted.mimi  # the depformer's ring lives within a step
    everything_per_session = (held[4][1] - held[2][1]) / 2
    # the rest a session holds (offsets, masks, Mimi's convolution buffers, the token cache) is small
    assert counted.lm_kv + counted.mimi <= everything_per_session <= 1.05 * counted.total + 64 * 1024


def test_the_clamp_at_start_up_is_the_planners_number() -> None:
    from procs.plan import plan

    for footprint in FOOTPRINTS.values():
        engine = engine_for(footprint, batch_size=1)
        share = DEFAULTS.gpu_memory_fraction  # the engine's and the planner's, as serve's
        card_bytes = int((engine.weights_bytes + 5.5 * engine.per_session_bytes) / share)  # room for 5.5
        rows, _ = plan(ModelSource(), dtype=torch.float32, reduced_context=20,
                       gpus=(("card", card_bytes / 1e9),), gpu_memory_fraction=share)
        (row,) = [r for r in rows if (r.weights == "int8") == (footprint.weights == "int8")
                  and (r.kv == "fp8") == (footprint.kv == "fp8") and r.context == engine.lm.context]
        assert row.session_mb * 1e6 == pytest.approx(engine.per_session_bytes, abs=1)  # the same count
        assert row.weights_gb * 1e9 == pytest.approx(engine.weights_bytes, abs=1)
        clamped = engine_for(footprint, batch_size=64, card_memory_bytes=int(row.gpu_memory_gb * 1e9))
        assert clamped.batch_size == row.sessions == 5


def test_apply_footprint_refuses_what_cannot_be_combined() -> None:
    engine = engine_for(Footprint(), batch_size=1)
    with pytest.raises(ValueError, match="longer than the model"):
        apply_footprint(copy.deepcopy(engine.lm), Footprint(context=4000))
    with pytest.raises(ValueError, match="at least"):
        Footprint(context=8)
    from moshi.models import loaders

    from procs.model.demo import demo_lm_config

    # heads of 6 values: the float32 scale after each vector in the uint8 ring would sit misaligned
    odd_heads = loaders.get_moshi_lm(None, lm_kwargs=demo_lm_config(400) | {"dim": 120, "num_heads": 20},
                                     device="meta", dtype=torch.float32)
    with pytest.raises(ValueError, match="divisible by 4"):
        apply_footprint(odd_heads, Footprint(kv="fp8"))
