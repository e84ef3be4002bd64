"""The demo checkpoint: built files, moshi's loaders, the Telugu tokenizer, determinism, atomic caching."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from moshi.models import loaders

from procs.model import demo
from procs.model.checkpoints import checkpoint_info_from_dir, is_demo_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {demo.CONFIG_FILE, demo.LM_FILE, demo.MIMI_FILE, demo.MIMI_CONFIG_FILE, demo.TOKENIZER_FILE}


def _is_telugu(char: str) -> bool:
    return "\u0c00" <= char <= "\u0c7f"


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    messages: list[str] = []
    out_dir = tmp_path_factory.mktemp("demo") / "ckpt"
    out = demo.build_demo_checkpoint(out_dir, seed=0, progress=messages.append)
    assert messages, "progress callback was never called"
    return out


def test_build_writes_a_moshi_layout(built_dir: Path) -> None:
    assert {p.name for p in built_dir.iterdir()} == EXPECTED_FILES
    config = json.loads((built_dir / demo.CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["moshi_name"] == demo.LM_FILE
    assert config["mimi_name"] == demo.MIMI_FILE
    assert config["mimi_config_name"] == demo.MIMI_CONFIG_FILE
    assert config["tokenizer_name"] == demo.TOKENIZER_FILE
    assert config["model_id"]["random_weights"] is True
    # Moshi's structure: 8 own + 8 user codebooks, depformer over 8, moshi's default delays.
    assert (config["n_q"], config["dep_q"]) == (16, 8)
    assert config["delays"] == loaders._lm_kwargs["delays"]


def test_loads_through_checkpoint_info(built_dir: Path) -> None:
    info = checkpoint_info_from_dir(built_dir)
    assert isinstance(info, loaders.CheckpointInfo)
    assert info.moshi_weights == built_dir.resolve() / demo.LM_FILE
    assert info.mimi_config is not None and info.lm_config is not None
    assert is_demo_checkpoint(info)

    tokenizer = info.get_text_tokenizer()
    lm = info.get_moshi(device="cpu", dtype=torch.float32)  # strict load_state_dict inside moshi
    mimi = info.get_mimi(device="cpu")
    assert lm.text_card == tokenizer.vocab_size() == demo.TOKENIZER_VOCAB_SIZE
    assert mimi.num_codebooks == 8 and mimi.sample_rate == 24000 and mimi.frame_size == 1920
    assert lm.card == mimi.cardinality


def test_tokenizer_is_telugu_with_moshi_special_ids(built_dir: Path) -> None:
    tokenizer = checkpoint_info_from_dir(built_dir).get_text_tokenizer()
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert tokenizer.unk_id() == 0 and tokenizer.pad_id() == 3

    pieces = [tokenizer.id_to_piece(i) for i in range(4, tokenizer.vocab_size())]
    telugu = [p for p in pieces if any(_is_telugu(c) for c in p)]
    assert len(telugu) >= 0.9 * len(pieces)
    other_letters = [p for p in pieces if any(unicodedata.category(c)[0] == "L" and not _is_telugu(c)
                                              for c in p)]
    assert not other_letters

    sentence = "నమస్కారం, మీరు ఎలా ఉన్నారు?"
    ids = tokenizer.encode(sentence)
    assert len(ids) < len(sentence) / 2  # real sub-word pieces, not characters
    assert tokenizer.decode(ids) == sentence


def test_corpus_is_a_few_hundred_telugu_sentences() -> None:
    sentences = demo.read_corpus()
    assert len(sentences) >= 300
    assert len(set(sentences)) == len(sentences)
    assert all(any(_is_telugu(c) for c in s) for s in sentences)


def test_mimi_codes_follow_the_input_and_decode_bounded(built_dir: Path) -> None:
    mimi = checkpoint_info_from_dir(built_dir).get_mimi(device="cpu")
    t = torch.arange(24000) / 24000
    tone = 0.3 * torch.sin(2 * torch.pi * 220 * t)
    noise = 0.1 * torch.randn(24000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = mimi.encode(torch.stack([tone, noise])[:, None])
        assert codes.shape == (2, 8, 13)
        assert len(torch.unique(codes)) > 20  # a fresh Mimi's all-zero codebooks would give only code 0
        assert not torch.equal(codes[0], codes[1])
        generator = torch.Generator().manual_seed(2)
        random_codes = torch.randint(0, mimi.cardinality, (4, 8, 50), generator=generator)
        audio = mimi.decode(random_codes)
    assert torch.isfinite(audio).all()
    assert 0.01 < float(audio.abs().max()) <= 1.0


def test_racing_builds_are_atomic_and_deterministic(built_dir: Path, tmp_path: Path) -> None:
    """Two processes ask for the cached checkpoint at once: both get one complete dir, bytes equal a fresh
    build with the same seed, and no temporary directories are left behind. Each logs its progress (the
    server's first start says why it takes a minute)."""
    cache = tmp_path / "cache" / "demo"
    env = os.environ | {"VOICE_DEMO_DIR": str(cache)}
    code = ("import logging; logging.basicConfig(level='INFO'); "
            "from procs.model.torch_setup import prepare_torch; prepare_torch('cpu'); "
            "from procs.model.demo import demo_checkpoint_dir; print(demo_checkpoint_dir())")
    racers = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs, logs = zip(*(racer.communicate(timeout=300) for racer in racers), strict=True)
    assert [racer.returncode for racer in racers] == [0, 0]
    assert [out.strip() for out in outputs] == [str(cache), str(cache)]
    for log in logs:
        assert "first start: building the demo checkpoint" in log and "initialising the LM" in log
    assert [p.name for p in cache.parent.iterdir()] == ["demo"]
    for name in EXPECTED_FILES:
        assert (cache / name).read_bytes() == (built_dir / name).read_bytes(), name


def test_cli_keeps_an_existing_checkpoint_and_refuses_to_replace_other_dirs(built_dir: Path,
                                                                            tmp_path: Path) -> None:
    before = (built_dir / demo.LM_FILE).stat().st_mtime_ns
    command = [sys.executable, "-m", "procs.model.build_demo", "--out", str(built_dir)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert "already built" in run.stdout
    assert run.stdout.splitlines()[-1] == str(built_dir)
    assert (built_dir / demo.LM_FILE).stat().st_mtime_ns == before

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        demo._check_replaceable(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
