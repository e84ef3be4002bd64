"""`voice-agent plan`: how many sessions of a checkpoint each card holds, for each way of holding the model.

The checkpoint is named as `serve` names one (the demo, `--checkpoint DIR`, a fine-tune directory,
`--hf-repo REPO`, moshi.server's per-file flags, `--random-model`); only its config is read (from a Hub repo:
config.json alone, the weights are not fetched), and the model is built on the meta device: shapes, no
weights. Each footprint (procs/model/footprint.py) is applied to a copy with the engine's own
`apply_footprint`, and priced with the engine's own `session_bytes`, `weight_bytes` and `CardMemory`
(procs/model/capacity.py): the number a row shows is the number `serve --gpu-memory-gb X` clamps to at
start-up (tests/test_plan.py checks both). On a real card the engine reads CUDA's free memory instead, which
also sees the CUDA context, so it may admit a session fewer than the row.

A card's memory is counted as the GB (10^9 bytes) it is sold with; `--gpu-memory-gb X` plans one card of X.
The figures are computed from memory; step time is not measured here (bench/gpu_check measures it).

Imports moshi: call `procs.model.torch_setup.prepare_torch` first (`main` does).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from procs.config import DEFAULTS
from procs.model.footprint import MIN_CONTEXT, MOSHI_CONTEXT, Footprint
from procs.model.source import ModelSource
from protocol.constants import BLOCK_MS

# (name, memory in GB as sold)
GPUS: tuple[tuple[str, float], ...] = (
    ("L4", 24), ("A10G", 24), ("L40S", 48), ("A40", 48), ("A100 40GB", 40), ("A100 80GB", 80),
    ("H100 80GB", 80), ("H200", 141),
)
NOTE = "computed from memory, step time not measured"
REDUCED_CONTEXT = MOSHI_CONTEXT // 2  # the reduced context a plan prices unless told (`--context`)
_UNFETCHED = "(not read by the planner)"  # stands for weight files: CheckpointInfo would fetch them


@dataclass(frozen=True)
class PlanRow:
    gpu: str
    gpu_memory_gb: float
    weights: str  # "bf16" (the model's dtype) or "int8"
    kv: str  # "bf16" (the model's dtype) or "fp8"
    context: int
    sessions: int
    weights_gb: float
    session_mb: float
    note: str = NOTE


def _config_only(source: ModelSource) -> ModelSource:
    """`source` with placeholder weight files where moshi would fetch them from the Hub."""
    from procs.model.checkpoints import is_finetune_dir

    fetches = source.hf_repo is not None or (
        source.checkpoint is not None and is_finetune_dir(Path(source.checkpoint).expanduser()))
    if not fetches:
        return source
    return replace(source, moshi_weight=source.moshi_weight or _UNFETCHED,
                   mimi_weight=source.mimi_weight or _UNFETCHED, tokenizer=source.tokenizer or _UNFETCHED,
                   lora_weight=None)


def meta_models(source: ModelSource, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(Mimi, LM, description) of the checkpoint `source` names, on the meta device, LoRA fused (its shapes
    are the base's)."""
    from moshi.models import loaders

    from procs.model.checkpoints import resolve_checkpoint
    from procs.model.demo import mimi_codebooks
    from procs.model.moshi_engine import random_model_configs

    if source.random_model is not None:
        lm_config, mimi_config, _ = random_model_configs(source.random_model)
        described = f"random {source.random_model}"
    else:
        info, described = resolve_checkpoint(_config_only(source))
        lm_config = dict(info.lm_config) if info.lm_config is not None else dict(loaders._lm_kwargs)
        mimi_config = info.mimi_config
    for key in ("lora", "lora_rank", "lora_scaling"):
        lm_config.pop(key, None)
    mimi = loaders.get_mimi(None, mimi_config, num_codebooks=mimi_codebooks(lm_config), device="meta")
    lm = loaders.get_moshi_lm(None, lm_kwargs=lm_config, device="meta", dtype=dtype)
    return mimi, lm, described


def footprints(reduced_context: int) -> list[Footprint]:
    """The rows of a plan: bf16 / int8 weights x full context, `reduced_context`, fp8 KV, both."""
    kv_options = [Footprint(), Footprint(context=reduced_context), Footprint(kv="fp8"),
                  Footprint(context=reduced_context, kv="fp8")]
    return [replace(kv, weights=weights) for weights in ("model", "int8") for kv in kv_options]


def plan(source: ModelSource, *, dtype: torch.dtype = torch.bfloat16,
         reduced_context: int = REDUCED_CONTEXT, gpus: tuple[tuple[str, float], ...] = GPUS,
         gpu_memory_fraction: float = DEFAULTS.gpu_memory_fraction) -> tuple[list[PlanRow], str]:
    """Every card x footprint (see the module docstring); and what the checkpoint was. The card's share is
    serve's unless told (`gpu_memory_fraction`)."""
    mimi, base_lm, described = meta_models(source, dtype)
    return price(mimi, base_lm, reduced_context=reduced_context, gpus=gpus,
                 gpu_memory_fraction=gpu_memory_fraction), described


def price(mimi: torch.nn.Module, base_lm: torch.nn.Module, *, reduced_context: int,
          gpus: tuple[tuple[str, float], ...], gpu_memory_fraction: float) -> list[PlanRow]:
    """The rows for a built (meta-device) Mimi and LM as stored; `base_lm` is left as it is."""
    from procs.model.capacity import CardMemory, streaming_bytes_per_session, weight_bytes
    from procs.model.compact import apply_footprint

    dtype = base_lm.dtype
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    rows = []
    for footprint in footprints(min(reduced_context, base_lm.context)):
        lm = apply_footprint(copy.deepcopy(base_lm), footprint)
        per_session, weights = streaming_bytes_per_session(mimi, lm), weight_bytes(mimi, lm)
        for name, gb in gpus:
            card = CardMemory.told(int(gb * 1e9), weights)
            rows.append(PlanRow(
                gpu=name, gpu_memory_gb=gb, weights="int8" if footprint.weights == "int8" else dtype_name,
                kv="fp8" if footprint.kv == "fp8" else dtype_name, context=lm.context,
                sessions=card.sessions(per_session, gpu_memory_fraction), weights_gb=weights / 1e9,
                session_mb=per_session / 1e6))
    return rows


def table(rows: list[PlanRow], described: str, gpu_memory_fraction: float) -> str:
    combos = list(dict.fromkeys((r.weights, r.kv, r.context) for r in rows))
    gpus = list(dict.fromkeys((r.gpu, r.gpu_memory_gb) for r in rows))
    cell = {(r.gpu, r.weights, r.kv, r.context): r for r in rows}
    lines = [f"Sessions per card for {described} ({NOTE}; {1 - gpu_memory_fraction:.0%} of each card kept "
             "for working memory, --gpu-memory-fraction):", ""]
    header = ["weights", "KV", "context", "weights GB", "MB/session",
              *(g if "GB" in g else f"{g} {gb:g}GB" for g, gb in gpus)]
    body = []
    for weights, kv, context in combos:
        first = cell[(gpus[0][0], weights, kv, context)]
        sessions = [str(cell[(g, weights, kv, context)].sessions) for g, _ in gpus]
        minutes = context * BLOCK_MS / 60_000
        body.append([weights, kv, f"{context} ({minutes:.1f} min)", f"{first.weights_gb:.2f}",
                     f"{first.session_mb:.0f}", *sessions])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    for row in [header, *body]:
        lines.append("  ".join(text.rjust(width) if i >= 3 else text.ljust(width)
                               for i, (text, width) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "voice-agent plan") -> int:
    from procs.config import (
        DTYPES,
        MODEL_SOURCE_OPTIONS,
        OPTIONS,
        add_options,
        check_config,
        config_from_values,
        read_options,
    )
    from procs.model.torch_setup import prepare_torch

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].split(": ", 1)[1])
    # serve's own options, with their checks and VOICE_* twins: what names the model, and the card's share
    options = (*MODEL_SOURCE_OPTIONS,
               *(o for o in OPTIONS if o.dest in ("gpu_memory_fraction", "gpu_memory_gb")))
    add_options(parser, options)
    parser.add_argument("--dtype", default="bf16", choices=DTYPES,
                        help="the model's dtype on the card (default: %(default)s)")
    parser.add_argument("--context", type=int, default=REDUCED_CONTEXT, metavar="N",
                        help=f"the reduced context to price, in {BLOCK_MS} ms steps (default %(default)s: "
                        f"{REDUCED_CONTEXT * BLOCK_MS / 60_000:g} minutes)")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    values = read_options(parser, options, argv)
    args = argparse.Namespace(**values)
    # serve's options as serve reads them (the rest of the ServerConfig at its defaults), checked as there
    cfg = config_from_values({k: v for k, v in values.items() if k in {o.dest for o in options}})
    if args.context < MIN_CONTEXT:
        parser.error(f"--context must be at least {MIN_CONTEXT} steps")
    problem = check_config(cfg)
    if problem:
        parser.error(problem)
    source = cfg.model
    gpus = GPUS if cfg.gpu_memory_gb is None else ((f"{cfg.gpu_memory_gb:g} GB card", cfg.gpu_memory_gb),)
    prepare_torch("cpu")  # before moshi is imported: nothing runs, shapes only
    from procs.model.checkpoints import parse_dtype

    try:
        rows, described = plan(source, dtype=parse_dtype(args.dtype, torch.device("cuda")),
                               reduced_context=args.context, gpus=gpus,
                               gpu_memory_fraction=cfg.gpu_memory_fraction)
    except (OSError, ValueError, KeyError) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    else:
        print(table(rows, described, cfg.gpu_memory_fraction))
    return 0
