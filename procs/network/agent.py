"""HAProxy's agent check: a TCP port where the server tells the balancer how much room it has.

HAProxy (`agent-check agent-port N` on a `server` line, see deploy/haproxy.cfg) connects every
`agent-inter`, reads one line and acts on its words. `agent_reply` decides that line, sans I/O;
`AgentServer` answers each connection with it and closes.

What the line says, and why:

* ready, with free slots: `up N%`: N is the share of slots that are free (at least 1), so HAProxy's
  weight follows the room each server has and `balance leastconn` (connections / weight) sends new
  sessions where there is most of it;
* full, starting or draining: `0% down #full` (or `#starting`, `#draining`). DOWN, not just a weight of
  0% and not `drain`: a zero weight and HAProxy's DRAIN mode both still accept clients that persistence
  (the sticky cookie) sends, and such a server would only refuse them (`capacity`, or 503 while starting
  or draining). A DOWN server's cookie is ignored, so its sticky clients are balanced to a server with
  room (and get that server's cookie). The health check on `/health` says the same; the agent adds the
  weight, and would be enough on its own.

Every line says `up` or `down` explicitly: HAProxy keeps an agent's `down` until an agent says `up`. The
line never says `ready`, `drain` or `maint`: those set HAProxy's administrative state, which belongs to
the operator (`set server voice/gpu1 state drain` on the runtime API); a `ready` every 200 ms would undo
an operator's drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from enum import StrEnum

from procs.network.http import Health

log = logging.getLogger("network.agent")

CLOSE_TIMEOUT_S = 1.0  # a checker that does not take its few bytes is not waited for longer than this


class ServerState(StrEnum):
    """What the server can do now, as far as new sessions go (its slots say whether it has room)."""

    STARTING = "starting"  # the workers are not ready yet
    READY = "ready"
    DRAINING = "draining"  # SIGTERM: live sessions finish, no new ones


def agent_reply(state: ServerState, sessions_active: int, max_sessions: int) -> str:
    """HAProxy's agent-check reply (one line, newline included) for a server in `state` holding
    `sessions_active` of `max_sessions` sessions."""
    free = max_sessions - sessions_active
    if state is not ServerState.READY:
        return f"0% down #{state.value}\n"
    if free <= 0:
        return "0% down #full\n"
    # Rounded up: one free slot of many is still room (1%, not 0%, which HAProxy reads as no weight).
    percent = -(-100 * free // max_sessions)
    return f"up {percent}%\n"


def health_reply(health: Health) -> str:
    """The agent's reply for the server whose `/health` says `health` ("ok" and "full" are both READY:
    the slots tell the room), so the agent and the health check never disagree."""
    state = ServerState.READY if health.status in ("ok", "full") else ServerState(health.status)
    return agent_reply(state, health.sessions_active, health.max_sessions)


class AgentServer:
    """Answers every TCP connection with `reply()` and closes it. It reads nothing: HAProxy sends nothing
    unless `agent-send` is configured, and anything sent is ignored."""

    def __init__(self, host: str, port: int, reply: Callable[[], str]) -> None:
        """`port` 0: a free one, in `.port` once started."""
        self.host, self.port, self.reply = host, port, reply
        self.server: asyncio.Server | None = None
        self.last_reply = ""
        self.connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._answer, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("agent check listening on %s:%d (HAProxy: `agent-check agent-port %d`)", self.host,
                 self.port, self.port)

    async def _answer(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        peer = _peer(writer)
        try:
            line = self.reply()
            if line != self.last_reply:  # HAProxy asks every 200 ms: log changes, not every answer
                log.info("agent check: now answering %r (was %r), to %s", line.strip(),
                         self.last_reply.strip(), peer)
                self.last_reply = line
            writer.write(line.encode())
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT_S)
        except (OSError, TimeoutError) as e:  # the checker went away, or did not read: its next try will
            log.debug("agent check to %s: %r", peer, e)
            writer.transport.abort()
        except Exception:
            log.exception("agent check to %s failed", peer)
            writer.transport.abort()
        finally:
            self.connections.discard(task)

    async def close(self) -> None:
        """Stop listening; an answer under way is finished (it takes at most CLOSE_TIMEOUT_S)."""
        if self.server is None:
            return
        self.server.close()
        await self.server.wait_closed()
        if self.connections:
            await asyncio.wait(self.connections, timeout=2 * CLOSE_TIMEOUT_S)
        for task in self.connections:
            task.cancel()
        log.info("agent check on port %d closed (last answer %r)", self.port, self.last_reply.strip())
        self.server = None


def _peer(writer: asyncio.StreamWriter) -> object:
    """The checker's address, read once: under uvloop a transport its peer has already reset raises
    AttributeError from get_extra_info instead of returning a default."""
    try:
        return writer.get_extra_info("peername")
    except AttributeError:
        return None
