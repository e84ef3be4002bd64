"""Network process entry point: start the asyncio (uvloop) server and stop it on SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from multiprocessing.connection import Connection

import uvloop

from procs.config import ServerConfig
from procs.network.server import NetworkServer
from procs.runtime import setup_child
from procs.topology import Topology


class StopRelay:
    """Carries SIGTERM from the signal handler into the event loop, whenever it arrives: before the loop
    runs, while it runs, or after it closed (a second signal during exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback: Callable[[], None] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop, self._callback = loop, callback
        if self.requested:
            loop.call_soon(callback)

    def __call__(self) -> None:
        self.requested = True
        if self._loop is not None and self._callback is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._callback)


def main(cfg: ServerConfig, topo: Topology, status: Connection) -> None:
    relay = StopRelay()
    setup_child(cfg.log_level, relay)

    async def run() -> None:
        server = NetworkServer(cfg, topo, status)
        relay.bind(asyncio.get_running_loop(), server.stop)
        await server.run()

    uvloop.run(run())
