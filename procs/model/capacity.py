"""How many sessions fit: the memory a session's streaming state takes, what the weights take, and what a
card holds. The engine clamps its capacity with this code at start-up and `voice-agent plan` prices a
checkpoint with it (on the meta device: shapes, no weights), so the two cannot disagree.

A step of the 7B is memory-bound (it reads every weight and every session's KV cache), and each session's
state is dominated by the LM's KV cache: layers x 2 (K, V) x context x (dim / kv_repeat) x bytes per value,
~1.57 GB for the 7B in bf16 at moshi's 3,000 steps. With an fp8 cache (procs/model/kv_cache.py) a value is
one byte plus 4 bytes of scale per head vector, and attention reads one layer's ring dequantized into the
compute dtype: that transient is counted per session too (one layer's K and V), since it grows with the
batch. `lm_kv_cache_bytes` computes the bf16 figure from a config (before any model exists, as
bench/gpu_capacity.py needs); `session_bytes` sums a built model's attention modules; the two agree
(tests/test_engine.py), and `held_state_bytes` measures what a streaming model really holds
(tests/test_footprint.py, bench/footprint_memory.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class AttentionBytes:
    stored: int  # the ring, per session
    transient: int  # what reading it allocates for one step of this layer, per session (fp8: dequantized)


def attention_kv_bytes(attention: StreamingMultiheadAttention, compute_dtype: torch.dtype) -> AttentionBytes:
    """One session's share of one attention's KV ring, in the format its `ServingAttention` class names
    (procs/model/kv_cache.py) or moshi's."""
    from procs.model.kv_cache import SCALE_BYTES, cache_capacity, kv_format_of

    kv_heads = attention.num_heads // attention.kv_repeat
    head_dim = attention.embed_dim // attention.num_heads
    vectors = 2 * cache_capacity(attention) * kv_heads
    if kv_format_of(attention) == "fp8":
        return AttentionBytes(vectors * (head_dim + SCALE_BYTES), vectors * head_dim * compute_dtype.itemsize)
    return AttentionBytes(vectors * head_dim * compute_dtype.itemsize, 0)


def _self_attentions(module: torch.nn.Module) -> list[StreamingMultiheadAttention]:
    from moshi.modules.transformer import StreamingMultiheadAttention

    return [m for m in module.modules()
            if isinstance(m, StreamingMultiheadAttention) and not m.cross_attention]


def kv_cache_bytes_per_session(lm: LMModel) -> int:
    """One session's KV cache of a built LM's main transformer (its attention modules, summed)."""
    if lm.context is None:
        raise ValueError("the LM has no context: its streaming KV cache would be unbounded")
    return sum(attention_kv_bytes(a, lm.dtype).stored for a in _self_attentions(lm.transformer))


@dataclass(frozen=True)
class SessionBytes:
    """One session's memory, by where it is held."""

    lm_kv: int  # the main transformer's KV rings
    lm_kv_transient: int  # one layer's rings read back in the compute dtype (fp8 only)
    mimi: int  # Mimi's encoder and decoder transformers' KV rings
    depformer: int  # the depformer's per-step cache (allocated afresh each step)
    tokens: int  # LMGen's int64 token delay buffer

    @property
    def total(self) -> int:
        return self.lm_kv + self.lm_kv_transient + self.mimi + self.depformer + self.tokens


def session_bytes(mimi: MimiModel, lm: LMModel) -> SessionBytes:
    """All per-session streaming state of a built (or meta-device) Mimi and LM."""
    if lm.context is None:
        raise ValueError("the LM has no context: its streaming KV cache would be unbounded")
    main = [attention_kv_bytes(a, lm.dtype) for a in _self_attentions(lm.transformer)]
    mimi_dtype = next(mimi.parameters()).dtype
    mimi_bytes = sum(attention_kv_bytes(a, mimi_dtype).stored for a in _self_attentions(mimi)
                     if a.context is not None)
    depformer = 0 if lm.depformer is None else sum(
        attention_kv_bytes(a, lm.dtype).stored for a in _self_attentions(lm.depformer))
    return SessionBytes(
        lm_kv=sum(a.stored for a in main),
        lm_kv_transient=max((a.transient for a in main), default=0),  # one layer at a time
        mimi=mimi_bytes,
        depformer=depformer,
        tokens=lm.num_codebooks * (max(lm.delays) + 2) * 8,
    )


def streaming_bytes_per_session(mimi: MimiModel, lm: LMModel) -> int:
    return session_bytes(mimi, lm).total


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (each storage once): what the model holds besides sessions."""
    seen: dict[tuple[str, int], int] = {}
    tensors = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    for tensor in tensors:
        if tensor.is_meta:  # no storage to share: the planner's model, one tensor per weight
            seen[("meta", id(tensor))] = tensor.numel() * tensor.element_size()
        else:  # views of one storage (moshi splits per-step weights that way) count once, whole
            storage = tensor.untyped_storage()
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def held_state_bytes(modules: Iterable[torch.nn.Module]) -> tuple[int, int]:
    """(KV-ring bytes, all streaming-state bytes) the modules' streaming states hold now, each storage
    once: a measurement of a streaming model, to check `session_bytes` against."""
    from moshi.modules.streaming import State
    from moshi.modules.transformer import RingKVCache

    everything: list[torch.Tensor] = []
    rings: list[torch.Tensor] = []

    def collect(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            everything.append(value)
        elif isinstance(value, RingKVCache):
            rings.append(value.cache)
            collect(vars(value))
        elif isinstance(value, State):
            collect(vars(value))
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)
        # Anything else (CUDA graph wrappers, exit stacks, modules) holds no per-session state of its own.

    for module in modules:
        collect(getattr(module, "_streaming_state", None))

    def unique(tensors: list[torch.Tensor]) -> int:
        storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes()
                    for t in tensors}
        return sum(storages.values())

    return unique(rings), unique(everything)


def max_sessions_for_memory(free_bytes: int, per_session_bytes: int, reserve_bytes: int) -> int:
    """How many sessions' streaming state fit in `free_bytes` once `reserve_bytes` are set aside."""
    if per_session_bytes <= 0:
        raise ValueError(f"per_session_bytes must be positive, got {per_session_bytes}")
    return max(0, (free_bytes - reserve_bytes) // per_session_bytes)


@dataclass(frozen=True)
class CardMemory:
    """A card's memory as the capacity clamp sees it: its size, and what is free once the model is loaded.
    `told`: a card of a given size (`--gpu-memory-gb`, the planner): free is its size less the weights.
    `measured`: CUDA's own count, after loading (it also sees the CUDA context and anything else there)."""

    total_bytes: int
    free_bytes: int
    source: str

    @classmethod
    def told(cls, total_bytes: int, weights_bytes: int) -> CardMemory:
        return cls(total_bytes, total_bytes - weights_bytes, "--gpu-memory-gb")

    @classmethod
    def measured(cls, device: torch.device) -> CardMemory:
        free_bytes, total_bytes = torch.cuda.mem_get_info(device)
        return cls(total_bytes, free_bytes, "free GPU memory")

    def sessions(self, per_session_bytes: int, gpu_memory_fraction: float) -> int:
        """Sessions whose state fits once `1 - gpu_memory_fraction` of the card is kept for working memory
        (activations, CUDA graphs, the allocator's slack, the CUDA context)."""
        reserve = int(self.total_bytes * (1.0 - gpu_memory_fraction))
        return max_sessions_for_memory(self.free_bytes, per_session_bytes, reserve)


def sessions_that_fit(requested: int, per_session_bytes: int, *, card: CardMemory | None,
                      session_memory_bytes: int | None, gpu_memory_fraction: float,
                      log: logging.Logger) -> int:
    """`requested`, or fewer if memory holds fewer sessions' streaming state: the `--session-memory-mb`
    budget on any device, and what the card holds (`CardMemory.sessions`; None: no card, the CPU).
    NoRoomForASession if not even one fits."""
    limits = [(requested, "--max-sessions")]
    if session_memory_bytes is not None:
        limits.append((session_memory_bytes // per_session_bytes, "--session-memory-mb"))
    if card is not None:
        fits = card.sessions(per_session_bytes, gpu_memory_fraction)
        log.info("card memory (%s): %.2f GiB free of %.2f GiB, %.1f MiB per session, %.2f GiB kept for "
                 "working memory (--gpu-memory-fraction %.2f): room for %d sessions", card.source,
                 card.free_bytes / 2**30, card.total_bytes / 2**30, per_session_bytes / 2**20,
                 card.total_bytes * (1.0 - gpu_memory_fraction) / 2**30, gpu_memory_fraction, fits)
        limits.append((fits, card.source))
    capacity, reason = min(limits)
    if capacity < 1:
        raise NoRoomForASession(f"{reason} leaves room for no session ({per_session_bytes / 2**20:.1f} MiB "
                                "of streaming state each)")
    if capacity < requested:
        log.warning("max sessions clamped from %d to %d: that is what %s holds (%.1f MiB per session)",
                    requested, capacity, reason, per_session_bytes / 2**20)
    return capacity
