"""The speech model behind the inference process: one batched streaming state, one step per 80 ms frame.

`MoshiEngine` holds Mimi and moshi's `LMGen` in streaming mode with batch size = max sessions. Each slot of
the batch is one session: `reset_slot` starts a session (moshi's per-element `reset_streaming(mask)`), and
every step runs with `set_exec_mask(ready)` so slots without a new frame do not advance. One step is

    codes = mimi.encode(pcm)            [B, 8, 1]     the users' audio, 1920 samples at 24 kHz each
    tokens = lm_gen.step(codes)         [B, 1+8, 1]   inner-monologue text token + Moshi's 8 audio codes
    pcm_out = mimi.decode(tokens[:, 1:])              Moshi's audio for the same 80 ms

`LoopbackEngine` has no model and echoes; it lets everything around the engine run without one.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece
import torch

# isort: off
import procs.model.torch_setup  # noqa: F401  (before moshi: see there)
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen, LMModel
from moshi.modules.transformer import StreamingMultiheadAttention
# isort: on

from procs.model.demo import demo_checkpoint_dir

FRAME_SAMPLES = 1920  # one Mimi frame: 80 ms at 24 kHz
SAMPLE_RATE = 24000
# Text ids moshi uses as padding in the inner monologue (`existing_text_end_padding_id`, `..._padding_id`).
TEXT_PADDING_IDS = (0, 3)
# GPU memory kept free for weights' neighbours: activations, the allocator's slack, CUDA graphs, cuBLAS.
GPU_RESERVE_MIN_BYTES = 1 << 30
GPU_RESERVE_FRACTION = 0.05


class EngineOOM(RuntimeError):
    """The accelerator ran out of memory during a step. The cache was emptied; the caller should refuse new
    sessions (and may reset the slots of the step that failed, whose state may be partly advanced)."""


@dataclass
class StepResult:
    pcm: np.ndarray  # [B, 1920] float32 at 24 kHz, not clipped; rows without has_audio are zero
    has_audio: np.ndarray  # [B] bool: ready slots whose LM produced audio this step (False while delays fill)
    text: list[str | None]  # [B] inner-monologue piece per slot, '▁' as a space; None for padding/unmappable
    encode_s: float
    lm_s: float
    decode_s: float


class Engine(Protocol):
    name: str
    batch_size: int
    demo_weights: bool
    device: str
    frame_samples: int
    sample_rate: int

    @property
    def max_sessions(self) -> int: ...  # == batch_size: one session per slot

    def reset_slot(self, slot: int) -> None: ...

    def step_batch(self, pcm: np.ndarray, ready: np.ndarray) -> StepResult: ...

    def warmup(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Capacity


def max_sessions_for_memory(free_bytes: int, per_session_bytes: int, reserve_bytes: int) -> int:
    """How many sessions' streaming state fit in `free_bytes` once `reserve_bytes` are set aside."""
    if per_session_bytes <= 0:
        raise ValueError(f"per_session_bytes must be positive, got {per_session_bytes}")
    return max(0, (free_bytes - reserve_bytes) // per_session_bytes)


def _attention_kv_bytes(attention: StreamingMultiheadAttention, capacity: int, dtype: torch.dtype) -> int:
    kv_heads = attention.num_heads // attention.kv_repeat
    head_dim = attention.embed_dim // attention.num_heads
    return 2 * capacity * kv_heads * head_dim * dtype.itemsize


def kv_cache_bytes_per_session(lm: LMModel) -> int:
    """KV cache of the LM's main transformer for one session: layers x 2 x context x dim x dtype bytes.

    For the 7B Moshi in bf16 this is 32 x 2 x 3000 x 4096 x 2 B ~= 1.57 GB.
    """
    if lm.context is None:
        raise ValueError("the LM has no context: its streaming KV cache would be unbounded")
    attentions = [m for m in lm.transformer.modules()
                  if isinstance(m, StreamingMultiheadAttention) and not m.cross_attention]
    return sum(_attention_kv_bytes(a, lm.context, lm.dtype) for a in attentions)


def streaming_bytes_per_session(mimi: MimiModel, lm: LMModel) -> int:
    """All per-session streaming state: the LM's KV cache plus Mimi's transformers' KV caches, the depformer's
    per-step cache and the token delay buffer (the last three are small next to the LM's)."""
    total = kv_cache_bytes_per_session(lm)
    for module in mimi.modules():
        if isinstance(module, StreamingMultiheadAttention) and module.context is not None:
            total += _attention_kv_bytes(module, module.context, next(mimi.parameters()).dtype)
    if lm.depformer is not None:
        for module in lm.depformer.modules():
            if isinstance(module, StreamingMultiheadAttention):
                total += _attention_kv_bytes(module, lm.dep_q, lm.dtype)
    total += lm.num_codebooks * (max(lm.delays) + 2) * 8  # LMGen's int64 token cache
    return total


def gpu_reserve_bytes(total_bytes: int) -> int:
    return max(GPU_RESERVE_MIN_BYTES, int(total_bytes * GPU_RESERVE_FRACTION))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


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


def text_piece_table(tokenizer: sentencepiece.SentencePieceProcessor) -> list[str | None]:
    """id -> printable piece ('▁' as a space), None for padding, control, unknown and byte pieces."""
    table: list[str | None] = []
    for token_id in range(tokenizer.vocab_size()):
        if (
            token_id in TEXT_PADDING_IDS
            or tokenizer.is_control(token_id)
            or tokenizer.is_unknown(token_id)
            or tokenizer.is_byte(token_id)
        ):
            table.append(None)
        else:
            table.append(tokenizer.id_to_piece(token_id).replace("▁", " "))
    return table


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------
# Engines


class MoshiEngine:
    """Mimi + LMGen streaming over `batch_size` slots; see the module docstring for one step."""

    name = "moshi"

    def __init__(
        self,
        mimi: MimiModel,
        lm: LMModel,
        tokenizer: sentencepiece.SentencePieceProcessor,
        *,
        batch_size: int,
        demo_weights: bool,
        lm_gen_kwargs: dict | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mimi = mimi
        self.lm = lm
        self.batch_size = batch_size
        self.demo_weights = demo_weights
        self.torch_device = lm.device
        self.device = str(lm.device)
        self.frame_samples = mimi.frame_size
        self.sample_rate = mimi.sample_rate
        self.per_session_bytes = streaming_bytes_per_session(mimi, lm)
        self._pieces = text_piece_table(tokenizer)
        # Out of sync: slots start at different times, so "has this slot's delay filled" is per slot
        # (from the returned tokens), not LMGen's single batch-wide counter.
        self.lm_gen = LMGen(lm, support_out_of_sync=True, **(lm_gen_kwargs or {}))
        self._on_cuda = self.torch_device.type == "cuda"
        # Slots whose next encoded frame is their session's first (see step_batch).
        self._fresh = np.ones(batch_size, dtype=bool)
        self._last_mimi_mask: np.ndarray | None = None
        with torch.no_grad():
            self.mimi.streaming_forever(batch_size)
            self.lm_gen.streaming_forever(batch_size)

    @property
    def max_sessions(self) -> int:
        return self.batch_size

    def _mask(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values, dtype=bool)).to(self.torch_device)

    def _set_mimi_mask(self, mask: np.ndarray) -> None:
        # Setting a mask touches every streaming submodule; skip it when unchanged (the common case).
        if self._last_mimi_mask is not None and np.array_equal(self._last_mimi_mask, mask):
            return
        self.mimi.set_exec_mask(self._mask(mask))
        self._last_mimi_mask = mask.copy()

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise IndexError(f"slot {slot} out of range for batch size {self.batch_size}")

    def _sync(self) -> None:
        if self._on_cuda:
            torch.cuda.synchronize(self.torch_device)

    @torch.no_grad()
    def reset_slot(self, slot: int) -> None:
        """A new session starts in `slot`: its encoder, LM and decoder state start from scratch."""
        self._check_slot(slot)
        mask = np.zeros(self.batch_size, dtype=bool)
        mask[slot] = True
        reset_mask = self._mask(mask)
        self.mimi.reset_streaming(reset_mask)
        self.lm_gen.reset_streaming(reset_mask)
        self._last_mimi_mask = None  # reset_streaming re-enables the reset slot's exec mask
        self._fresh[slot] = True

    def step_batch(self, pcm: np.ndarray, ready: np.ndarray) -> StepResult:
        """One 80 ms step for every ready slot. pcm: [B, 1920] float32 at 24 kHz; ready: [B] bool."""
        pcm = np.asarray(pcm, dtype=np.float32)
        ready = np.asarray(ready, dtype=bool)
        if pcm.shape != (self.batch_size, self.frame_samples) or ready.shape != (self.batch_size,):
            raise ValueError(
                f"expected pcm [{self.batch_size}, {self.frame_samples}] and ready [{self.batch_size}], "
                f"got {pcm.shape} and {ready.shape}")
        if not ready.any():
            return self._empty_result()
        try:
            return self._step(pcm, ready)
        except torch.OutOfMemoryError as error:
            if self._on_cuda:
                torch.cuda.empty_cache()
            raise EngineOOM(f"out of memory stepping {int(ready.sum())} sessions: {error}") from error

    def _empty_result(self) -> StepResult:
        return StepResult(
            pcm=np.zeros((self.batch_size, self.frame_samples), dtype=np.float32),
            has_audio=np.zeros(self.batch_size, dtype=bool),
            text=[None] * self.batch_size,
            encode_s=0.0, lm_s=0.0, decode_s=0.0,
        )

    @torch.no_grad()
    def _step(self, pcm: np.ndarray, ready: np.ndarray) -> StepResult:
        t_start = time.perf_counter()
        self._set_mimi_mask(ready)
        audio_in = torch.from_numpy(pcm).to(self.torch_device)[:, None, :]
        codes = self.mimi.encode(audio_in)  # [B, 8, 1]
        fresh = self._fresh & ready
        if fresh.any():
            # As moshi.server does: the first frame of a session is encoded with the encoder's initial left
            # padding; the encoder is then reset so the next frame gets that padding again. (The decoder
            # has not run for these slots yet, so resetting it too changes nothing.)
            self.mimi.reset_streaming(self._mask(fresh))
            self._last_mimi_mask = None
            self._fresh &= ~ready
        self._sync()
        t_encoded = time.perf_counter()

        self.lm_gen.set_exec_mask(self._mask(ready))
        tokens = self.lm_gen.step(codes)  # [B, 1 + dep_q, 1]; ungenerated_token_id where none yet
        assert tokens is not None  # support_out_of_sync: always a tensor
        tokens_cpu = tokens[:, :, 0].cpu().numpy()
        t_stepped = time.perf_counter()

        has_audio = ready & (tokens_cpu[:, 1:] >= 0).all(axis=1)
        pcm_out = np.zeros((self.batch_size, self.frame_samples), dtype=np.float32)
        if has_audio.any():
            self._set_mimi_mask(has_audio)
            audio_tokens = tokens[:, 1:].clamp(min=0)  # slots without audio decode a dummy code, masked out
            decoded = self.mimi.decode(audio_tokens)[:, 0, : self.frame_samples].float().cpu().numpy()
            pcm_out[has_audio] = decoded[has_audio]
        t_decoded = time.perf_counter()

        text = [self._piece(int(token_id)) if ok else None
                for token_id, ok in zip(tokens_cpu[:, 0], ready, strict=True)]
        return StepResult(
            pcm=pcm_out, has_audio=has_audio, text=text,
            encode_s=t_encoded - t_start, lm_s=t_stepped - t_encoded, decode_s=t_decoded - t_stepped,
        )

    def _piece(self, token_id: int) -> str | None:
        # Any sampled id must be survived: the LM's text_card may exceed the tokenizer's vocabulary.
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else None

    def warmup(self) -> None:
        """Runs a few full-batch steps (allocations, CUDA graphs), then resets every slot."""
        silence = np.zeros((self.batch_size, self.frame_samples), dtype=np.float32)
        everyone = np.ones(self.batch_size, dtype=bool)
        for _ in range(max(self.lm.delays) + 3):
            self.step_batch(silence, everyone)
        for slot in range(self.batch_size):
            self.reset_slot(slot)
        self._sync()


class LoopbackEngine:
    """No model: each ready slot's input comes back as its output, at once. For tests and plumbing."""

    name = "loopback"
    demo_weights = False
    device = "cpu"
    frame_samples = FRAME_SAMPLES
    sample_rate = SAMPLE_RATE

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    @property
    def max_sessions(self) -> int:
        return self.batch_size

    def reset_slot(self, slot: int) -> None:
        if not 0 <= slot < self.batch_size:
            raise IndexError(f"slot {slot} out of range for batch size {self.batch_size}")

    def step_batch(self, pcm: np.ndarray, ready: np.ndarray) -> StepResult:
        ready = np.asarray(ready, dtype=bool)
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.shape != (self.batch_size, self.frame_samples) or ready.shape != (self.batch_size,):
            raise ValueError(f"expected pcm [{self.batch_size}, {self.frame_samples}] and ready "
                             f"[{self.batch_size}], got {pcm.shape} and {ready.shape}")
        started = time.perf_counter()
        out = np.where(ready[:, None], pcm, np.float32(0.0)).astype(np.float32, copy=False)
        return StepResult(pcm=out, has_audio=ready.copy(), text=[None] * self.batch_size,
                          encode_s=0.0, lm_s=time.perf_counter() - started, decode_s=0.0)

    def warmup(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------
# Loading


def _describe_lm(lm: LMModel) -> str:
    return (f"LM dim {lm.dim}, {len(lm.transformer.layers)} layers, context {lm.context}, "
            f"text_card {lm.text_card}, n_q {lm.n_q}, dep_q {lm.dep_q}, "
            f"{_param_count(lm) / 1e6:.1f} M params")


def _clamp_batch_to_memory(batch_size: int, per_session_bytes: int, device: torch.device,
                           log: logging.Logger) -> int:
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    reserve = gpu_reserve_bytes(total_bytes)
    capacity = max_sessions_for_memory(free_bytes, per_session_bytes, reserve)
    log.info("GPU memory: %.2f GiB free of %.2f GiB, %.1f MiB per session, %.2f GiB reserved: room for %d "
             "sessions", free_bytes / 2**30, total_bytes / 2**30, per_session_bytes / 2**20, reserve / 2**30,
             capacity)
    if capacity < 1:
        raise EngineOOM(f"no GPU memory left for even one session ({free_bytes / 2**30:.2f} GiB free)")
    if batch_size > capacity:
        log.warning("max sessions clamped from %d to %d: that is what fits in free GPU memory",
                    batch_size, capacity)
        return capacity
    return batch_size


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

    torch_device = parse_device(device)
    torch_dtype = parse_dtype(dtype, torch_device)
    if torch_device.type == "cpu" and torch_dtype != torch.float32:
        log.warning("dtype %s on CPU is slow; float32 is the CPU default", torch_dtype)
    if seed is not None:
        torch.manual_seed(seed)

    info, source = resolve_checkpoint(checkpoint, hf_repo)
    demo = is_demo_checkpoint(info)
    log.info("loading checkpoint %s", source)
    mimi = info.get_mimi(device=torch_device)
    lm = info.get_moshi(device=torch_device, dtype=torch_dtype)
    tokenizer = info.get_text_tokenizer()
    log.info("checkpoint %s: %s, dtype %s, device %s; Mimi %.1f M params, %d codebooks; tokenizer %d pieces",
             source, _describe_lm(lm), torch_dtype, torch_device, _param_count(mimi) / 1e6,
             mimi.num_codebooks, tokenizer.vocab_size())
    if lm.text_card != tokenizer.vocab_size():
        log.warning("LM text_card %d != tokenizer size %d: text ids the tokenizer cannot map are dropped",
                    lm.text_card, tokenizer.vocab_size())
    if demo:
        log.warning("*** RANDOM DEMO WEIGHTS (%s): the model outputs noise, not speech. Pass "
                    "--checkpoint DIR or --hf-repo REPO for a real Moshi. ***", source)

    per_session = streaming_bytes_per_session(mimi, lm)
    if torch_device.type == "cuda":
        batch_size = _clamp_batch_to_memory(batch_size, per_session, torch_device, log)
    lm_gen_kwargs = dict(info.lm_gen_config)
    if greedy:
        lm_gen_kwargs["use_sampling"] = False
    engine = MoshiEngine(mimi, lm, tokenizer, batch_size=batch_size, demo_weights=demo,
                         lm_gen_kwargs=lm_gen_kwargs)
    log.info("engine: moshi, %d slots, %.1f MiB streaming state per session", batch_size, per_session / 2**20)
    return engine
