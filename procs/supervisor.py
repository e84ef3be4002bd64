"""Supervisor: creates the shared-memory rings, spawns the network, VAD and inference processes, keeps them
alive, and shuts them down in order. The children are the topology's table of places (procs/topology.py):
the network, one inference process per device (`--devices`, `--inference-workers`), the VAD.

It knows nothing of models: it owns the rings and the heartbeat board (and alone unlinks them), watches its
children, and restarts one that dies or hangs:

* a child hangs when its heartbeat (its word on the board, written from its loop at least every half
  second once it is ready) is older than HEARTBEAT_TIMEOUT_S: it is killed and treated as crashed;
* the VAD is optional to a conversation: it is restarted and sessions go on (speech events resume);
* an inference process ends the sessions it held (the network tells them: `error` internal, close 1011)
  and is restarted; the other inference processes and their sessions go on; `/health` shows it `starting`
  until it is ready again (and says `starting` itself while no inference process is ready);
* the network process is restarted (clients reconnect by their back-off; the workers forget its sessions);
* MAX_CRASHES within CRASH_WINDOW_S stop everything with exit status 1.

Signals: the first SIGTERM drains (no new sessions; live ones go on until they end or `--drain-timeout`,
then `session_end` and close 1001), as Kubernetes and a load balancer expect; a second SIGTERM, or SIGINT,
stops at once (every client gets `session_end` and 1001 within seconds). Exit status 0 unless a child
failed to stop or crashed too often.

    voice-agent serve --host 0.0.0.0 --port 8998               # demo checkpoint on the CPU
    voice-agent serve --hf-repo kyutai/moshiko-pytorch-bf16 --device cuda
    python supervisor.py ...                                   # the same, from a checkout (the launch script)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from procs.config import ServerConfig, parse_config
from procs.fdlimit import FDS_PER_SESSION, RESERVE_FDS, open_fds, raise_soft_limit
from procs.runtime import run_process, setup_logging
from procs.topology import HEARTBEAT_TIMEOUT_S, OwnedTopology, Place, descriptors
from protocol.internal import NetworkReady, WorkerDown, decode_internal

EXIT_USAGE = 2  # what was asked for cannot be served here (as for a bad flag)
log = logging.getLogger("supervisor")

CHECK_EVERY_S = 0.5
MAX_CRASHES = 5
CRASH_WINDOW_S = 60.0
NETWORK_STOP_S = 10.0  # stopping at once: goodbyes (2 s, then aborts), handshakes in flight (5 s at most)
CHILD_STOP_S = 3.0


@dataclass
class Child:
    place: Place
    proc: BaseProcess
    status: Connection
    started: float = field(default_factory=time.monotonic)
    down: bool = False  # died or hung while the server stops: told to the network, not restarted

    @property
    def label(self) -> str:
        """How the log names it: `inference[1234]`, as `ps` would."""
        return f"{self.place.role}[{self.proc.pid}]"

    @property
    def where(self) -> str:
        """Which of its role's places it holds, for the log; empty for a role of one process."""
        place = self.place
        if place.role != "inference":
            return ""
        return f" ({place.name} on {place.device}, session slots {place.slots.start}-{place.slots.stop - 1})"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


class Supervisor:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")  # CUDA does not survive fork
        self.children: dict[str, Child] = {}
        self.signals: list[int] = []
        self.exit_code = 0
        self.crashes: deque[float] = deque()
        self.started = time.monotonic()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    # ---- signals --------------------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self.wake_w, b"x")

    @property
    def stopping(self) -> bool:
        return bool(self.signals)

    @property
    def stop_now(self) -> bool:
        """A second SIGTERM, or any SIGINT."""
        return signal.SIGINT in self.signals or self.signals.count(signal.SIGTERM) > 1

    # ---- children -------------------------------------------------------------------------------------
    def spawn(self, place: Place) -> None:
        parent_end, child_end = self.ctx.Pipe(duplex=False)
        # Its records' process name: the role, or the place where a role has several (`inference-1`).
        several = sum(p.role == place.role for p in self.owned.topology.places) > 1
        proc = self.ctx.Process(target=run_process,
                                args=(place.role, self.cfg, self.owned.topology, place.name, child_end),
                                name=place.name if several else place.role)
        proc.start()
        child_end.close()
        self.owned.board.set(place.beat, 0)  # no heartbeat until it is ready
        self.children[place.name] = Child(place, proc, parent_end)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        # Before the rings and the children (they inherit the limit): the supervisor and the network process
        # each map every ring, and the network process holds a socket per session besides.
        limit = raise_soft_limit()
        devices = self.cfg.worker_devices()
        sessions = len(devices) * self.cfg.max_sessions
        need = open_fds() + descriptors(sessions, len(devices) + 2) + sessions * FDS_PER_SESSION + RESERVE_FDS
        if need > limit:
            log.error("the open-files limit (%d, after raising the soft limit to the hard one) is below "
                      "the %d that --max-sessions %d needs (on %d inference workers): raise it (ulimit -n, "
                      "systemd's LimitNOFILE, the container runtime's nofile) or lower --max-sessions", limit,
                      need, self.cfg.max_sessions, len(devices))
            return EXIT_USAGE
        with OwnedTopology(devices, self.cfg.max_sessions) as owned:
            self.owned = owned
            self.to_network = owned.control_to_network(log)
            for place in owned.topology.places:
                self.spawn(place)
            log.info("started %s", ", ".join(c.label + c.where for c in self.children.values()))
            self.watch()
            self.shutdown()
        log.info("supervisor exiting with %d", self.exit_code)
        return self.exit_code

    def watch(self) -> None:
        """Until a stop is asked for: readiness reports, children that exit or hang, the resource tracker."""
        next_check = time.monotonic() + CHECK_EVERY_S
        while not self.stopping:
            sentinels = {c.proc.sentinel: c for c in self.children.values()}
            statuses = {c.status: c for c in self.children.values() if not c.status.closed}
            timeout = max(0.0, next_check - time.monotonic())
            for ready in wait([self.wake_r, *sentinels, *statuses], timeout):
                if ready == self.wake_r:
                    os.read(self.wake_r, 64)
                elif ready in sentinels:
                    child = sentinels[ready]
                    child.proc.join(1.0)  # reap it, so its exit status is known
                    self.failed(child, describe_exit(child.proc.exitcode))
                elif ready in statuses:
                    self.on_status(statuses[ready])
                if self.stopping or self.exit_code:
                    return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_EVERY_S
                self.check_heartbeats()
                self.check_resource_tracker()
                if self.exit_code:
                    return

    def on_status(self, child: Child) -> None:
        try:
            msg = decode_internal(child.status.recv_bytes())
        except (EOFError, OSError):
            child.status.close()
            return
        if isinstance(msg, NetworkReady):
            # A restarted network process listens where the first one did (`--port 0` picked it once), and
            # so does its agent check: HAProxy keeps asking the port it was told.
            self.cfg = dataclasses.replace(self.cfg, port=msg.port, agent_port=msg.agent_port)
            scheme = "http" if self.cfg.ssl_cert is None else "https"
            url = f"{scheme}://{msg.host}:{msg.port}"
            agent = "" if msg.agent_port is None else f" agent={msg.agent_port}"
            print(f"READY {url} model={msg.model}{agent}", flush=True)  # tests and scripts wait for this line
            log.info("ready in %.1f s: open %s/ in a browser", time.monotonic() - self.started, url)

    def check_heartbeats(self) -> None:
        now = time.monotonic_ns()
        for child in list(self.children.values()):
            if child.down:
                continue
            beat = self.owned.board.get(child.place.beat)
            if beat and now - beat > HEARTBEAT_TIMEOUT_S * 1e9:
                silent = (now - beat) / 1e9
                log.error("%s stopped answering (no heartbeat for %.1f s): killing it%s", child.label, silent,
                          child.where)
                child.proc.kill()
                child.proc.join(5.0)
                self.failed(child, f"hung (no heartbeat for {silent:.1f} s)")

    def check_resource_tracker(self) -> None:
        """The resource tracker unlinks our segments if this process is killed outright; if it died, it is
        started again and told about them."""
        tracker = resource_tracker._resource_tracker
        pid = getattr(tracker, "_pid", None)
        if pid is None:
            return
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if not done:
            return
        log.error("the resource tracker [%d] died: starting a new one and registering %d segments with it",
                  pid, len(self.owned.segment_names()))
        tracker.ensure_running()  # sees the old one gone and starts another
        for name in self.owned.segment_names():
            resource_tracker.register("/" + name, "shared_memory")

    def failed(self, child: Child, how: str) -> None:
        """A child died or hung: restart it, unless this is a crash loop or the server is stopping (then
        a worker's sessions are still ended: the drain goes on for the others)."""
        name = child.place.name
        if self.stopping or self.exit_code:  # a signal, or a crash loop: nothing is restarted
            if not child.down:
                child.down = True
                log.error("%s %s while stopping%s", child.label, how, child.where)
                if child.place.role != "network":
                    self.to_network.send(WorkerDown(worker=name, why=how))
            return
        log.error("%s %s after %.1f s%s", child.label, how, time.monotonic() - child.started, child.where)
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - CRASH_WINDOW_S:
            self.crashes.popleft()
        if len(self.crashes) >= MAX_CRASHES:
            log.error("%d crashes within %.0f s: stopping", len(self.crashes), CRASH_WINDOW_S)
            self.exit_code = 1
            return
        child.status.close()
        if child.place.role != "network":
            self.to_network.send(WorkerDown(worker=name, why=how))
        self.spawn(child.place)
        log.info("restarted %s as [%d]%s", child.place.role, self.children[name].proc.pid, child.where)

    # ---- stopping -------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The network first (it drains, or says goodbye at once), then the workers together."""
        network = self.children["network"].proc
        now_asked = self.stop_now or bool(self.exit_code)
        if network.is_alive():
            if now_asked:
                os.kill(network.pid, signal.SIGUSR1)
            else:
                log.info("draining: sessions may go on for up to %.0f s (SIGTERM again or SIGINT: stop now)",
                         self.cfg.drain_timeout_s)
                network.terminate()
        os.set_blocking(self.wake_r, False)
        allowed = NETWORK_STOP_S if now_asked else self.cfg.drain_timeout_s + NETWORK_STOP_S
        deadline = time.monotonic() + allowed
        next_check = time.monotonic() + CHECK_EVERY_S
        while network.is_alive() and time.monotonic() < deadline:
            # The workers are still watched while the network drains: one that dies or hangs now has its
            # sessions ended (`internal`) rather than left silent until the drain is over.
            workers = {c.proc.sentinel: c for c in self.children.values()
                       if c.place.role != "network" and not c.down}
            until = min(deadline, next_check)
            for ready in wait([network.sentinel, self.wake_r, *workers], max(0.0, until - time.monotonic())):
                if ready in workers:
                    child = workers[ready]
                    child.proc.join(1.0)
                    self.failed(child, describe_exit(child.proc.exitcode))
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_EVERY_S
                self.check_heartbeats()
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 64)
            if self.stop_now and not now_asked and network.is_alive():
                log.info("stopping at once")
                os.kill(network.pid, signal.SIGUSR1)
                now_asked = True
                deadline = min(deadline, time.monotonic() + NETWORK_STOP_S)
        self.stop([network], grace=1.0)
        self.stop([c.proc for c in self.children.values() if c.place.role != "network"], CHILD_STOP_S)

    def stop(self, procs: list[BaseProcess], grace: float) -> None:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("%s did not stop within %.0f s, killing it", proc.name, grace)
                proc.kill()
                proc.join()
                self.exit_code = self.exit_code or 1


def serve(cfg: ServerConfig) -> int:
    """Run the server with a checked configuration until it is stopped; the exit status."""
    setup_logging(cfg.log_level, cfg.log_format)
    return Supervisor(cfg).run()


def main(argv: list[str] | None = None) -> int:
    return serve(parse_config(argv))


if __name__ == "__main__":
    sys.exit(main())
