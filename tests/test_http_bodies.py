"""Requests with a body, on the real server: answered like any other request, never dropped unanswered.

websockets' parser refuses a request it would have to read a body of, and drops the connection without a
word; the network process's connection (procs/network/server.py: HttpConnection) lets such a request
through to the routes, which serve no body: 405 for a method they do not serve, 400 for a WebSocket
handshake, and what GET would answer otherwise."""

from __future__ import annotations

import socket

import pytest

from tests.support.launcher import ServerProcess

HANDSHAKE = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n")


def status_line(server: ServerProcess, request: bytes) -> bytes:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n" not in reply and (chunk := sock.recv(4096)):
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello", b"405"),
    (b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     b"405"),
    (b"PUT /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length: 7\r\n\r\n{\"a\":1}", b"405"),
    (b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 65536\r\n\r\n" + b"x" * 65536, b"405"),
    (b"GET /ws HTTP/1.1\r\nHost: localhost\r\n" + HANDSHAKE + b"Content-Length: 3\r\n\r\nabc", b"400"),
    # Some devices announce an empty body on a handshake; websockets takes it, and so do we.
    (b"GET /ws HTTP/1.1\r\nHost: localhost\r\n" + HANDSHAKE + b"Content-Length: 0\r\n\r\n", b"101"),
    (b"GET /health HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabc", b"200"),
])
def test_a_request_with_a_body_gets_an_answer(loopback_server: ServerProcess, request_bytes: bytes,
                                              status: bytes) -> None:
    assert status_line(loopback_server, request_bytes).split(b" ")[1] == status
    # ...and the server goes on answering the next one
    livez = b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert status_line(loopback_server, livez) == b"HTTP/1.1 200 OK"
