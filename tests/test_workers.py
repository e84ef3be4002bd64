"""Several inference workers in one server: `--inference-workers 2` on the CPU, as `--devices cuda:0,cuda:1`
is on a GPU pod. The real supervisor, two inference processes each loading the demo checkpoint into its own
model copy, their own rings and slot ranges, real WebSockets on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import urllib.request

import numpy as np
import pytest

from procs.client import ClientRun, stream_client
from procs.inference.clock import StepScheduler
from procs.inference.main import InferenceSlot, QueuedBlock, SlotSnapshot
from procs.model.engine import LoopbackEngine
from procs.network.slots import SessionSlots
from procs.network.workers import STALL_NS, InferenceWorkers
from procs.runtime import process_name
from procs.topology import OwnedTopology
from protocol import FRAMES_PER_BLOCK, IN_FRAME_SAMPLES, OUT_SAMPLES_PER_BLOCK, Error, ErrorCode, SessionStart
from protocol.internal import InferenceReady
from tests.support.launcher import ServerProcess, child_pids, comm, poll_until
from tests.support.speech import telugu_speech_for

WORKERS = ("--inference-workers", "2", "--max-sessions", "2")
BOUND_S = 60.0  # every wait here is for a condition, bounded by this (two demo models on two shared cores)


@pytest.fixture(scope="module")
def two_workers(demo_checkpoint: str):
    with ServerProcess(*WORKERS, ready_timeout=240.0) as server:
        yield server


def inference_pids(server: ServerProcess) -> list[int]:
    return [pid for pid in child_pids(server.proc.pid) if comm(pid) == process_name("inference")]


def workers_of(server: ServerProcess) -> dict[str, dict]:
    return {w["name"]: w for w in server.health()[1]["workers"]}


def all_ready(server: ServerProcess) -> bool:
    return all(w["status"] == "ready" for w in workers_of(server).values())


def metric_samples(server: ServerProcess, name: str) -> dict[str, float]:
    """`{worker: value}` of one per-worker series of /metrics."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}\{{worker="([^"]+)"\}} (\S+)$', text, re.M)}


def test_each_worker_reports_its_slots_in_health_and_metrics_and_the_server_their_sum(two_workers) -> None:
    status, body = two_workers.health()
    assert status == 200 and body["status"] == "ok"
    assert body["max_sessions"] == 4 and body["sessions_active"] == 0
    assert [(w["name"], w["device"], w["status"], w["max_sessions"]) for w in body["workers"]] == [
        ("inference-0", "cpu", "ready", 2), ("inference-1", "cpu", "ready", 2)]
    assert metric_samples(two_workers, "voice_worker_up") == {"inference-0": 1.0, "inference-1": 1.0}
    both = {"inference-0": 2.0, "inference-1": 2.0}
    assert metric_samples(two_workers, "voice_worker_sessions_max") == both
    assert len(inference_pids(two_workers)) == 2  # a process, and a model copy, per worker


def test_sessions_spread_over_the_workers_and_a_killed_worker_costs_only_its_own(two_workers) -> None:
    server = two_workers

    async def scenario() -> tuple[list[ClientRun], dict[str, dict], Error | None, float]:
        started = [asyncio.Event() for _ in range(4)]
        clients = []
        for i in range(4):  # one at a time, so each admission sees the ones before it
            clients.append(asyncio.create_task(stream_client(
                server.ws_url, telugu_speech_for(12), first_audio=started[i], tail_s=3.0)))
            await asyncio.wait_for(started[i].wait(), BOUND_S)
        spread = workers_of(server)
        # A fifth finds every slot of both workers taken.
        refused = await stream_client(server.ws_url, telugu_speech_for(1), tail_s=0.0)
        victim = inference_pids(server)[0]
        killed_at = asyncio.get_running_loop().time()
        os.kill(victim, signal.SIGKILL)
        runs = await asyncio.wait_for(asyncio.gather(*clients), 4 * BOUND_S)
        capacity = next(iter(refused.of_type(Error)), None)
        return runs, spread, capacity, killed_at

    runs, spread, capacity, killed_at = asyncio.run(scenario())
    assert {name: w["sessions_active"] for name, w in spread.items()} == {"inference-0": 2, "inference-1": 2}
    assert capacity is not None and capacity.code == ErrorCode.CAPACITY
    failed = [r for r in runs if r.close_code == 1011]
    survived = [r for r in runs if r.close_code == 1000]
    assert len(failed) == 2 and len(survived) == 2, [r.close_code for r in runs]
    for run in failed:
        assert run.of_type(Error)[-1].code == ErrorCode.INTERNAL
    for run in survived:
        assert not run.of_type(Error)
        assert any(t > killed_at + 1.0 for t, _ in run.frames), "no model audio after the other worker died"
    assert re.search(r"inference\[\d+\] killed by SIGKILL after [\d.]+ s \(inference-[01] on cpu",
                     server.log())

    # The worker comes back with a new model copy; the server admits into its slots again.
    assert poll_until(lambda: all_ready(server), BOUND_S) is not None
    assert len(inference_pids(server)) == 2
    after = asyncio.run(stream_client(server.ws_url, telugu_speech_for(1), tail_s=3.0))
    assert isinstance(after.session_start, SessionStart) and after.frames and not after.of_type(Error)


def test_while_a_worker_restarts_the_server_admits_into_the_other(two_workers) -> None:
    server = two_workers
    assert poll_until(lambda: all_ready(server), BOUND_S) is not None
    os.kill(inference_pids(server)[0], signal.SIGKILL)
    # Its replacement loads a model (seconds): meanwhile the server is up with the other worker's room.
    one_restarting = ["ready", "starting"]
    assert poll_until(lambda: sorted(w["status"] for w in workers_of(server).values()) == one_restarting,
                      BOUND_S) is not None
    status, body = server.health()
    assert status == 200 and body["max_sessions"] == 2
    run = asyncio.run(stream_client(server.ws_url, telugu_speech_for(1), tail_s=3.0))
    assert isinstance(run.session_start, SessionStart) and run.frames and not run.of_type(Error)
    assert poll_until(lambda: all_ready(server), BOUND_S) is not None


# ---- the rules under it, sans I/O -------------------------------------------------------------------------


def test_a_new_session_goes_to_the_ready_worker_with_the_most_free_slots() -> None:
    with OwnedTopology(("cpu", "cpu"), 2) as owned:
        topo = owned.topology
        assert [(p.name, p.slots) for p in topo.inference] == [("inference-0", range(2)),
                                                                ("inference-1", range(2, 4))]
        assert topo.owner(3).name == "inference-1" and topo.max_sessions == 4
        workers = InferenceWorkers(topo.inference, last_beat=lambda place: 0)
        slots: SessionSlots[int] = SessionSlots(topo.max_sessions)

        def admit() -> int | None:
            worker = workers.choose(slots.count, now_ns=0)
            if worker is None:
                return None
            return slots.admit(workers.room(worker, 0), lambda slot, gen: slot, within=worker.place.slots)

        assert admit() is None and workers.free(slots.count, 0) == 0  # none ready yet
        workers.get("inference-1").ready = InferenceReady(model="m", demo_weights=True, max_sessions=2,
                                                          device="cpu")
        assert admit() == 2 and workers.free(slots.count, 0) == 1  # the one that is ready
        workers.get("inference-0").ready = InferenceReady(model="m", demo_weights=True, max_sessions=1,
                                                          device="cpu")  # its memory held one session
        assert [admit(), admit(), admit()] == [0, 3, None]  # most free first; then both are full
        assert slots.release(2, 1) and admit() == 2


def test_a_worker_whose_heartbeat_is_old_is_stalled_and_gets_no_new_session() -> None:
    with OwnedTopology(("cpu", "cpu"), 2) as owned:
        beats = {"inference-0": 0, "inference-1": 0}
        workers = InferenceWorkers(owned.topology.inference, last_beat=lambda place: beats[place.name])
        first, second = workers
        assert workers.status(first, 10 * STALL_NS) == "starting"  # not ready: neither stalled nor room
        for worker in workers:
            worker.ready = InferenceReady(model="m", demo_weights=True, max_sessions=2, device="cpu")
        assert workers.status(first, 10 * STALL_NS) == "ready"  # no beat yet: its loop has not begun
        beats.update({"inference-0": 1, "inference-1": 1})
        t = 1 + STALL_NS
        assert workers.status(second, t) == "ready" and workers.status(second, t + 1) == "stalled"
        beats["inference-0"] = t  # the other one beat meanwhile
        assert workers.free(lambda slots: 0, t + 1) == 2 and workers.choose(lambda slots: 0, t + 1) is first
        assert workers.free(lambda slots: 1 if 2 in slots else 0, t + 1) == 2  # a stalled worker's sessions
        beats["inference-1"] = t + 1  # it beats again: room again
        assert workers.status(second, t + 2) == "ready" and workers.free(lambda slots: 0, t + 2) == 4


def test_an_inference_slot_opens_closes_and_says_what_it_holds() -> None:
    engine = LoopbackEngine(2)
    scheduler = StepScheduler[QueuedBlock](2)
    slot = InferenceSlot(1, 5, engine, scheduler)
    empty = SlotSnapshot(slot=5, is_open=False, opened_ns=0, out_seq=0, dropped=0, realigned=0, skipped=0,
                         audio_t_ms=0.0, block_fill=0)
    assert slot.snapshot() == empty
    slot.open(1000)
    frame = np.zeros(IN_FRAME_SAMPLES, dtype=np.int16)
    blocks = [slot.push(frame, t) for t in range(FRAMES_PER_BLOCK + 1)]
    assert all(b is None for b in blocks[:FRAMES_PER_BLOCK - 1]) and blocks[FRAMES_PER_BLOCK] is None
    block = blocks[FRAMES_PER_BLOCK - 1]
    assert block is not None and block.pcm.shape == (OUT_SAMPLES_PER_BLOCK,) and block.t_in_ns == 3
    slot.dropped, slot.out_seq, slot.audio_t_ms = 4, 8, 160.0
    held = slot.snapshot()
    assert held.is_open and held.opened_ns == 1000
    assert held.block_fill == OUT_SAMPLES_PER_BLOCK // FRAMES_PER_BLOCK  # the fifth frame's
    assert (held.dropped, held.out_seq, held.audio_t_ms) == (4, 8, 160.0)
    assert scheduler.timing(1) is not None
    slot.close()
    assert scheduler.timing(1) is None and not slot.snapshot().is_open
    slot.open(2000)  # a new session starts from nothing
    assert slot.snapshot() == dataclasses.replace(empty, is_open=True, opened_ns=2000)


# ---- a worker that fails while the server stops ----------------------------------------------------------


def test_an_inference_worker_that_dies_during_a_drain_ends_its_sessions_at_once() -> None:
    # Without the supervisor watching its workers during the drain, the session would go silent until the
    # drain (60 s here) was over: the client's wait below would run out first.
    with ServerProcess("--engine", "loopback", "--drain-timeout", "60") as server:
        pid = server.child_pid("inference")

        async def scenario() -> ClientRun:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(
                server.ws_url, telugu_speech_for(40), first_audio=streaming, end_session=False))
            await asyncio.wait_for(streaming.wait(), BOUND_S)
            server.proc.send_signal(signal.SIGTERM)  # drain: the session may go on
            draining = await asyncio.to_thread(poll_until, lambda: server.health()[1]["status"] == "draining",
                                               BOUND_S)
            assert draining is not None
            os.kill(pid, signal.SIGKILL)
            return await asyncio.wait_for(client, 20)

        run = asyncio.run(scenario())
        assert run.of_type(Error)[-1].code == ErrorCode.INTERNAL and run.close_code == 1011
        assert re.search(r"inference\[\d+\] killed by SIGKILL while stopping", server.log())


def test_a_frozen_worker_stops_admissions_at_once_and_takes_them_again_when_it_steps() -> None:
    # Before, /health said ok for the ~5 s until the heartbeat limit, and sessions admitted then ended 1011.
    with ServerProcess("--engine", "loopback", "--max-sessions", "2") as server:
        pid = server.child_pid("inference")

        async def scenario() -> tuple[ClientRun, ClientRun, dict]:
            streaming = asyncio.Event()
            client = asyncio.create_task(stream_client(
                server.ws_url, telugu_speech_for(8), first_audio=streaming, tail_s=3.0))
            await asyncio.wait_for(streaming.wait(), BOUND_S)
            os.kill(pid, signal.SIGSTOP)
            try:
                stalled = await asyncio.to_thread(
                    poll_until, lambda: server.health()[1]["workers"][0]["status"] == "stalled", BOUND_S)
                assert stalled is not None
                health = server.health()[1]
                newcomer = await stream_client(server.ws_url, telugu_speech_for(1), tail_s=0.0)
            finally:
                os.kill(pid, signal.SIGCONT)
            return await client, newcomer, health

        run, newcomer, health = asyncio.run(scenario())
        assert health["status"] == "full" and health["max_sessions"] == health["sessions_active"] == 1
        assert newcomer.of_type(Error)[0].code == ErrorCode.CAPACITY and newcomer.close_code == 1013
        assert run.close_code == 1000 and not run.of_type(Error)  # its session went on once it stepped
        assert server.child_pid("inference") == pid  # not killed: it was back before the heartbeat limit
        assert poll_until(lambda: server.health()[0] == 200, BOUND_S) is not None
