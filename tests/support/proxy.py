"""A TCP proxy whose link can be cut: the network between a client and the server, failing.

`TcpProxy(host, port)` listens on 127.0.0.1 (its `port`) and forwards every connection to the target, bytes
as they come, both ways. `cut()` is the network going: every connection it carries is reset on both sides at
once (SO_LINGER 0: an RST, no FIN, and never a WebSocket close frame), and new connections are reset as soon
as they are accepted, until `restore()`. It runs its own event loop in a thread, so a synchronous test (a
browser's) and an asyncio one (whose loop it must not share: a cut must not wait on the test) use it alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with an RST: what a peer sees when the path dies and a middlebox gives up."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.down = False
        self.accepted = 0  # connections taken while the link was up
        self.refused = 0  # connections reset because the link was down
        self.cut_at: float | None = None  # time.monotonic() of the last cut and restore
        self.restored_at: float | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def url(self, scheme: str = "ws", path: str = "/ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.down:
            self.refused += 1
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)
            return
        if self.down:  # cut while connecting
            _reset(client_w)
            _reset(server_w)
            return
        self.accepted += 1
        pair = (client_w, server_w)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                if not w.transport.is_closing():
                    w.close()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
            if not dst.transport.is_closing() and dst.can_write_eof():
                dst.write_eof()  # a half-close passes through as one

    async def _cut(self) -> int:
        self.down = True
        pairs = list(self._pairs)
        for pair in pairs:
            for w in pair:
                _reset(w)
        return len(pairs)

    async def _restore(self) -> None:
        self.down = False

    def cut(self) -> int:
        """The network goes: every live connection is reset (both sides), new ones too; how many were."""
        self.cut_at = time.monotonic()
        return self._call(self._cut())

    def restore(self) -> None:
        """The network comes back: new connections go through again."""
        self._call(self._restore())
        self.restored_at = time.monotonic()

    @property
    def live(self) -> int:
        """Connections carried now."""
        return len(self._pairs)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._cut()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
