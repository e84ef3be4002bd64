"""Where a model comes from: a local Moshi-format directory, a Hub repo, or the demo checkpoint; and the
dtype and device it runs in. Every path ends in moshi's own `CheckpointInfo`, the code real checkpoints use.

Imports moshi: call `procs.model.torch_setup.prepare_torch` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from moshi.models import loaders

from procs.model.demo import demo_checkpoint_dir


def checkpoint_info_from_dir(directory: Path) -> loaders.CheckpointInfo:
    """Loads a local Moshi-format directory (config.json, weights, tokenizer) through moshi's CheckpointInfo.

    File names in config.json that are plain relative names are resolved inside `directory` (moshi itself
    would fetch them from the Hub); `file://` and `hf://` names are left to moshi. A directory without
    config.json is read as moshi reads such legacy repos: the 7B Moshi with moshi's default file names.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        return loaders.CheckpointInfo(
            moshi_weights=directory / loaders.MOSHI_NAME,
            mimi_weights=directory / loaders.MIMI_NAME,
            tokenizer=directory / loaders.TEXT_TOKENIZER_NAME,
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))

    def local(key: str, default: str | None) -> Path | None:
        name = config.get(key, default)
        if name is None or name.startswith(("file://", "hf://")):
            return None  # None: CheckpointInfo resolves it from config.json itself
        return directory / name

    return loaders.CheckpointInfo.from_hf_repo(
        str(directory),
        moshi_weights=local("moshi_name", loaders.MOSHI_NAME),
        mimi_weights=local("mimi_name", loaders.MIMI_NAME),
        tokenizer=local("tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
        config_path=config_path,
        mimi_config_path=local("mimi_config_name", None),
        lora_weights=local("lora_name", None),
    )


def resolve_checkpoint(checkpoint: str | None, hf_repo: str | None) -> tuple[loaders.CheckpointInfo, str]:
    """CheckpointInfo and a description of where it came from: a local dir, a Hub repo, or the demo."""
    if checkpoint is not None and hf_repo is not None:
        raise ValueError("give either a checkpoint directory or a Hub repo, not both")
    if hf_repo is not None:
        return loaders.CheckpointInfo.from_hf_repo(hf_repo), f"hf://{hf_repo}"
    if checkpoint is not None:
        return checkpoint_info_from_dir(Path(checkpoint)), str(Path(checkpoint).expanduser().resolve())
    demo_dir = demo_checkpoint_dir()
    return checkpoint_info_from_dir(demo_dir), f"{demo_dir} (demo)"


def is_demo_checkpoint(info: loaders.CheckpointInfo) -> bool:
    return bool(info.model_id.get("random_weights"))


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and float32 on CPU unless told otherwise."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    }
    try:
        return aliases[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(aliases)}") from None


def parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device
