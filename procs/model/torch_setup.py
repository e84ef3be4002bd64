"""Torch set-up for a process that will import moshi: one explicit call, before moshi is imported.

moshi decides whether to `torch.compile` its hot functions when its modules are imported
(`moshi.utils.compile.torch_compile_lazy` reads the NO_TORCH_COMPILE environment variable at decoration
time: any non-empty value turns compile off), so the choice must be made first. Without CUDA the first
compiled step takes tens of seconds for little gain: compile is off. With CUDA, moshi's own default stands
(compile on) unless the user set NO_TORCH_COMPILE. Every process and script that imports moshi calls
`prepare_torch` first: the inference process, the demo-checkpoint builder, the tests, the benchmarks.
`flush_subnormals` is the inference process's own choice (see there).
"""

from __future__ import annotations

import os
import sys

_MOSHI_COMPILE_MODULE = "moshi.utils.compile"


def wants_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device == "cuda" or device.startswith("cuda:")


def prepare_torch(device: str, *, compile: bool | None = None) -> bool:
    """Decide torch.compile for moshi; returns whether it is on. `compile=None`: on for CUDA devices unless
    NO_TORCH_COMPILE is set, off otherwise. RuntimeError if moshi was imported already with the other
    choice (it can no longer change)."""
    compile_now = not os.environ.get("NO_TORCH_COMPILE")  # what an import of moshi would decide now
    if compile is None:
        compile = wants_cuda(device) and compile_now
    if _MOSHI_COMPILE_MODULE in sys.modules and compile != compile_now:
        raise RuntimeError(
            f"moshi was imported already (with torch.compile {'on' if compile_now else 'off'}); "
            "call prepare_torch() before anything imports moshi"
        )
    if compile:
        os.environ.pop("NO_TORCH_COMPILE", None)
    else:
        os.environ["NO_TORCH_COMPILE"] = "1"
    return compile


def flush_subnormals(device: str) -> None:
    """For a process that steps a model on the CPU, and nothing else: subnormal floats (a streaming state
    decaying towards zero) take a slow path on many x86 cores, so they are flushed to zero (on the demo
    model and its benchmark input no gain was measured: bench/RESULTS.md, issue 16). The flag is processor
    state of the calling thread (where the inference process's one torch thread runs), so it is set only
    where the model steps: other code in the same thread (a test's Hypothesis floats) would see floats that
    are not IEEE-754's."""
    if not wants_cuda(device):
        import torch

        torch.set_flush_denormal(True)


def pin_cuda_device(device: str) -> str:
    """For a process that serves one of several GPUs (`--devices cuda:0,cuda:1`): `cuda:N` narrows
    CUDA_VISIBLE_DEVICES to that card and returns "cuda", so everything in the process (moshi's CUDA
    graphs, the allocator, free-memory readings) sees one card as its default; other devices come back as
    they are. It must run before CUDA is first used in the process (CUDA reads the variable then);
    N counts among the cards visible already, as torch numbers them."""
    if not device.startswith("cuda:"):
        return device
    index = int(device.removeprefix("cuda:"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # unset: every card; empty: none
    cards = [c.strip() for c in visible.split(",") if c.strip()] if visible is not None else [
        str(i) for i in range(index + 1)]
    if index >= len(cards):
        raise ValueError(f"{device}: {len(cards)} CUDA devices visible (CUDA_VISIBLE_DEVICES={visible})")
    os.environ["CUDA_VISIBLE_DEVICES"] = cards[index]
    return "cuda"
