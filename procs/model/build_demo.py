"""Build the demo checkpoint from a shell: `python -m procs.model.build_demo [--out DIR] [--force]`.

Prints progress, then the directory on its last line (scripts read that line). The demo checkpoint is a
small Moshi-architecture model with random weights in moshi's on-disk layout (see procs/model/demo.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from procs.model.torch_setup import prepare_torch


def main(argv: list[str] | None = None, prog: str = "python -m procs.model.build_demo") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: ~/.cache/telugu-voice-agent/demo-VERSION)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory already exists")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prepare_torch("cpu")  # building is CPU work; before moshi is imported
    from procs.model.demo import build_demo, default_demo_dir

    def say(msg: str) -> None:
        print(f"demo_checkpoint: {msg}", flush=True)

    out_dir = build_demo((args.out or default_demo_dir()).expanduser(), seed=args.seed, force=args.force,
                         progress=say)
    print(out_dir, flush=True)  # last line: the directory, for scripts
    return 0


if __name__ == "__main__":
    sys.exit(main())
