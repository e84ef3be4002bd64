"""The `voice-agent` command (also `python -m procs`): one entry point for an installed server.

    voice-agent serve [FLAGS]          the server (supervisor.py's flags and VOICE_* variables)
    voice-agent client --url URL --wav IN.wav [--out OUT.wav]
    voice-agent build-demo [--out DIR] [--force]
    voice-agent plan [MODEL FLAGS] [--json]    sessions per card for each way of holding the model
    voice-agent token --secret SECRET [--ttl S]   a short-lived token for --auth-secret servers

moshi is installed apart (`pip install --no-deps moshi==0.2.13`: its release pins torch<2.10, which would
replace a pod's CUDA torch); `serve` and `build-demo` check for it first and name that command if it is
missing, instead of failing later inside a child process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable

MOSHI_VERSION = "0.2.13"
MOSHI_FIX = (f"pip install --no-deps moshi=={MOSHI_VERSION}   (moshi pins torch<2.10; --no-deps keeps your "
             "torch, and this package already lists what moshi needs at run time)")
# What moshi imports at run time (this package's dependencies, unless someone removed one).
MOSHI_NEEDS = ("torch", "safetensors", "sentencepiece", "einops", "huggingface_hub")

COMMANDS = {
    "serve": "run the server (flags: voice-agent serve --help)",
    "client": "stream a WAV to a server and save its answer (voice-agent client --help)",
    "build-demo": "build the random-weight demo checkpoint into the cache now",
    "token": "mint a short-lived access token for a server run with --auth-secret",
    "plan": "sessions per card (L4 ... H200) for bf16/int8 weights and full/reduced/fp8 KV cache",
}


def missing_model_packages() -> list[str]:
    """The modules the Moshi engine needs that are not installed (empty when all are)."""
    missing = [name for name in ("moshi", *MOSHI_NEEDS) if importlib.util.find_spec(name) is None]
    return missing


def require_moshi(command: str) -> int | None:
    """None when the model can run; else prints what is missing and the fix, and returns the exit status."""
    missing = missing_model_packages()
    if not missing:
        return None
    fix = MOSHI_FIX if "moshi" in missing else f"pip install {' '.join(missing)}"
    print(f"voice-agent {command}: missing {', '.join(missing)}; install with:\n  {fix}\n"
          "(`voice-agent serve --engine loopback` runs without a model)", file=sys.stderr)
    return 3


def serve(argv: list[str]) -> int:
    from procs.config import parse_config

    cfg = parse_config(argv, prog="voice-agent serve")  # flags and VOICE_* checked (--help answered) first
    if cfg.engine != "loopback":
        status = require_moshi("serve")
        if status is not None:
            return status
    from procs.supervisor import serve as run_server

    return run_server(cfg)


def build_demo(argv: list[str]) -> int:
    status = require_moshi("build-demo")
    if status is not None:
        return status
    from procs.model.build_demo import main

    return main(argv, prog="voice-agent build-demo")


def plan(argv: list[str]) -> int:
    status = require_moshi("plan")
    if status is not None:
        return status
    from procs.plan import main

    return main(argv)


def client(argv: list[str]) -> int:
    from procs.wav_client import main

    return main(argv)


def token(argv: list[str]) -> int:
    from procs.config import parse_secret
    from procs.network.auth import MAX_TOKEN_LIFETIME_S, mint_token

    parser = argparse.ArgumentParser(prog="voice-agent token", description=COMMANDS["token"])
    parser.add_argument("--secret", default=os.environ.get("VOICE_AUTH_SECRET"),
                        help="the server's --auth-secret [env VOICE_AUTH_SECRET]")
    parser.add_argument("--ttl", type=float, default=300.0, metavar="S",
                        help=f"seconds it stays valid (default 300, at most {MAX_TOKEN_LIFETIME_S:.0f})")
    args = parser.parse_args(argv)
    if args.secret is None:
        parser.error("--secret (or VOICE_AUTH_SECRET) is required")
    try:
        parse_secret(args.secret)
    except ValueError as error:
        parser.error(f"--secret: {error}")
    if not 0 < args.ttl <= MAX_TOKEN_LIFETIME_S:
        parser.error(f"--ttl must be in (0, {MAX_TOKEN_LIFETIME_S:.0f}]")
    print(mint_token(args.secret, args.ttl, time.time()))
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: voice-agent COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    handlers: dict[str, Callable[[list[str]], int]] = {
        "serve": serve, "client": client, "build-demo": build_demo, "token": token, "plan": plan,
    }
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    handler = handlers.get(args[0])
    if handler is None:
        print(f"voice-agent: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return handler(args[1:])


if __name__ == "__main__":
    sys.exit(main())
