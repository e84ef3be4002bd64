"""The GPU check: one command that proves the serving core on a CUDA machine, and prints one table.

    bench/gpu_check                      # on a CUDA pod (the 7B shape); not yet timed on one
    bench/gpu_check --tiny               # anywhere (the demo model on the CPU): the same code path, ~1 minute
    bench/gpu_check --markdown bench/RESULTS.md      # also write the table into that file (a marked block)

(a) Step time of the real 7B shape (moshi's default LM config and full-size Mimi, random bf16 weights) at
    batch 1, 8, 16, 32, 64 as memory allows: bench/gpu_capacity.py, in its own process.
(b) The real server on that shape (`supervisor --random-model moshi-7b`: random weights built in memory, no
    15 GB file) on its one step clock, driven by N clients at real-time pace from this machine (several
    client processes, so the clients are not the bottleneck) for --seconds each, for a few N around what (a)
    says fits: the most sessions held, with bench/capacity_cpu.py's rule (every client got >= 95% of
    real-time output, its latency grew <= 20 ms, nothing dropped).
(c) A masked, batched step (CUDA graphs on CUDA, captured by the warm-up) gives each slot the same greedy
    tokens as the same session run alone, with sessions that start at different steps: as stored, and with
    int8 weights, an fp8 KV cache and a reduced context (procs/model/footprint.py).
(a) also runs each way of holding the model that changes a step (`--quantize int8`, `--context 1500`,
    `--kv-dtype fp8`), and (d) measures what int8 weights and an fp8 cache cost in quality: teacher-forced
    logits against bf16, and greedy text-token agreement, over 250 steps (bench/footprint_quality.py).

Needs the project importable (`pip install --no-deps -e .`, as the set-up does) and, for (a) and (b), CUDA
unless --tiny.

Exit status 1 when (c) finds a slot that differs from its session alone, or, on a card, when N sessions held
in real time did not step on one clock (`one_clock`: about 12.5 steps/s, most sessions in each step). How many
sessions are held is a measured figure, not a pass/fail: on the CPU (--tiny, on a shared machine) neither it
nor the step figures are judged; tests/test_gpu_check.py checks that each part ran and its figures are whole
and consistent.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import logging
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.capacity_cpu import (
    LATENCY_GROWTH_MS,
    REAL_TIME_SHARE,
    Clients,
    HistogramDelta,
    latency_growth,
    realtime_share,
    scrape_metrics,
    speech_of_length,
    stream_sessions,
)
from procs.model.footprint import Footprint
from procs.model.torch_setup import prepare_torch
from protocol import BLOCK_MS, Latency
from tests.support.launcher import ServerProcess

ROOT = Path(__file__).resolve().parent.parent  # bench/ runs as a package from here: python -m bench.x
BLOCK_BEGIN = "<!-- gpu_check:begin -->"
BLOCK_END = "<!-- gpu_check:end -->"
BUDGET_MS = BLOCK_MS
MARGIN = 0.8
CLIENTS_PER_PROCESS = 16
# The clients' first frame is due this long after their processes are spawned (each imports numpy, websockets
# and protocol first); a process that comes up later starts its clients then (the row says whether every
# client streamed through the window the step figures come from).
CLIENT_START_S = 3.0
SPAWN = multiprocessing.get_context("spawn")
STEPS_PER_S = 1000 / BLOCK_MS  # the step clock: one step a tick
STEP_RATE_SLACK = 1.25  # (b) held on a card: steps/s within this factor of one a tick
BATCHED_SHARE = 0.75  # (b) held on a card: a step takes at least this share of the sessions on average


@dataclass(frozen=True)
class Variant:
    """One way of holding the model: a label and serve's flags for it (gpu_capacity.py takes the same)."""

    label: str
    flags: tuple[str, ...]

    @property
    def footprint(self) -> Footprint:
        values = dict(zip(self.flags[::2], self.flags[1::2], strict=True))
        context = values.get("--context")
        return Footprint(weights=values.get("--quantize", "model"),  # type: ignore[arg-type]
                         context=None if context is None else int(context),
                         kv=values.get("--kv-dtype", "model"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Plan:
    """What one run checks: the full 7B shape on CUDA, or --tiny, the demo shape on the CPU."""

    device: str
    capacity_args: tuple[str, ...]
    variants: tuple[Variant, ...]  # the first: the model as stored
    server_args: tuple[str, ...]
    equivalence_model: str
    equivalence_slots: int
    equivalence_steps: int
    quality_args: tuple[str, ...]


def variants(reduced_context: int) -> tuple[Variant, ...]:
    context = ("--context", str(reduced_context))
    return (Variant("as stored", ()), Variant("int8 weights", ("--quantize", "int8")),
            Variant(f"context {reduced_context}", context),
            Variant(f"int8 weights, context {reduced_context}", ("--quantize", "int8", *context)),
            Variant("int8 weights, fp8 KV", ("--quantize", "int8", "--kv-dtype", "fp8")))


def plan(tiny: bool, batch_sizes: str, steps: int) -> Plan:
    if tiny:
        tiny_capacity = ("--tiny", "--device", "cpu", "--batch-sizes", "1,2", "--steps", "5", "--warmup", "3")
        return Plan("cpu", tiny_capacity, variants(32), ("--device", "cpu"), "demo", 3, 12,
                    ("--model", "demo", "--device", "cpu", "--steps", "30", "--context", "16",
                     "--variants", "int8,fp8"))
    return Plan("cuda", ("--device", "cuda", "--batch-sizes", batch_sizes, "--steps", str(steps),
                         "--torch-compile"), variants(1500),
                ("--random-model", "moshi-7b", "--device", "cuda"), "moshi-7b", 4, 24,
                ("--model", "moshi-7b", "--device", "cuda", "--steps", "250", "--variants", "int8,fp8"))


# ---- (a) step time against batch size ----------------------------------------------------------------------


def step_times(p: Plan, variant: Variant) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "capacity.json"
        command = [sys.executable, "-m", "bench.gpu_capacity", *p.capacity_args, *variant.flags,
                   "--json", str(out)]
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise RuntimeError(f"gpu_capacity.py failed ({run.returncode}):\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())


def fits_in_budget(capacity: dict) -> int:
    """The largest batch whose step p99 stays under the budget x margin (0: none)."""
    ok = [b["batch"] for b in capacity["batches"]
          if b["status"] == "ok" and b["p99_ms"] <= BUDGET_MS * MARGIN]
    return max(ok, default=0)


# ---- (b) sessions held by the server -----------------------------------------------------------------------


def scrape_at(url: str, monotonic_t: float) -> tuple[float, dict[str, float]]:
    """Spawned: /metrics at a moment of the run (the moment is the measurement, not a synchronisation), and
    when it was read: a spawned process may start late on a loaded machine, so rates are taken over the time
    between the two reads, not between the moments meant (time.monotonic is the system's clock on Linux)."""
    time.sleep(max(0.0, monotonic_t - time.monotonic()))
    read_at = time.monotonic()
    return read_at, scrape_metrics(url)


def client_process(url: str, seconds: float, n: int, seed: int, warmup_s: float, window_s: float,
                   start_at: float) -> list[dict]:
    """Spawned: n clients stream `seconds` of speech at real-time pace from `start_at` (time.monotonic, the
    system's clock), or as soon as they can after it; what each saw, summarised."""
    pcm = speech_of_length(seconds)
    clients = Clients(random_phases=True, drift_ppm=300.0, jitter_ms=5.0, seed=seed)
    runs, _ = asyncio.run(stream_sessions(url, pcm, n, clients, start_at=start_at))
    summaries = []
    for run in runs:
        first, last, p99 = latency_growth(run, warmup_s, window_s)
        reports = run.of_type(Latency)
        summaries.append({"share": realtime_share(run), "first_ms": first, "last_ms": last, "p99_ms": p99,
                          "dropped": reports[-1].dropped_frames if reports else 0,
                          "refused": run.session_start is None,
                          "first_send": run.t_first_send, "last_send": run.t_last_send})
    return summaries


@dataclass
class HeldRow:
    """N sessions for a while: the verdict, the figures it is computed from (`verdict`), and the step figures
    of the steady window."""

    sessions: int
    held: bool
    why_not: str
    refused: int  # clients the server turned away
    min_share: float
    max_growth_ms: float  # NaN when a client's first or last window had no latency report
    dropped_frames: int  # over every client
    window_streamed: bool  # every client streamed from the first read of /metrics to the second
    steps_per_s: float
    sessions_per_step: float
    wait_mean_ms: float
    step_p50_ms: float


def verdict(refused: int, min_share: float, max_growth_ms: float, dropped_frames: int) -> list[str]:
    """Why N sessions were not held (none: held), by bench/capacity_cpu.py's rule: every client admitted and
    got >= 95% of real-time output, its latency grew <= 20 ms, and nothing was dropped."""
    reasons = []
    if refused:
        reasons.append(f"{refused} refused")
    if min_share < REAL_TIME_SHARE:
        reasons.append(f"real-time share {min_share:.1%}")
    if not max_growth_ms <= LATENCY_GROWTH_MS:
        reasons.append(f"latency grew {max_growth_ms:+.0f} ms")
    if dropped_frames:
        reasons.append(f"{dropped_frames} frames dropped")
    return reasons


def drive(server: ServerProcess, n: int, seconds: float) -> HeldRow:
    warmup_s, window_s = min(5.0, seconds / 4), min(10.0, seconds / 4)
    processes = -(-n // CLIENTS_PER_PROCESS)
    counts = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    start_at = time.monotonic() + CLIENT_START_S
    # The step figures come from a window while every client streams: it begins after the warm-up and ends a
    # second before the audio does.
    steady = (warmup_s, seconds - 1.0)
    with ProcessPoolExecutor(processes + 1, mp_context=SPAWN) as pool:
        futures = [pool.submit(client_process, server.ws_url, seconds, count, 100 * i, warmup_s, window_s,
                               start_at) for i, count in enumerate(counts)]
        scrapes = [pool.submit(scrape_at, server.url, start_at + t) for t in steady]
        summaries = [s for f in futures for s in f.result()]
        (t_before, before), (t_after, after) = (f.result() for f in scrapes)
    steps = HistogramDelta.between(before, after, "voice_step_seconds")
    waits = HistogramDelta.between(before, after, "voice_step_wait_seconds")
    refused = sum(s["refused"] for s in summaries)
    min_share = min(s["share"] for s in summaries)
    # NaN (a client with no latency report in a window) stays NaN: max() would drop it if it came later.
    growth = [s["last_ms"] - s["first_ms"] for s in summaries]
    max_growth = float("nan") if np.isnan(growth).any() else max(growth)
    dropped = sum(s["dropped"] for s in summaries)
    streamed = all(s["first_send"] <= t_before and s["last_send"] >= t_after for s in summaries)
    reasons = verdict(refused, min_share, max_growth, dropped)
    return HeldRow(n, not reasons, "; ".join(reasons), refused, min_share, max_growth, dropped, streamed,
                   steps.total / (t_after - t_before),
                   waits.total / steps.total if steps.total else float("nan"),
                   waits.mean() * 1e3, steps.quantile(0.5) * 1e3)


def one_clock(row: HeldRow) -> str:
    """Why N sessions held in real time do not look like N sessions on one step clock ('' when they do, and
    for a row not held): about one step a tick (catch-up steps and owed ticks add a few), most of the sessions
    in each step, over a window every client streamed through. Figures of real-time serving: judged on a card
    (`failures`), only reported on the CPU (--tiny), where they say how busy the machine was."""
    if not row.held:
        return ""
    reasons = []
    if not row.window_streamed:
        reasons.append("not every client streamed through the step window")
    if not STEPS_PER_S / STEP_RATE_SLACK <= row.steps_per_s <= STEPS_PER_S * STEP_RATE_SLACK:
        reasons.append(f"{row.steps_per_s:.2f} steps/s, not about {STEPS_PER_S:g}")
    if not row.sessions_per_step >= BATCHED_SHARE * row.sessions:
        reasons.append(f"{row.sessions_per_step:.1f} sessions/step of {row.sessions}")
    return "; ".join(reasons)


def sessions_held(p: Plan, candidates: list[int], seconds: float) -> list[HeldRow]:
    with ServerProcess(*p.server_args, "--max-sessions", str(max(candidates)), ready_timeout=600) as server:
        rows = []
        for n in candidates:
            rows.append(drive(server, n, seconds))
            verdict = "held" if rows[-1].held else "NOT held: " + rows[-1].why_not
            print(f"(b) N={n}: {verdict}", file=sys.stderr, flush=True)
        return rows


# ---- (c) masked batched step = each session alone ----------------------------------------------------------


@dataclass
class EquivalenceRow:
    variant: str
    slots: int
    steps: int
    identical: bool
    detail: str


def masked_equals_alone(p: Plan, variant: Variant) -> EquivalenceRow:
    """Sessions in the slots of one engine start at different steps (the others masked) and are run again
    one at a time in the same engine; greedy tokens must match slot by slot, step by step."""
    prepare_torch(p.device)  # before moshi is imported
    from procs.inference.loader import load_engine
    from procs.model.source import ModelSource

    n, steps = p.equivalence_slots, p.equivalence_steps
    engine = load_engine("moshi", source=ModelSource(random_model=p.equivalence_model), device=p.device,
                         batch_size=n, log=logging.getLogger("gpu_check"), greedy=True, seed=0,
                         footprint=variant.footprint)
    engine.warmup()  # as the server does before it says ready: on CUDA this captures the graphs
    rng = np.random.default_rng(7)
    audio = (0.1 * rng.standard_normal((n, steps, engine.frame_samples))).astype(np.float32)
    start = [2 * s for s in range(n)]  # staggered starts

    def run(active: list[int]) -> dict[int, list[np.ndarray]]:
        for slot in range(n):
            engine.reset_slot(slot)
        got: dict[int, list[np.ndarray]] = {s: [] for s in active}
        for t in range(steps + start[max(active)]):
            ready = np.array([s in active and start[s] <= t < start[s] + steps for s in range(n)])
            if not ready.any():
                continue
            pcm = np.zeros((n, engine.frame_samples), np.float32)
            for s in np.flatnonzero(ready):
                pcm[s] = audio[s, t - start[s]]
            tokens = engine.step_batch(pcm, ready).tokens
            for s in np.flatnonzero(ready):
                got[int(s)].append(tokens[s].copy())
        return got

    together = run(list(range(n)))
    for slot in range(n):
        alone = run([slot])[slot]
        for step, (a, b) in enumerate(zip(together[slot], alone, strict=True)):
            if not np.array_equal(a, b):
                return EquivalenceRow(variant.label, n, steps, False,
                                      f"slot {slot} differs at its step {step}: {a} vs {b}")
    return EquivalenceRow(variant.label, n, steps, True, f"{n} slots x {steps} steps identical")


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ---- (d) what int8 weights and an fp8 cache cost -----------------------------------------------------------


def quality(p: Plan) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quality.json"
        command = [sys.executable, "-m", "bench.footprint_quality", *p.quality_args, "--json", str(out)]
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise RuntimeError(f"footprint_quality.py failed ({run.returncode}):\n{run.stderr[-3000:]}")
        return json.loads(out.read_text())


# ---- the table ---------------------------------------------------------------------------------------------


def table(capacities: list[tuple[Variant, dict]], held: list[HeldRow], equivalence: list[EquivalenceRow],
          quality_figures: dict, p: Plan, seconds: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # noqa: UP017
    model = "the demo model (--tiny)" if p.device == "cpu" else "Moshi 7B shape, random bf16 weights"
    first = capacities[0][1]
    lines = [
        f"**GPU check** on {first['device']}, {date}: torch {first['torch']}, CUDA {first['cuda']}, "
        f"moshi {first['moshi']}; {model}. Command: `bench/gpu_check"
        f"{' --tiny' if p.device == 'cpu' else ''}`.",
        "",
        "| check | figure |",
        "| --- | --- |",
    ]
    for variant, capacity in capacities:
        memory = (f"weights {capacity['weights_bytes'] / 1e9:.2f} GB, "
                  f"{capacity['session_bytes'] / 1e6:.0f} MB per session")
        for b in capacity["batches"]:
            if b["status"] == "ok":
                floor = f", floor {b['floor_ms']:.1f} ms" if b["floor_ms"] else ""
                lines.append(f"| (a) {variant.label}: step at batch {b['batch']} | p50 {b['p50_ms']:.1f} ms, "
                             f"p99 {b['p99_ms']:.1f} ms, peak {b['peak_gib'] or 0:.1f} GiB{floor}; "
                             f"{memory} |")
            else:
                lines.append(f"| (a) {variant.label}: step at batch {b['batch']} | {b['status']} |")
    for r in held:
        said = "held" if r.held else f"NOT held ({r.why_not})"
        if p.device != "cpu" and (clock := one_clock(r)):
            said += f", NOT on one step clock ({clock})"
        lines.append(f"| (b) {r.sessions} sessions for {seconds:.0f} s | {said}: real-time share "
                     f"{r.min_share:.1%}, {r.steps_per_s:.2f} steps/s, {r.sessions_per_step:.1f} "
                     f"sessions/step, wait {r.wait_mean_ms:.1f} ms, step p50 {r.step_p50_ms:.1f} ms |")
    most = max((r.sessions for r in held if r.held), default=0)
    lines.append(f"| (b) most sessions held | {most} |")
    for e in equivalence:
        lines.append(f"| (c) masked batched step = alone, {e.variant} | {'yes' if e.identical else 'NO'}: "
                     f"{e.detail} |")
    for q in quality_figures["rows"]:
        lines.append(f"| (d) {q['variant']} against {q['against']}, {q['steps']} steps teacher-forced "
                     f"({quality_figures['input']}) | text logits rel. err. {q['text_rel_err_mean']:.4f}, "
                     f"audio {q['audio_rel_err_mean']:.4f}; greedy text agreement "
                     f"{q['text_agreement']:.1%} |")
    return "\n".join(lines)


def failures(device: str, held: list[HeldRow], equivalence: list[EquivalenceRow]) -> list[str]:
    """What fails the run: a masked batched step that differs from a session alone (anywhere), and, on a card,
    N sessions held in real time that did not step on one clock. On a shared CPU (--tiny) the step figures
    say how busy the machine was, so there they are reported and not judged."""
    found = [f"(c) {e.variant}: {e.detail}" for e in equivalence if not e.identical]
    if device != "cpu":
        found += [f"(b) {r.sessions} sessions held, but not on one step clock: {clock}"
                  for r in held if (clock := one_clock(r))]
    return found


def write_block(path: Path, text: str) -> None:
    block = f"{BLOCK_BEGIN}\n{text}\n{BLOCK_END}"
    current = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(BLOCK_BEGIN) + ".*?" + re.escape(BLOCK_END), re.DOTALL)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else f"{current}\n{block}\n"
    path.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the demo model on the CPU: the code path")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="(a) batch sizes")
    parser.add_argument("--steps", type=int, default=30, help="(a) timed steps per batch size")
    parser.add_argument("--seconds", type=float, default=30.0, help="(b) seconds each N is held")
    parser.add_argument("--sessions", help="(b) session counts to try (default: around what (a) fits)")
    parser.add_argument("--markdown", type=Path, help="also write the table into this file (a marked block)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    p = plan(args.tiny, args.batch_sizes, args.steps)
    seconds = min(args.seconds, 8.0) if args.tiny else args.seconds
    started = time.monotonic()

    capacities = []
    for variant in p.variants:
        capacities.append((variant, step_times(p, variant)))
        print(f"(a) {variant.label} done at {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    capacity = capacities[0][1]
    if args.sessions:
        candidates = sorted({int(v) for v in args.sessions.split(",")})
    else:
        fits = max(fits_in_budget(capacity), 1)
        candidates = [2] if args.tiny else sorted({max(1, fits // 2), fits, fits * 5 // 4})
    held = sessions_held(p, candidates, seconds)
    print(f"(b) done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    equivalence = []
    for variant in (p.variants[0], Variant(f"{p.variants[3].label}, fp8 KV",
                                           (*p.variants[3].flags, "--kv-dtype", "fp8"))):
        equivalence.append(masked_equals_alone(p, variant))
        release(p.device)  # its engine is gone with the call: give the card back before the next
    print(f"(c) done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    quality_figures = quality(p)
    print(f"(d) done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    text = table(capacities, held, equivalence, quality_figures, p, seconds)
    print(text)
    if args.markdown:
        write_block(args.markdown, text)
    if args.json:
        args.json.write_text(json.dumps({
            "capacity": capacity, "held": [{**asdict(r), "clock": one_clock(r)} for r in held],
            "equivalence": asdict(equivalence[0]),
            "variants": [{"label": v.label, "flags": list(v.flags), "capacity": c} for v, c in capacities],
            "equivalence_variants": [asdict(e) for e in equivalence], "quality": quality_figures,
            "seconds": time.monotonic() - started}, indent=2))
    failed = failures(p.device, held, equivalence)
    for failure in failed:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
