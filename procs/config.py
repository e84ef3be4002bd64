"""Server configuration: command-line flags, each with an environment-variable twin for pods.

The model flags are moshi.server's, with the same names and meanings (`--hf-repo`, `--moshi-weight`,
`--mimi-weight`, `--tokenizer`, `--config-path`, `--lora-weight`, `--no_fuse_lora`, `--half`, `--cfg-coef`),
so a command line written for moshi.server serves the same checkpoint here. An environment variable is
checked exactly as its flag is (`VOICE_PORT=abc` is refused with the variable's name, before anything
starts); a flag given on the command line wins over its variable.

Every default lives in `ServerConfig` and nowhere else: `--help` and the README's flag table show it from
there (tests/test_readme_flags.py compares them), and the functions below the configuration take their values
from a ServerConfig (or `DEFAULTS`), not defaults of their own.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from procs.model.footprint import KV_FORMATS, MIN_CONTEXT, WEIGHT_FORMATS, Footprint
from procs.model.source import ModelSource
from procs.network.hosts import ANY_HOST, parse_host_pattern


def default_web_dir() -> Path:
    """The page: the copy installed with the package (procs/web, see setup.py), else the checkout's web/."""
    installed = Path(__file__).resolve().parent / "web"
    checkout = Path(__file__).resolve().parent.parent / "web"
    return installed if (installed / "index.html").is_file() else checkout


WEB_DIR = default_web_dir()

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
DTYPES = ("bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32", "float")
ENGINES = ("moshi", "loopback")
STEP_CLOCKS = ("auto", "on", "off")
RANDOM_MODELS = ("demo", "moshi-7b")
MAX_SESSIONS_LIMIT = 256


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8998
    # Where the model comes from (procs/model/checkpoints.py: resolve_checkpoint). Nothing named: the demo.
    # Its flags (`--checkpoint`, `--hf-repo`, ...) fill it directly: their Options' dests are `model.<field>`.
    model: ModelSource = field(default_factory=ModelSource)
    device: str = "cpu"
    # Inference processes, each with its own copy of the model and its own range of `max_sessions` slots;
    # `devices`, when given, names each one's device (and so their number: parse_config sets both).
    inference_workers: int = 1
    devices: tuple[str, ...] = ()
    dtype: str | None = None
    cfg_coef: float = 1.0
    max_sessions: int = 4  # per inference worker
    gpu_memory_fraction: float = 0.95
    session_memory_mb: float | None = None
    # How the model is held (procs/model/footprint.py) and the card it is sized for (None: measured).
    quantize: str = "model"
    context: int | None = None
    kv_dtype: str = "model"
    gpu_memory_gb: float | None = None
    engine: str = "moshi"
    step_clock: str = "auto"
    threads: int | None = None
    seed: int | None = None  # seeds the model's sampling: one session's run is then reproducible
    idle_timeout_s: float | None = 30.0
    max_session_s: float | None = None
    drain_timeout_s: float = 30.0
    # A session whose link drops (no close handshake) is kept this long for `/ws?resume=TOKEN`; 0: off. Ten
    # seconds covers a Wi-Fi blip or a phone changing networks, plus the page's reconnect, and holds a slot
    # (it counts for admission) no longer than a caller would wait before starting over.
    resume_window_s: float = 10.0
    allowed_origins: tuple[str, ...] = ()  # besides the page's own origin and localhost; ("*",): any
    # Host headers served besides the names and addresses the server is bound to (and localhost); ("*",):
    # any. The defence against DNS rebinding: procs/network/hosts.py.
    allowed_hosts: tuple[str, ...] = ()
    auth_token: str | None = None
    auth_secret: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    # TLS: both set, or neither. `--ssl DIR` (moshi.server's flag) sets them to DIR/cert.pem and DIR/key.pem.
    ssl_cert: Path | None = None
    ssl_key: Path | None = None
    ssl_dir: Path | None = None
    # HAProxy agent-check: a TCP port where the server tells the balancer its free slots (None: off).
    agent_port: int | None = None
    web_dir: Path = field(default=WEB_DIR)

    @property
    def footprint(self) -> Footprint:
        return Footprint(weights=self.quantize, context=self.context, kv=self.kv_dtype)  # type: ignore[arg-type]

    def worker_devices(self) -> tuple[str, ...]:
        """The device of each inference worker: `--devices`, else `--device` for each of
        `--inference-workers`."""
        return self.devices or (self.device,) * self.inference_workers


# The defaults, for code below the configuration that is called without one (tests, benchmarks, `plan`).
DEFAULTS: Final = ServerConfig()


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be 0 or more, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be 0-65535, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be positive, got {value}")
    return value


def _context(text: str) -> int:
    value = _positive_int(text)
    if value < MIN_CONTEXT:
        raise ValueError(f"must be at least {MIN_CONTEXT} steps")
    return value


def _seconds_or_off(text: str) -> float | None:
    if text.strip().lower() in ("off", "none") or float(text) == 0.0:
        return None
    return _positive_float(text)


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise ValueError(f"must be a finite number, 0 or more, got {value}")
    return value


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if origin not in ("*", "null") and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port]), * or null")
    return origins


def _hosts(text: str) -> tuple[str, ...]:
    """Comma-separated `--allowed-hosts` entries, each checked and normalised (`Voice.Example.` is
    voice.example)."""
    entries = (e.strip() for e in text.split(",") if e.strip())
    return tuple(ANY_HOST if e == ANY_HOST else str(parse_host_pattern(e)) for e in entries)


def _readable_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _directory(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError(f"no such directory: {path}")
    return path


def parse_secret(text: str) -> str:
    if len(text) < 16:
        raise ValueError("must be at least 16 characters")
    return text


def _device(text: str) -> str:
    if text in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise ValueError("must be cpu, cuda, cuda:N or auto")


def _devices(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(","))
    for device in devices:
        try:
            _device(device)
        except ValueError as error:
            raise ValueError(f"device {device!r} {error}") from None
    return devices


def _choice(options: tuple[str, ...], *, upper: bool = False, lower: bool = True) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower() if lower else text
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    parse.__name__ = "choice"
    return parse


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/true/yes or 0/false/no")


@dataclass(frozen=True)
class Option:
    """One flag: its destination in ServerConfig, its spellings, its variable and how its text is parsed.

    Its default is the ServerConfig's (`option_default`); `default_text` says in words what a default of
    None or nothing means where the value alone would not (`--dtype`: the device's usual dtype)."""

    dest: str  # a ServerConfig field, or `model.<field>` for the nested ModelSource
    flags: tuple[str, ...]
    env: str
    parse: Callable[[str], Any] | None  # None: a switch (sets `switch_value`)
    help: str
    switch_value: Any = None
    metavar: str | None = None
    default_text: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("host", ("--host",), "VOICE_HOST", str, "address to listen on (scripts/serve: 0.0.0.0)"),
    Option("port", ("--port",), "VOICE_PORT", _port, "TCP port (0 picks a free one)"),
    Option("model.checkpoint", ("--checkpoint",), "VOICE_CHECKPOINT", str,
           "local Moshi-format checkpoint directory, or a moshi-finetune `consolidated/` directory",
           metavar="DIR", default_text="the demo"),
    Option("model.hf_repo", ("--hf-repo",), "VOICE_HF_REPO", str,
           "Hugging Face repo (e.g. kyutai/moshiko-pytorch-bf16); with a fine-tune, its base",
           metavar="REPO", default_text="the demo"),
    Option("model.moshi_weight", ("--moshi-weight",), "VOICE_MOSHI_WEIGHT", str,
           "local Moshi LM weights file", metavar="FILE", default_text="the repo's"),
    Option("model.mimi_weight", ("--mimi-weight",), "VOICE_MIMI_WEIGHT", str, "local Mimi weights file",
           metavar="FILE", default_text="the repo's"),
    Option("model.tokenizer", ("--tokenizer",), "VOICE_TOKENIZER", str, "local SentencePiece tokenizer file",
           metavar="FILE", default_text="the repo's"),
    Option("model.config_path", ("--config-path",), "VOICE_CONFIG_PATH", str,
           "local config.json overriding the repo's", metavar="FILE", default_text="the repo's"),
    Option("model.lora_weight", ("--lora-weight",), "VOICE_LORA_WEIGHT", str,
           "LoRA adapters (lora.safetensors)", metavar="FILE"),
    Option("model.fuse_lora", ("--no_fuse_lora", "--no-fuse-lora"), "VOICE_NO_FUSE_LORA", None,
           "keep LoRA layers apart instead of fusing them into the linear layers", switch_value=False),
    Option("model.random_model", ("--random-model",), "VOICE_RANDOM_MODEL", _choice(RANDOM_MODELS),
           "a model built in memory with random weights, no checkpoint: demo, or moshi-7b (the real 7B "
           "shape, for GPU capacity checks)", metavar="NAME"),
    Option("device", ("--device",), "VOICE_DEVICE", _device, "cpu, cuda, cuda:N or auto"),
    Option("inference_workers", ("--inference-workers",), "VOICE_INFERENCE_WORKERS", _positive_int,
           "inference processes, each with its own copy of the model and its own --max-sessions slots "
           "(--devices sets it: one per device)", metavar="N"),
    Option("devices", ("--devices",), "VOICE_DEVICES", _devices,
           "comma-separated devices (e.g. cuda:0,cuda:1), each as --device: one inference worker on each",
           metavar="LIST", default_text="--device for each worker"),
    Option("dtype", ("--dtype",), "VOICE_DTYPE", _choice(DTYPES),
           "model dtype: bfloat16, float16 or float32 (and their short names)",
           default_text="bfloat16 on CUDA, float32 on CPU"),
    Option("dtype", ("--half",), "VOICE_HALF", None,
           "float16 instead of bfloat16 (older GPUs), as moshi.server", switch_value="float16"),
    Option("cfg_coef", ("--cfg-coef",), "VOICE_CFG_COEF", float,
           "classifier-free guidance coefficient (only 1.0: see the README)"),
    Option("max_sessions", ("--max-sessions",), "VOICE_MAX_SESSIONS", _positive_int,
           f"sessions served at once per inference worker, 1-{MAX_SESSIONS_LIMIT} (fewer if memory holds "
           "fewer); the server's total is the sum over its workers", metavar="N"),
    Option("gpu_memory_fraction", ("--gpu-memory-fraction",), "VOICE_GPU_MEMORY_FRACTION", _fraction,
           "share of the GPU's memory the server may use (weights, sessions' state, working memory)"),
    Option("session_memory_mb", ("--session-memory-mb",), "VOICE_SESSION_MEMORY_MB", _positive_float,
           "memory the sessions' streaming state may take on any device; fewer sessions if it holds fewer",
           default_text="no bound"),
    Option("quantize", ("--quantize",), "VOICE_QUANTIZE", _choice(WEIGHT_FORMATS),
           "int8: the LM's linear weights as int8 with per-channel scales (half of bf16's memory); model: "
           "as the checkpoint stores them"),
    Option("context", ("--context",), "VOICE_CONTEXT", _context,
           "steps of attention the LM keeps, 80 ms each (3000 = 4 minutes for Moshi); fewer: less KV cache "
           "per session, the model remembers less far back", metavar="N", default_text="the checkpoint's"),
    Option("kv_dtype", ("--kv-dtype",), "VOICE_KV_DTYPE", _choice(KV_FORMATS),
           "fp8: the LM's KV cache stored as float8 with per-vector scales (about half of bf16's); model: "
           "in the model's dtype"),
    Option("gpu_memory_gb", ("--gpu-memory-gb",), "VOICE_GPU_MEMORY_GB", _positive_float,
           "size the sessions for a card of this many GB (10^9 bytes), less the weights, instead of the "
           "free memory CUDA reports (a shared card; the same figure voice-agent plan uses)", metavar="X",
           default_text="measured"),
    Option("engine", ("--engine",), "VOICE_ENGINE", _choice(ENGINES),
           "moshi, or loopback (no model: each session hears itself)"),
    Option("step_clock", ("--step-clock",), "VOICE_STEP_CLOCK", _choice(STEP_CLOCKS),
           "on: one batched step per 80 ms for every session; off: a step per ready block; auto: on for a "
           "model, off for loopback"),
    Option("seed", ("--seed",), "VOICE_SEED", _non_negative_int,
           "seed the model's sampling, so a session's answers can be reproduced (debugging, tests)",
           metavar="N", default_text="none: each start samples differently"),
    Option("threads", ("--threads",), "VOICE_THREADS", _positive_int,
           "torch threads in the inference process", metavar="N",
           default_text="1 on a CPU, torch's own on CUDA"),
    Option("idle_timeout_s", ("--idle-timeout",), "VOICE_IDLE_TIMEOUT", _seconds_or_off,
           "close a session that sends no audio this many seconds (0: never)", metavar="S"),
    Option("max_session_s", ("--max-session-s",), "VOICE_MAX_SESSION_S", _seconds_or_off,
           "end sessions at this age in seconds", metavar="S", default_text="no limit"),
    Option("drain_timeout_s", ("--drain-timeout",), "VOICE_DRAIN_TIMEOUT", _positive_float,
           "on SIGTERM, let live sessions go on this many seconds before ending them", metavar="S"),
    Option("resume_window_s", ("--resume-window",), "VOICE_RESUME_WINDOW", _non_negative_float,
           "keep a session whose connection dropped this many seconds for /ws?resume=TOKEN (0: off)",
           metavar="S"),
    Option("allowed_origins", ("--allowed-origins",), "VOICE_ALLOWED_ORIGINS", _origins,
           "browser origins allowed to open sessions besides the page's own and localhost "
           "(comma-separated; * allows any)", metavar="ORIGINS", default_text="the page's own and localhost"),
    Option("allowed_hosts", ("--allowed-hosts",), "VOICE_ALLOWED_HOSTS", _hosts,
           "Host headers served besides the server's own names and addresses: the public name a balancer "
           "forwards (comma-separated host[:port]; .example.com: it and its subdomains; * allows any)",
           metavar="HOSTS", default_text="the names and addresses it is bound to, and localhost"),
    Option("auth_token", ("--auth-token",), "VOICE_AUTH_TOKEN", parse_secret,
           "a shared secret clients must pass as ?token=... (at least 16 characters)", metavar="TOKEN"),
    Option("auth_secret", ("--auth-secret",), "VOICE_AUTH_SECRET", parse_secret,
           "accept short-lived tokens a backend signs with this secret (see the README)", metavar="SECRET"),
    Option("log_level", ("--log-level",), "VOICE_LOG_LEVEL", _choice(LOG_LEVELS, upper=True),
           "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    Option("log_format", ("--log-format",), "VOICE_LOG_FORMAT", _choice(LOG_FORMATS),
           "text, or json: one JSON object a line, for a log collector"),
    Option("ssl_cert", ("--ssl-cert",), "VOICE_SSL_CERT", _readable_file,
           "TLS certificate chain (PEM): serve https:// and wss:// (with --ssl-key)", metavar="FILE"),
    Option("ssl_key", ("--ssl-key",), "VOICE_SSL_KEY", _readable_file,
           "TLS private key (PEM), with --ssl-cert", metavar="FILE"),
    Option("ssl_dir", ("--ssl",), "VOICE_SSL", _directory,
           "a directory holding cert.pem and key.pem, as moshi.server's --ssl", metavar="DIR"),
    Option("agent_port", ("--agent-port",), "VOICE_AGENT_PORT", _port,
           "TCP port of the HAProxy agent-check (free slots as a weight; see deploy/README.md)",
           metavar="PORT", default_text="off"),
)


def option_default(option: Option) -> Any:
    """The option's default: the ServerConfig's value at its dest."""
    value: Any = DEFAULTS
    for name in option.dest.split("."):
        value = getattr(value, name)
    return value


def describe_default(option: Option) -> str:
    """The option's default as `--help` and the README show it: its `default_text`, else the ServerConfig's
    value (a switch: off)."""
    if option.default_text is not None:
        return option.default_text
    value = option_default(option)
    if option.parse is None:
        return "off"
    if value is None or value == ():
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None

    return convert


# The options that name a model (ServerConfig.model's fields): `serve` and `plan` take the same ones.
MODEL_SOURCE_OPTIONS = tuple(o for o in OPTIONS if o.dest.startswith("model."))


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    for option in options:
        help_text = f"{option.help} (default: {describe_default(option)}) [env {option.env}]"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %-placeholders
        if option.parse is None:
            parser.add_argument(*option.flags, dest=option.dest, action="store_const",
                                const=option.switch_value, default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = option.metavar or option.dest.rsplit(".", 1)[-1].upper()
            parser.add_argument(*option.flags, dest=option.dest, type=_argparse_type(option.parse),
                                default=argparse.SUPPRESS, metavar=metavar, help=help_text)


def build_parser(prog: str = "supervisor.py") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Real-time full-duplex Telugu speech-to-speech server (Moshi). With no model named it "
        "runs the built-in demo checkpoint (random weights: it answers with noise).",
    )
    add_options(parser, OPTIONS)
    return parser


def read_options(parser: argparse.ArgumentParser, options: tuple[Option, ...], argv: list[str] | None,
                 environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options' environment variables, then the command line over them (and the parser's own other
    arguments); every value checked the same way wherever it came from. Exits with status 2 and a usage
    message naming the flag or variable at fault."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for option in options:
        text = env.get(option.env)
        if text is None:
            continue
        try:
            if option.parse is None:
                if _boolean(text):
                    values[option.dest] = option.switch_value
            else:
                values[option.dest] = option.parse(text)
        except ValueError as error:
            parser.error(f"environment variable {option.env}={text!r} (for {option.flags[0]}): {error}")
    values.update(vars(parser.parse_args(argv)))
    return values


def parse_config(argv: list[str] | None = None, environ: Mapping[str, str] | None = None,
                 prog: str = "supervisor.py") -> ServerConfig:
    """Flags over environment variables over defaults (`read_options`)."""
    parser = build_parser(prog)
    values = read_options(parser, OPTIONS, argv, environ)
    if "devices" in values and "inference_workers" not in values:
        values["inference_workers"] = len(values["devices"])  # one worker per device
    cfg = config_from_values(values)
    if cfg.ssl_dir is not None and cfg.ssl_cert is None and cfg.ssl_key is None:
        cfg = replace(cfg, ssl_cert=cfg.ssl_dir / "cert.pem", ssl_key=cfg.ssl_dir / "key.pem")
    problem = check_config(cfg)
    if problem:
        parser.error(problem)
    return cfg


def config_from_values(values: Mapping[str, Any]) -> ServerConfig:
    """The ServerConfig of option values keyed by their dests (`read_options`): `model.<field>` ones make its
    ModelSource; what is not given keeps ServerConfig's default."""
    model = {f.name: values[f"model.{f.name}"] for f in fields(ModelSource) if f"model.{f.name}" in values}
    top = {f.name: values[f.name] for f in fields(ServerConfig) if f.name in values and f.name != "model"}
    return ServerConfig(model=ModelSource(**model), **top)


def check_config(cfg: ServerConfig) -> str | None:
    """What is wrong with a combination of options, or None."""
    if cfg.max_sessions > MAX_SESSIONS_LIMIT:
        return f"--max-sessions must be between 1 and {MAX_SESSIONS_LIMIT}"
    if cfg.cfg_coef != 1.0:
        return ("--cfg-coef other than 1.0 is not supported: classifier-free guidance doubles moshi's batch "
                "and needs a conditioned model; this server batches unconditioned Moshi models per session")
    cuda_cards = [d for d in cfg.worker_devices() if d != "cpu"]
    if (len(cuda_cards) > len(set(cuda_cards)) and cfg.gpu_memory_gb is None and cfg.session_memory_mb is None
            and cfg.engine != "loopback"):
        return ("several inference workers on one GPU each size their sessions from its free memory, and "
                "together would take more than it has: give each its share (--gpu-memory-gb or "
                "--session-memory-mb), or one device each (--devices cuda:0,cuda:1)")
    if cfg.devices and len(cfg.devices) != cfg.inference_workers:
        return (f"--devices names {len(cfg.devices)} devices but --inference-workers is "
                f"{cfg.inference_workers}: one inference worker runs on each device (give --devices alone)")
    model = cfg.model
    if model.random_model is not None and (model.checkpoint or model.hf_repo or model.file_overrides):
        return "--random-model builds a model in memory: it takes no --checkpoint, --hf-repo or weights"
    if cfg.engine == "loopback" and (model.checkpoint or model.hf_repo or model.random_model):
        return "--engine loopback runs no model: drop --checkpoint, --hf-repo and --random-model"
    if cfg.engine == "loopback" and (not cfg.footprint.is_default or cfg.gpu_memory_gb is not None):
        return "--engine loopback runs no model: drop --quantize, --context, --kv-dtype and --gpu-memory-gb"
    if cfg.quantize == "int8" and not model.fuse_lora:
        return "--quantize int8 stores fused weights: LoRA adapters are fused first (drop --no_fuse_lora)"
    if cfg.agent_port and cfg.agent_port == cfg.port:
        return f"--agent-port {cfg.agent_port} is the server's own --port: the agent needs a port of its own"
    if (cfg.ssl_cert is None) != (cfg.ssl_key is None):
        return "--ssl-cert and --ssl-key go together (or --ssl DIR holding cert.pem and key.pem)"
    for path in (cfg.ssl_cert, cfg.ssl_key):
        if path is not None and not path.is_file():
            return f"no such file: {path} (--ssl DIR needs cert.pem and key.pem in it)"
    if cfg.ssl_cert is not None and cfg.ssl_key is not None:
        problem = _tls_problem(cfg.ssl_cert, cfg.ssl_key)
        if problem:
            return problem
    return None


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The server side of https:// and wss://: TLS 1.2 at least; no ALPN, so browsers speak HTTP/1.1, which
    WebSocket needs. ssl.SSLError or OSError for a pair that cannot serve."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def _tls_problem(cert: Path, key: Path) -> str | None:
    """The pair is loaded here first, so a wrong file stops the server at start with its name, not later in
    the network process (which builds the same context)."""
    try:
        server_tls_context(cert, key)
    except (ssl.SSLError, OSError) as error:
        return f"cannot use TLS certificate {cert} with key {key}: {error}"
    return None
