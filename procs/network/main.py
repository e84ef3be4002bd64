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
    """Carries stop signals from the signal handlers into the event loop, whenever they arrive: before the
    loop runs, while it runs, or after it closed. SIGTERM asks for a drain (live conversations finish),
    however often it comes: a service manager that signals the whole group and the supervisor that passes
    its own SIGTERM on both send one. SIGUSR1 (the supervisor's "now": a second SIGTERM to it, or SIGINT)
    stops at once."""

    def __init__(self) -> None:
        self.requests: list[bool] = []  # drain?, in the order they came
        self._loop: asyncio.AbstractEventLoop | None = None
        self._callback: Callable[[bool], None] | None = None

    def bind(self, loop: asyncio.AbstractEventLoop, callback: Callable[[bool], None]) -> None:
        self._loop, self._callback = loop, callback
        for drain in self.requests:
            loop.call_soon(callback, drain)

    def term(self) -> None:
        self._request(drain=True)

    def now(self) -> None:
        self._request(drain=False)

    def _request(self, drain: bool) -> None:
        self.requests.append(drain)
        if self._loop is not None and self._callback is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._callback, drain)


def main(cfg: ServerConfig, topo: Topology, name: str, status: Connection) -> None:
    """The network process (`name`: its place in the topology, "network")."""
    relay = StopRelay()
    setup_child(cfg.log_level, relay.term, relay.now, log_format=cfg.log_format)

    async def run() -> None:
        server = NetworkServer(cfg, topo, status)
        relay.bind(asyncio.get_running_loop(), server.request_stop)
        await server.run()

    uvloop.run(run())
