"""`load_engine`: the engine the inference process runs, built from its flags.

Imports moshi only for the moshi engine, and only when called: the caller runs `prepare_torch` first.
"""

from __future__ import annotations

import logging

from procs.model.engine import Engine, LoopbackEngine


def load_engine(
    kind: str,
    *,
    checkpoint: str | None,
    hf_repo: str | None,
    device: str,
    dtype: str | None,
    batch_size: int,
    log: logging.Logger,
    greedy: bool = False,
    seed: int | None = None,
) -> Engine:
    """Builds the engine the inference process runs.

    kind "loopback": no model. kind "moshi": `checkpoint` (a local Moshi-format directory) or `hf_repo`
    (through CheckpointInfo.from_hf_repo), or neither for the random demo checkpoint. On CUDA, `batch_size`
    is clamped to what fits in free GPU memory: read the result's `batch_size`.
    `greedy` replaces sampling by argmax (tests); `seed` seeds torch's RNG for sampling.
    """
    if kind == "loopback":
        log.info("engine: loopback (no model), %d slots", batch_size)
        return LoopbackEngine(batch_size)
    if kind != "moshi":
        raise ValueError(f"unknown engine kind {kind!r}; use 'moshi' or 'loopback'")

    from procs.model.moshi_engine import load_moshi_engine  # imports moshi: prepare_torch ran first

    return load_moshi_engine(checkpoint=checkpoint, hf_repo=hf_repo, device=device, dtype=dtype,
                             batch_size=batch_size, log=log, greedy=greedy, seed=seed)
