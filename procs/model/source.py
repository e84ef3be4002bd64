"""The flags that name a model, as one value (no moshi import: the inference process builds it before
`prepare_torch`). procs/model/checkpoints.py resolves it into moshi's `CheckpointInfo`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSource:
    """The flags that name a model (see the module docstring); all None: the demo checkpoint."""

    checkpoint: str | None = None
    hf_repo: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    lora_weight: str | None = None
    fuse_lora: bool = True
    random_model: str | None = None

    @property
    def file_overrides(self) -> bool:
        return any((self.moshi_weight, self.mimi_weight, self.tokenizer, self.config_path, self.lora_weight))
