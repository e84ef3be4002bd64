"""The `voice-agent` command (procs/cli.py, procs/wav_client.py) against real servers, JSON logs, and the
wheel's contents (the page shipped as package data, the console script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest

from procs.network.auth import Access
from procs.wav_client import read_wav_16k
from tests.support.launcher import ServerProcess, poll_until

ROOT = Path(__file__).resolve().parent.parent
SECRET = "0123456789abcdef-secret"
pytestmark = pytest.mark.loopback_server("--log-format", "json")


def voice_agent(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0
                ) -> subprocess.CompletedProcess[str]:
    """`python -m procs ARGS` (what the `voice-agent` script runs), from outside the checkout."""
    return subprocess.run([sys.executable, "-m", "procs", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd="/")


def write_wav(path: Path, signal: np.ndarray, rate: int, width: int = 2) -> None:
    """`signal`: float in [-1, 1], shape (samples,) or (samples, channels)."""
    frames = signal if signal.ndim == 2 else signal[:, None]
    scale = float(2 ** (8 * width - 1) - 1)
    ints = np.round(frames * scale).astype({2: "<i2", 4: "<i4"}[width])
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(frames.shape[1])
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(ints.tobytes())


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[int(np.argmax(spectrum))])


# ---- the command itself --------------------------------------------------------------------------------
def test_usage_and_unknown_commands_exit_2() -> None:
    bare = voice_agent()
    assert bare.returncode == 2 and "serve" in bare.stderr and "client" in bare.stderr
    helped = voice_agent("--help")
    assert helped.returncode == 0 and "build-demo" in helped.stdout
    unknown = voice_agent("launch")
    assert unknown.returncode == 2 and "unknown command 'launch'" in unknown.stderr


def test_serve_help_lists_the_server_flags_under_its_name() -> None:
    result = voice_agent("serve", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: voice-agent serve")
    for flag in ("--hf-repo", "--ssl-cert", "--log-format", "--agent-port", "VOICE_PORT"):
        assert flag in result.stdout


def test_a_bad_environment_variable_stops_serve_with_its_name() -> None:
    result = voice_agent("serve", "--engine", "loopback", env={"VOICE_PORT": "abc"})
    assert result.returncode == 2
    assert "VOICE_PORT='abc'" in result.stderr and "Traceback" not in result.stderr


def test_serve_without_moshi_names_the_fix() -> None:
    """moshi is installed apart (--no-deps); without it the command says how, before starting anything.
    `sys.modules["moshi"] = None` is Python's own way to make a module unimportable in one process."""
    code = ("import sys; sys.modules['moshi'] = None; from procs.cli import main; "
            "sys.exit(main(['serve', '--port', '0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "missing moshi" in result.stderr and "pip install --no-deps moshi==0.2.13" in result.stderr
    assert "READY" not in result.stdout


def test_token_mints_what_the_server_accepts() -> None:
    minted = voice_agent("token", "--secret", SECRET, "--ttl", "60")
    assert minted.returncode == 0
    token = minted.stdout.strip()
    access = Access(auth_secret=SECRET)
    assert access.check(f"/ws?token={token}", None, None, time.time()) is None
    assert access.check(f"/ws?token={token}", None, None, time.time() + 120) is not None  # expired
    short = voice_agent("token", "--secret", "short")
    assert short.returncode == 2 and "at least 16" in short.stderr


# ---- the client, against a real server -----------------------------------------------------------------
def test_read_wav_resamples_any_rate_and_mixes_channels(tmp_path: Path) -> None:
    stereo = np.stack([tone(500, 1.0, 44_100), tone(500, 1.0, 44_100)], axis=1)
    write_wav(tmp_path / "a.wav", stereo, 44_100)
    pcm = read_wav_16k(tmp_path / "a.wav")
    assert abs(len(pcm) - 16_000) <= 2 and abs(dominant_hz(pcm, 16_000) - 500) < 5
    write_wav(tmp_path / "b.wav", tone(500, 1.0, 8_000), 8_000, width=4)
    pcm32 = read_wav_16k(tmp_path / "b.wav")
    assert abs(len(pcm32) - 16_000) <= 2 and abs(dominant_hz(pcm32, 16_000) - 500) < 5
    assert 0.25 < np.abs(pcm32).max() / 32767 < 0.35  # the level survives


def test_client_streams_a_wav_and_writes_the_answer(loopback_server: ServerProcess, tmp_path: Path) -> None:
    """The loopback engine answers each session with its own audio: what comes back is the tone sent,
    at 24 kHz, as long as what was sent (whole 80 ms blocks)."""
    write_wav(tmp_path / "in.wav", np.stack([tone(440, 2.0, 44_100)] * 2, axis=1), 44_100)
    result = voice_agent("client", "--url", loopback_server.ws_url, "--wav", str(tmp_path / "in.wav"),
                         "--out", str(tmp_path / "out.wav"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["close_code"] == 1000 and report["errors"] == []
    assert report["frames_sent"] == 100 and report["frames_received"] == 100
    assert 0 < report["first_audio_s"] < 1.0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    with wave.open(str(tmp_path / "out.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24_000, 1, 2)
        answer = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    assert len(answer) == 100 * 480
    assert abs(dominant_hz(answer, 24_000) - 440) < 5


def test_client_prints_text_by_default(loopback_server: ServerProcess, tmp_path: Path) -> None:
    write_wav(tmp_path / "in.wav", tone(300, 0.4, 16_000), 16_000)
    result = voice_agent("client", "--url", loopback_server.ws_url, "--wav", str(tmp_path / "in.wav"))
    assert result.returncode == 0, result.stderr
    assert "first audio:" in result.stdout and "round trip per 80 ms block: p50" in result.stdout
    assert "closed: 1000" in result.stdout


def test_client_reports_a_refusal_and_exits_1(tmp_path: Path) -> None:
    write_wav(tmp_path / "in.wav", tone(300, 0.4, 16_000), 16_000)
    with ServerProcess("--engine", "loopback", "--auth-secret", SECRET) as server:
        refused = voice_agent("client", "--url", server.ws_url, "--wav", str(tmp_path / "in.wav"), "--json")
        token = voice_agent("token", "--secret", SECRET).stdout.strip()
        allowed = voice_agent("client", "--url", f"{server.ws_url}?token={token}",
                              "--wav", str(tmp_path / "in.wav"), "--json")
    assert refused.returncode == 1 and "401" in json.loads(refused.stdout)["refused"]
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["ok"]


def test_client_refuses_a_file_that_is_not_a_wav(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not audio")
    result = voice_agent("client", "--url", "ws://127.0.0.1:9/ws", "--wav", str(tmp_path / "notes.txt"))
    assert result.returncode == 2 and "not an audio file" in result.stderr
    assert "Traceback" not in result.stderr


# ---- JSON logs -----------------------------------------------------------------------------------------
def test_json_logs_are_one_object_a_line_with_session_and_slot(loopback_server: ServerProcess,
                                                               tmp_path: Path) -> None:
    write_wav(tmp_path / "in.wav", tone(300, 0.4, 16_000), 16_000)
    assert voice_agent("client", "--url", loopback_server.ws_url, "--wav", str(tmp_path / "in.wav")
                       ).returncode == 0
    records = [json.loads(line) for line in loopback_server.log().splitlines() if line.strip()]
    assert records, "no log lines"
    for record in records:
        assert {"time", "level", "process", "logger", "message"} <= record.keys()
    # The supervisor and both busy processes (the VAD logs nothing at INFO).
    assert {r["process"] for r in records} >= {"MainProcess", "network", "inference"}
    ended = [r for r in records if r["logger"] == "network" and "ended (client_request)" in r["message"]]
    assert ended, "no session-end line"
    assert isinstance(ended[0]["session"], str) and isinstance(ended[0]["slot"], int)
    assert f"session={ended[0]['session']} slot={ended[0]['slot']}" in ended[0]["message"]


# ---- the package ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("*.whl")
    return found


def test_the_wheel_ships_the_page_the_script_and_the_corpus(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    page = {p.relative_to(ROOT / "web").as_posix() for p in (ROOT / "web").rglob("*")
            if p.is_file() and p.name != "README.md"}
    assert page and {f"procs/web/{p}" for p in page} <= names
    assert "voice-agent = procs.cli:main" in entry_points
    assert any(n.startswith("procs/model/data/") and n.endswith(".txt") for n in names)
    # No top-level module named like PyPI's supervisord: the checkout's supervisor.py is a launch script.
    assert "supervisor.py" not in names
    assert {"procs/supervisor.py", "procs/__main__.py", "ringbuf/ring.py", "protocol/wire.py"} <= names


def test_the_wheel_ships_no_test_or_benchmark_tooling(wheel: Path) -> None:
    """The launcher, Chromium's flags and the test speech are tests/support/'s, not the server's."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    modules = {Path(n).stem for n in names if n.endswith(".py")}
    top = {n.split("/", 1)[0] for n in names} - {n.split("/", 1)[0] for n in names if ".dist-info/" in n}
    assert not modules & {"launcher", "chromium", "speech"}, sorted(modules)
    assert top == {"procs", "ringbuf", "protocol"}, top  # no tests/, no bench/


def test_an_installed_package_serves_its_own_copy_of_the_page(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    found = subprocess.run([sys.executable, "-c", "import procs.config as c; print(c.WEB_DIR)"],
                           capture_output=True, text=True, check=True, cwd="/",
                           env={**os.environ, "PYTHONPATH": str(target)}, timeout=60)
    web_dir = Path(found.stdout.strip())
    assert web_dir == target / "procs" / "web" and (web_dir / "index.html").is_file()


def test_read_wav_takes_extensible_24_bit_and_float_files(tmp_path: Path) -> None:
    """sox writes 24-bit and multichannel WAVs as WAVE_FORMAT_EXTENSIBLE, which Python 3.11's `wave`
    cannot read; libsndfile reads them, and float WAVs."""
    flavours = {"x24.wav": ["-b", "24", "-c", "3"], "f32.wav": ["-e", "floating-point", "-b", "32"]}
    for name, options in flavours.items():
        subprocess.run(["sox", "-n", "-r", "48000", *options, str(tmp_path / name),
                        "synth", "1", "sine", "500", "vol", "0.3"], check=True, timeout=60)
        pcm = read_wav_16k(tmp_path / name)
        assert abs(len(pcm) - 16_000) <= 2 and abs(dominant_hz(pcm, 16_000) - 500) < 5


def test_client_usage_mistakes_exit_2_before_any_session(tmp_path: Path) -> None:
    write_wav(tmp_path / "in.wav", tone(300, 0.4, 16_000), 16_000)
    wav = str(tmp_path / "in.wav")
    for args in (["--url", "ws://[::1/ws", "--wav", wav],
                 ["--url", "ws://127.0.0.1:99999/ws", "--wav", wav],
                 ["--url", "http://127.0.0.1:1/ws", "--wav", wav],
                 ["--url", "wss://127.0.0.1:1/ws", "--wav", wav, "--ca-file", str(tmp_path / "none.pem")],
                 ["--url", "ws://127.0.0.1:1/ws", "--wav", wav, "--out", str(tmp_path / "no" / "out.wav")]):
        result = voice_agent("client", *args)
        assert result.returncode == 2 and "usage:" in result.stderr, args
        assert "Traceback" not in result.stderr, args


def test_client_prints_the_servers_error(tmp_path: Path) -> None:
    """A full server accepts, says `error` capacity and closes 1013: the client prints the message."""
    write_wav(tmp_path / "in.wav", tone(300, 0.4, 16_000), 16_000)
    with ServerProcess("--engine", "loopback", "--max-sessions", "1") as server:
        hold = ["client", "--url", server.ws_url, "--wav", str(tmp_path / "in.wav"), "--tail", "30"]
        holder = subprocess.Popen([sys.executable, "-m", "procs", *hold], stdout=subprocess.PIPE, text=True)
        try:
            assert poll_until(lambda: server.health()[1].get("sessions_active") == 1, 30) is not None
            result = voice_agent("client", "--url", server.ws_url, "--wav", str(tmp_path / "in.wav"))
        finally:
            holder.terminate()
            holder.wait(30)
    assert result.returncode == 1
    assert "error: capacity: Server at capacity" in result.stdout and "closed: 1013" in result.stdout
