"""The LM's streaming KV cache in the layout a `Footprint` asks for: moshi's own ring in the compute dtype, or
`Float8RingKVCache`, the same ring holding float8 (e4m3) values with one float32 scale per head and step.

moshi builds each attention's cache in `StreamingMultiheadAttention._init_streaming_state`, from the dtype
of its first input projection. `ServingAttention` is that class with one change, how the cache is made:
from the compute dtype the footprint names (int8 projections have no float weight to read it from) and in
the cache format it names. A built model's attention modules are given this class (`serve_attention`), so
nothing of moshi is forked: the projections, rotary embedding, masks and the ring's index arithmetic are
moshi's, and every step, reset and exec mask goes through them unchanged.

fp8 cache layout: each cached vector of `D` values is `D` float8 bytes followed by its float32 scale's four
bytes, in one uint8 ring of width `D + 4`, so moshi's `RingKVCache.complete` writes and rotates it as it
is. Reading dequantizes the whole ring of one layer into the compute dtype for attention: that transient
(K and V of one layer at a time) is counted per session by procs/model/capacity.py.
"""

from __future__ import annotations

import itertools

import torch
from moshi.modules.transformer import (
    KVCacheResult,
    RingKVCache,
    StreamingMultiheadAttention,
    _MHAState,
)

from procs.model.footprint import KVFormat

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448
SCALE_BYTES = 4  # one float32 per cached vector


def _pack(x: torch.Tensor) -> torch.Tensor:
    """[..., D] in any float dtype -> [..., D + 4] uint8: float8 values, then their float32 scale."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FLOAT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    values = (x32 / scale).to(FLOAT8)
    return torch.cat([values.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def _unpack(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `_pack`, into `dtype` (one new tensor the size of the ring)."""
    dim = packed.shape[-1] - SCALE_BYTES
    out = packed[..., :dim].view(FLOAT8).to(dtype)
    return out.mul_(packed[..., dim:].view(torch.float32))


class Float8RingKVCache(RingKVCache):
    """moshi's `RingKVCache` storing float8 vectors with their scales (see the module docstring)."""

    def __init__(self, batch_size: int, num_heads: int, dim_per_head: int, capacity: int, *,
                 respect_exec_mask: bool, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(batch_size, num_heads, dim_per_head + SCALE_BYTES, capacity,
                         respect_exec_mask=respect_exec_mask, device=device, dtype=torch.uint8)
        self.compute_dtype = dtype

    def complete(self, k: torch.Tensor, v: torch.Tensor, exec_mask: torch.Tensor) -> KVCacheResult:
        keys, values, positions = super().complete(_pack(k), _pack(v), exec_mask)
        dtype = self.compute_dtype
        return KVCacheResult(_unpack(keys, dtype), _unpack(values, dtype), positions)


class ServingAttention(StreamingMultiheadAttention):
    """moshi's attention whose streaming cache follows `kv_format` and `compute_dtype` (set by
    `serve_attention`); everything else is inherited."""

    kv_format: KVFormat
    compute_dtype: torch.dtype

    def _init_streaming_state(self, batch_size: int) -> _MHAState:
        device = next(itertools.chain(self.parameters(), self.buffers())).device
        if self.cross_attention:
            kv_cache = None
        else:
            capacity = cache_capacity(self)
            kind = Float8RingKVCache if self.kv_format == "fp8" else RingKVCache
            kv_cache = kind(batch_size, self.num_heads // self.kv_repeat, self.embed_dim // self.num_heads,
                            capacity, respect_exec_mask=not self.weights_per_step, device=device,
                            dtype=self.compute_dtype)
        return _MHAState(batch_size, device, kv_cache,
                         offset=torch.zeros(batch_size, device=device, dtype=torch.long), offset_cpu=0)


def cache_capacity(attention: StreamingMultiheadAttention) -> int:
    """Steps one attention's ring holds, as moshi decides it: its context, or one per step of weights."""
    if attention.context is not None:
        return attention.context
    if attention.weights_per_step:
        return attention.weights_per_step
    raise ValueError("an attention without context or per-step weights has an unbounded KV cache")


def serve_attention(module: torch.nn.Module, kv_format: KVFormat, compute_dtype: torch.dtype) -> int:
    """Gives every self-attention under `module` the `ServingAttention` class with this cache format;
    returns how many. Call before the model starts streaming."""
    count = 0
    for attention in module.modules():
        if isinstance(attention, StreamingMultiheadAttention) and not attention.cross_attention:
            if attention._streaming_state is not None:
                raise RuntimeError("the KV cache format must be set before the model starts streaming")
            if kv_format == "fp8" and (attention.embed_dim // attention.num_heads) % SCALE_BYTES:
                # the scale's 4 bytes follow each vector in the uint8 ring and are read as one float32
                raise ValueError(f"an fp8 KV cache needs a head dimension divisible by {SCALE_BYTES}, got "
                                 f"{attention.embed_dim // attention.num_heads}")
            attention.__class__ = ServingAttention
            attention.kv_format = kv_format
            attention.compute_dtype = compute_dtype
            count += 1
    return count


def kv_format_of(attention: StreamingMultiheadAttention) -> KVFormat:
    return attention.kv_format if isinstance(attention, ServingAttention) else "model"
