"""Flags and their VOICE_* environment variables (procs/config.py)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from procs.config import (
    MODEL_SOURCE_OPTIONS,
    OPTIONS,
    ServerConfig,
    build_parser,
    describe_default,
    option_default,
    parse_config,
)
from procs.model.footprint import Footprint
from procs.model.source import ModelSource


def test_defaults_run_the_demo_checkpoint_on_the_cpu() -> None:
    cfg = parse_config([], environ={})
    assert cfg == ServerConfig()
    assert cfg.engine == "moshi" and cfg.model.checkpoint is None and cfg.model.hf_repo is None
    assert cfg.device == "cpu"
    assert cfg.model.fuse_lora and cfg.cfg_coef == 1.0 and cfg.step_clock == "auto"


def test_every_option_has_an_environment_twin_and_flags_win() -> None:
    env = {
        "VOICE_PORT": "9100",
        "VOICE_MAX_SESSIONS": "8",
        "VOICE_HF_REPO": "kyutai/moshiko-pytorch-bf16",
        "VOICE_DEVICE": "cuda",
        "VOICE_DTYPE": "bfloat16",
        "VOICE_LOG_LEVEL": "debug",
        "VOICE_GPU_MEMORY_FRACTION": "0.8",
        "VOICE_STEP_CLOCK": "off",
        "VOICE_NO_FUSE_LORA": "1",
        "VOICE_LORA_WEIGHT": "/ft/lora.safetensors",
    }
    cfg = parse_config([], environ=env)
    assert (cfg.port, cfg.max_sessions, cfg.model.hf_repo, cfg.device, cfg.dtype, cfg.log_level) == (
        9100, 8, "kyutai/moshiko-pytorch-bf16", "cuda", "bfloat16", "DEBUG"
    )
    assert (cfg.gpu_memory_fraction, cfg.step_clock, cfg.model.fuse_lora) == (0.8, "off", False)
    assert cfg.model.lora_weight == "/ft/lora.safetensors"
    assert parse_config(["--port", "9200"], environ=env).port == 9200
    assert all(o.env.startswith("VOICE_") for o in OPTIONS)
    assert len({o.env for o in OPTIONS}) == len(OPTIONS)  # one variable per flag


def test_moshi_servers_flags_mean_what_they_mean_there() -> None:
    argv = ["--hf-repo", "BNarayanaReddy/siba", "--moshi-weight", "m.safetensors", "--mimi-weight",
            "mimi.safetensors", "--tokenizer", "tok.model", "--config-path", "config.json", "--lora-weight",
            "lora.safetensors", "--no_fuse_lora", "--half", "--cfg-coef", "1.0", "--device", "auto"]
    cfg = parse_config(argv, environ={})
    model = cfg.model
    files = (model.moshi_weight, model.mimi_weight, model.tokenizer, model.config_path, model.lora_weight)
    assert cfg.model.hf_repo == "BNarayanaReddy/siba"
    assert files == ("m.safetensors", "mimi.safetensors", "tok.model", "config.json", "lora.safetensors")
    assert (cfg.model.fuse_lora, cfg.dtype, cfg.device) == (False, "float16", "auto")
    assert parse_config(["--no-fuse-lora"], environ={}).model.fuse_lora is False  # the dashed spelling too


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "gpt"],
        ["--device", "tpu"],
        ["--max-sessions", "0"],
        ["--max-sessions", "257"],
        ["--port", "http"],
        ["--port", "70000"],
        ["--dtype", "int8"],
        ["--log-level", "verbose"],
        ["--gpu-memory-fraction", "1.5"],
        ["--cfg-coef", "3.0"],
        ["--step-clock", "sometimes"],
        ["--random-model", "moshi-7b", "--hf-repo", "a/b"],
        ["--engine", "loopback", "--checkpoint", "/x"],
        ["--log-format", "xml"],
        ["--port", "8998", "--agent-port", "8998"],
        ["--ssl-cert", "/nonexistent/cert.pem", "--ssl-key", "/nonexistent/key.pem"],
        ["--quantize", "int4"],
        ["--kv-dtype", "int8"],
        ["--context", "8"],
        ["--gpu-memory-gb", "0"],
        ["--engine", "loopback", "--quantize", "int8"],
        ["--quantize", "int8", "--no_fuse_lora"],
    ],
)
def test_bad_options_are_refused_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, environ={})
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VOICE_PORT", "abc"),
        ("VOICE_LOG_LEVEL", "verbose"),
        ("VOICE_DTYPE", "int8"),
        ("VOICE_MAX_SESSIONS", "-3"),
        ("VOICE_DEVICE", "gpu"),
        ("VOICE_NO_FUSE_LORA", "maybe"),
        ("VOICE_GPU_MEMORY_FRACTION", "0"),
        ("VOICE_LOG_FORMAT", "xml"),
        ("VOICE_SSL_CERT", "/nonexistent/cert.pem"),
        ("VOICE_SSL", "/nonexistent"),
        ("VOICE_AGENT_PORT", "abc"),
        ("VOICE_QUANTIZE", "fp4"),
        ("VOICE_CONTEXT", "ten"),
        ("VOICE_KV_DTYPE", "fp4"),
    ],
)
def test_bad_environment_variables_are_refused_like_flags_naming_the_variable(
    variable: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config([], environ={variable: value})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and f"{variable}={value!r}" in err


def test_cfg_coef_other_than_one_is_refused_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--cfg-coef", "2"], environ={})
    assert "classifier-free guidance" in capsys.readouterr().err


def test_the_memory_flags_name_one_footprint() -> None:
    cfg = parse_config(["--quantize", "int8", "--context", "1500"], environ={"VOICE_KV_DTYPE": "fp8",
                                                                             "VOICE_GPU_MEMORY_GB": "24"})
    assert cfg.footprint == Footprint(weights="int8", context=1500, kv="fp8")
    assert cfg.gpu_memory_gb == 24.0
    assert parse_config([], environ={}).footprint.is_default


def test_the_model_options_fill_the_nested_model_source() -> None:
    cfg = parse_config(["--checkpoint", "/ft/consolidated", "--hf-repo", "a/b"],
                       environ={"VOICE_TOKENIZER": "tok.model", "VOICE_NO_FUSE_LORA": "1"})
    assert cfg.model == ModelSource(checkpoint="/ft/consolidated", hf_repo="a/b", tokenizer="tok.model",
                                    fuse_lora=False)
    named = {o.dest.removeprefix("model.") for o in MODEL_SOURCE_OPTIONS}
    assert named == {f.name for f in fields(ModelSource)}


def test_one_inference_worker_on_the_device_by_default() -> None:
    cfg = parse_config([], environ={})
    assert (cfg.inference_workers, cfg.devices) == (1, ())
    assert cfg.worker_devices() == ("cpu",)
    cfg = parse_config(["--inference-workers", "3", "--device", "cuda:1", "--gpu-memory-gb", "24"],
                       environ={})
    assert cfg.worker_devices() == ("cuda:1", "cuda:1", "cuda:1")
    assert parse_config([], environ={"VOICE_INFERENCE_WORKERS": "2"}).worker_devices() == ("cpu", "cpu")


def test_devices_name_one_worker_each() -> None:
    cfg = parse_config(["--devices", "cuda:0, cuda:1"], environ={})
    assert (cfg.inference_workers, cfg.worker_devices()) == (2, ("cuda:0", "cuda:1"))
    cfg = parse_config(["--inference-workers", "2"], environ={"VOICE_DEVICES": "cuda:1,cuda:0"})
    assert (cfg.inference_workers, cfg.worker_devices()) == (2, ("cuda:1", "cuda:0"))
    # Two workers may share a card, each told its share; --devices wins over --device for the workers.
    cfg = parse_config(["--device", "cuda", "--devices", "cuda:0,cuda:0", "--session-memory-mb", "8000"],
                       environ={})
    assert cfg.worker_devices() == ("cuda:0", "cuda:0")


@pytest.mark.parametrize("argv", [["--devices", "cuda:0,cuda:0"],
                                  ["--inference-workers", "2", "--device", "cuda"]])
def test_workers_sharing_a_card_without_their_share_are_refused(argv: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Each would size its sessions from the whole card's free memory: together, more than it has.
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, environ={})
    assert exc.value.code == 2 and "--gpu-memory-gb or --session-memory-mb" in capsys.readouterr().err


def test_devices_and_a_different_worker_count_are_refused_naming_both(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(["--inference-workers", "3", "--devices", "cuda:0,cuda:1"], environ={})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--devices names 2 devices but --inference-workers is 3" in err


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--inference-workers", "0"], {}),
        (["--inference-workers", "two"], {}),
        (["--devices", "cuda:0,tpu"], {}),
        (["--devices", ""], {}),
        (["--devices", "cuda:0,,cuda:1"], {}),
        ([], {"VOICE_INFERENCE_WORKERS": "-1"}),
        ([], {"VOICE_DEVICES": "gpu0"}),
    ],
)
def test_bad_worker_options_are_refused_with_usage(argv: list[str], environ: dict[str, str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, environ=environ)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_help_shows_every_options_default_and_variable() -> None:
    help_text = " ".join(build_parser().format_help().split())  # argparse wraps lines anywhere
    for option in OPTIONS:
        assert f"(default: {describe_default(option)}) [env {option.env}]" in help_text, option.flags[0]
    # --gpu-memory-fraction and --idle-timeout, as numbers
    assert "(default: 0.95)" in help_text and "(default: 30)" in help_text
    assert "sessions served at once per inference worker" in help_text


def test_every_default_is_the_server_configs() -> None:
    for option in OPTIONS:
        value = option_default(option)  # the dest names a ServerConfig field (or model.<field>)
        if option.parse is None:
            assert value != option.switch_value, f"{option.flags[0]} is off by default"
        if option.default_text is not None:
            # Words stand for a default only where the value says nothing by itself (none, or empty).
            assert value in (None, ()), f"{option.flags[0]}: default {value!r} hidden behind words"
    assert describe_default(next(o for o in OPTIONS if o.dest == "gpu_memory_fraction")) == "0.95"
