"""The demo checkpoint in the other layouts people serve, so that every loading path runs here:

* `build_finetune(base, out, "lora")`: what kyutai's moshi-finetune writes with `save_adapters: true`, a
  `consolidated/` directory with `lora.safetensors` (the adapters; random here) and a `config.json` that is
  the base's with `lora`, `lora_rank` and `lora_scaling` added;
* `build_finetune(base, out, "full")`: its full fine-tune, `consolidated.safetensors` (every LM weight;
  the base's, perturbed here) with the same `config.json` (`lora: false`);
* `write_hub_cache(checkpoint, cache, "org/name")`: a checkpoint as the Hugging Face cache holds a
  downloaded repo, which `--hf-repo org/name` then loads with `HF_HUB_OFFLINE=1`, as pods run;
* `build_vocab_variant(base, out, 48000)`: the demo with a larger text vocabulary, such as
  `BNarayanaReddy/siba`'s (Moshiko's 32k pieces plus 16k Hindi and Telugu ones): an LM whose `text_card`
  is that size and a SentencePiece tokenizer with that many pieces (the demo's Telugu pieces, then
  placeholders).

Imports moshi: call `procs.model.torch_setup.prepare_torch` first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import sentencepiece
import torch
from moshi.models import loaders
from safetensors.torch import load_file, save_file
from sentencepiece import sentencepiece_model_pb2

from procs.model.checkpoints import FINETUNE_FULL_FILE, FINETUNE_LORA_FILE, checkpoint_info_from_dir
from procs.model.demo import CONFIG_FILE, LM_FILE, TOKENIZER_FILE, demo_lm_config

LORA_RANK = 8  # moshi-finetune's default is 128; the demo's widths are 128
LORA_SCALING = 2.0
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build_finetune(base_dir: Path, out_dir: Path, kind: Literal["lora", "full"], *, seed: int = 1) -> Path:
    """A moshi-finetune `consolidated/` directory of the checkpoint in `base_dir` (see the module doc)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_config = json.loads((base_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    config = raw_config | {"lora": kind == "lora", "lora_rank": LORA_RANK, "lora_scaling": LORA_SCALING}
    generator = _seeded(seed)
    if kind == "lora":
        info = checkpoint_info_from_dir(base_dir)
        lm_kwargs = dict(info.lm_config or {}) | {"lora": True, "lora_rank": LORA_RANK,
                                                  "lora_scaling": LORA_SCALING}
        lm = loaders.get_moshi_lm(info.moshi_weights, lm_kwargs=lm_kwargs, dtype=torch.float32,
                                  fuse_lora=False)
        adapters = {}
        for name, tensor in lm.state_dict().items():
            if ".lora_A." in name or ".lora_B." in name:  # B starts at zero in moshi: make the adapters act
                adapters[name] = (torch.randn(tensor.shape, generator=generator) * 0.05).to(torch.bfloat16)
        save_file(adapters, out_dir / FINETUNE_LORA_FILE, metadata={"format": "pt"})
    else:
        weights = load_file(base_dir / raw_config.get("moshi_name", LM_FILE))
        def perturbed(w: torch.Tensor) -> torch.Tensor:
            noise = 0.05 * w.float().std() * torch.randn(w.shape, generator=generator)
            return (w.float() + noise).to(w.dtype)

        tuned = {name: perturbed(w) if w.dtype.is_floating_point and w.numel() > 1 else w
                 for name, w in weights.items()}
        save_file(tuned, out_dir / FINETUNE_FULL_FILE, metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=4, ensure_ascii=False) + "\n")
    return out_dir


def write_hub_cache(checkpoint_dir: Path, cache_dir: Path, repo_id: str) -> Path:
    """The checkpoint's files as the Hugging Face cache (`HF_HUB_CACHE`) holds a download of `repo_id`;
    returns the snapshot directory."""
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in Path(checkpoint_dir).iterdir():
        if file.is_file():
            shutil.copy2(file, snapshot / file.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(HUB_REVISION)
    return snapshot


def extend_tokenizer(proto: bytes, vocab_size: int) -> bytes:
    """A SentencePiece model with `vocab_size` pieces: the given model's, then unique placeholder pieces."""
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    have = {piece.piece for piece in model.pieces}
    lowest = min(piece.score for piece in model.pieces)
    index = 0
    while len(model.pieces) < vocab_size:
        name = f"▁ext{index}"
        index += 1
        if name in have:
            continue
        piece = model.pieces.add()
        piece.piece, piece.score = name, lowest - 1.0 - index * 1e-3
    return model.SerializeToString()


def build_vocab_variant(base_dir: Path, out_dir: Path, text_card: int, *, seed: int = 2) -> Path:
    """The demo checkpoint with a `text_card`-piece text vocabulary (see the module docstring)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_config = json.loads((base_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    tokenizer = extend_tokenizer((base_dir / TOKENIZER_FILE).read_bytes(), text_card)
    assert sentencepiece.SentencePieceProcessor(model_proto=tokenizer).vocab_size() == text_card
    (out_dir / TOKENIZER_FILE).write_bytes(tokenizer)
    lm_config = demo_lm_config(text_card=text_card)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config, dtype=torch.float32)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in lm.state_dict().items()}
    save_file(state, out_dir / LM_FILE, metadata={"format": "pt"})
    for key in ("mimi_name", "mimi_config_name"):
        shutil.copy2(base_dir / raw_config[key], out_dir / raw_config[key])
    config = raw_config | lm_config | {"model_id": raw_config["model_id"] | {"text_card": text_card}}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir
