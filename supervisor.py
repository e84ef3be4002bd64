"""Supervisor: creates the shared-memory rings, spawns the network, VAD and inference processes, and
shuts them down in order.

It knows nothing of models or audio: it owns the rings (and alone unlinks them), watches its children,
and on SIGTERM/SIGINT asks the network process to say goodbye to every client first, then stops the rest.

    python supervisor.py --host 0.0.0.0 --port 8998            # demo checkpoint on the CPU
    python supervisor.py --hf-repo kyutai/moshiko-pytorch-bf16 --device cuda
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from procs.config import ServerConfig, parse_config
from procs.runtime import run_process, setup_logging
from procs.topology import OwnedTopology
from protocol.internal import NetworkReady, decode_internal

log = logging.getLogger("supervisor")

CHILDREN = ("network", "inference", "vad")  # procs/<role>/main.py, each with main(cfg, topology, status)
NETWORK_DRAIN_S = 5.0  # the network process says goodbye to every client within this
CHILD_STOP_S = 3.0


class Supervisor:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.ctx = mp.get_context("spawn")  # CUDA does not survive fork
        self.procs: dict[str, BaseProcess] = {}
        self.status: dict[str, Connection] = {}
        self.stopping = False
        self.exit_code = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("%s received, shutting down", signal.Signals(signum).name)
        self.stopping = True
        with contextlib.suppress(BlockingIOError):  # a wake-up is already pending
            os.write(self.wake_w, b"x")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        started = time.monotonic()
        with OwnedTopology(self.cfg.max_sessions) as owned:
            for name in CHILDREN:
                parent_end, child_end = self.ctx.Pipe(duplex=False)
                proc = self.ctx.Process(
                    target=run_process, args=(name, self.cfg, owned.topology, child_end), name=name
                )
                proc.start()
                child_end.close()
                self.procs[name], self.status[name] = proc, parent_end
            log.info("started %s", ", ".join(f"{n}[{p.pid}]" for n, p in self.procs.items()))
            self.watch(started)
            self.shutdown()
        log.info("supervisor exiting with %d", self.exit_code)
        return self.exit_code

    def watch(self, started: float) -> None:
        sentinels = {p.sentinel: n for n, p in self.procs.items()}
        conns = {c: n for n, c in self.status.items()}
        while not self.stopping:
            for ready in wait([self.wake_r, *sentinels, *conns]):
                if ready == self.wake_r:
                    os.read(self.wake_r, 64)
                elif ready in sentinels:
                    name = sentinels[ready]
                    log.error("%s process exited unexpectedly (code %s)", name, self.procs[name].exitcode)
                    self.exit_code, self.stopping = 1, True
                    break
                else:
                    conn = ready
                    try:
                        msg = decode_internal(conn.recv_bytes())
                    except EOFError:
                        del conns[conn]
                        continue
                    if isinstance(msg, NetworkReady):
                        url = f"http://{msg.host}:{msg.port}"
                        # Tests and scripts wait for this exact line.
                        print(f"READY {url} model={msg.model}", flush=True)
                        log.info("ready in %.1f s: open %s/ in a browser", time.monotonic() - started, url)

    def shutdown(self) -> None:
        """Network first (it tells clients `session_end` and closes with 1001), then the workers together."""
        for names, grace in ((["network"], NETWORK_DRAIN_S), (["inference", "vad"], CHILD_STOP_S)):
            procs = [self.procs[n] for n in names if n in self.procs]
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


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    setup_logging(cfg.log_level)
    return Supervisor(cfg).run()


if __name__ == "__main__":
    sys.exit(main())
