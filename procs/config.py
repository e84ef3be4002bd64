"""Server configuration: command-line flags, each with an environment-variable twin for pods."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8998
    checkpoint: str | None = None
    hf_repo: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    max_sessions: int = 4
    engine: str = "moshi"
    log_level: str = "INFO"
    # How long a ready 80 ms block may wait for the other sessions' blocks before a step runs without them.
    # None: chosen by the engine (0 for loopback, where a step costs nothing; 25 ms for moshi).
    batch_wait_ms: float | None = None
    web_dir: Path = field(default=WEB_DIR)
    # Torch threads in the inference process; None leaves torch's default.
    threads: int | None = None


# flag -> (environment variable, type, help)
_OPTIONS: dict[str, tuple[str, type, str]] = {
    "host": ("VOICE_HOST", str, "address to listen on"),
    "port": ("VOICE_PORT", int, "TCP port (0 picks a free one)"),
    "checkpoint": ("VOICE_CHECKPOINT", str, "local Moshi-format checkpoint directory"),
    "hf_repo": ("VOICE_HF_REPO", str, "Hugging Face repo, e.g. kyutai/moshiko-pytorch-bf16"),
    "device": ("VOICE_DEVICE", str, "cpu or cuda"),
    "dtype": ("VOICE_DTYPE", str, "bfloat16, float16 or float32 (default: bf16 on CUDA, fp32 on CPU)"),
    "max_sessions": ("VOICE_MAX_SESSIONS", int, "batch slots (on CUDA clamped to what memory holds)"),
    "engine": ("VOICE_ENGINE", str, "moshi, or loopback (no model: each session hears itself)"),
    "log_level": ("VOICE_LOG_LEVEL", str, "DEBUG, INFO, WARNING, ERROR"),
    "batch_wait_ms": ("VOICE_BATCH_WAIT_MS", float, "max wait of a ready block for a batched step"),
    "threads": ("VOICE_THREADS", int, "torch threads in the inference process"),
}


def parse_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    env = os.environ if environ is None else environ
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="supervisor.py",
        description="Real-time full-duplex Telugu speech-to-speech server (Moshi). With no model named it "
        "runs the built-in demo checkpoint (random weights: it answers with noise).",
    )
    for name, (var, typ, help_text) in _OPTIONS.items():
        default = env.get(var)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=typ,
            default=typ(default) if default is not None else getattr(defaults, name),
            help=f"{help_text} [env {var}]",
        )
    args = parser.parse_args(argv)
    if args.engine not in ("moshi", "loopback"):
        parser.error(f"--engine must be moshi or loopback, not {args.engine!r}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, not {args.device!r}")
    if args.max_sessions < 1 or args.max_sessions > 256:
        parser.error("--max-sessions must be between 1 and 256")
    if args.checkpoint and args.hf_repo:
        parser.error("give --checkpoint or --hf-repo, not both")
    return ServerConfig(**vars(args))
