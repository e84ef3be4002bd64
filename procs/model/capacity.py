"""How many sessions fit: the memory a session's streaming state takes, and what free GPU memory holds.

A step of the 7B is memory-bound (it reads every weight and every session's KV cache), and each session's
state is dominated by the LM's KV cache: layers x 2 (K, V) x context x (dim / kv_repeat) x dtype bytes,
~1.57 GB for the 7B in bf16. `lm_kv_cache_bytes` computes it from a config (before any model exists, as
bench/gpu_capacity.py needs); `kv_cache_bytes_per_session` sums it over a built model's attention modules;
the two agree (tests/test_engine.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moshi.models.compression import MimiModel
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import StreamingMultiheadAttention


class NoRoomForASession(RuntimeError):
    """Free accelerator memory cannot hold even one session's state."""


def lm_kv_cache_bytes(lm_kwargs: dict[str, Any], dtype: torch.dtype) -> int:
    """One session's KV cache of the LM's main transformer, from its config (moshi's `lm_kwargs`)."""
    kv_dim = lm_kwargs["dim"] // lm_kwargs.get("kv_repeat", 1)
    return lm_kwargs["num_layers"] * 2 * lm_kwargs["context"] * kv_dim * dtype.itemsize


def _attention_kv_bytes(attention: StreamingMultiheadAttention, capacity: int, dtype: torch.dtype) -> int:
    kv_heads = attention.num_heads // attention.kv_repeat
    head_dim = attention.embed_dim // attention.num_heads
    return 2 * capacity * kv_heads * head_dim * dtype.itemsize


def kv_cache_bytes_per_session(lm: LMModel) -> int:
    """One session's KV cache of a built LM's main transformer (its attention modules, summed)."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    if lm.context is None:
        raise ValueError("the LM has no context: its streaming KV cache would be unbounded")
    attentions = [m for m in lm.transformer.modules()
                  if isinstance(m, StreamingMultiheadAttention) and not m.cross_attention]
    return sum(_attention_kv_bytes(a, lm.context, lm.dtype) for a in attentions)


def streaming_bytes_per_session(mimi: MimiModel, lm: LMModel) -> int:
    """All per-session streaming state: the LM's KV cache plus Mimi's transformers' KV caches, the depformer's
    per-step cache and the token delay buffer (the last three are small next to the LM's)."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    total = kv_cache_bytes_per_session(lm)
    for module in mimi.modules():
        if isinstance(module, StreamingMultiheadAttention) and module.context is not None:
            total += _attention_kv_bytes(module, module.context, next(mimi.parameters()).dtype)
    if lm.depformer is not None:
        for module in lm.depformer.modules():
            if isinstance(module, StreamingMultiheadAttention):
                total += _attention_kv_bytes(module, lm.dep_q, lm.dtype)
    total += lm.num_codebooks * (max(lm.delays) + 2) * 8  # LMGen's int64 token cache
    return total


def max_sessions_for_memory(free_bytes: int, per_session_bytes: int, reserve_bytes: int) -> int:
    """How many sessions' streaming state fit in `free_bytes` once `reserve_bytes` are set aside."""
    if per_session_bytes <= 0:
        raise ValueError(f"per_session_bytes must be positive, got {per_session_bytes}")
    return max(0, (free_bytes - reserve_bytes) // per_session_bytes)


def sessions_that_fit(requested: int, per_session_bytes: int, *, device: torch.device,
                      session_memory_bytes: int | None, gpu_memory_fraction: float,
                      log: logging.Logger) -> int:
    """`requested`, or fewer if memory holds fewer sessions' streaming state: the `--session-memory-mb`
    budget on any device, and on CUDA what free memory holds once `1 - gpu_memory_fraction` of the card is
    kept for working memory (activations, CUDA graphs, the allocator's slack). NoRoomForASession if not
    even one fits."""
    limits = [(requested, "--max-sessions")]
    if session_memory_bytes is not None:
        limits.append((session_memory_bytes // per_session_bytes, "--session-memory-mb"))
    if device.type == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        reserve = int(total_bytes * (1.0 - gpu_memory_fraction))
        fits = max_sessions_for_memory(free_bytes, per_session_bytes, reserve)
        log.info("GPU memory: %.2f GiB free of %.2f GiB, %.1f MiB per session, %.2f GiB kept for working "
                 "memory (--gpu-memory-fraction %.2f): room for %d sessions", free_bytes / 2**30,
                 total_bytes / 2**30, per_session_bytes / 2**20, reserve / 2**30, gpu_memory_fraction, fits)
        limits.append((fits, "free GPU memory"))
    capacity, reason = min(limits)
    if capacity < 1:
        raise NoRoomForASession(f"{reason} leaves room for no session ({per_session_bytes / 2**20:.1f} MiB "
                                "of streaming state each)")
    if capacity < requested:
        log.warning("max sessions clamped from %d to %d: that is what %s holds (%.1f MiB per session)",
                    requested, capacity, reason, per_session_bytes / 2**20)
    return capacity
