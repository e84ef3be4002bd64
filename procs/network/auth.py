"""Who may open a session, sans I/O: the Origin allow-list and the optional token.

A browser cannot set headers on a WebSocket, so a token travels the way a browser can send it: in the URL,
`/ws?token=...` (the page passes on the `token` of its own URL). Two kinds are accepted, either or both:

* `--auth-token TOKEN`: a shared secret, compared in constant time;
* `--auth-secret SECRET`: short-lived tokens a backend mints for each user, `v1.<expiry>.<signature>`, where
  expiry is a Unix time and the signature the hex HMAC-SHA256 of `v1.<expiry>` under the secret. A leaked URL
  stops working when its token expires. `mint_token` makes one (the backend's side, in 5 lines of any
  language).

Refusals happen in the HTTP handshake, before any slot is taken: 401 without a token, 403 with a wrong or
expired one, or from an origin that is not allowed. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

TOKEN_VERSION = "v1"
MAX_TOKEN_LIFETIME_S = 24 * 3600  # a token that claims to live longer than this is refused as minted wrong
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
EXPIRY = re.compile(r"[0-9]{1,12}")


def mint_token(secret: str, ttl_s: float, now: float) -> str:
    """A token valid until `now + ttl_s` (Unix seconds), signed with `secret`."""
    expiry = int(now + ttl_s)
    payload = f"{TOKEN_VERSION}.{expiry}"
    return f"{payload}.{_sign(secret, payload)}"


def _sign(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def query_token(path: str) -> str | None:
    """The `token` query parameter of a request path, if any."""
    values = parse_qs(urlsplit(path).query).get("token")
    return values[0] if values else None


@dataclass(frozen=True)
class Access:
    """The rules; `check` answers None (let in) or the HTTP status and body of the refusal."""

    allowed_origins: tuple[str, ...] = ()  # besides the request's own origin and localhost; "*": any
    auth_token: str | None = None
    auth_secret: str | None = None

    @property
    def needs_token(self) -> bool:
        return self.auth_token is not None or self.auth_secret is not None

    def check(self, path: str, origin: str | None, host: str | None, now: float) -> tuple[int, str] | None:
        if not self.origin_allowed(origin, host):
            return 403, "origin not allowed"
        if not self.needs_token:
            return None
        token = query_token(path)
        if token is None:
            return 401, "a token is required: /ws?token=..."
        if not self.token_valid(token, now):
            return 403, "token refused"
        return None

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """A browser always sends Origin on a WebSocket; a client without one is no browser, and what keeps
        it out is the token. The page's own origin (the host it asked for) and localhost are allowed: the
        request's `host` was checked first against the hosts this server answers for (hosts.py), without
        which a DNS-rebinding page's own name would pass as "the page's own origin"."""
        if origin is None or "*" in self.allowed_origins:
            return True
        origin = origin.rstrip("/")
        if origin in self.allowed_origins:
            return True
        match = re.fullmatch(r"https?://([^/]+)", origin)
        if match is None:  # "null" (a sandboxed frame, a file) or garbage
            return False
        origin_host = match.group(1).lower()
        if host is not None and origin_host == host.lower():
            return True
        return origin_host.rsplit(":", 1)[0] in LOCAL_HOSTS or origin_host in LOCAL_HOSTS

    def token_valid(self, token: str, now: float) -> bool:
        if self.auth_token is not None and hmac.compare_digest(token.encode(), self.auth_token.encode()):
            return True
        if self.auth_secret is None:
            return False
        parts = token.split(".")
        # At most 12 ASCII digits (a Unix time far past any token's life): str.isdigit() takes other
        # scripts' digits, and int() refuses thousands of digits, both of which a client controls.
        if len(parts) != 3 or parts[0] != TOKEN_VERSION or not EXPIRY.fullmatch(parts[1]):
            return False
        payload = f"{parts[0]}.{parts[1]}"
        if not hmac.compare_digest(parts[2].encode(), _sign(self.auth_secret, payload).encode()):
            return False
        expiry = int(parts[1])
        return now < expiry <= now + MAX_TOKEN_LIFETIME_S
