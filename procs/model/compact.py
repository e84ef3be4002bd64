"""`apply_footprint`: a built LM made to hold the memory a `Footprint` names (procs/model/footprint.py).

Order matters and is fixed here: LoRA adapters are fused by moshi's loader before this runs (int8 rows of a
fused weight, not of the base and an adapter apart); the context is set on every attention of the main
transformer (and on the LM, whose `context` moshi and the capacity code read); int8 replaces every linear
layer of the LM, the depformer's and the output heads included; last, the attention modules get the cache
format. Embeddings and norms stay in the compute dtype (0.3 B of the 7B's 7.7 B parameters). Mimi is not
touched: its 79 M parameters are 1 % of the weights, and its encoder and decoder set the audio quality.

Imports moshi: call `procs.model.torch_setup.prepare_torch` first.
"""

from __future__ import annotations

from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear
from moshi.modules.transformer import StreamingMultiheadAttention, set_attention_context

from procs.model.footprint import Footprint
from procs.model.int8 import quantize_linears
from procs.model.kv_cache import serve_attention


def apply_footprint(lm: LMModel, footprint: Footprint) -> LMModel:
    """Applies `footprint` to `lm` in place (see the module docstring) and returns it. Call before the
    model streams. ValueError for what cannot be combined."""
    if footprint.is_default:
        return lm
    compute_dtype = lm.dtype
    if footprint.context is not None:
        if footprint.context > (lm.context or footprint.context):
            raise ValueError(f"--context {footprint.context} is longer than the model's own "
                             f"({lm.context} steps): it was not trained to attend further back")
        set_attention_context(lm.transformer, footprint.context)
        lm.context = footprint.context
    if footprint.weights == "int8":
        if any(isinstance(m, LoRALinear) for m in lm.modules()):
            raise ValueError("int8 weights need LoRA adapters fused into the weights first "
                             "(drop --no_fuse_lora)")
        if lm.condition_provider is not None or lm.fuser is not None or any(
                isinstance(m, StreamingMultiheadAttention) and m.cross_attention for m in lm.modules()):
            # moshi's cross-attention reads its projection's float weight directly
            raise ValueError("int8 weights are for Moshi's unconditioned LM: this model has conditioning or "
                             "cross-attention")
        quantize_linears(lm)
    serve_attention(lm.transformer, footprint.kv, compute_dtype)
    if lm.depformer is not None:
        serve_attention(lm.depformer, "model", compute_dtype)  # its cache lives one step: kept as is
    return lm
