"""Int8 weight-only linear layers: `Int8Linear` and `quantize_linears`.

Each weight row (output channel) is stored as int8 with one float32 scale, symmetric:
`w[o, :] ~= q[o, :] * scale[o]`, `scale[o] = max|w[o, :]| / 127`. Activations stay in the compute dtype, so
the step's arithmetic is the model's; what shrinks is what a step reads (a 7B step is memory-bound: it reads
every weight once) and what the card holds (7.37 B linear parameters: 14.7 GB in bf16, 7.4 GB here).

Why this small module and not moshi's own 8-bit path or torchao (bench/RESULTS.md, issue 17, has the
measurements):
* moshi's `quantize` (`moshi/utils/quantize.py`) goes through bitsandbytes' LLM.int8 matmul: CUDA only (the
  suite could not test it), float16 activations, and a host-side outlier split that CUDA graphs cannot
  capture;
* torchao's int8 weight-only layout ties the server to torchao's release for the pod's torch (the GPU box
  keeps its own torch), for the same arithmetic as the few lines below;
* here, the forward is plain torch: on the CPU with bf16/fp16 activations `torch._weight_int8pack_mm` (a
  vectorised int8 kernel, faster than a bf16 matmul at the 7B's width: bench/test_bench_footprint.py);
  elsewhere the rows are scaled back into the compute dtype and multiplied, `linear(x, q * scale)`
  (scaling first: fp16 would overflow on raw int8 products), compiled by moshi's `torch_compile_lazy` on
  CUDA like its own hot functions and captured by its CUDA graphs like any other op.

What this costs on a GPU is not measured yet (no GPU was lent while it was written): there, each layer's
rows are widened to bf16 as the step reaches them, so a step reads 1 byte per weight, writes 2 and reads
them again, against bf16's 2 read, unless torch.compile fuses the widening into the matmul. int8 weights buy
memory (sessions per card) for certain; whether they also keep a step within 80 ms at those batch sizes is
`bench/gpu_check`'s part (a) to measure. PyTorch's CUDA `_weight_int8pack_mm`, as its source (int8mm.cu)
reads, takes float32 activations and computes one output element per thread group, reading the weights
again for each row of the batch, so it is not used there.

The module is not an `nn.Linear` on purpose: moshi's gating layers take the fused kernel path only for
`nn.Linear` (reading `.weight` directly) and call any other module, which is what int8 weights need.
"""

from __future__ import annotations

import torch
from moshi.utils.compile import torch_compile_lazy
from torch import nn
from torch.nn import functional as F

INT8_MAX = 127


@torch_compile_lazy
def _dequantized_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None])


class Int8Linear(nn.Module):
    """An int8 linear layer (its bias, if any, in the compute dtype); see the module docstring."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach()
        if weight.is_meta:  # the planner prices a model that has no weights
            q = torch.empty(weight.shape, dtype=torch.int8, device="meta")
            scale = torch.empty(weight.shape[0], dtype=torch.float32, device="meta")
        else:
            q, scale = quantize_rows(weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            flat = x.reshape(-1, self.in_features)
            y = torch._weight_int8pack_mm(flat.contiguous(), self.weight, self.scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = _dequantized_linear(x, self.weight, self.scale)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows, " \
               f"bias={self.bias is not None}"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and their float32 scales (see the module docstring); computed in float32."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale


def quantize_linears(module: nn.Module) -> int:
    """Replaces every `nn.Linear` under `module` by an `Int8Linear`, one at a time (the float weight of
    each is released as the next is quantized, so the peak is the model plus one layer); returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count
