"""The checkpoints people serve, loaded through our flags (procs/model/checkpoints.py): fine-tunes as
kyutai's moshi-finetune writes them, a Hub repo from the local Hugging Face cache with no network, and a
checkpoint of the Telugu model's text-vocabulary shape. Each is the demo checkpoint in that layout
(procs/model/variants.py), with real moshi modules."""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from moshi.models import loaders
from moshi.modules.lora import LoRALinear

from procs.inference.loader import load_engine
from procs.model.checkpoints import is_finetune_dir, resolve_checkpoint
from procs.model.demo import LM_FILE, demo_checkpoint_dir
from procs.model.engine import StepResult
from procs.model.footprint import Footprint
from procs.model.int8 import Int8Linear
from procs.model.moshi_engine import MoshiEngine
from procs.model.source import ModelSource
from procs.model.variants import build_finetune, build_vocab_variant, write_hub_cache
from protocol import OUT_SAMPLES_PER_BLOCK

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOG = logging.getLogger("test_checkpoints")
REPO = "telugu-voice-agent/demo"
FRAME = OUT_SAMPLES_PER_BLOCK  # one step's audio at 24 kHz
STEPS = 12


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    return demo_checkpoint_dir()


@pytest.fixture(scope="module")
def hub_cache(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    write_hub_cache(demo_dir, cache, REPO)
    return cache


@pytest.fixture
def offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """As a pod runs: HF_HUB_OFFLINE=1 and a cache that holds the repo (huggingface_hub read its settings at
    import, so they are set where it reads them)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


@pytest.fixture(scope="module")
def finetunes(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetunes")
    return {kind: build_finetune(demo_dir, root / kind / "consolidated", kind) for kind in ("lora", "full")}


def run(engine: MoshiEngine, steps: int = STEPS, seed: int = 3) -> list[StepResult]:
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal((steps, FRAME))).astype(np.float32)
    return [engine.step_batch(audio[i][None], np.ones(1, bool)) for i in range(steps)]


def tokens(results: list[StepResult]) -> np.ndarray:
    return np.stack([r.tokens[0] for r in results])


def ours(source: ModelSource) -> MoshiEngine:
    engine = load_engine("moshi", source=source, batch_size=1, log=LOG, greedy=True)
    assert isinstance(engine, MoshiEngine)
    return engine


def moshis_own(info: loaders.CheckpointInfo, fuse_lora: bool = True) -> MoshiEngine:
    """The same checkpoint loaded by moshi's own CheckpointInfo, as moshi.server loads it."""
    lm = info.get_moshi(dtype=torch.float32, fuse_lora=fuse_lora)
    lm_gen = dict(info.lm_gen_config) | {"use_sampling": False}
    return MoshiEngine(info.get_mimi(), lm, info.get_text_tokenizer(), batch_size=1, demo_weights=True,
                       lm_gen_kwargs=lm_gen)


def test_a_hub_repo_loads_from_the_local_cache_with_no_network(offline: Path, demo_dir: Path) -> None:
    info, described = resolve_checkpoint(ModelSource(hf_repo=REPO))
    assert described == f"hf://{REPO}"
    assert Path(info.moshi_weights).parent.parent.parent == offline / "models--telugu-voice-agent--demo"
    from_cache = tokens(run(ours(ModelSource(hf_repo=REPO))))
    from_dir = tokens(run(ours(ModelSource(checkpoint=str(demo_dir)))))
    assert np.array_equal(from_cache, from_dir)


def test_finetune_directories_are_recognised(finetunes: dict[str, Path], demo_dir: Path) -> None:
    assert is_finetune_dir(finetunes["lora"]) and is_finetune_dir(finetunes["full"])
    assert not is_finetune_dir(demo_dir)
    assert sorted(p.name for p in finetunes["lora"].iterdir()) == ["config.json", "lora.safetensors"]
    assert sorted(p.name for p in finetunes["full"].iterdir()) == ["config.json", "consolidated.safetensors"]


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_finetune_serves_as_moshi_serves_it_and_differs_from_its_base(
    kind: str, finetunes: dict[str, Path], offline: Path
) -> None:
    directory = finetunes[kind]
    config = directory / "config.json"
    if kind == "lora":
        adapters = directory / "lora.safetensors"
        flags = ModelSource(hf_repo=REPO, lora_weight=str(adapters), config_path=str(config))
        reference = loaders.CheckpointInfo.from_hf_repo(REPO, lora_weights=adapters, config_path=config)
    else:
        weights = directory / "consolidated.safetensors"
        flags = ModelSource(hf_repo=REPO, moshi_weight=str(weights), config_path=str(config))
        reference = loaders.CheckpointInfo.from_hf_repo(REPO, moshi_weights=weights, config_path=config)
    as_a_directory = tokens(run(ours(ModelSource(checkpoint=str(directory), hf_repo=REPO))))
    with_moshis_flags = tokens(run(ours(flags)))
    moshi = tokens(run(moshis_own(reference)))
    base = tokens(run(ours(ModelSource(hf_repo=REPO))))
    assert np.array_equal(as_a_directory, moshi)
    assert np.array_equal(with_moshis_flags, moshi)
    assert not np.array_equal(moshi, base)


def test_no_fuse_lora_keeps_the_adapters_apart_with_the_same_output(finetunes: dict[str, Path],
                                                                    offline: Path) -> None:
    source = ModelSource(checkpoint=str(finetunes["lora"]), hf_repo=REPO)
    fused = ours(source)
    apart = ours(ModelSource(checkpoint=source.checkpoint, hf_repo=REPO, fuse_lora=False))
    assert not any(isinstance(m, LoRALinear) for m in fused.lm.modules())
    assert any(isinstance(m, LoRALinear) for m in apart.lm.modules())
    assert np.array_equal(tokens(run(fused)), tokens(run(apart)))


def test_a_complete_checkpoint_takes_no_base(demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="fine-tune"):
        resolve_checkpoint(ModelSource(checkpoint=str(demo_dir), hf_repo=REPO))


def test_per_file_flags_override_a_local_checkpoint(demo_dir: Path, finetunes: dict[str, Path]) -> None:
    weights = finetunes["full"] / "consolidated.safetensors"
    info, _ = resolve_checkpoint(ModelSource(checkpoint=str(demo_dir), moshi_weight=str(weights)))
    assert Path(info.moshi_weights) == weights
    plain, _ = resolve_checkpoint(ModelSource(checkpoint=str(demo_dir)))
    assert Path(plain.moshi_weights) == demo_dir / LM_FILE


def test_a_checkpoint_of_the_telugu_models_48k_text_vocabulary_loads_and_steps(
    demo_dir: Path, tmp_path: Path
) -> None:
    """BNarayanaReddy/siba: Moshiko with a 48k text vocabulary (32k + 16k Hindi and Telugu pieces)."""
    variant = build_vocab_variant(demo_dir, tmp_path / "siba-shape", text_card=48000)
    engine = load_engine("moshi", source=ModelSource(checkpoint=str(variant)), batch_size=2, log=LOG, seed=0)
    assert isinstance(engine, MoshiEngine)
    assert engine.lm.text_card == 48000 and len(engine._pieces) == 48000
    assert engine.lm.text_emb.weight.shape[0] == 48001  # the text vocabulary plus moshi's initial token
    rng = np.random.default_rng(5)
    results = [engine.step_batch((0.1 * rng.standard_normal((2, FRAME))).astype(np.float32), np.ones(2, bool))
               for _ in range(STEPS)]
    assert results[-1].has_audio.all() and np.isfinite(results[-1].pcm).all()
    text_ids = np.concatenate([r.tokens[:, 0] for r in results])
    assert text_ids.max() < 48000


@pytest.mark.parametrize("layout", ["demo", "hub", "lora directory", "full directory", "lora flags",
                                    "full flags", "vocab48k"])
def test_every_layout_serves_with_int8_weights_a_short_context_and_an_fp8_cache(
    layout: str, finetunes: dict[str, Path], offline: Path, demo_dir: Path, tmp_path: Path
) -> None:
    """`serve --quantize int8 --context 20 --kv-dtype fp8` on each way a model is named (LoRA fused first)."""
    lora, full = finetunes["lora"], finetunes["full"]
    source = {
        "demo": lambda: ModelSource(),
        "hub": lambda: ModelSource(hf_repo=REPO),
        "lora directory": lambda: ModelSource(checkpoint=str(lora), hf_repo=REPO),
        "full directory": lambda: ModelSource(checkpoint=str(full), hf_repo=REPO),
        "lora flags": lambda: ModelSource(hf_repo=REPO, lora_weight=str(lora / "lora.safetensors"),
                                          config_path=str(lora / "config.json")),
        "full flags": lambda: ModelSource(hf_repo=REPO, moshi_weight=str(full / "consolidated.safetensors"),
                                          config_path=str(full / "config.json")),
        "vocab48k": lambda: ModelSource(checkpoint=str(build_vocab_variant(demo_dir, tmp_path / "v", 48000))),
    }[layout]()
    footprint = Footprint(weights="int8", context=20, kv="fp8")
    engine = load_engine("moshi", source=source, batch_size=2, log=LOG, greedy=True, footprint=footprint)
    assert isinstance(engine, MoshiEngine)
    assert engine.lm.context == 20 and isinstance(engine.lm.text_linear, Int8Linear)
    assert not any(isinstance(m, LoRALinear | torch.nn.Linear) for m in engine.lm.modules())
    rng = np.random.default_rng(5)
    results = [engine.step_batch((0.1 * rng.standard_normal((2, FRAME))).astype(np.float32), np.ones(2, bool))
               for _ in range(24)]  # past the context
    assert results[-1].has_audio.all() and np.isfinite(results[-1].pcm).all()
