"""Plain HTTP next to the WebSocket, sans I/O: the page and its files, `/health` (readiness), `/livez`
(liveness), `/metrics`, and the checks a WebSocket handshake passes before any slot is taken (method,
origin, token, server state).

Every request first names its `Host`: exactly one (400 otherwise, as HTTP/1.1 says), and, but for the
probes' routes, one this server answers for (hosts.py; 421 Misdirected Request otherwise), before the
Origin check that trusts it. The probes (`/livez`, `/health`, `/metrics`) are exempt from the allow-list:
their callers are machines whose Host is whatever they were pointed at (a pod IP, HAProxy's `Host:
voice-agent`), no browser's credentials ride on them, they start nothing and only tell figures.

websockets hands every HTTP request to `HttpRoutes.respond` before its handshake; a `Response` answers it,
None lets the WebSocket handshake of `/ws` go on. Only GET and HEAD are served (HEAD: the same headers,
no body); any other method gets 405 with an `Allow` header.
"""

from __future__ import annotations

import email.utils
import mimetypes
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

import msgspec
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from procs.network.auth import Access
from procs.network.codec import requested_codec
from procs.network.hosts import AllowedHosts

WS_PATH = "/ws"
MOSHI_PATH = "/api/chat"  # kyutai's moshi.server wire, the same admission (procs/network/moshi_api.py)
READ_METHODS = ("GET", "HEAD")
PROBE_PATHS = ("/livez", "/health", "/metrics")  # served whatever the Host (above)
MISDIRECTED = 421  # a Host this server does not answer for (a DNS-rebinding page's own name)
# A request's body headers, renamed by the connection (server.py: HttpConnection) so that websockets parses a
# request with a body at all; the body is never read. None of our routes takes one.
UNREAD_BODY_PREFIX = "X-Unread-"
# Scripts must be JavaScript for module loading; fonts (the page's Noto Sans Telugu) get their font/* types.
FIXED_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".ttf": "font/ttf", ".otf": "font/otf",
               ".woff": "font/woff", ".woff2": "font/woff2"}


class WorkerHealth(msgspec.Struct, frozen=True):
    """One inference worker in `/health`: its own model copy on `device`, its own slots."""

    name: str  # "inference-0", ...
    device: str
    status: str  # "ready", "starting" (also while it restarts after a crash or a hang), or "stalled" (owes a
    # step for 1.5 s: no new sessions until it steps, or the supervisor replaces it)
    sessions_active: int
    max_sessions: int  # what it admits now: 0 until it is ready, and while it is stalled


class Health(msgspec.Struct, frozen=True):
    """Body of `GET /health`: 200 only while `status` is "ok" (ready, with a free slot), else 503.

    The server's figures are the sums over its inference workers (`workers`): `max_sessions` counts the
    ready ones', so a server one of whose workers restarts is "ok" with less room, and "starting" only while
    none is ready."""

    status: str  # "ok", "full", "starting" or "draining"
    sessions_active: int
    max_sessions: int
    model: str
    engine: str
    demo_weights: bool
    workers: list[WorkerHealth] = msgspec.field(default_factory=list)

    @property
    def http_status(self) -> int:
        return 200 if self.status == "ok" else 503


class HttpRoutes:
    def __init__(
        self,
        web_dir: Path,
        health: Callable[[], Health],
        metrics: Callable[[], str],
        websocket_refusal: Callable[[], str | None],
        access: Access | None = None,
        hosts: AllowedHosts | None = None,
    ) -> None:
        """`websocket_refusal()` says why `/ws` is not open now ("starting", "draining"), None if it is.
        `hosts`: the Host headers served; by default loopback's names alone."""
        self.web_dir = web_dir.resolve()
        self.health, self.metrics, self.websocket_refusal = health, metrics, websocket_refusal
        self.access = access or Access()
        self.hosts = hosts or AllowedHosts()

    def respond(self, request: Request, now: float = 0.0) -> Response | None:
        """`now`: Unix time, for token expiry."""
        path = request.path.split("?", 1)[0]
        method = request.method
        misdirected = self._host_refusal(request, path)
        if misdirected is not None:
            if method == "HEAD":
                misdirected.body = b""
            return misdirected
        if path in (WS_PATH, MOSHI_PATH):
            if method != "GET":
                return _response(405, b"method not allowed\n", "text/plain", allow="GET")
            if any(name.lower().startswith(UNREAD_BODY_PREFIX.lower()) for name in request.headers):
                return _response(400, b"a WebSocket handshake has no body\n", "text/plain")
            denied = self.access.check(request.path, request.headers.get("Origin"),
                                       request.headers.get("Host"), now)
            if denied is not None:
                status, why = denied
                return _response(status, f"{why}\n".encode(), "text/plain")
            try:  # `?codec=` (ours, not moshi's): refused before a slot is taken, so a client sees why
                if path == WS_PATH:
                    requested_codec(request.path)
            except ValueError as why:
                return _response(400, f"{why}\n".encode(), "text/plain")
            refusal = self.websocket_refusal()
            return None if refusal is None else _response(503, f"{refusal}\n".encode(), "text/plain")
        if method not in READ_METHODS:
            return _response(405, b"method not allowed\n", "text/plain", allow=", ".join(READ_METHODS))
        if path == "/livez":
            # Liveness, apart from readiness: this process's loop answers. 200 while starting, full or
            # draining too, so an orchestrator restarts only a server that is hung, never a busy one.
            response = _response(200, b'{"status":"alive"}', "application/json")
        elif path == "/health":
            health = self.health()
            response = _response(health.http_status, msgspec.json.encode(health), "application/json")
        elif path == "/metrics":
            response = _response(200, self.metrics().encode(), "text/plain; version=0.0.4")
        else:
            response = self._static(path)
        if method == "HEAD":
            response.body = b""  # Content-Length still says what GET would send
        return response

    def _host_refusal(self, request: Request, path: str) -> Response | None:
        """None when the request's Host may be served (module docstring)."""
        hosts = request.headers.get_all("Host")
        if len(hosts) != 1:
            return _response(400, b"a request names exactly one Host\n", "text/plain")
        if path in PROBE_PATHS or self.hosts.allows(hosts[0]):
            return None
        return _response(MISDIRECTED, b"this server does not answer for that Host (its --allowed-hosts)\n",
                         "text/plain")

    def _static(self, path: str) -> Response:
        rel = "index.html" if path in ("", "/") else path.lstrip("/")
        not_found = _response(404, b"not found\n", "text/plain")
        if "\x00" in rel:  # a raw NUL byte in the request line: no file has one (and resolve() raises)
            return not_found
        try:  # a name over 255 bytes, a loop of links, ...: the OS says no, and no such file is served
            target = (self.web_dir / rel).resolve()
            if not target.is_relative_to(self.web_dir) or not target.is_file():
                return not_found
        except (OSError, ValueError):
            return not_found
        # Types that matter to a browser are fixed here, not left to the host's mime.types.
        ctype = FIXED_TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0]
        # Fonts change only with the package they came from: a day's caching spares phones 400 kB a visit.
        cache = "public, max-age=86400" if ctype and ctype.startswith("font/") else "no-cache"
        return _response(200, target.read_bytes(), ctype or "application/octet-stream", cache=cache)


def internal_error() -> Response:
    return _response(500, b"internal error\n", "text/plain")


def _response(status: int, body: bytes, ctype: str, cache: str = "no-store", allow: str | None = None
              ) -> Response:
    headers = Headers()
    headers["Date"] = email.utils.formatdate(usegmt=True)
    headers["Connection"] = "close"  # websockets serves one request per connection
    headers["Content-Type"] = _charset(ctype)
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = cache
    if allow is not None:
        headers["Allow"] = allow
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _charset(ctype: str) -> str:
    """Text types say they are UTF-8; others are left as they are."""
    return f"{ctype}; charset=utf-8" if ctype.startswith(("text/", "application/json")) else ctype
