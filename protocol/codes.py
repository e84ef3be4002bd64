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


class EndReason(enum.StrEnum):
    """Why a session ended: the `reason` of the processes' `session_close` and of the server's logs, and,
    for the endings that say goodbye (client_request, server_shutdown), of the wire's `session_end`.
    Never rename a value."""

    CLIENT_REQUEST = "client_request"  # the client sent `session_end`
    CLIENT_CLOSED = "client_closed"  # the client closed the WebSocket (or the connection was lost)
    SERVER_SHUTDOWN = "server_shutdown"  # the server is stopping
    PROTOCOL_ERROR = "protocol_error"  # too many malformed messages (close 1008)
    CAPACITY = "capacity"  # the model ran out of memory and this session had to go (close 1013)
