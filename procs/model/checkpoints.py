"""Where a model comes from, and the dtype and device it runs in. Every path ends in moshi's own
`CheckpointInfo`, the code real checkpoints use.

A model is named the ways moshi.server and kyutai's moshi-finetune name one (`ModelSource`):

* nothing: the demo checkpoint (random weights, built here);
* `--checkpoint DIR`: a local Moshi-format directory (config.json, weights, tokenizer), or a moshi-finetune
  `checkpoint_N/consolidated/` directory as it is: `lora.safetensors` (adapters) or
  `consolidated.safetensors` (a full fine-tune) with its `config.json`, on top of a base (`--hf-repo`,
  default moshi.server's `kyutai/moshiko-pytorch-bf16`) that supplies what the directory lacks;
* `--hf-repo REPO`: a Hub repo, through `CheckpointInfo.from_hf_repo` (with `HF_HUB_OFFLINE=1` from the local
  Hugging Face cache, as pods run);
* moshi.server's per-file flags on top of either: `--moshi-weight`, `--mimi-weight`, `--tokenizer`,
  `--config-path`, `--lora-weight` (`--no_fuse_lora` keeps LoRA layers apart).

Imports moshi: call `procs.model.torch_setup.prepare_torch` first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from moshi.models import loaders

from procs.model.demo import demo_checkpoint_dir
from procs.model.source import ModelSource

FINETUNE_LORA_FILE = "lora.safetensors"
FINETUNE_FULL_FILE = "consolidated.safetensors"


def is_finetune_dir(directory: Path) -> bool:
    """A moshi-finetune `consolidated/` directory: adapters (`lora.safetensors`) or full LM weights
    (`consolidated.safetensors`) next to a config.json that carries moshi-finetune's `lora` key. The file
    names in that config, if any, are the base's: the base supplies Mimi, the tokenizer and, for
    adapters, the LM."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        return False
    has_weights = (directory / FINETUNE_LORA_FILE).is_file() or (directory / FINETUNE_FULL_FILE).is_file()
    return has_weights and "lora" in json.loads(config_path.read_text(encoding="utf-8"))


def checkpoint_info_from_dir(directory: Path, source: ModelSource | None = None) -> loaders.CheckpointInfo:
    """Loads a local Moshi-format directory (config.json, weights, tokenizer) through moshi's CheckpointInfo.

    File names in config.json that are plain relative names are resolved inside `directory` (moshi itself
    would fetch them from the Hub); `file://` and `hf://` names are left to moshi. A directory without
    config.json is read as moshi reads such legacy repos: the 7B Moshi with moshi's default file names.
    """
    source = source or ModelSource()
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    config_path = Path(source.config_path) if source.config_path else directory / "config.json"
    if not config_path.is_file():
        return loaders.CheckpointInfo(
            moshi_weights=Path(source.moshi_weight or directory / loaders.MOSHI_NAME),
            mimi_weights=Path(source.mimi_weight or directory / loaders.MIMI_NAME),
            tokenizer=Path(source.tokenizer or directory / loaders.TEXT_TOKENIZER_NAME),
            lora_weights=Path(source.lora_weight) if source.lora_weight else None,
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))

    def local(key: str, default: str | None, given: str | None = None) -> Path | None:
        if given is not None:
            return Path(given)
        name = config.get(key, default)
        if name is None or name.startswith(("file://", "hf://")):
            return None  # None: CheckpointInfo resolves it from config.json itself
        return directory / name

    return loaders.CheckpointInfo.from_hf_repo(
        str(directory),
        moshi_weights=local("moshi_name", loaders.MOSHI_NAME, source.moshi_weight),
        mimi_weights=local("mimi_name", loaders.MIMI_NAME, source.mimi_weight),
        tokenizer=local("tokenizer_name", loaders.TEXT_TOKENIZER_NAME, source.tokenizer),
        config_path=config_path,
        mimi_config_path=local("mimi_config_name", None),
        lora_weights=local("lora_name", None, source.lora_weight),
    )


def finetune_info(directory: Path, source: ModelSource) -> loaders.CheckpointInfo:
    """A moshi-finetune directory on top of its base, as moshi.server serves one with `--lora-weight` (or
    `--moshi-weight`) and `--config-path`."""
    lora = directory / FINETUNE_LORA_FILE
    full = directory / FINETUNE_FULL_FILE
    return loaders.CheckpointInfo.from_hf_repo(
        source.hf_repo or loaders.DEFAULT_REPO,
        moshi_weights=source.moshi_weight or (full if full.is_file() else None),
        mimi_weights=source.mimi_weight,
        tokenizer=source.tokenizer,
        config_path=source.config_path or directory / "config.json",
        lora_weights=source.lora_weight or (lora if lora.is_file() else None),
    )


def resolve_checkpoint(source: ModelSource) -> tuple[loaders.CheckpointInfo, str]:
    """CheckpointInfo and a description of where it came from (see the module docstring)."""
    if source.checkpoint is not None:
        directory = Path(source.checkpoint).expanduser().resolve()
        if is_finetune_dir(directory):
            base = source.hf_repo or loaders.DEFAULT_REPO
            return finetune_info(directory, source), f"{directory} (fine-tune of hf://{base})"
        if source.hf_repo is not None:
            raise ValueError("--checkpoint DIR is a complete checkpoint: --hf-repo goes only with a "
                             "fine-tune directory (its base)")
        return checkpoint_info_from_dir(directory, source), str(directory)
    if source.hf_repo is not None or source.file_overrides:
        repo = source.hf_repo or loaders.DEFAULT_REPO
        info = loaders.CheckpointInfo.from_hf_repo(
            repo, source.moshi_weight, source.mimi_weight, source.tokenizer,
            config_path=source.config_path, lora_weights=source.lora_weight,
        )
        return info, f"hf://{repo}" + (" with local overrides" if source.file_overrides else "")
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
