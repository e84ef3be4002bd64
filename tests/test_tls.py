"""TLS: `--ssl-cert`/`--ssl-key` and moshi.server's `--ssl DIR` serve https:// and wss://, with a certificate
made at test time by a throwaway CA (trustme); a bad pair stops the server at start, naming the files."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import trustme

from tests.support.launcher import ServerProcess


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_dir(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cert.pem (the chain) and key.pem for 127.0.0.1 and localhost, plus the CA as ca.pem."""
    out = tmp_path_factory.mktemp("tls")
    issued = ca.issue_cert("127.0.0.1", "localhost")
    (out / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(out / "key.pem"))
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    return out


def https_get(url: str, ca_file: Path) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        return response.status, response.read()


def say_something(path: Path) -> Path:
    t = np.arange(8_000) / 16_000
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16_000)
        wav.writeframes((0.3 * 32767 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes())
    return path


def client(url: str, wav: Path, *extra: str) -> tuple[int, dict]:
    command = [sys.executable, "-m", "procs", "client", "--url", url, "--wav", str(wav), "--json", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("how", ["cert-and-key", "ssl-dir"])
def test_https_and_wss_with_a_self_signed_certificate(how: str, cert_dir: Path, tmp_path: Path) -> None:
    args = (["--ssl-cert", str(cert_dir / "cert.pem"), "--ssl-key", str(cert_dir / "key.pem")]
            if how == "cert-and-key" else ["--ssl", str(cert_dir)])
    wav = say_something(tmp_path / "hello.wav")
    with ServerProcess("--engine", "loopback", *args) as server:
        assert server.url.startswith("https://127.0.0.1:") and server.ws_url.startswith("wss://")
        status, page = https_get(server.url + "/", cert_dir / "ca.pem")
        assert status == 200 and b"<html" in page.lower()
        status, health = https_get(server.url + "/health", cert_dir / "ca.pem")
        assert status == 200 and json.loads(health)["status"] == "ok"
        code, report = client(server.ws_url, wav, "--ca-file", str(cert_dir / "ca.pem"))
        assert code == 0 and report["ok"] and report["frames_received"] == 24
        # Without the CA the certificate is not trusted: the client says so and exits 1.
        code, report = client(server.ws_url, wav)
        assert code == 1 and "CERTIFICATE_VERIFY_FAILED" in report["refused"]
        # Plain HTTP to a TLS port is not served.
        with pytest.raises(OSError):
            urllib.request.urlopen(server.url.replace("https://", "http://") + "/health", timeout=10)


def test_a_key_that_does_not_match_stops_the_server_at_start(cert_dir: Path, ca: trustme.CA,
                                                             tmp_path: Path) -> None:
    other = ca.issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", "--engine", "loopback", "--port", "0",
         "--ssl-cert", str(cert_dir / "cert.pem"), "--ssl-key", str(tmp_path / "other-key.pem")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "READY" not in result.stdout
    assert "cannot use TLS certificate" in result.stderr and "other-key.pem" in result.stderr


def test_a_certificate_without_its_key_is_refused(cert_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "supervisor", "--ssl-cert", str(cert_dir / "cert.pem")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--ssl-cert and --ssl-key go together" in result.stderr
