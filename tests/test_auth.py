"""Who may open a session (procs/network/auth.py): the Origin allow-list and the tokens, through the HTTP
routes' handshake checks, without a socket."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from procs.network.auth import MAX_TOKEN_LIFETIME_S, Access, mint_token
from procs.network.hosts import AllowedHosts
from procs.network.http import Health, HttpRoutes

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-s3cret-s3cret"
NOW = 1_800_000_000.0
# The server answers for voice.example (its --allowed-hosts): the Origin rules below are checked after it.
HOSTS = AllowedHosts.of(("localhost", "voice.example"))


def handshake(access: Access, path: str = "/ws", origin: str | None = None, host: str = "voice.example:8998"):
    headers = Headers({"Host": host})
    if origin is not None:
        headers["Origin"] = origin
    routes = HttpRoutes(ROOT / "web", lambda: Health("ok", 0, 4, "m", "moshi", False), lambda: "",
                        lambda: None, access, HOSTS)
    return routes.respond(Request(path, headers), NOW)


@pytest.mark.parametrize(
    "origin",
    [None, "http://voice.example:8998", "https://voice.example:8998", "http://localhost:8998",
     "http://127.0.0.1:3000", "http://[::1]:8998", "http://localhost"],
)
def test_the_pages_own_origin_localhost_and_non_browsers_are_let_in(origin: str | None) -> None:
    assert handshake(Access(), origin=origin) is None


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://voice.example:9999", "garbage"])
def test_other_origins_are_refused_with_403(origin: str) -> None:
    response = handshake(Access(), origin=origin)
    assert response is not None and response.status_code == 403


def test_listed_origins_and_a_star_are_let_in() -> None:
    assert handshake(Access(allowed_origins=("https://app.example",)), origin="https://app.example") is None
    assert handshake(Access(allowed_origins=("*",)), origin="https://evil.example") is None
    assert handshake(Access(allowed_origins=("null",)), origin="null") is None


def test_a_shared_token_is_required_and_compared() -> None:
    access = Access(auth_token="t" * 20)
    missing = handshake(access)
    assert missing is not None and missing.status_code == 401
    wrong = handshake(access, "/ws?token=" + "x" * 20)
    assert wrong is not None and wrong.status_code == 403
    assert handshake(access, "/ws?token=" + "t" * 20) is None


def test_signed_short_lived_tokens() -> None:
    access = Access(auth_secret=SECRET)
    good = mint_token(SECRET, ttl_s=300, now=NOW)
    assert handshake(access, f"/ws?token={good}") is None
    expired = mint_token(SECRET, ttl_s=300, now=NOW - 301)
    forged = mint_token("another-secret-entirely", ttl_s=300, now=NOW)
    too_long = mint_token(SECRET, ttl_s=MAX_TOKEN_LIFETIME_S + 60, now=NOW)
    version, expiry, signature = good.split(".")
    tampered = f"{version}.{int(expiry) + 3600}.{signature}"  # a later expiry under the old signature
    for token in (expired, forged, too_long, tampered, "v1.abc.def", "nonsense"):
        response = handshake(access, f"/ws?token={token}")
        assert response is not None and response.status_code == 403, token


def test_an_origin_is_checked_before_a_token() -> None:
    response = handshake(Access(auth_token="t" * 20), "/ws?token=" + "t" * 20, origin="https://evil.example")
    assert response is not None and response.status_code == 403


@pytest.mark.parametrize("expiry", ["9" * 5000, "1" * 13, "١٨٠٠٠٠٠٣٠٠", "²"])
def test_a_correctly_signed_token_with_an_absurd_expiry_is_refused_not_a_500(expiry: str) -> None:
    # Signed with the real secret, so only the expiry's form can refuse it: 5,000 digits (int() refuses
    # them), 13 digits, Arabic-Indic digits and a superscript (str.isdigit() takes both).
    payload = f"v1.{expiry}"
    token = f"{payload}.{hmac.new(SECRET.encode(), payload.encode(), hashlib.sha256).hexdigest()}"
    response = handshake(Access(auth_secret=SECRET), f"/ws?token={token}")
    assert response is not None and response.status_code == 403
