"""The demo checkpoint: a small Moshi-architecture checkpoint with random weights, built here.

Real weights cannot be downloaded in this project's environments, so the tests and the default demo run on
a checkpoint the project generates itself. It has the on-disk layout of a real one (like
kyutai/moshiko-pytorch-bf16): `config.json` (LM kwargs plus the file names), the LM weights in bf16
safetensors, the Mimi weights and Mimi config, and a SentencePiece tokenizer, so it is loaded by moshi's own
`CheckpointInfo`, the same code path as a real `--checkpoint DIR`. The structure is Moshi's (Mimi at 24 kHz
and 12.5 Hz with 8 codebooks, an LM with an inner-monologue text stream, a depformer over 8 codebooks,
moshi's default acoustic delays); only widths and depths are shrunk so that a 2-core CPU steps several
sessions in real time. Its output is noise.

Imports moshi: call `procs.model.torch_setup.prepare_torch` first. From a shell:
`python -m procs.model.build_demo [--out DIR] [--force]` prints progress, then the directory on its last line.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization.core_vq import EuclideanCodebook
from moshi.quantization.vq import ResidualVectorQuantizer
from safetensors.torch import save_file

# Bump when the build recipe changes in a way the config/corpus digest below cannot see.
DEMO_FORMAT_VERSION = 1
CORPUS_PATH = Path(__file__).parent / "data" / "telugu_corpus.txt"

CONFIG_FILE = "config.json"
LM_FILE = "model.safetensors"
MIMI_FILE = "mimi.safetensors"
MIMI_CONFIG_FILE = "mimi_config.json"
TOKENIZER_FILE = "tokenizer_telugu_spm.model"
# The largest unigram vocabulary the shipped corpus supports is ~470 pieces; 400 leaves room for edits.
TOKENIZER_VOCAB_SIZE = 400
# Marker in config.json's `model_id` (CheckpointInfo keeps it) telling the engine these weights are noise.
DEMO_MODEL_ID = {"name": "telugu-voice-agent-demo", "random_weights": True}

# Loudness the random Mimi decoder is scaled to (peak of the calibration decode), so its noise is audible
# but far from clipping.
_DECODER_PEAK = 0.25

Progress = Callable[[str], None]


def demo_mimi_config() -> dict:
    """Moshi's Mimi config with the widths shrunk; the strides (24 kHz -> 12.5 Hz) are unchanged."""
    dimension = 64
    seanet = loaders._seanet_kwargs | {"n_filters": 8, "dimension": dimension}
    quantizer = loaders._quantizer_kwargs | {
        "dimension": 32,
        "n_q": 8,
        "input_dimension": dimension,
        "output_dimension": dimension,
    }
    transformer = loaders._transformer_kwargs | {
        "d_model": dimension,
        "num_heads": 4,
        "num_layers": 1,
        "dim_feedforward": 256,
        "input_dimension": dimension,
        "output_dimensions": [dimension],
    }
    return loaders._mimi_config | {"seanet": seanet, "quantizer": quantizer, "transformer": transformer}


def mimi_codebooks(lm_config: dict) -> int:
    """The codebooks Mimi must produce for an LM config: the larger of the LM's own (dep_q) and the user's
    (n_q - dep_q) audio streams, as moshi's `CheckpointInfo.get_mimi` counts them."""
    return max(lm_config["dep_q"], lm_config["n_q"] - lm_config["dep_q"])


def demo_lm_config(text_card: int) -> dict:
    """Moshi's LM kwargs (n_q=16: 8 own + 8 user codebooks, dep_q=8, default delays) with a small width/depth.

    `text_card` must equal the tokenizer's vocabulary size: moshi.server crashes on a sampled id its tokenizer
    cannot map.
    """
    depformer_dim = 128
    return loaders._lm_kwargs | {
        "dim": 128,
        "text_card": text_card,
        "num_heads": 4,
        "num_layers": 2,
        "depformer_dim": depformer_dim,
        "depformer_dim_feedforward": int(4.125 * depformer_dim),
        "depformer_num_heads": 4,
        "depformer_num_layers": 1,
    }


def read_corpus(path: Path = CORPUS_PATH) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def train_tokenizer(sentences: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> bytes:
    """Trains a unigram SentencePiece model and returns its serialized proto.

    Ids 0..3 are unk, bos, eos, pad: moshi treats text ids 0 and 3 as padding (`existing_text_end_padding_id`
    and `existing_text_padding_id`), as in its own 32k tokenizer. One thread keeps the result deterministic.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def demo_version() -> str:
    """Cache key: the recipe version plus a digest of everything the build reads, so edits invalidate it."""
    digest = hashlib.sha256()
    digest.update(json.dumps([demo_mimi_config(), demo_lm_config(0)], sort_keys=True).encode())
    digest.update(CORPUS_PATH.read_bytes())
    return f"v{DEMO_FORMAT_VERSION}-{digest.hexdigest()[:10]}"


def default_demo_dir() -> Path:
    explicit = os.environ.get("VOICE_DEMO_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache_root / "telugu-voice-agent" / f"demo-{demo_version()}"


@contextlib.contextmanager
def _torch_seeded(seed: int) -> Iterator[None]:
    """Seeds torch's global RNG for a deterministic init without leaking the seed to the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _calibration_audio(seed: int, seconds: float = 2.0) -> torch.Tensor:
    """Deterministic speech-band test signal: a few tones with a wobbling pitch, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(loaders.SAMPLE_RATE * seconds)) / loaders.SAMPLE_RATE
    pitch = 140.0 * (1 + 0.2 * torch.sin(2 * torch.pi * 3.0 * t))
    phase = 2 * torch.pi * torch.cumsum(pitch, 0) / loaders.SAMPLE_RATE
    voiced = sum(torch.sin(k * phase) / k for k in (1, 2, 3, 5))
    noise = 0.05 * torch.randn(t.shape, generator=generator)
    return (0.3 * voiced + noise)[None, None].float()


@torch.no_grad()
def _fill_codebooks(mimi: MimiModel, audio: torch.Tensor) -> None:
    """Gives every RVQ codebook random codewords at the scale of its input.

    A fresh Mimi has all-zero codebooks, so every frame would encode to code 0 and decode to the same sound:
    the LM's input would not depend on the user's audio and its output would not change the audio.
    """
    latent = mimi._encode_to_unquantized_latent(audio)
    for rvq in mimi.modules():
        if not isinstance(rvq, ResidualVectorQuantizer):
            continue
        scale = float(rvq.input_proj(latent).std())
        for codebook in rvq.modules():
            if isinstance(codebook, EuclideanCodebook):
                codebook.embedding_sum.copy_(torch.randn_like(codebook.embedding_sum) * scale)
                codebook.cluster_usage.fill_(1.0)
                codebook._initialized.fill_(1.0)
                codebook.register_buffer("_embedding", None, persistent=False)  # drop the cached zeros


@torch.no_grad()
def _scale_decoder_output(mimi: MimiModel, num_codebooks: int, seed: int) -> None:
    """Scales the decoder's last convolution so random codes decode at a bounded, audible level."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, mimi.cardinality, (2, num_codebooks, 25), generator=generator)
    peak = float(mimi.decode(codes).abs().max())
    if not 0 < peak < float("inf"):
        raise RuntimeError(f"random Mimi decoder output is not finite and non-zero (peak {peak})")
    last_conv = [m for m in mimi.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    last_conv.weight.mul_(_DECODER_PEAK / peak)
    if last_conv.bias is not None:
        last_conv.bias.mul_(_DECODER_PEAK / peak)


def _contiguous(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if dtype is not None and tensor.dtype.is_floating_point:
            tensor = tensor.to(dtype)
        out[name] = tensor.detach().contiguous()
    return out


def build_demo_checkpoint(out_dir: Path, *, seed: int = 0, progress: Progress | None = None) -> Path:
    """Writes the demo checkpoint into `out_dir` (created if needed) and returns it.

    Deterministic: the same seed, corpus and moshi/torch versions give byte-identical files.
    Not atomic by itself; `demo_checkpoint_dir` builds in a temporary directory and renames.
    """
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    sentences = read_corpus()
    say(f"training the SentencePiece tokenizer on {len(sentences)} Telugu sentences")
    tokenizer_proto = train_tokenizer(sentences)
    vocab_size = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_proto).vocab_size()
    (out_dir / TOKENIZER_FILE).write_bytes(tokenizer_proto)

    mimi_config = demo_mimi_config()
    lm_config = demo_lm_config(text_card=vocab_size)
    num_codebooks = mimi_codebooks(lm_config)
    with _torch_seeded(seed):
        say("initialising Mimi with random weights")
        mimi = loaders.get_mimi(None, mimi_config, num_codebooks=num_codebooks)
        _fill_codebooks(mimi, _calibration_audio(seed))
        _scale_decoder_output(mimi, num_codebooks, seed)
        save_file(_contiguous(mimi.state_dict()), out_dir / MIMI_FILE, metadata={"format": "pt"})
        (out_dir / MIMI_CONFIG_FILE).write_text(json.dumps(mimi_config, indent=2) + "\n")

        say(f"initialising the LM with random weights (dim {lm_config['dim']}, "
            f"{lm_config['num_layers']} layers, text_card {vocab_size})")
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config, dtype=torch.float32)
        # Stored in bf16 like kyutai/moshiko-pytorch-bf16; the loader casts to the requested dtype.
        save_file(_contiguous(lm.state_dict(), torch.bfloat16), out_dir / LM_FILE, metadata={"format": "pt"})

    config = lm_config | {
        "moshi_name": LM_FILE,
        "mimi_name": MIMI_FILE,
        "mimi_config_name": MIMI_CONFIG_FILE,
        "tokenizer_name": TOKENIZER_FILE,
        "model_type": "moshi",
        "model_id": DEMO_MODEL_ID | {"version": demo_version(), "seed": seed},
    }
    # Written last: a directory with config.json has everything else.
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    say(f"demo checkpoint files written to {out_dir}")
    return out_dir


def _check_replaceable(existing: Path) -> None:
    """Refuses to delete a directory that is neither empty nor a demo checkpoint (a mistyped --out)."""
    config_path = existing / CONFIG_FILE
    if not any(existing.iterdir()):
        return
    if config_path.exists():
        model_id = json.loads(config_path.read_text(encoding="utf-8")).get("model_id", {})
        if model_id.get("name") == DEMO_MODEL_ID["name"]:
            return
    raise FileExistsError(f"{existing} exists and is not a demo checkpoint; not replacing it")


def _build_atomically(final_dir: Path, *, seed: int, progress: Progress | None, replace: bool) -> Path:
    """Builds into a sibling temp dir, then renames it into place, so no reader sees a half-written one.

    When two processes race, the first rename wins and the loser discards its copy (same bytes anyway).
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.building-", dir=final_dir.parent))
    try:
        build_demo_checkpoint(temp_dir, seed=seed, progress=progress)
        temp_dir.chmod(0o755)  # mkdtemp made it private; the cache is an ordinary directory
        if replace and final_dir.exists():
            _check_replaceable(final_dir)
            stale = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.stale-", dir=final_dir.parent))
            os.replace(final_dir, stale / final_dir.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(temp_dir, final_dir)
        except OSError:
            if not (final_dir / CONFIG_FILE).exists():
                raise
            # Another process finished first; its copy is equivalent.
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if progress is not None:
        progress(f"demo checkpoint ready at {final_dir}")
    return final_dir


def build_demo(out_dir: Path, *, seed: int = 0, force: bool = False,
               progress: Progress | None = None) -> Path:
    """Builds the demo checkpoint into `out_dir` unless one is there already (or `force`)."""
    if (out_dir / CONFIG_FILE).exists() and not force:
        if progress is not None:
            progress(f"already built at {out_dir} (use --force to rebuild)")
        return out_dir
    return _build_atomically(out_dir, seed=seed, progress=progress, replace=True)


def demo_checkpoint_dir(*, progress: Progress | None = None) -> Path:
    """The cached demo checkpoint directory, built on first use."""
    final_dir = default_demo_dir()
    if (final_dir / CONFIG_FILE).exists():
        return final_dir
    if progress is None:  # the server's first start: say why it takes a minute, step by step
        log = logging.getLogger("model.demo")
        log.info("first start: building the demo checkpoint into %s (about a minute, once)", final_dir)
        progress = log.info
    return _build_atomically(final_dir, seed=0, progress=progress, replace=False)
