"""Pods needed for N concurrent users, from measured sessions-per-pod figures only.

    python deploy/capacity.py                              # print the table
    python deploy/capacity.py --readme deploy/k8s/README.md  # also rewrite the table there

Where the figures come from (bench/RESULTS.md, nothing estimated here):
* CPU pod: the marker `<!-- capacity: cpu_demo_sessions_per_pod=N -->` next to the measured "**N sessions
  held**" line (demo checkpoint, 2 cores; the marker must agree with that line or this refuses to run).
* GPU pod: the `gpu_check` block's "(b) most sessions held" row, written by `bench/gpu_check` on a CUDA pod;
  used only when it is there, from a real GPU run with the 7B shape, and above 0.
* The seed brief's "10 L4 pods for 100 users" (10 sessions per L4 pod) is printed next to them for
  comparison and labelled as NOT measured by this project.

pods = ceil(users / (sessions per pod x occupancy)), at the HPA's target occupancy (the headroom the
autoscaler keeps, deploy/k8s/hpa.yaml) and at 100% (every slot taken: no headroom at all).
Stdlib only, so it runs anywhere the repository is checked out.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
README = ROOT / "deploy" / "k8s" / "README.md"

# deploy/k8s/hpa.yaml's target (averageValue 700m of voice_session_occupancy); a string so the arithmetic is
# exact (with a float, 21 / (3 * 0.7) is a hair above 10 and rounds up to 11). tests/test_deploy_k8s.py keeps
# the two equal.
HPA_TARGET = "0.7"
USERS = (100, 1_000, 10_000)
SEED_L4_SESSIONS_PER_POD = 10  # the project brief: "10 L4 pods for 100 users"; not measured by us

CPU_MARKER = re.compile(r"<!-- capacity: cpu_demo_sessions_per_pod=(\d+)\b[^>]*-->\n\*\*(\d+) sessions held")
GPU_BEGIN, GPU_END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
GPU_HELD = re.compile(r"^\| \(b\) most sessions held \| (\d+) \|$", re.MULTILINE)
GPU_DEVICE = re.compile(r"\*\*GPU check\*\* on ([^,]+),")
BLOCK_BEGIN, BLOCK_END = "<!-- capacity:begin -->", "<!-- capacity:end -->"


@dataclass(frozen=True)
class Figure:
    pod: str
    sessions_per_pod: int | None  # None: no measurement
    source: str


def cpu_figure(results: str) -> Figure:
    found = CPU_MARKER.search(results)
    if found is None:
        raise ValueError("bench/RESULTS.md has no `<!-- capacity: cpu_demo_sessions_per_pod=N -->` marker "
                         "directly above its '**N sessions held' line")
    marked, written = int(found.group(1)), int(found.group(2))
    if marked != written:
        # The marker is a copy of the measured figure; a copy that drifted from it would be made up.
        raise ValueError(f"bench/RESULTS.md: marker says {marked} sessions, the measurement says {written}")
    return Figure("CPU, demo checkpoint (2 cores)", marked,
                  "measured: bench/RESULTS.md, sessions held 60 s (issue 9)")


def gpu_figure(results: str) -> Figure:
    start, end = results.find(GPU_BEGIN), results.find(GPU_END)
    block = results[start:end] if 0 <= start < end else ""
    device = GPU_DEVICE.search(block)
    held = GPU_HELD.search(block)
    # A `--tiny` run (the demo model on the CPU) writes the same table; it says nothing about a GPU pod.
    real_gpu = device is not None and "cpu" not in device.group(1).lower() and "Moshi 7B shape" in block
    if held is None or not real_gpu or int(held.group(1)) == 0:
        return Figure("GPU, Moshi 7B", None, "not measured yet: bench/RESULTS.md gpu_check block")
    assert device is not None
    return Figure(f"GPU ({device.group(1).strip()}), Moshi 7B shape", int(held.group(1)),
                  "measured: bench/gpu_check, most sessions held")


def seed_figure() -> Figure:
    return Figure("L4 (seed brief)", SEED_L4_SESSIONS_PER_POD,
                  'NOT measured by us: the brief\'s "10 L4 pods for 100 users"')


def pods_needed(users: int, sessions_per_pod: int, occupancy: str | Fraction) -> int:
    return math.ceil(Fraction(users) / (sessions_per_pod * Fraction(occupancy)))


def figures(results: str) -> list[Figure]:
    return [cpu_figure(results), gpu_figure(results), seed_figure()]


def table(results: str, target: str = HPA_TARGET) -> str:
    pct = f"{float(Fraction(target) * 100):g}%"
    lines = [
        f"pods = ceil(users / (sessions per pod x occupancy)); cells: at the HPA target ({pct}) / at 100%",
        "",
        "| pod | sessions per pod | source | " + " | ".join(f"{u:,} users" for u in USERS) + " |",
        "| --- | --- | --- |" + " --- |" * len(USERS),
    ]
    for f in figures(results):
        if f.sessions_per_pod is None:
            cells = ["—"] * len(USERS)
        else:
            n = f.sessions_per_pod
            cells = [f"{pods_needed(u, n, target):,} / {pods_needed(u, n, '1'):,}" for u in USERS]
        per_pod = "—" if f.sessions_per_pod is None else str(f.sessions_per_pod)
        lines.append(f"| {f.pod} | {per_pod} | {f.source} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def with_table(readme: str, text: str) -> str:
    start, end = readme.find(BLOCK_BEGIN), readme.find(BLOCK_END)
    if not 0 <= start < end:
        raise ValueError(f"no {BLOCK_BEGIN} ... {BLOCK_END} block to rewrite")
    return readme[: start + len(BLOCK_BEGIN)] + "\n" + text + readme[end:]


def table_in(readme: str) -> str:
    start, end = readme.find(BLOCK_BEGIN), readme.find(BLOCK_END)
    if not 0 <= start < end:
        raise ValueError(f"no {BLOCK_BEGIN} ... {BLOCK_END} block")
    return readme[start + len(BLOCK_BEGIN) : end].removeprefix("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the measured figures are")
    parser.add_argument("--readme", type=Path, nargs="?", const=README,
                        help=f"also rewrite the table between {BLOCK_BEGIN} and {BLOCK_END} in this file "
                             f"(default {README.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        text = table(args.results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        print(f"capacity: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    if args.readme is not None:
        args.readme.write_text(with_table(args.readme.read_text(encoding="utf-8"), text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
