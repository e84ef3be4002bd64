"""GPU capacity benchmark: how many Moshi sessions one GPU can step within the 80 ms real-time budget.

Builds the real 7B Moshi LM (moshi's default `_lm_kwargs`, bf16) and the full-size Mimi codec (fp32, as
moshi's server runs it) with random weights, puts both in streaming mode at batch size B (one batch slot per
session) and times full steps: Mimi encode of 80 ms of audio + one `LMGen.step` + Mimi decode, with
`torch.cuda.synchronize()` around each step. For each B it reports step p50/p99, peak and in-use GPU memory,
and the memory-bandwidth floor of a step, (weights + KV cache x B) / bandwidth, next to the measured p50.
It ends with the most sessions whose p99 stays under budget x margin (default 80 ms x 0.8 = 64 ms).

Running it on a GPU pod (needs torch with CUDA, numpy, einops, safetensors, sentencepiece, moshi and this
project importable for its capacity formula and demo configs; huggingface_hub is replaced by a stub when
missing, because nothing here downloads):

    pip install --no-deps ./moshi-0.2.13-py3-none-any.whl    # the wheel the lead carries over
    pip install einops safetensors sentencepiece              # only if the image lacks them
    pip install --no-deps -e .                                # this project (or run with PYTHONPATH=.)
    python -m bench.gpu_capacity --markdown bench/gpu_capacity_results.md
    python -m bench.gpu_capacity --batch-sizes 1,4,16 --steps 100 --torch-compile   # other variants

Building the 7B model takes ~15.4 GB of GPU memory for the weights; each session adds ~1.6 GB of KV cache.
On a machine without CUDA, `--tiny --device cpu` runs the same code path on a tiny model in seconds.

By default torch.compile is off (`--torch-compile` turns it on; see procs/model/torch_setup.py) and
moshi's own CUDA graphs stay on, as moshi does on CUDA (`--no-cuda-graph` turns them off).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import sys
import time
import types
import typing as tp
from pathlib import Path

import numpy as np
import torch

from procs.model.capacity import held_state_bytes, session_bytes, weight_bytes
from procs.model.footprint import KV_FORMATS, WEIGHT_FORMATS, Footprint
from procs.model.torch_setup import prepare_torch
from protocol import BLOCK_MS, OUT_SAMPLES_PER_BLOCK

REAL_TIME_BUDGET_MS = float(BLOCK_MS)  # one Mimi frame of audio; a step must finish before the next frame.
DEFAULT_MARGIN = 0.8
MIMI_FRAME_SAMPLES = OUT_SAMPLES_PER_BLOCK  # 80 ms at 24 kHz
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
EXIT_USAGE = 2
MARKDOWN_BLOCK_BEGIN = "<!-- gpu_capacity:begin {key} -->"
MARKDOWN_BLOCK_END = "<!-- gpu_capacity:end {key} -->"


@dataclasses.dataclass(frozen=True)
class VendorBandwidth:
    pattern: str  # regex searched in torch.cuda.get_device_name(); first match wins, so order matters
    label: str
    bytes_per_s: float


# Vendor-spec peak DRAM bandwidth (datasheet numbers, not measured here). Order: specific before generic.
VENDOR_BANDWIDTHS: tuple[VendorBandwidth, ...] = (
    VendorBandwidth(r"\bH200\b", "H200 (141 GB HBM3e)", 4.8e12),
    VendorBandwidth(r"\bH100\b.*\bNVL\b", "H100 NVL (94 GB HBM3)", 3.9e12),
    VendorBandwidth(r"\bH100\b.*\bPCIe\b", "H100 PCIe (80 GB HBM2e)", 2.0e12),
    VendorBandwidth(r"\bH100\b", "H100 SXM (80 GB HBM3)", 3.35e12),
    VendorBandwidth(r"\bA100\b.*80GB.*PCIe|\bA100\b.*PCIe.*80GB", "A100 80GB PCIe (HBM2e)", 1.935e12),
    VendorBandwidth(r"\bA100\b.*80GB", "A100 80GB SXM (HBM2e)", 2.039e12),
    VendorBandwidth(r"\bA100\b", "A100 40GB (HBM2)", 1.555e12),
    VendorBandwidth(r"\bL40S?\b", "L40 / L40S (48 GB GDDR6)", 864e9),
    VendorBandwidth(r"\bL4\b", "L4 (24 GB GDDR6)", 300e9),
    VendorBandwidth(r"\bA40\b", "A40 (48 GB GDDR6)", 696e9),
    VendorBandwidth(r"\bA10G?\b", "A10 / A10G (24 GB GDDR6)", 600e9),
    VendorBandwidth(r"\bRTX 4090\b", "RTX 4090 (24 GB GDDR6X)", 1008e9),
    VendorBandwidth(r"\bRTX 6000 Ada\b", "RTX 6000 Ada (48 GB GDDR6)", 960e9),
)


def vendor_bandwidth(device_name: str) -> VendorBandwidth | None:
    for entry in VENDOR_BANDWIDTHS:
        if re.search(entry.pattern, device_name, flags=re.IGNORECASE):
            return entry
    return None


# ---------------------------------------------------------------------------------------------- configs


def full_size_configs() -> tuple[dict[str, tp.Any], dict[str, tp.Any]]:
    """moshi's own 7B LM config and full-size Mimi config (copies, so nothing of moshi's is mutated)."""
    from moshi.models import loaders

    mimi_config = {key: dict(v) if isinstance(v, dict) else v for key, v in loaders._mimi_config.items()}
    return dict(loaders._lm_kwargs), mimi_config


def tiny_configs() -> tuple[dict[str, tp.Any], dict[str, tp.Any]]:
    """The demo checkpoint's shrunk configs (procs/model/demo.py): the same structure as the 7B (delays,
    depformer, codebooks, Mimi frame of 1920 samples), small widths, so the whole measuring path runs on a
    CPU in seconds."""
    from procs.model.demo import demo_lm_config, demo_mimi_config

    return demo_lm_config(text_card=100), demo_mimi_config()


# ---------------------------------------------------------------------------------------------- footprint


@dataclasses.dataclass(frozen=True)
class ModelBytes:
    lm_weight_bytes: int
    mimi_weight_bytes: int
    kv_bytes_per_session_formula: int  # procs/model/capacity.py: LM layers x 2 (K, V) x context x ...
    kv_bytes_per_session_measured: int | None = None  # RingKVCache tensors of the LM at batch B, / B
    state_bytes_per_session_measured: int | None = None  # every streaming tensor (LM + Mimi), / B

    @property
    def weight_bytes(self) -> int:
        return self.lm_weight_bytes + self.mimi_weight_bytes

    def bytes_read_per_step(self, batch_size: int) -> int:
        """A step reads every weight once (all are used: the depformer has one weight set per codebook)
        and the whole KV ring of every session (moshi attends over the full capacity, masking the unused
        positions). Activations are negligible at these batch sizes."""
        return self.weight_bytes + self.kv_bytes_per_session_formula * batch_size


# ---------------------------------------------------------------------------------------------- bandwidth


def measure_copy_bandwidth(device: torch.device, buffer_bytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written (as CUDA's
    bandwidthTest does), since a model step is reads and the floor compares against read+write peak."""
    source = torch.empty(buffer_bytes, dtype=torch.uint8, device=device)
    source.fill_(1)
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            target.copy_(source)
        end.record()
        torch.cuda.synchronize(device)
        elapsed_s = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            target.copy_(source)
        elapsed_s = time.perf_counter() - begin
    del source, target
    return 2 * buffer_bytes * repeats / elapsed_s


# ---------------------------------------------------------------------------------------------- stepping


@dataclasses.dataclass
class BatchResult:
    batch_size: int
    status: str  # "ok" or "OOM"
    step_ms: list[float] = dataclasses.field(default_factory=list)
    encode_ms: list[float] = dataclasses.field(default_factory=list)
    lm_ms: list[float] = dataclasses.field(default_factory=list)
    decode_ms: list[float] = dataclasses.field(default_factory=list)
    warmup_steps_run: int = 0
    peak_allocated_bytes: int | None = None
    in_use_allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    device_used_bytes: int | None = None  # total - free from the driver: context, allocator cache, others
    kv_bytes_measured: int | None = None
    state_bytes_measured: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def percentile(self, samples: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(samples), q))


class StepClock:
    """Times a step and its three parts. The step total is wall time with a device sync before and after
    (what a serving loop sees); on CUDA the parts come from events, which add no syncs inside the step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def mark(self) -> tp.Any:
        if self.is_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: tp.Any, end: tp.Any) -> float:
        if self.is_cuda:
            return float(start.elapsed_time(end))
        return (end - start) * 1e3


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # CUDA graph capture and some kernels report OOM as a plain RuntimeError.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def run_batch(
    mimi: tp.Any, lm_gen: tp.Any, batch_size: int, steps: int, warmup: int, device: torch.device
) -> BatchResult:
    result = BatchResult(batch_size=batch_size, status="ok")
    clock = StepClock(device)
    if clock.is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out_of_memory = False
    try:
        with contextlib.ExitStack() as streaming, torch.no_grad():
            streaming.enter_context(mimi.streaming(batch_size))
            streaming.enter_context(lm_gen.streaming(batch_size))
            # Speech-like level noise; the same buffer every step keeps input creation out of the timing.
            pcm = 0.1 * torch.randn(batch_size, 1, MIMI_FRAME_SAMPLES, device=device)
            decodes = 0
            # Warm up past the acoustic delay (LMGen returns None at first) until the decoder has run twice:
            # moshi captures each CUDA graph on its second call, which must not be timed.
            while result.warmup_steps_run < warmup or decodes < 2:
                decodes += _one_step(mimi, lm_gen, pcm, clock) is not None
                result.warmup_steps_run += 1
            for _ in range(steps):
                clock.sync()
                begin = time.perf_counter()
                marks = _one_step(mimi, lm_gen, pcm, clock)
                clock.sync()
                result.step_ms.append((time.perf_counter() - begin) * 1e3)
                if marks is None:
                    raise RuntimeError("LMGen.step returned no tokens after the warm-up")
                result.encode_ms.append(clock.elapsed_ms(marks[0], marks[1]))
                result.lm_ms.append(clock.elapsed_ms(marks[1], marks[2]))
                result.decode_ms.append(clock.elapsed_ms(marks[2], marks[3]))
            lm_modules = [lm_gen, *lm_gen.lm_model.modules()]
            result.kv_bytes_measured = held_state_bytes(lm_modules)[0]
            result.state_bytes_measured = held_state_bytes([*lm_modules, *mimi.modules()])[1]
            if clock.is_cuda:
                result.peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
                result.in_use_allocated_bytes = torch.cuda.memory_allocated(device)
                result.reserved_bytes = torch.cuda.memory_reserved(device)
                free, total = torch.cuda.mem_get_info(device)
                result.device_used_bytes = total - free
    except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
        if not _is_out_of_memory(error):
            raise
        out_of_memory = True
    if out_of_memory:
        # Outside the except block, so the traceback's frames no longer pin the batch's tensors.
        result = BatchResult(batch_size=batch_size, status="OOM", warmup_steps_run=result.warmup_steps_run)
    release_memory(device)
    return result


def _one_step(mimi: tp.Any, lm_gen: tp.Any, pcm: torch.Tensor, clock: StepClock) -> tuple | None:
    """One real-time step; returns the four time marks, or None while LMGen still fills its delay."""
    start = clock.mark()
    codes = mimi.encode(pcm)
    encoded = clock.mark()
    tokens = lm_gen.step(codes)
    stepped = clock.mark()
    if tokens is None:
        return None
    mimi.decode(tokens[:, 1:])
    decoded = clock.mark()
    return start, encoded, stepped, decoded


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- report


@dataclasses.dataclass
class RunInfo:
    device_name: str
    device_total_bytes: int | None
    torch_version: str
    moshi_version: str
    cuda_version: str
    date_utc: str
    model: str
    model_key: str  # short name of the model size, part of the markdown block's key
    torch_compile: bool
    cuda_graphs: bool
    steps: int
    warmup: int
    budget_ms: float
    margin: float
    vendor: VendorBandwidth | None
    measured_bandwidth: float
    command: str

    @property
    def threshold_ms(self) -> float:
        return self.budget_ms * self.margin


@dataclasses.dataclass(frozen=True)
class Capacity:
    max_sessions_measured: int  # largest tested B whose p99 <= threshold (0: none)
    time_estimate: int | None  # from a line fitted to p99(B), extrapolated to the threshold
    memory_estimate: int | None  # from a line fitted to peak memory(B), extrapolated to device memory


def estimate_capacity(results: list[BatchResult], info: RunInfo) -> Capacity:
    ok = [r for r in results if r.ok]
    passing = [r.batch_size for r in ok if r.percentile(r.step_ms, 99) <= info.threshold_ms]
    time_estimate = memory_estimate = None
    if len({r.batch_size for r in ok}) >= 2:
        sizes = np.array([r.batch_size for r in ok], dtype=float)
        slope, intercept = np.polyfit(sizes, [r.percentile(r.step_ms, 99) for r in ok], 1)
        if slope > 0:
            time_estimate = max(0, int((info.threshold_ms - intercept) // slope))
        peaks = [r.peak_allocated_bytes for r in ok]
        if info.device_total_bytes and all(p is not None for p in peaks):
            slope, intercept = np.polyfit(sizes, np.array(peaks, dtype=float), 1)
            if slope > 0:
                memory_estimate = max(0, int((info.device_total_bytes - intercept) // slope))
    return Capacity(max(passing, default=0), time_estimate, memory_estimate)


def _gb_cell(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def _bytes_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.3f} GB" if value >= 1e8 else f"{value / 1e6:.3f} MB"


def table_rows(results: list[BatchResult], footprint: ModelBytes, info: RunInfo) -> list[list[str]]:
    rows = []
    for r in results:
        read_bytes = footprint.bytes_read_per_step(r.batch_size)
        floor_spec_ms = read_bytes / info.vendor.bytes_per_s * 1e3 if info.vendor else None
        floor_measured_ms = read_bytes / info.measured_bandwidth * 1e3
        if not r.ok:
            rows.append(
                [
                    str(r.batch_size),
                    r.status,
                    *["-"] * 6,
                    "-" if floor_spec_ms is None else f"{floor_spec_ms:.2f}",
                    f"{floor_measured_ms:.2f}",
                    "-",
                    *["-"] * 3,
                ]
            )
            continue
        p50, p99 = r.percentile(r.step_ms, 50), r.percentile(r.step_ms, 99)
        verdict = "yes" if p99 <= info.threshold_ms else "no"
        rows.append(
            [
                str(r.batch_size),
                verdict,
                f"{p50:.2f}",
                f"{p99:.2f}",
                f"{max(r.step_ms):.2f}",
                f"{r.percentile(r.encode_ms, 50):.2f}",
                f"{r.percentile(r.lm_ms, 50):.2f}",
                f"{r.percentile(r.decode_ms, 50):.2f}",
                "-" if floor_spec_ms is None else f"{floor_spec_ms:.2f}",
                f"{floor_measured_ms:.2f}",
                f"{p50 / floor_measured_ms:.1f}x",
                _gb_cell(r.peak_allocated_bytes),
                _gb_cell(r.in_use_allocated_bytes),
                _gb_cell(r.device_used_bytes),
            ]
        )
    return rows


TABLE_HEADER = [
    "B",
    "within budget",
    "step p50 ms",
    "step p99 ms",
    "step max ms",
    "enc p50",
    "lm p50",
    "dec p50",
    "floor spec ms",
    "floor meas ms",
    "p50/floor(meas)",
    "peak GB",
    "in-use GB",
    "device used GB",
]


def summary_lines(footprint: ModelBytes, info: RunInfo, capacity: Capacity) -> list[str]:
    vendor = (
        f"{info.vendor.bytes_per_s / 1e9:.0f} GB/s ({info.vendor.label}, vendor spec)"
        if info.vendor
        else "unknown for this device name (floor uses the measured bandwidth only)"
    )
    measured_kv = _bytes_text(footprint.kv_bytes_per_session_measured)
    measured_state = _bytes_text(footprint.state_bytes_per_session_measured)
    total = _bytes_text(info.device_total_bytes)
    return [
        f"device: {info.device_name} (memory {total})",
        f"torch {info.torch_version}, moshi {info.moshi_version}, CUDA {info.cuda_version}, "
        f"python {platform.python_version()}, date {info.date_utc}",
        f"model: {info.model}; torch.compile {'on' if info.torch_compile else 'off'}, "
        f"CUDA graphs {'on' if info.cuda_graphs else 'off'}; {info.steps} timed steps after >= {info.warmup} "
        "warm-up steps per B",
        f"command: {info.command}",
        f"weights: LM {_bytes_text(footprint.lm_weight_bytes)} + "
        f"Mimi {_bytes_text(footprint.mimi_weight_bytes)} (fp32) = {_bytes_text(footprint.weight_bytes)}",
        f"KV cache per session: formula {_bytes_text(footprint.kv_bytes_per_session_formula)} "
        f"(procs/model/capacity.py), measured {measured_kv}; all streaming state per session "
        f"(LM + Mimi) measured {measured_state}",
        f"memory bandwidth: {vendor}; measured device copy (read + write) "
        f"{info.measured_bandwidth / 1e9:.0f} GB/s",
        "floor per step = (weights + KV per session x B) / bandwidth; step = Mimi encode + LMGen.step + "
        "Mimi decode, wall time with a device sync before and after; enc/lm/dec are the parts' p50",
        f"budget: p99 <= {info.budget_ms:.0f} ms x margin {info.margin} = {info.threshold_ms:.1f} ms",
        f"max sessions (largest tested B with p99 <= {info.threshold_ms:.1f} ms): "
        f"{capacity.max_sessions_measured}",
        "extrapolated (straight lines through the tested B; estimates, not measurements): "
        f"time-bound {_or_dash(capacity.time_estimate)}, memory-bound {_or_dash(capacity.memory_estimate)}",
    ]


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_human(rows: list[list[str]], summary: list[str]) -> str:
    widths = [max(len(TABLE_HEADER[i]), *(len(row[i]) for row in rows)) for i in range(len(TABLE_HEADER))]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) for cell, width in zip(cells, widths, strict=True))

    return "\n".join([*summary[:6], "", line(TABLE_HEADER), *(line(row) for row in rows), "", *summary[6:]])


def format_markdown(rows: list[list[str]], summary: list[str], info: RunInfo) -> str:
    table = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    bullets = [f"- {text}" for text in summary]
    return "\n".join(
        [f"## Moshi capacity on {info.device_name} ({info.model})", "", *bullets, "", *table, ""]
    )


def markdown_key(info: RunInfo) -> str:
    return re.sub(r"[^A-Za-z0-9 ._()/+-]|--", "_", f"{info.device_name} {info.model_key}")


def update_markdown_file(path: Path, block: str, key: str) -> None:
    """Writes the block into the file, replacing an earlier block for the same device and model, so one file
    can collect the results of several GPUs."""
    begin, end = MARKDOWN_BLOCK_BEGIN.format(key=key), MARKDOWN_BLOCK_END.format(key=key)
    wrapped = f"{begin}\n{block}{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# GPU capacity (bench/gpu_capacity.py)\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", flags=re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: wrapped, text, count=1)
    else:
        text = text + ("" if text.endswith("\n\n") else "\n") + wrapped
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from error
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers: {text!r}")
    return sorted(set(sizes))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batch-sizes",
        type=parse_batch_sizes,
        default=list(DEFAULT_BATCH_SIZES),
        help="comma-separated batch sizes (sessions per step), tried in increasing order; "
        "the first OOM stops the growth (default 1,2,4,8,16,32)",
    )
    parser.add_argument("--steps", type=int, default=50, help="timed steps per batch size (default 50)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps per batch size; at least until the decoder has run twice (default 10)",
    )
    parser.add_argument("--device", default="cuda", help="torch device (default cuda)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, for a CPU smoke run in seconds")
    parser.add_argument("--markdown", type=Path, help="write or update a markdown report at this path")
    parser.add_argument("--json", type=Path, help="also write each batch size's figures here (gpu_check)")
    parser.add_argument(
        "--budget-ms",
        type=float,
        default=REAL_TIME_BUDGET_MS,
        help="real-time budget of one step (default 80)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="fraction of the budget a step p99 may use (default 0.8)",
    )
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="let moshi torch.compile its kernels (off by default: NO_TORCH_COMPILE=1)",
    )
    parser.add_argument("--no-cuda-graph", action="store_true", help="turn off moshi's CUDA graphs")
    parser.add_argument("--quantize", choices=WEIGHT_FORMATS, default="model",
                        help="int8: the LM's linear weights as int8 (serve's flag)")
    parser.add_argument("--context", type=int, help="steps of attention the LM keeps (serve's flag)")
    parser.add_argument("--kv-dtype", choices=KV_FORMATS, default="model",
                        help="fp8: the LM's KV cache as float8 (serve's flag)")
    parser.add_argument(
        "--bandwidth-buffer-mib",
        type=int,
        default=None,
        help="buffer for the copy-bandwidth test (default 1024 on CUDA, 64 on CPU)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def configure_moshi_environment(args: argparse.Namespace) -> None:
    """Must run before moshi is imported: moshi reads these choices when its modules load."""
    prepare_torch(args.device, compile=args.torch_compile)
    if args.no_cuda_graph:
        os.environ["NO_CUDA_GRAPH"] = "1"


def install_huggingface_hub_stub_if_missing() -> None:
    """moshi.models.loaders imports huggingface_hub at module level, only to download checkpoints. This
    benchmark downloads nothing, so on a pod without huggingface_hub a stub stands in for it."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:

        def hf_hub_download(*_args: tp.Any, **_kwargs: tp.Any) -> str:
            raise RuntimeError("huggingface_hub is not installed; gpu_capacity.py downloads nothing")

        class EntryNotFoundError(Exception):
            pass

        stub = types.ModuleType("huggingface_hub")
        errors = types.ModuleType("huggingface_hub.errors")
        stub.hf_hub_download = hf_hub_download  # type: ignore[attr-defined]
        errors.EntryNotFoundError = EntryNotFoundError  # type: ignore[attr-defined]
        stub.errors = errors  # type: ignore[attr-defined]
        sys.modules["huggingface_hub"] = stub
        sys.modules["huggingface_hub.errors"] = errors


def build_models(
    lm_kwargs: dict[str, tp.Any], mimi_config: dict[str, tp.Any], device: torch.device, footprint: Footprint
) -> tuple[tp.Any, tp.Any]:
    """Random-weight Mimi (fp32) and LM (bf16) through moshi's own builders; torch's default init; held as
    `footprint` says, by the engine's own `apply_footprint`."""
    from moshi.models import LMGen, loaders

    from procs.model.compact import apply_footprint
    from procs.model.demo import mimi_codebooks

    mimi = loaders.get_mimi(None, mimi_config, device=device, num_codebooks=mimi_codebooks(lm_kwargs))
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(lm_kwargs), device=device, dtype=torch.bfloat16)
    return mimi, LMGen(apply_footprint(lm, footprint))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        print(f"error: --device {args.device}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device {args.device} needs CUDA, but torch {torch.__version__} sees no CUDA device "
            f"(torch.version.cuda={torch.version.cuda}). On a machine without a GPU run "
            "`--tiny --device cpu` for a smoke run.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    configure_moshi_environment(args)
    install_huggingface_hub_stub_if_missing()
    import moshi  # only now: moshi reads NO_TORCH_COMPILE when its modules load

    torch.manual_seed(0)
    is_cuda = device.type == "cuda"
    if is_cuda:
        # torch.cuda.set_device and the memory queries want an index; "cuda" alone means the current one.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif not args.tiny:
        print(
            "warning: the full-size model on the CPU needs ~16 GB of RAM and seconds a step", file=sys.stderr
        )

    buffer_mib = args.bandwidth_buffer_mib or (1024 if is_cuda else 64)
    measured_bandwidth = measure_copy_bandwidth(device, buffer_mib * 2**20, repeats=20 if is_cuda else 3)
    release_memory(device)

    lm_kwargs, mimi_config = tiny_configs() if args.tiny else full_size_configs()
    held_as = Footprint(weights=args.quantize, context=args.context, kv=args.kv_dtype)
    print(f"building the {'tiny' if args.tiny else '7B'} model on {device} ({held_as.describe()}) ...",
          file=sys.stderr, flush=True)
    try:
        mimi, lm_gen = build_models(lm_kwargs, mimi_config, device, held_as)
    except torch.cuda.OutOfMemoryError:
        print(f"error: the model's weights alone do not fit in the memory of {args.device}", file=sys.stderr)
        return 1
    lm = lm_gen.lm_model
    device_name = torch.cuda.get_device_name(device) if is_cuda else f"CPU ({platform.processor() or 'cpu'})"
    info = RunInfo(
        device_name=device_name,
        device_total_bytes=torch.cuda.get_device_properties(device).total_memory if is_cuda else None,
        torch_version=torch.__version__,
        moshi_version=moshi.__version__,
        cuda_version=str(torch.version.cuda),
        # timezone.utc, not datetime.UTC: GPU images often still ship Python 3.10.
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),  # noqa: UP017
        model=(
            f"tiny (LM dim {lm_kwargs['dim']}, {lm_kwargs['num_layers']} layers)"
            if args.tiny
            else "Moshi 7B (random bf16 weights) + full-size Mimi"
        ) + f"; {held_as.describe(model_context=lm.context)}",
        model_key=("tiny" if args.tiny else "7B") + ("" if held_as.is_default else
                                                     f" {args.quantize} ctx {lm.context} kv {args.kv_dtype}"),
        torch_compile=args.torch_compile,
        cuda_graphs=is_cuda and not args.no_cuda_graph,
        steps=args.steps,
        warmup=args.warmup,
        budget_ms=args.budget_ms,
        margin=args.margin,
        vendor=vendor_bandwidth(device_name) if is_cuda else None,
        measured_bandwidth=measured_bandwidth,
        command=" ".join(["python", "-m", "bench.gpu_capacity", *(sys.argv[1:] if argv is None else argv)]),
    )

    results: list[BatchResult] = []
    for batch_size in args.batch_sizes:
        result = run_batch(mimi, lm_gen, batch_size, args.steps, args.warmup, device)
        results.append(result)
        print(
            f"B={batch_size}: {result.status}"
            + (f", step p50 {result.percentile(result.step_ms, 50):.2f} ms" if result.ok else ""),
            file=sys.stderr,
            flush=True,
        )
        if not result.ok:
            break

    largest_ok = max((r for r in results if r.ok), key=lambda r: r.batch_size, default=None)
    footprint = ModelBytes(
        lm_weight_bytes=weight_bytes(lm),
        mimi_weight_bytes=weight_bytes(mimi),
        kv_bytes_per_session_formula=session_bytes(mimi, lm).lm_kv,
        kv_bytes_per_session_measured=(
            None
            if largest_ok is None or largest_ok.kv_bytes_measured is None
            else largest_ok.kv_bytes_measured // largest_ok.batch_size
        ),
        state_bytes_per_session_measured=(
            None
            if largest_ok is None or largest_ok.state_bytes_measured is None
            else largest_ok.state_bytes_measured // largest_ok.batch_size
        ),
    )
    rows = table_rows(results, footprint, info)
    summary = summary_lines(footprint, info, estimate_capacity(results, info))
    print(format_human(rows, summary))
    if args.markdown is not None:
        update_markdown_file(args.markdown, format_markdown(rows, summary, info), markdown_key(info))
        print(f"markdown report written to {args.markdown}")
    if args.json is not None:
        floor_bytes = footprint.bytes_read_per_step
        bandwidth = info.vendor.bytes_per_s if info.vendor is not None else measured_bandwidth
        args.json.write_text(json.dumps({
            "device": device_name,
            "torch": torch.__version__,
            "cuda": str(torch.version.cuda),
            "moshi": moshi.__version__,
            "footprint": {"weights": args.quantize, "context": lm.context, "kv": args.kv_dtype},
            "weights_bytes": footprint.weight_bytes,
            "session_bytes": session_bytes(mimi, lm).total,
            "batches": [{
                "batch": r.batch_size,
                "status": r.status,
                "p50_ms": r.percentile(r.step_ms, 50) if r.ok else None,
                "p99_ms": r.percentile(r.step_ms, 99) if r.ok else None,
                "peak_gib": None if r.peak_allocated_bytes is None else r.peak_allocated_bytes / 2**30,
                "floor_ms": floor_bytes(r.batch_size) / bandwidth * 1e3 if bandwidth else None,
            } for r in results],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
