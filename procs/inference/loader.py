"""`load_engine`: the engine the inference process runs, built from its flags.

Imports moshi only for the moshi engine, and only when called: the caller runs `prepare_torch` first.
"""

from __future__ import annotations

import logging

from procs.config import DEFAULTS
from procs.model.engine import Engine, LoopbackEngine
from procs.model.footprint import Footprint
from procs.model.source import ModelSource


def load_engine(
    kind: str,
    *,
    # The server passes its ServerConfig's values; the defaults are that config's defaults (DEFAULTS),
    # for the tests and benchmarks that call this directly.
    source: ModelSource = DEFAULTS.model,
    device: str = DEFAULTS.device,
    dtype: str | None = DEFAULTS.dtype,
    batch_size: int,
    log: logging.Logger,
    footprint: Footprint = DEFAULTS.footprint,
    session_memory_bytes: int | None = None,
    card_memory_bytes: int | None = None,
    gpu_memory_fraction: float = DEFAULTS.gpu_memory_fraction,
    greedy: bool = False,
    seed: int | None = None,
) -> Engine:
    """Builds the engine the inference process runs.

    kind "loopback": no model. kind "moshi": the model `source` names (procs/model/checkpoints.py; nothing
    named: the demo checkpoint), held in memory as `footprint` says (int8 weights, context, KV cache format).
    `batch_size` is clamped to what memory holds (`session_memory_bytes` on any device; a card of
    `card_memory_bytes` on any device, else free GPU memory on CUDA, under `gpu_memory_fraction`): read the
    result's `batch_size`.
    `greedy` replaces sampling by argmax (tests); `seed` seeds torch's RNG for sampling.
    """
    if kind == "loopback":
        log.info("engine: loopback (no model), %d slots", batch_size)
        return LoopbackEngine(batch_size)
    if kind != "moshi":
        raise ValueError(f"unknown engine kind {kind!r}; use 'moshi' or 'loopback'")
    from procs.model.moshi_engine import load_moshi_engine  # imports moshi: prepare_torch ran first

    return load_moshi_engine(source=source, device=device, dtype=dtype,
                             batch_size=batch_size, log=log, footprint=footprint,
                             session_memory_bytes=session_memory_bytes, card_memory_bytes=card_memory_bytes,
                             gpu_memory_fraction=gpu_memory_fraction, greedy=greedy, seed=seed)
