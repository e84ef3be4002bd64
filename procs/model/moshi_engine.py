"""`MoshiEngine`: Mimi + moshi's `LMGen` in streaming mode over a batch of session slots.

Each slot of the batch is one session: `reset_slot` starts a session (moshi's per-element
`reset_streaming(mask)`), and every step runs with `set_exec_mask(ready)` so slots without a new frame do not
advance. One step is

    codes = mimi.encode(pcm)            [B, 8, 1]     the users' audio, 1920 samples at 24 kHz each
    tokens = lm_gen.step(codes)         [B, 1+8, 1]   inner-monologue text token + Moshi's 8 audio codes
    pcm_out = mimi.decode(tokens[:, 1:])              Moshi's audio for the same 80 ms

Imports moshi: call `procs.model.torch_setup.prepare_torch` first.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import sentencepiece
import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen, LMModel

from procs.model.capacity import CardMemory, sessions_that_fit, streaming_bytes_per_session, weight_bytes
from procs.model.checkpoints import is_demo_checkpoint, parse_device, parse_dtype, resolve_checkpoint
from procs.model.compact import apply_footprint
from procs.model.demo import demo_checkpoint_dir
from procs.model.engine import TEXT_PADDING_IDS, EngineOOM, StepResult
from procs.model.footprint import Footprint
from procs.model.source import ModelSource


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
        self.weights_bytes = weight_bytes(mimi, lm)
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
            tokens=np.where(ready[:, None], tokens_cpu, -1),
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


def _describe_lm(lm: LMModel) -> str:
    return (f"LM dim {lm.dim}, {len(lm.transformer.layers)} layers, context {lm.context}, "
            f"text_card {lm.text_card}, n_q {lm.n_q}, dep_q {lm.dep_q}, "
            f"{_param_count(lm) / 1e6:.1f} M params")


def random_model_configs(name: str) -> tuple[dict, dict, sentencepiece.SentencePieceProcessor]:
    """(LM kwargs, Mimi config, tokenizer) of a `--random-model`: "moshi-7b" has the real shapes (moshi's
    default 7B LM and full-size Mimi), "demo" the demo checkpoint's. The tokenizer is the demo's (ids it
    cannot map are dropped)."""
    from procs.model.demo import TOKENIZER_FILE, demo_lm_config, demo_mimi_config

    tokenizer = sentencepiece.SentencePieceProcessor(str(demo_checkpoint_dir() / TOKENIZER_FILE))
    if name == "moshi-7b":
        return dict(loaders._lm_kwargs), loaders._mimi_config, tokenizer
    if name == "demo":
        return demo_lm_config(text_card=tokenizer.vocab_size()), demo_mimi_config(), tokenizer
    raise ValueError(f"unknown random model {name!r}")


def random_model(name: str, device: torch.device, dtype: torch.dtype, log: logging.Logger
                 ) -> tuple[MimiModel, LMModel, sentencepiece.SentencePieceProcessor]:
    """`--random-model`: Mimi and the LM built in memory with random weights, no checkpoint file, for
    capacity checks on a GPU (`random_model_configs` says which shapes)."""
    from procs.model.demo import mimi_codebooks

    lm_kwargs, mimi_config, tokenizer = random_model_configs(name)
    log.info("building a random-weight %s model in memory on %s", name, device)
    mimi = loaders.get_mimi(None, mimi_config, num_codebooks=mimi_codebooks(lm_kwargs), device=device)
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device=device, dtype=dtype)
    return mimi, lm, tokenizer


def card_memory(device: torch.device, told_bytes: int | None, weights: int) -> CardMemory | None:
    """What the capacity clamp reads: a card of the size told (on any device), CUDA's free memory, or
    nothing (the CPU, where only --session-memory-mb bounds the sessions)."""
    if told_bytes is not None:
        return CardMemory.told(told_bytes, weights)
    return CardMemory.measured(device) if device.type == "cuda" else None


def load_moshi_engine(*, source: ModelSource, device: str, dtype: str | None, batch_size: int,
                      log: logging.Logger, footprint: Footprint, session_memory_bytes: int | None,
                      card_memory_bytes: int | None, gpu_memory_fraction: float, greedy: bool,
                      seed: int | None) -> MoshiEngine:
    """`load_engine("moshi", ...)`: see there (every value is the caller's: no defaults here)."""
    torch_device = parse_device(device)
    torch_dtype = parse_dtype(dtype, torch_device)
    if torch_device.type == "cpu" and torch_dtype != torch.float32:
        log.warning("dtype %s on CPU is slow; float32 is the CPU default", torch_dtype)
    if seed is not None:
        torch.manual_seed(seed)

    if source.random_model is not None:
        mimi, lm, tokenizer = random_model(source.random_model, torch_device, torch_dtype, log)
        described, demo, lm_gen_config = f"random {source.random_model}", True, {}
    else:
        info, described = resolve_checkpoint(source)
        demo = is_demo_checkpoint(info)
        log.info("loading checkpoint %s", described)
        mimi = info.get_mimi(device=torch_device)
        lm = info.get_moshi(device=torch_device, dtype=torch_dtype, fuse_lora=source.fuse_lora)
        tokenizer = info.get_text_tokenizer()
        lm_gen_config = dict(info.lm_gen_config)
    apply_footprint(lm, footprint)
    if torch_device.type == "cuda" and footprint.weights == "int8":
        # The bf16 weights int8 replaced sit in torch's cache, which CUDA's free memory counts as used:
        # hand them back before the capacity clamp reads it.
        gc.collect()
        torch.cuda.empty_cache()
    log.info("model %s: %s, dtype %s, device %s; Mimi %.1f M params, %d codebooks; tokenizer %d pieces",
             described, _describe_lm(lm), torch_dtype, torch_device, _param_count(mimi) / 1e6,
             mimi.num_codebooks, tokenizer.vocab_size())
    if lm.text_card != tokenizer.vocab_size():
        log.warning("LM text_card %d != tokenizer size %d: text ids the tokenizer cannot map are dropped",
                    lm.text_card, tokenizer.vocab_size())
    if demo:
        log.warning("*** RANDOM DEMO WEIGHTS (%s): the model outputs noise, not speech. Pass "
                    "--checkpoint DIR or --hf-repo REPO for a real Moshi. ***", described)

    per_session, weights = streaming_bytes_per_session(mimi, lm), weight_bytes(mimi, lm)
    log.info("memory: %s; weights %.2f GiB, %.1f MiB of streaming state per session",
             footprint.describe(str(torch_dtype).removeprefix("torch."), lm.context), weights / 2**30,
             per_session / 2**20)
    batch_size = sessions_that_fit(batch_size, per_session, card=card_memory(torch_device, card_memory_bytes,
                                                                             weights),
                                   session_memory_bytes=session_memory_bytes,
                                   gpu_memory_fraction=gpu_memory_fraction, log=log)
    if greedy:
        lm_gen_config["use_sampling"] = False
    engine = MoshiEngine(mimi, lm, tokenizer, batch_size=batch_size, demo_weights=demo,
                         lm_gen_kwargs=lm_gen_config)
    log.info("engine: moshi, %d slots, %.1f MiB streaming state per session", batch_size, per_session / 2**20)
    return engine
