"""Plain HTTP next to the WebSocket: routes, methods and bodies (procs/network/http.py), without a socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from websockets.datastructures import Headers
from websockets.http11 import Request

from procs.network.http import Health, HttpRoutes

ROOT = Path(__file__).resolve().parent.parent


def health(status: str = "ok") -> Health:
    return Health(status=status, sessions_active=1, max_sessions=4, model="m", engine="moshi",
                  demo_weights=True)


def routes(status: str = "ok", refusal: str | None = None) -> HttpRoutes:
    return HttpRoutes(ROOT / "web", lambda: health(status), lambda: "voice_sessions_active 1\n",
                      lambda: refusal)


def request(path: str, method: str = "GET") -> Request:
    return Request(path, Headers({"Host": "localhost"}), method=method)


def test_get_serves_the_page_health_and_metrics() -> None:
    page = routes().respond(request("/"))
    assert page.status_code == 200 and b"<html" in page.body.lower()
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    script = routes().respond(request("/app.js"))
    assert script.status_code == 200 and script.headers["Content-Type"].startswith("text/javascript")
    ok = routes().respond(request("/health"))
    assert ok.status_code == 200 and json.loads(ok.body)["status"] == "ok"
    metrics = routes().respond(request("/metrics?x=1"))
    assert metrics.status_code == 200 and metrics.body == b"voice_sessions_active 1\n"


@pytest.mark.parametrize("status", ["full", "starting", "draining"])
def test_health_is_503_unless_a_session_can_start(status: str) -> None:
    response = routes(status).respond(request("/health"))
    assert response.status_code == 503 and json.loads(response.body)["status"] == status


@pytest.mark.parametrize("path", ["/", "/health", "/metrics", "/app.js"])
def test_head_has_the_headers_of_get_and_no_body(path: str) -> None:
    get, head = routes().respond(request(path)), routes().respond(request(path, "HEAD"))
    assert head.status_code == get.status_code and head.body == b""
    assert head.headers["Content-Length"] == get.headers["Content-Length"] == str(len(get.body))
    assert head.headers["Content-Type"] == get.headers["Content-Type"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
@pytest.mark.parametrize("path", ["/", "/health", "/metrics", "/app.js", "/nothing"])
def test_other_methods_get_405_with_allow(method: str, path: str) -> None:
    response = routes().respond(request(path, method))
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"


def test_the_websocket_path_takes_get_only_and_only_while_open() -> None:
    assert routes().respond(request("/ws")) is None  # the handshake goes on
    for method in ("HEAD", "POST"):
        response = routes().respond(request("/ws", method))
        assert response.status_code == 405 and response.headers["Allow"] == "GET"
    refused = routes(refusal="draining").respond(request("/ws"))
    assert refused.status_code == 503 and refused.body == b"draining\n"


@pytest.mark.parametrize("path", ["/nothing", "/../pyproject.toml", "/lib/../../README.md"])
def test_missing_files_and_escapes_are_404(path: str) -> None:
    assert routes().respond(request(path)).status_code == 404


@pytest.mark.parametrize("path", ["/\x00", "/index.html\x00.js", "/../pyproject.toml", "/%2e%2e/README.md",
                                  "/" + "a" * 256, "/lib/" + "b" * 5000 + ".js", "/" + "c/" * 3000])
def test_paths_outside_the_page_or_with_a_nul_byte_are_not_found(path: str) -> None:
    assert routes().respond(request(path)).status_code == 404


@pytest.mark.parametrize("status", ["ok", "full", "starting", "draining"])
def test_liveness_is_200_whatever_readiness_says(status: str) -> None:
    """Kubernetes restarts a container whose liveness fails: a busy, starting or draining server is alive."""
    response = routes(status).respond(request("/livez"))
    assert response.status_code == 200 and json.loads(response.body) == {"status": "alive"}
    assert routes(status).respond(request("/health")).status_code == (200 if status == "ok" else 503)


@pytest.mark.parametrize("name", ["NotoSansTelugu-Regular.ttf", "NotoSansTelugu-Bold.ttf"])
def test_the_served_telugu_font_is_font_ttf_and_cached(name: str) -> None:
    response = routes().respond(request(f"/fonts/{name}"))
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "font/ttf"  # not text/..., no charset
    assert response.body == (ROOT / "web" / "fonts" / name).read_bytes()
    assert response.body[:4] == b"\x00\x01\x00\x00"  # a TrueType file
    assert response.headers["Cache-Control"] == "public, max-age=86400"
    head = routes().respond(request(f"/fonts/{name}", "HEAD"))
    assert head.headers["Content-Type"] == "font/ttf" and head.body == b""


def test_fonts_and_scripts_get_their_types_whatever_the_hosts_mime_types_say(tmp_path: Path) -> None:
    for name in ("a.ttf", "a.woff2", "a.woff", "a.otf", "a.js", "a.mjs", "OFL.txt"):
        (tmp_path / name).write_bytes(b"x")
    served = HttpRoutes(tmp_path, lambda: health(), lambda: "", lambda: None)
    types = {name: served.respond(request(f"/{name}")).headers["Content-Type"]
             for name in ("a.ttf", "a.woff2", "a.woff", "a.otf", "a.js", "a.mjs", "OFL.txt")}
    assert types == {"a.ttf": "font/ttf", "a.woff2": "font/woff2", "a.woff": "font/woff", "a.otf": "font/otf",
                     "a.js": "text/javascript; charset=utf-8", "a.mjs": "text/javascript; charset=utf-8",
                     "OFL.txt": "text/plain; charset=utf-8"}
