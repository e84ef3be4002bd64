"""The speech model behind the inference process: one batched streaming state, one step per 80 ms frame.

`Engine` is what the inference loop steps: `MoshiEngine` (moshi_engine.py) runs a Moshi-format checkpoint;
`LoopbackEngine`, here, has no model and echoes each session's audio, so that everything around the engine
runs without one. `load_engine` (loader.py) builds either.

This module imports no moshi.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protocol.constants import OUT_RATE, OUT_SAMPLES_PER_BLOCK

FRAME_SAMPLES = OUT_SAMPLES_PER_BLOCK  # one Mimi frame: a block, 80 ms at 24 kHz
SAMPLE_RATE = OUT_RATE
# Text ids moshi uses as padding in the inner monologue (`existing_text_end_padding_id`, `..._padding_id`).
TEXT_PADDING_IDS = (0, 3)


class EngineOOM(RuntimeError):
    """The accelerator ran out of memory during a step. The cache was emptied; the caller should refuse new
    sessions (and may reset the slots of the step that failed, whose state may be partly advanced)."""


@dataclass
class StepResult:
    pcm: np.ndarray  # [B, 1920] float32 at 24 kHz, not clipped; rows without has_audio are zero
    has_audio: np.ndarray  # [B] bool: ready slots whose LM produced audio this step (False while delays fill)
    text: list[str | None]  # [B] inner-monologue piece per slot, '▁' as a space; None for padding/unmappable
    encode_s: float
    lm_s: float
    decode_s: float
    tokens: np.ndarray | None = None  # [B, 1 + dep_q] the LM's text and audio tokens (-1: none yet); no model


class Engine(Protocol):
    name: str
    batch_size: int
    demo_weights: bool
    device: str
    frame_samples: int
    sample_rate: int

    @property
    def max_sessions(self) -> int: ...  # == batch_size: one session per slot

    def reset_slot(self, slot: int) -> None: ...

    def step_batch(self, pcm: np.ndarray, ready: np.ndarray) -> StepResult: ...

    def warmup(self) -> None: ...


class LoopbackEngine:
    """No model: each ready slot's input comes back as its output, at once. For tests and plumbing."""

    name = "loopback"
    demo_weights = False
    device = "cpu"
    frame_samples = FRAME_SAMPLES
    sample_rate = SAMPLE_RATE

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @property
    def max_sessions(self) -> int:
        return self.batch_size

    def reset_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise IndexError(f"slot {slot} out of range for batch size {self.batch_size}")

    def step_batch(self, pcm: np.ndarray, ready: np.ndarray) -> StepResult:
        ready = np.asarray(ready, dtype=bool)
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.shape != (self.batch_size, self.frame_samples) or ready.shape != (self.batch_size,):
            raise ValueError(f"expected pcm [{self.batch_size}, {self.frame_samples}] and ready "
                             f"[{self.batch_size}], got {pcm.shape} and {ready.shape}")
        started = time.perf_counter()
        out = np.where(ready[:, None], pcm, np.float32(0.0)).astype(np.float32, copy=False)
        return StepResult(pcm=out, has_audio=ready.copy(), text=[None] * self.batch_size,
                          encode_s=0.0, lm_s=time.perf_counter() - started, decode_s=0.0)

    def warmup(self) -> None:
        pass
