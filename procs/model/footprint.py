"""How a model is held in memory: its LM weights (as stored, or int8) and its KV cache (how far back it
reaches, and in which dtype). One value, `Footprint`, named by `--quantize`, `--context` and `--kv-dtype`;
the engine applies it to a built model (procs/model/compact.py) and the planner prices it
(procs/plan.py) with the same capacity code (procs/model/capacity.py).

No torch or moshi import: the server's flags are checked into it before anything heavy is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WeightsFormat = Literal["model", "int8"]
KVFormat = Literal["model", "fp8"]
WEIGHT_FORMATS: tuple[WeightsFormat, ...] = ("model", "int8")
KV_FORMATS: tuple[KVFormat, ...] = ("model", "fp8")
# Steps of attention Moshi's 7B keeps (moshi's `context`: 3,000 x 80 ms = 4 minutes); the planner's reduced
# default is half of it.
MOSHI_CONTEXT = 3000
MIN_CONTEXT = 16  # fewer steps than the depformer's and Mimi's own windows would be no conversation at all


@dataclass(frozen=True)
class Footprint:
    """`weights`: "model" keeps the checkpoint's dtype; "int8" stores every linear layer of the LM as int8
    with one scale per output channel. `context`: steps of attention the LM keeps (None: the checkpoint's).
    `kv`: "model" stores the LM's KV cache in the compute dtype; "fp8" as float8 (e4m3) with one scale per
    head and step, attended in the compute dtype."""

    weights: WeightsFormat = "model"
    context: int | None = None
    kv: KVFormat = "model"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weights format {self.weights!r}; use one of {WEIGHT_FORMATS}")
        if self.kv not in KV_FORMATS:
            raise ValueError(f"unknown KV cache format {self.kv!r}; use one of {KV_FORMATS}")
        if self.context is not None and self.context < MIN_CONTEXT:
            raise ValueError(f"context must be at least {MIN_CONTEXT} steps, got {self.context}")

    @property
    def is_default(self) -> bool:
        return self == Footprint()

    def describe(self, model_dtype: str = "bf16", model_context: int | None = None) -> str:
        """E.g. "int8 weights, fp8 KV, context 1500" (the model's own values named as given)."""
        weights = "int8 weights" if self.weights == "int8" else f"{model_dtype} weights"
        kv = "fp8 KV" if self.kv == "fp8" else f"{model_dtype} KV"
        context = self.context if self.context is not None else model_context
        return f"{weights}, {kv}" + (f", context {context}" if context is not None else "")


AS_STORED = Footprint()  # the checkpoint's dtype and context, moshi's cache
