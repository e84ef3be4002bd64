"""The batched Moshi engine on the real demo checkpoint (real moshi modules), and the loopback engine."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from moshi.models import loaders

from procs.inference.loader import load_engine
from procs.model.capacity import kv_cache_bytes_per_session, lm_kv_cache_bytes, max_sessions_for_memory
from procs.model.checkpoints import checkpoint_info_from_dir, parse_dtype
from procs.model.demo import demo_checkpoint_dir
from procs.model.engine import EngineOOM, LoopbackEngine, StepResult
from procs.model.moshi_engine import MoshiEngine, text_piece_table
from procs.model.source import ModelSource
from protocol import OUT_RATE, OUT_SAMPLES_PER_BLOCK

FRAME = OUT_SAMPLES_PER_BLOCK  # one step's audio at 24 kHz
pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOG = logging.getLogger("test_engine")


@pytest.fixture(scope="module")
def demo_dir():
    return demo_checkpoint_dir()


def new_engine(batch_size: int, demo_dir) -> MoshiEngine:
    """A fresh engine (fresh streaming state) on the demo checkpoint, greedy so runs are reproducible."""
    engine = load_engine("moshi", source=ModelSource(checkpoint=str(demo_dir)), device="cpu",
                         batch_size=batch_size, log=LOG, greedy=True)
    assert isinstance(engine, MoshiEngine)
    return engine


def audio(seed: int, steps: int) -> np.ndarray:
    """[steps, 1920] of speech-band noise bursts: different seeds give different signals."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps * FRAME) / OUT_RATE
    pitch, wobble = rng.uniform(100, 300), rng.uniform(1, 4)
    tone = 0.2 * np.sin(2 * np.pi * pitch * t) * (1 + np.sin(2 * np.pi * wobble * t))
    return (tone + 0.05 * rng.standard_normal(t.shape)).astype(np.float32).reshape(steps, FRAME)


def run(engine: MoshiEngine, inputs: list[np.ndarray], ready: list[np.ndarray],
        resets: dict[int, list[int]] | None = None) -> list[StepResult]:
    """Steps the engine: inputs[i] is [B, 1920], ready[i] is [B]; resets: step -> slots reset before it."""
    results = []
    for step, (pcm, mask) in enumerate(zip(inputs, ready, strict=True)):
        for slot in (resets or {}).get(step, []):
            engine.reset_slot(slot)
        results.append(engine.step_batch(pcm, mask))
    return results


def slot_outputs(results: list[StepResult], slot: int) -> tuple[np.ndarray, list[str | None], list[bool]]:
    return (np.stack([r.pcm[slot] for r in results]), [r.text[slot] for r in results],
            [bool(r.has_audio[slot]) for r in results])


def assert_same_slot_outputs(a: list[StepResult], slot_a: int, b: list[StepResult], slot_b: int) -> None:
    pcm_a, text_a, audio_a = slot_outputs(a, slot_a)
    pcm_b, text_b, audio_b = slot_outputs(b, slot_b)
    assert audio_a == audio_b
    assert text_a == text_b
    np.testing.assert_allclose(pcm_a, pcm_b, atol=1e-5)


def test_demo_engine_loads_and_warns(demo_dir, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOG.name):
        engine = load_engine("moshi", device="cpu", batch_size=3,
                             log=LOG)
    assert (engine.name, engine.batch_size, engine.device) == ("moshi", 3, "cpu")
    assert (engine.frame_samples, engine.sample_rate) == (1920, 24000)
    assert engine.demo_weights
    assert engine.lm.dtype == torch.float32  # float32 is the CPU default
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("RANDOM DEMO WEIGHTS" in message for message in warnings)
    assert any("LM dim 128" in r.getMessage() and "params" in r.getMessage() for r in caplog.records)


def test_step_shapes_bounded_audio_and_acoustic_delay(demo_dir) -> None:
    engine = new_engine(2, demo_dir)
    steps = 6
    inputs = list(np.stack([audio(1, steps), audio(2, steps)], axis=1))
    results = run(engine, inputs, [np.ones(2, bool)] * steps)
    for result in results:
        assert result.pcm.shape == (2, FRAME) and result.pcm.dtype == np.float32
        assert result.has_audio.shape == (2,) and result.has_audio.dtype == bool
        assert len(result.text) == 2 and all(t is None or isinstance(t, str) for t in result.text)
        assert np.isfinite(result.pcm).all() and np.abs(result.pcm).max() <= 1.0
        assert min(result.encode_s, result.lm_s, result.decode_s) >= 0
    # Moshi's acoustic delay is one step: nothing on the first step, audio from the second on.
    assert [r.has_audio.tolist() for r in results] == [[False, False]] + [[True, True]] * (steps - 1)
    assert not results[0].pcm.any() and results[0].text == [None, None]
    assert all(np.abs(r.pcm).max() > 1e-3 for r in results[1:])
    # The two slots heard different audio and answer differently (the model is not degenerate).
    assert not np.allclose(results[-1].pcm[0], results[-1].pcm[1])


def test_a_long_run_stays_finite_and_bounded(demo_dir) -> None:
    engine = new_engine(1, demo_dir)
    steps = 150  # 12 s: past the Mimi transformers' 10 s context
    pcm = np.stack([audio(16, steps)], axis=1)
    results = run(engine, list(pcm), [np.ones(1, bool)] * steps)
    out = np.concatenate([r.pcm[0] for r in results[1:]])
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    assert min(np.sqrt(np.mean(r.pcm[0] ** 2)) for r in results[1:]) > 1e-3  # no decay to silence


def test_two_slots_fed_the_same_audio_stay_identical(demo_dir) -> None:
    engine = new_engine(2, demo_dir)
    steps = 8
    same = audio(3, steps)
    results = run(engine, [np.stack([frame, frame]) for frame in same], [np.ones(2, bool)] * steps)
    assert_same_slot_outputs(results, 0, results, 1)


def test_resetting_slot_0_leaves_slot_1_alone_and_restarts_slot_0(demo_dir) -> None:
    steps, reset_at = 10, 4
    slot0_first, slot0_second, slot1 = audio(4, steps), audio(5, steps), audio(6, steps)
    slot0 = np.concatenate([slot0_first[:reset_at], slot0_second[: steps - reset_at]])
    both = run(new_engine(2, demo_dir), list(np.stack([slot0, slot1], axis=1)), [np.ones(2, bool)] * steps,
               resets={reset_at: [0]})

    # Slot 1 matches a run where it is alone (slot 0 never ready).
    idle = np.zeros(FRAME, np.float32)
    alone = run(new_engine(2, demo_dir), [np.stack([idle, frame]) for frame in slot1],
                [np.array([False, True])] * steps)
    assert_same_slot_outputs(both, 1, alone, 1)

    # After its reset, slot 0 behaves as a session that started right then.
    after_reset = slot0_second[: steps - reset_at]
    fresh = run(new_engine(2, demo_dir), [np.stack([frame, idle]) for frame in after_reset],
                [np.array([True, False])] * len(after_reset))
    assert_same_slot_outputs(both[reset_at:], 0, fresh, 0)


def test_a_masked_slot_does_not_advance(demo_dir) -> None:
    steps, masked_at = 9, 4
    slot0, slot1 = audio(7, steps), audio(8, steps)
    inputs = [np.stack([a, b]) for a, b in zip(slot0, slot1, strict=True)]
    reference = run(new_engine(2, demo_dir), inputs, [np.ones(2, bool)] * steps)

    # Same inputs, but an extra step in the middle where slot 0 is not ready (and is given garbage) while
    # slot 1 keeps going.
    garbage = np.random.default_rng(9).standard_normal(FRAME).astype(np.float32)
    extra_slot1 = audio(10, 1)[0]
    inputs = list(inputs)
    inputs.insert(masked_at, np.stack([garbage, extra_slot1]))
    ready = [np.ones(2, bool)] * steps
    ready.insert(masked_at, np.array([False, True]))
    with_gap = run(new_engine(2, demo_dir), inputs, ready)

    gap = with_gap.pop(masked_at)
    assert not gap.has_audio[0] and gap.text[0] is None and not gap.pcm[0].any()
    assert gap.has_audio[1]
    assert_same_slot_outputs(reference, 0, with_gap, 0)


def test_warmup_leaves_every_slot_fresh(demo_dir) -> None:
    steps = 5
    inputs = list(np.stack([audio(11, steps), audio(12, steps)], axis=1))
    cold = run(new_engine(2, demo_dir), inputs, [np.ones(2, bool)] * steps)
    warmed = new_engine(2, demo_dir)
    warmed.warmup()
    warm = run(warmed, inputs, [np.ones(2, bool)] * steps)
    for slot in (0, 1):
        assert_same_slot_outputs(cold, slot, warm, slot)


def test_nothing_ready_is_a_no_op(demo_dir) -> None:
    engine = new_engine(2, demo_dir)
    result = engine.step_batch(audio(13, 2), np.zeros(2, bool))
    assert not result.has_audio.any() and not result.pcm.any() and result.text == [None, None]
    with pytest.raises(ValueError):
        engine.step_batch(np.zeros((3, FRAME), np.float32), np.ones(3, bool))
    with pytest.raises(IndexError):
        engine.reset_slot(2)


def test_survives_text_ids_beyond_the_tokenizer(demo_dir) -> None:
    """The LM samples text ids the tokenizer cannot map (moshi.server crashes on this): they become None."""
    info = checkpoint_info_from_dir(demo_dir)
    tokenizer = info.get_text_tokenizer()
    wide_text = dict(info.lm_config) | {"text_card": 4 * tokenizer.vocab_size()}
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=wide_text, dtype=torch.float32)
    engine = MoshiEngine(info.get_mimi(), lm, tokenizer, batch_size=4, demo_weights=True,
                         lm_gen_kwargs={"temp_text": 5.0, "top_k_text": 0})  # near-uniform over all ids
    seen_ids: list[int] = []
    engine.lm_gen.on_text_hook = lambda ids: seen_ids.extend(ids.tolist())
    results = run(engine, [np.stack([frame] * 4) for frame in audio(14, 12)], [np.ones(4, bool)] * 12)
    assert max(seen_ids) >= tokenizer.vocab_size()
    texts = [t for r in results for t in r.text]
    assert None in texts and any(t is not None for t in texts)

    pieces = text_piece_table(tokenizer)
    assert pieces[0] is None and pieces[3] is None and pieces[1] is None and pieces[2] is None
    assert all(p is None or "▁" not in p for p in pieces)
    assert any(p is not None and p.startswith(" ") for p in pieces)
    for token_id in (-2, -1, len(pieces), 10**9):
        assert engine._piece(token_id) is None


def test_loopback_echoes_exactly() -> None:
    engine = load_engine("loopback", batch_size=3,
                         log=LOG)
    assert isinstance(engine, LoopbackEngine) and not engine.demo_weights
    pcm = np.random.default_rng(15).uniform(-1, 1, (3, FRAME)).astype(np.float32)
    ready = np.array([True, False, True])
    engine.reset_slot(1)
    engine.warmup()
    result = engine.step_batch(pcm, ready)
    assert np.array_equal(result.pcm[ready], pcm[ready])
    assert not result.pcm[1].any()
    assert result.has_audio.tolist() == ready.tolist()
    assert result.text == [None, None, None]
    with pytest.raises(ValueError):
        load_engine("whisper", batch_size=1, log=LOG)


def test_capacity_is_computed_from_memory() -> None:
    # 7B Moshi in bf16 (built on the meta device: shapes only): DESIGN.md's 1.57 GB per session.
    big = loaders.get_moshi_lm(None, lm_kwargs=loaders._lm_kwargs, device="meta", dtype=torch.bfloat16)
    per_session = kv_cache_bytes_per_session(big)
    assert per_session == 32 * 2 * 3000 * 4096 * 2
    assert lm_kv_cache_bytes(loaders._lm_kwargs, torch.bfloat16) == per_session  # the config's formula agrees
    gib = 2**30
    # An L4 (24 GB) after ~15.2 GB of weights, 1 GiB reserve: 4 sessions (DESIGN.md: B=4 needs 21.5 GB).
    assert max_sessions_for_memory(int(22.0 * gib) - int(15.2e9), per_session, gib) == 4
    assert max_sessions_for_memory(gib // 2, per_session, gib) == 0
    assert max_sessions_for_memory(80 * gib, 10 * 2**20, gib) == 79 * 1024 // 10
    with pytest.raises(ValueError):
        max_sessions_for_memory(gib, 0, 0)


def test_demo_engine_memory_figures(demo_dir) -> None:
    engine = new_engine(1, demo_dir)
    lm_kv = kv_cache_bytes_per_session(engine.lm)
    assert lm_kv == 2 * 2 * 3000 * 128 * 4  # 2 layers, context 3000, dim 128, float32
    assert lm_kv == lm_kv_cache_bytes(json.loads((demo_dir / "config.json").read_text()), torch.float32)
    assert engine.per_session_bytes > lm_kv


def test_a_directory_without_config_is_read_as_a_legacy_7b_repo(tmp_path) -> None:
    info = checkpoint_info_from_dir(tmp_path)
    assert info.lm_config is None  # moshi's 7B defaults, as CheckpointInfo.from_hf_repo does for such repos
    assert info.moshi_weights == tmp_path.resolve() / loaders.MOSHI_NAME
    assert info.tokenizer == tmp_path.resolve() / loaders.TEXT_TOKENIZER_NAME
    with pytest.raises(FileNotFoundError):
        checkpoint_info_from_dir(tmp_path / "missing")


def test_dtype_defaults() -> None:
    assert parse_dtype(None, torch.device("cpu")) == torch.float32
    assert parse_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert parse_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError):
        parse_dtype("int4", torch.device("cpu"))


def test_out_of_memory_becomes_engine_oom(demo_dir) -> None:
    """No GPU here: a step that raises torch's OOM error stands in for a CUDA OOM."""

    class OutOfMemoryOnStep(MoshiEngine):
        def _step(self, pcm, ready):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    info = checkpoint_info_from_dir(demo_dir)
    lm = info.get_moshi(dtype=torch.float32)
    tokenizer = info.get_text_tokenizer()
    engine = OutOfMemoryOnStep(info.get_mimi(), lm, tokenizer, batch_size=1, demo_weights=True)
    with pytest.raises(EngineOOM):
        engine.step_batch(np.zeros((1, FRAME), np.float32), np.ones(1, bool))
