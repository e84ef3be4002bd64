"""Resume tokens: which session a `/ws?resume=TOKEN` may re-attach, sans I/O.

A token is URL-safe base64 of 32 random-looking bytes: this server's id (8 bytes, drawn when the network
process starts), the token's id (8 random bytes, how it is found) and its secret (16 random bytes,
compared with `hmac.compare_digest`, so the time a comparison takes says nothing of how much matched). It
is bound to one session of one server: a token of another server, or of a network process that restarted,
names nothing here. Tokens are never logged (`TokenBook` logs nothing; the server logs only the refusal's
reason).

Each token is good for one resume: `redeem` hands its session back, and the resumed session is issued a
new one. The redeemed token stays good (pending) until the new connection `confirm`s that the client has
the new one, with its first message: a link that drops again before the client ever saw its new token
would otherwise leave the client with a spent one and strand its session for the whole window. A spent
token, and the token of a session that has ended, is remembered (the newest `remember` of them) so its
refusal can say why ("used", "expired") for the metrics and the client's `error`; anything else is
"unknown".

    issue(key) ─▶ live ─ redeem ─▶ pending ─ confirm (the client spoke on the new link) ─▶ used
                   │                  └─ redeem again (that link died first): pending, the same session
                   └─ (live or pending) ─ retire ─▶ expired   (the session ended: close, window, drain)
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar
from urllib.parse import parse_qs, urlsplit

from protocol import MAX_RESUME_TOKEN_CHARS

K = TypeVar("K")

SERVER_ID_BYTES, TOKEN_ID_BYTES, SECRET_BYTES = 8, 8, 16
TOKEN_BYTES = SERVER_ID_BYTES + TOKEN_ID_BYTES + SECRET_BYTES


class ResumeRefusal(enum.StrEnum):
    """Why a resume token was refused: the label of `voice_resume_failures_total` and the client's error."""

    MALFORMED = "malformed"  # not a token at all
    FOREIGN = "foreign"  # a token of another server (or of this server's network process before a restart)
    UNKNOWN = "unknown"  # no session of ours has it (or its secret does not match)
    USED = "used"  # spent by a resume already
    EXPIRED = "expired"  # its session has ended


REFUSAL_MESSAGES: Mapping[ResumeRefusal, str] = MappingProxyType({
    ResumeRefusal.MALFORMED: "the resume token is malformed",
    ResumeRefusal.FOREIGN: "the resume token is not from this server (or it restarted)",
    ResumeRefusal.UNKNOWN: "no session has this resume token",
    ResumeRefusal.USED: "the resume token was used already",
    ResumeRefusal.EXPIRED: "the session of this resume token has ended",
})


@dataclass(frozen=True, slots=True)
class _Issued(Generic[K]):
    secret: bytes
    key: K


class TokenBook(Generic[K]):
    """The live token of every resumable session (by its key, the server's `(slot, gen)`), and a memory of
    spent and retired ones."""

    def __init__(self, server_id: bytes | None = None, remember: int = 4096) -> None:
        self.server_id = server_id if server_id is not None else secrets.token_bytes(SERVER_ID_BYTES)
        assert len(self.server_id) == SERVER_ID_BYTES
        self._live: dict[bytes, _Issued[K]] = {}  # token id -> its secret and session (live or pending)
        self._id_of: dict[K, bytes] = {}  # session -> its newest token's id
        self._pending: dict[K, bytes] = {}  # session -> the token it was resumed with, until confirmed
        self._past: OrderedDict[bytes, tuple[bytes, ResumeRefusal]] = OrderedDict()
        self._remember = remember

    def issue(self, key: K) -> str:
        """A new token for session `key`; the one it had is spent, unless it is the one pending."""
        if (old := self._id_of.pop(key, None)) is not None and old != self._pending.get(key):
            self._forget(old, ResumeRefusal.USED)
        token_id = secrets.token_bytes(TOKEN_ID_BYTES)
        while token_id in self._live or token_id in self._past:  # 2^-64 a draw; cheap to rule out
            token_id = secrets.token_bytes(TOKEN_ID_BYTES)
        secret = secrets.token_bytes(SECRET_BYTES)
        self._live[token_id] = _Issued(secret, key)
        self._id_of[key] = token_id
        return base64.urlsafe_b64encode(self.server_id + token_id + secret).decode().rstrip("=")

    def redeem(self, token: str) -> K | ResumeRefusal:
        """The session `token` names, its token spent; or why it names none."""
        raw = _decode(token)
        if raw is None:
            return ResumeRefusal.MALFORMED
        server_id, token_id, secret = (raw[:SERVER_ID_BYTES], raw[SERVER_ID_BYTES:-SECRET_BYTES],
                                       raw[-SECRET_BYTES:])
        if not hmac.compare_digest(server_id, self.server_id):
            return ResumeRefusal.FOREIGN
        issued = self._live.get(token_id)
        if issued is not None:
            if not hmac.compare_digest(secret, issued.secret):
                return ResumeRefusal.UNKNOWN
            if (before := self._pending.get(issued.key)) is not None and before != token_id:
                self._forget(before, ResumeRefusal.USED)  # the client had a newer token: this one is old news
            self._pending[issued.key] = token_id
            return issued.key
        past = self._past.get(token_id)
        if past is not None and hmac.compare_digest(secret, past[0]):
            return past[1]
        return ResumeRefusal.UNKNOWN

    def confirm(self, key: K) -> None:
        """The client of resumed session `key` spoke on its new connection: it has the new token, and the
        one it resumed with is spent."""
        if (token_id := self._pending.pop(key, None)) is not None and token_id != self._id_of.get(key):
            self._forget(token_id, ResumeRefusal.USED)

    def retire(self, key: K) -> None:
        """Session `key` ended: its tokens name nothing from now on ("expired")."""
        for token_id in {self._id_of.pop(key, None), self._pending.pop(key, None)} - {None}:
            assert token_id is not None
            self._forget(token_id, ResumeRefusal.EXPIRED)

    def __len__(self) -> int:
        """Tokens that resume a session now (one per resumable session, two while a resume is pending)."""
        return len(self._live)

    def _forget(self, token_id: bytes, why: ResumeRefusal) -> None:
        """The token names nothing from now on; `why`, to anyone who presents it."""
        issued = self._live.pop(token_id)
        self._past[token_id] = (issued.secret, why)
        while len(self._past) > self._remember:
            self._past.popitem(last=False)


def requested_resume(path: str) -> str | None:
    """The token a `/ws` request path asks to resume with (`?resume=`), None if it asks for no resume; given
    more than once, "" (malformed: a fresh session, and `resume_failed`)."""
    values = parse_qs(urlsplit(path).query, keep_blank_values=True).get("resume")
    if values is None:
        return None
    return values[0] if len(values) == 1 else ""


def _decode(token: str) -> bytes | None:
    """The token's bytes, or None if it is not URL-safe base64 of exactly TOKEN_BYTES bytes."""
    if not token or len(token) > MAX_RESUME_TOKEN_CHARS or not token.isascii():
        return None
    if any(not (c.isalnum() or c in "-_") for c in token):  # what urlsafe_b64decode would silently skip
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != TOKEN_BYTES:
        return None
    # Only the one spelling `issue` gives: the last character's spare bits would let other strings decode to
    # the same bytes, so a mutated token would still work.
    return raw if base64.urlsafe_b64encode(raw).decode().rstrip("=") == token else None
