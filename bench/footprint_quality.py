"""What a footprint costs in quality: int8 weights, a reduced context and an fp8 KV cache against bf16,
teacher-forced on the same inputs, and bf16 against fp32 as the floor.

    python -m bench.footprint_quality --model demo --steps 250              # the demo checkpoint, CPU
    python -m bench.footprint_quality --model wide --steps 250              # dim 4096, 2 layers, full Mimi
    python -m bench.footprint_quality --model moshi-7b --device cuda        # the 7B shape (bench/gpu_check)

Inputs: Telugu speech (espeak-ng; seeded noise at speech level where it is missing, as on a bare GPU box),
encoded once by the model's Mimi (fp32, as served). The LM's weights are bf16 values (as a checkpoint stores
them) in every variant, so fp32 against bf16 measures the arithmetic alone. The teacher: the fp32 model run
greedily through moshi's own `LMGen`, recording what LMGen fed its transformer each step (the 17 streams,
after moshi's delays) and what it fed the depformer for each codebook. Every variant then steps the same
recorded inputs through its streaming `forward_text` and `forward_depformer` (moshi's), so a difference at
step t is the variant's own, not an earlier divergence. Per step: relative error ||l - l_ref|| / ||l_ref||
of the text logits and of the audio logits (all 8 codebooks), and whether the greedy text token agrees.
Variants other than fp32 are compared with bf16 (the weights a GPU serves); bf16 with fp32.

Models: "demo" (the demo checkpoint: random weights), "wide" (moshi's 7B config with 2 transformer layers
and 2 depformer layers, random weights: real widths, so int8's per-channel rows and fp8's per-vector scales
see 4,096-wide rows), "moshi-7b" (the full 7B shape, random weights, for a GPU). Random weights are a harsh
judge: their logits are nearly flat, so a greedy token flips on a small error that a trained model's peaked
distribution would not notice; the floor row says how harsh.

Prints a table and, with --json, every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from procs.model.footprint import Footprint
from procs.model.torch_setup import prepare_torch
from protocol import BLOCK_MS, OUT_SAMPLES_PER_BLOCK

FRAME_24K = OUT_SAMPLES_PER_BLOCK
MODELS = ("demo", "wide", "moshi-7b")
# What this project holds a footprint to: its mean relative error of the text and of the audio logits may
# be at most this many times the floor (bf16 against fp32: the error every bf16 deployment already takes).
# Why these are enough, and what they are measured on: bench/RESULTS.md (issue 17). A reduced context has
# none: it changes nothing within its window and forgets what lies beyond, by design.
THRESHOLDS = {"int8": 4.0, "fp8": 4.0}


@dataclass
class VariantQuality:
    variant: str
    against: str
    steps: int
    text_rel_err_mean: float
    text_rel_err_p95: float
    audio_rel_err_mean: float
    audio_rel_err_p95: float
    text_agreement: float  # greedy text token equal to the reference's, share of steps
    first_difference: int | None  # the first step whose logits differ at all (None: none does)
    seconds: float
    within_threshold: bool | None = None  # mean errors within THRESHOLDS x the floor (None: no threshold)


def parse_variants(text: str, context: int) -> dict[str, tuple[torch.dtype, Footprint]]:
    """Names -> (dtype, footprint). 'ctxN' is a reduced context of N steps."""
    known: dict[str, tuple[torch.dtype, Footprint]] = {
        "fp32": (torch.float32, Footprint()),
        "bf16": (torch.bfloat16, Footprint()),
        "int8": (torch.bfloat16, Footprint(weights="int8")),
        "fp8": (torch.bfloat16, Footprint(kv="fp8")),
        f"ctx{context}": (torch.bfloat16, Footprint(context=context)),
        f"int8+fp8+ctx{context}": (torch.bfloat16, Footprint(weights="int8", context=context, kv="fp8")),
    }
    chosen = {}
    for name in text.split(","):
        if name.startswith("ctx") and name[3:].isdigit():
            chosen[name] = (torch.bfloat16, Footprint(context=int(name[3:])))
        elif name in known:
            chosen[name] = known[name]
        else:
            raise SystemExit(f"unknown variant {name!r}; use {', '.join(known)} or ctxN")
    return {"fp32": known["fp32"], "bf16": known["bf16"], **chosen}


def configs(model: str, device: torch.device) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, Any]:
    """(LM kwargs, LM state dict or None for seeded random init, Mimi on `device`: the demo's own, or the
    full-size one with seed 1's random weights)."""
    from moshi.models import loaders
    from safetensors.torch import load_file

    if model == "demo":
        from procs.model.checkpoints import checkpoint_info_from_dir
        from procs.model.demo import demo_checkpoint_dir

        info = checkpoint_info_from_dir(demo_checkpoint_dir())
        return dict(info.lm_config or {}), load_file(str(info.moshi_weights)), info.get_mimi(device=device)
    from procs.model.demo import mimi_codebooks

    lm_kwargs = dict(loaders._lm_kwargs)
    if model == "wide":
        lm_kwargs |= {"num_layers": 2, "depformer_num_layers": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        mimi = loaders.get_mimi(None, loaders._mimi_config, num_codebooks=mimi_codebooks(lm_kwargs),
                                device=device)
    return lm_kwargs, None, mimi


def base_lm(lm_kwargs: dict[str, Any], state: dict[str, torch.Tensor] | None, device: torch.device) -> Any:
    """The LM in bf16 (weights as a checkpoint stores them), kept in host memory: the checkpoint's, or random
    ones from seed 0 (drawn on `device`, quick on a GPU). Every variant is a copy of it moved to `device`, so
    all share these values (fp32 computes with them exactly) and the card holds one variant at a time."""
    from moshi.models import loaders

    with torch.random.fork_rng(devices="all" if device.type == "cuda" else []):
        torch.manual_seed(0)
        lm = loaders.get_moshi_lm(None, lm_kwargs=dict(lm_kwargs), device=device, dtype=torch.bfloat16)
    if state is not None:
        lm.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    return lm.cpu().eval()


def variant_lm(base: Any, dtype: torch.dtype, footprint: Footprint, device: torch.device) -> Any:
    """A copy of `base` in `dtype` on `device`, held as `footprint` says (the engine's apply_footprint)."""
    from procs.model.compact import apply_footprint

    return apply_footprint(copy.deepcopy(base).to(device=device, dtype=dtype), footprint)  # copy on the host


def input_codes(mimi: Any, steps: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """[1, 8, steps] codes of the input audio, and what the audio was."""
    from procs.audio.resample import Resampler16to24

    try:
        from tests.support.speech import conversation_16k, repeat_to

        pcm16, kind = repeat_to(conversation_16k(), steps * BLOCK_MS / 1000), "Telugu speech (espeak-ng)"
    except (OSError, RuntimeError, FileNotFoundError):
        rng = np.random.default_rng(0)
        pcm16, kind = (0.1 * rng.standard_normal(steps * 1280)).astype(np.float32), "noise (no espeak-ng)"
    pcm24 = np.concatenate([Resampler16to24().process(chunk) for chunk in np.split(
        np.asarray(pcm16)[: steps * 1280], steps * 4)]).astype(np.float32)
    codes = []
    with torch.no_grad(), mimi.streaming(1):
        for t in range(steps):
            frame = torch.from_numpy(pcm24[t * FRAME_24K:(t + 1) * FRAME_24K]).to(device)[None, None]
            codes.append(mimi.encode(frame))
    return torch.cat(codes, dim=-1), kind


@dataclass
class Teacher:
    text_inputs: list[torch.Tensor]  # per step: [1, 17, 1], what LMGen fed forward_text
    depformer_inputs: list[list[torch.Tensor]]  # per step, per codebook: [1, 1, 1]


def record_teacher(lm: Any, codes: torch.Tensor) -> Teacher:
    """Runs `lm` greedily through moshi's LMGen on `codes`, recording its transformer's and depformer's
    inputs (instance attributes stand in for the two methods while it runs)."""
    from moshi.models import LMGen
    from moshi.utils.compile import no_cuda_graph

    teacher = Teacher([], [])
    forward_text, forward_depformer = lm.forward_text, lm.forward_depformer

    def recording_text(sequence: torch.Tensor, *args: Any) -> Any:
        teacher.text_inputs.append(sequence.clone())
        teacher.depformer_inputs.append([])
        return forward_text(sequence, *args)

    def recording_depformer(index: int, sequence: torch.Tensor, transformer_out: torch.Tensor) -> Any:
        teacher.depformer_inputs[-1].append(sequence.clone())
        return forward_depformer(index, sequence, transformer_out)

    lm.forward_text, lm.forward_depformer = recording_text, recording_depformer
    try:
        lm_gen = LMGen(lm, use_sampling=False)
        # no CUDA graphs: a replayed graph would not call the recorders
        with torch.no_grad(), no_cuda_graph(), lm_gen.streaming(1):
            for t in range(codes.shape[-1]):
                lm_gen.step(codes[:, :, t:t + 1])
    finally:
        del lm.forward_text, lm.forward_depformer
    return teacher


def teacher_forced_logits(lm: Any, teacher: Teacher) -> tuple[np.ndarray, np.ndarray]:
    """(text logits [T, card_text], audio logits [T, dep_q, card]) of `lm` on the teacher's inputs."""
    text, audio = [], []
    device = next(lm.parameters()).device
    with torch.no_grad(), lm.streaming(1):
        for sequence, depformer_inputs in zip(teacher.text_inputs, teacher.depformer_inputs, strict=True):
            transformer_out, text_logits = lm.forward_text(sequence.to(device))
            text.append(text_logits.float().reshape(-1).cpu().numpy())
            step_audio = []
            with lm.depformer.streaming(1):
                for index, previous in enumerate(depformer_inputs):
                    logits = lm.forward_depformer(index, previous.to(device), transformer_out)
                    step_audio.append(logits.float().reshape(-1).cpu().numpy())
            audio.append(np.stack(step_audio))
    return np.stack(text), np.stack(audio)


def compare(name: str, against: str, got: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray],
            seconds: float) -> VariantQuality:
    def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        axes = tuple(range(1, a.ndim))
        return np.sqrt(((a - b) ** 2).sum(axis=axes)) / np.sqrt((b**2).sum(axis=axes))

    text_err, audio_err = rel(got[0], ref[0]), rel(got[1], ref[1])
    agreement = float((got[0].argmax(axis=1) == ref[0].argmax(axis=1)).mean())
    differs = np.flatnonzero((text_err > 0) | (audio_err > 0))
    return VariantQuality(name, against, len(text_err), float(text_err.mean()),
                          float(np.percentile(text_err, 95)), float(audio_err.mean()),
                          float(np.percentile(audio_err, 95)), agreement,
                          int(differs[0]) if len(differs) else None, seconds)


def hold_thresholds(rows: list[VariantQuality]) -> None:
    floor = rows[0]
    for row in rows[1:]:
        limit = THRESHOLDS.get(row.variant)
        if limit is not None:
            row.within_threshold = (row.text_rel_err_mean <= limit * floor.text_rel_err_mean
                                    and row.audio_rel_err_mean <= limit * floor.audio_rel_err_mean)


def table(rows: list[VariantQuality], model: str, audio_kind: str, device: str) -> str:
    lines = [f"Teacher-forced quality, {model} model on {device}, input: {audio_kind}, "
             f"{rows[0].steps} steps.",
             "", "| variant | against | text logits rel. err. mean / p95 | audio logits rel. err. mean / p95 "
             "| greedy text agreement | first step that differs | within threshold |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        verdict = {None: "-", True: f"yes (<= {THRESHOLDS.get(r.variant)}x floor)", False: "NO"}[
            r.within_threshold]
        lines.append(f"| {r.variant} | {r.against} | {r.text_rel_err_mean:.4f} / {r.text_rel_err_p95:.4f} | "
                     f"{r.audio_rel_err_mean:.4f} / {r.audio_rel_err_p95:.4f} | {r.text_agreement:.1%} | "
                     f"{r.first_difference if r.first_difference is not None else 'none'} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--context", type=int, default=100, help="the reduced context variant (steps)")
    parser.add_argument("--variants", default="int8,fp8,ctx{context},int8+fp8+ctx{context}",
                        help="besides fp32 and bf16: int8, fp8, ctxN, int8+fp8+ctxN")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    prepare_torch(args.device, compile=False)  # the same arithmetic, without minutes of compiling

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = parse_variants(args.variants.format(context=args.context), args.context)
    lm_kwargs, state, mimi = configs(args.model, device)
    base = base_lm(lm_kwargs, state, device)
    codes, audio_kind = input_codes(mimi, args.steps, device)
    print(f"input: {audio_kind}, {args.steps} steps", file=sys.stderr, flush=True)

    logits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    teacher: Teacher | None = None
    for name, (dtype, footprint) in variants.items():
        started = time.perf_counter()
        lm = variant_lm(base, dtype, footprint, device)
        if teacher is None:  # fp32 comes first: its greedy run is the teacher
            teacher = record_teacher(lm, codes)
        logits[name] = teacher_forced_logits(lm, teacher)
        seconds[name] = time.perf_counter() - started
        print(f"{name}: {seconds[name]:.0f} s", file=sys.stderr, flush=True)
        del lm
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    rows = [compare("bf16", "fp32", logits["bf16"], logits["fp32"], seconds["bf16"])]
    rows += [compare(name, "bf16", logits[name], logits["bf16"], seconds[name])
             for name in variants if name not in ("fp32", "bf16")]
    hold_thresholds(rows)
    print(table(rows, args.model, audio_kind, args.device))
    if args.json:
        figures = {"model": args.model, "device": args.device, "input": audio_kind, "thresholds": THRESHOLDS,
                   "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(r.within_threshold is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
