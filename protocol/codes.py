"""Stable, machine-readable error codes sent to clients in `error` messages."""

import enum


class ErrorCode(enum.StrEnum):
    """Why a frame or a session was refused. Values are part of the wire protocol: never rename.

    A `StrEnum` is a `str` and an `enum.Enum` at once, so members compare equal to their values.
    """

    # Binary frames (checked in this order).
    EMPTY_FRAME = "empty_frame"
    BAD_HEADER = "bad_header"
    BAD_LENGTH = "bad_length"
    BAD_AUDIO = "bad_audio"  # an Opus packet that does not decode to one 20 ms frame (after BAD_LENGTH)
    # Text frames (checked in this order, after EMPTY_FRAME).
    OVERSIZE = "oversize"
    BAD_UTF8 = "bad_utf8"
    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"
    # Session-level conditions raised by the server, never by the decoders.
    CAPACITY = "capacity"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
    SHUTDOWN = "shutdown"
    BAD_REQUEST = "bad_request"
    IDLE_TIMEOUT = "idle_timeout"  # no audio for --idle-timeout seconds
    TIME_LIMIT = "time_limit"  # the session reached --max-session-s
    # `/ws?resume=TOKEN` named no session this server can resume (unknown, used, expired, from another
    # server): a fresh session goes on instead, so the error is not fatal.
    RESUME_FAILED = "resume_failed"


class EndReason(enum.StrEnum):
    """Why a session ended: the `reason` of the processes' `session_close` and of the server's logs, and,
    for the endings that say goodbye (client_request, server_shutdown), of the wire's `session_end`.
    Never rename a value."""

    CLIENT_REQUEST = "client_request"  # the client sent `session_end`
    CLIENT_CLOSED = "client_closed"  # the client closed the WebSocket
    CONNECTION_LOST = "connection_lost"  # the connection died with no close frame either way
    SERVER_SHUTDOWN = "server_shutdown"  # the server is stopping (or its drain ran out)
    PROTOCOL_ERROR = "protocol_error"  # too many malformed messages (close 1008)
    CAPACITY = "capacity"  # the model ran out of memory and this session had to go (close 1013)
    IDLE_TIMEOUT = "idle_timeout"  # no audio for --idle-timeout seconds (close 1000)
    TIME_LIMIT = "time_limit"  # the session reached --max-session-s (close 1000)
    RATE_LIMITED = "rate_limited"  # audio far faster than real time, for too long (close 1008)
    INTERNAL = "internal"  # the inference process failed (close 1011)
    MESSAGE_TOO_BIG = "message_too_big"  # the WebSocket layer refused an oversized message (close 1009)
    INVALID_UTF8 = "invalid_utf8"  # the WebSocket layer refused a text frame that is not UTF-8 (close 1007)
    KEEPALIVE_TIMEOUT = "keepalive_timeout"  # the client stopped answering pings (close 1011)
    RECONNECTING = "reconnecting"  # the client abandoned a silent connection to resume (its close 4000)
