import pytest

from procs.config import parse_config


def test_defaults_run_the_demo_checkpoint_on_the_cpu() -> None:
    cfg = parse_config([], environ={})
    assert cfg.engine == "moshi" and cfg.checkpoint is None and cfg.hf_repo is None and cfg.device == "cpu"


def test_every_option_has_an_environment_twin_and_flags_win() -> None:
    env = {
        "VOICE_PORT": "9100",
        "VOICE_MAX_SESSIONS": "8",
        "VOICE_HF_REPO": "kyutai/moshiko-pytorch-bf16",
        "VOICE_DEVICE": "cuda",
        "VOICE_DTYPE": "bfloat16",
        "VOICE_ENGINE": "loopback",
        "VOICE_LOG_LEVEL": "DEBUG",
    }
    cfg = parse_config([], environ=env)
    assert (cfg.port, cfg.max_sessions, cfg.hf_repo, cfg.device, cfg.dtype, cfg.engine, cfg.log_level) == (
        9100,
        8,
        "kyutai/moshiko-pytorch-bf16",
        "cuda",
        "bfloat16",
        "loopback",
        "DEBUG",
    )
    assert parse_config(["--port", "9200"], environ=env).port == 9200


@pytest.mark.parametrize(
    "argv",
    [
        ["--engine", "gpt"],
        ["--device", "tpu"],
        ["--max-sessions", "0"],
        ["--checkpoint", "/x", "--hf-repo", "a/b"],
        ["--port", "http"],
    ],
)
def test_bad_options_are_refused_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, environ={})
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err
