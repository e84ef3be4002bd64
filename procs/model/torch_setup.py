"""Import this before moshi. moshi decides whether to `torch.compile` its hot functions when its modules
are imported (`torch_compile_lazy` reads NO_TORCH_COMPILE at decoration time), so the choice must be made
first: without CUDA the first compiled step takes tens of seconds for little gain, so compile is off;
with CUDA moshi's own default (compile on, unless the user set NO_TORCH_COMPILE) stands."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
