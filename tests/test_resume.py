"""Resume after a dropped link: the tokens (procs/network/resume.py, sans I/O), then the real server, its
connections cut by a TCP proxy with no close handshake (tests/support/proxy.py), and the Python client that
resumes as the page does (procs/client.py, `resume=True`)."""

from __future__ import annotations

import asyncio
import json
import signal
import string
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from procs.client import ClientRun, messages_until_closed, stream_client
from procs.network.resume import ResumeRefusal, TokenBook
from protocol import (
    CLOSE_RESUMED_ELSEWHERE,
    FRAMES_PER_BLOCK,
    IN_FRAME_BYTES,
    ClientSessionEnd,
    Error,
    ErrorCode,
    SessionStart,
    decode_server,
    encode_client_audio,
    encode_client_control,
)
from tests.support.helpers import metric, wait_for_sessions
from tests.support.launcher import ServerProcess, poll_until
from tests.support.proxy import TcpProxy
from tests.support.speech import telugu_speech_16k

WINDOW_S = 3.0
pytestmark = pytest.mark.loopback_server("--max-sessions", "4", "--resume-window", str(WINDOW_S))
SILENCE = encode_client_audio(bytes(IN_FRAME_BYTES))
RESUMED_WITHIN_S = 2.0  # the goal: resumed within 2 s of the network coming back


# ---- tokens ---------------------------------------------------------------------------------------------


def test_a_token_resumes_its_own_session_until_the_client_speaks_with_the_new_one() -> None:
    book: TokenBook[tuple[int, int]] = TokenBook()
    first, other = book.issue((0, 1)), book.issue((1, 1))
    assert book.redeem(first) == (0, 1)
    second = book.issue((0, 1))  # the resumed session's next token, in its session_start
    # That link drops before the client saw `second`: `first` still takes the session back (pending).
    assert book.redeem(first) == (0, 1)
    third = book.issue((0, 1))
    assert book.redeem(second) is ResumeRefusal.USED  # issued on a link the client never heard
    book.confirm((0, 1))  # the client spoke on the link of `third`: it has it
    assert book.redeem(first) is ResumeRefusal.USED
    assert book.redeem(other) == (1, 1) and book.redeem(third) == (0, 1)
    fourth = book.issue((0, 1))
    book.confirm((0, 1))
    assert book.redeem(third) is ResumeRefusal.USED and book.redeem(fourth) == (0, 1)
    book.confirm((5, 5))  # a session that was never resumed: nothing to confirm
    assert len(book) == 2  # fourth (pending) and other (pending): each still its session's


def test_a_newer_token_spends_an_older_pending_one() -> None:
    book: TokenBook[int] = TokenBook()
    first = book.issue(0)
    book.redeem(first)
    second = book.issue(0)
    assert book.redeem(second) == 0  # the client had the newer one after all
    assert book.redeem(first) is ResumeRefusal.USED
    book.retire(0)
    assert book.redeem(second) is ResumeRefusal.EXPIRED and len(book) == 0


def test_an_ended_sessions_token_has_expired_and_another_servers_is_foreign() -> None:
    book: TokenBook[tuple[int, int]] = TokenBook()
    token = book.issue((3, 7))
    book.retire((3, 7))
    assert book.redeem(token) is ResumeRefusal.EXPIRED
    assert book.redeem(TokenBook().issue((3, 7))) is ResumeRefusal.FOREIGN
    book.retire((9, 9))  # a session that had no token: nothing to retire


@pytest.mark.parametrize("garbage", ["", "x", "!" * 43, "a" * 43 + "=", "a" * 500, "é" * 43, "a b", "%00"])
def test_what_is_not_a_token_is_malformed(garbage: str) -> None:
    assert TokenBook().redeem(garbage) is ResumeRefusal.MALFORMED


def test_the_past_is_remembered_within_its_bound() -> None:
    book: TokenBook[int] = TokenBook(remember=2)
    tokens = [book.issue(k) for k in range(3)]
    for k, token in enumerate(tokens):  # each resumed, its client speaking with its new token
        book.redeem(token)
        book.issue(k)
        book.confirm(k)
    assert [book.redeem(t) for t in tokens] == [ResumeRefusal.UNKNOWN, ResumeRefusal.USED, ResumeRefusal.USED]


ALPHABET = string.ascii_letters + string.digits + "-_=+/.%é "
mutations = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 200), st.sampled_from(ALPHABET)),
    st.tuples(st.just("insert"), st.integers(0, 200), st.sampled_from(ALPHABET)),
    st.tuples(st.just("delete"), st.integers(0, 200), st.just("")),
    st.tuples(st.just("swapcase"), st.integers(0, 200), st.just("")),
    st.tuples(st.just("truncate"), st.integers(0, 200), st.just("")),
)


@settings(max_examples=1000, deadline=None)
@given(victim=st.integers(0, 3), edits=st.lists(mutations, min_size=1, max_size=4))
def test_a_mutated_token_never_resumes_any_session(victim: int, edits: list[tuple[str, int, str]]) -> None:
    book: TokenBook[int] = TokenBook()
    tokens = {book.issue(k): k for k in range(4)}
    token = next(t for t, k in tokens.items() if k == victim)
    mutated = token
    for kind, at, char in edits:
        at %= len(mutated) + 1
        if kind == "replace" and at < len(mutated):
            mutated = mutated[:at] + char + mutated[at + 1:]
        elif kind == "insert":
            mutated = mutated[:at] + char + mutated[at:]
        elif kind == "delete":
            mutated = mutated[:at] + mutated[at + 1:]
        elif kind == "swapcase" and at < len(mutated):
            mutated = mutated[:at] + mutated[at].swapcase() + mutated[at + 1:]
        elif kind == "truncate":
            mutated = mutated[:at]
    if mutated in tokens:
        return  # the edits gave a real token back (a replace by the same character)
    assert isinstance(book.redeem(mutated), ResumeRefusal)
    assert {book.redeem(t) for t in tokens} == set(range(4)), "a refused attempt spent a token"


# ---- the real server, through a proxy whose link is cut ---------------------------------------------


async def heard_by(server: ServerProcess, frames: float) -> None:
    """Until the server has received `frames` client audio frames in all (voice_frames_in_total)."""
    assert await asyncio.to_thread(
        poll_until, lambda: metric(server, "voice_frames_in_total") >= frames, 10.0) is not None


async def first_messages(url: str, n: int) -> tuple[list[object], object]:
    """The first `n` control messages of a connection to `url`, and the connection (still open)."""
    ws = await connect(url, compression=None)
    got = [decode_server(await ws.recv()) for _ in range(n)]
    return got, ws


def test_a_link_cut_mid_conversation_resumes_the_same_session_100_times_in_a_row(
        loopback_server: ServerProcess) -> None:
    """The Python client streams real-time speech-like audio through the proxy; the link is cut (RST both
    ways, no close) and the network comes back 100 times. Each time the same session is resumed within 2 s
    of the network coming back, its audio flows again (loopback: every frame sent comes back), and at the
    end no slot is left held."""
    cuts = 100
    resumed_before = metric(loopback_server, "voice_sessions_resumed_total")
    sessions_before = metric(loopback_server, "voice_sessions_total")
    pcm = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 220) * 8000).astype(np.int16)
    with TcpProxy("127.0.0.1", loopback_server.port) as proxy:
        restored: list[float] = []

        async def cutter(run: ClientRun, done: asyncio.Event) -> None:
            for k in range(cuts):
                frames_before = len(run.frames)
                # Audio flows on this link before it is cut (the conversation is mid-sentence).
                while len(run.frames) < frames_before + 5:
                    await asyncio.sleep(0.01)  # polls the client's record; the test's timeout bounds it
                await asyncio.to_thread(proxy.cut)
                await asyncio.sleep(0.05)  # the outage (a scenario parameter, not a synchronisation)
                await asyncio.to_thread(proxy.restore)
                restored.append(time.monotonic())
                while len(run.reconnected) < k + 1:
                    await asyncio.sleep(0.01)  # polls the client's record; the test's timeout bounds it
            done.set()

        async def scenario() -> ClientRun:
            done = asyncio.Event()
            run = ClientRun()
            client = asyncio.create_task(stream_client(proxy.url(), pcm, repeat_until=done, resume=True,
                                                       run=run, tail_s=2.0, until_frames=-1))
            await asyncio.wait_for(cutter(run, done), timeout=cuts * 5.0)
            return await asyncio.wait_for(client, timeout=30.0)

        run = asyncio.run(scenario())
    starts = run.session_starts
    assert len(starts) == cuts + 1 and len(run.drops) == cuts
    assert {s.session_id for s in starts} == {starts[0].session_id}, "a resume gave another session"
    assert not starts[0].resumed and all(s.resumed for s in starts[1:])
    assert len({s.resume_token for s in starts}) == cuts + 1, "a token was issued twice"
    waits = [got - back for got, back in zip(run.reconnected, restored, strict=True)]
    assert max(waits) < RESUMED_WITHIN_S, f"slowest resume {max(waits):.2f} s after the network came back"
    assert run.close_code == 1000 and not run.of_type(Error)
    assert metric(loopback_server, "voice_sessions_resumed_total") - resumed_before == cuts
    assert metric(loopback_server, "voice_sessions_total") - sessions_before == 1
    wait_for_sessions(loopback_server, 0)
    assert metric(loopback_server, "voice_sessions_detached") == 0
    print(f"resume after the network came back: median {np.median(waits) * 1e3:.0f} ms, "
          f"max {max(waits) * 1e3:.0f} ms over {cuts} cuts")


def test_detached_sessions_count_for_capacity_until_their_window_ends(loopback_server: ServerProcess) -> None:
    async def scenario() -> tuple[list[object], int | None, float | None]:
        with TcpProxy("127.0.0.1", loopback_server.port) as proxy:
            heard = metric(loopback_server, "voice_frames_in_total")
            held = [await first_messages(proxy.url(), 1) for _ in range(4)]
            for _, ws in held:
                await ws.send(SILENCE)
            await heard_by(loopback_server, heard + 4)  # a session that heard nothing would not be kept
            proxy.cut()
            for _, ws in held:
                with pytest.raises(ConnectionClosed):
                    await ws.recv()
            # Every slot is held by a detached session: a newcomer hears `capacity`, not a stolen slot.
            async with connect(loopback_server.ws_url, compression=None) as newcomer:
                refusal = await messages_until_closed(newcomer)
                code = newcomer.close_code
            _, body = loopback_server.health()
            assert body["status"] == "full" and body["sessions_active"] == 4
            assert metric(loopback_server, "voice_sessions_detached") == 4
            freed = await asyncio.to_thread(
                poll_until, lambda: loopback_server.health()[1]["sessions_active"] == 0, WINDOW_S + 5.0)
        return refusal, code, freed

    refusal, code, freed = asyncio.run(scenario())
    assert code == 1013 and isinstance(refusal[0], Error) and refusal[0].code is ErrorCode.CAPACITY
    assert freed is not None, "the window ended and the slots were not given back"
    assert metric(loopback_server, "voice_sessions_detached") == 0


def test_wrong_used_expired_and_foreign_tokens_never_resume_and_the_session_beside_them_streams_on(
        loopback_server: ServerProcess) -> None:
    """A thousand resume attempts with tokens that are wrong (mutations of a live one), spent, expired or
    another server's: each gets a fresh session of its own and `resume_failed`, never the session streaming
    beside them, which goes on untouched (loopback: every frame it sends comes back, no error)."""
    attempts = 1000
    pcm = (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 330) * 8000).astype(np.int16)
    failures_before = {r: metric(loopback_server, f'voice_resume_failures_total{{reason="{r.value}"}}')
                       for r in ResumeRefusal}

    async def spent_and_expired() -> tuple[str, str]:
        (start,), ws = await first_messages(loopback_server.ws_url, 1)
        assert isinstance(start, SessionStart) and start.resume_token
        (resumed,), ws2 = await first_messages(f"{loopback_server.ws_url}?resume={start.resume_token}", 1)
        await ws.wait_closed()  # taken over: closed 4001
        assert ws.close_code == CLOSE_RESUMED_ELSEWHERE
        assert isinstance(resumed, SessionStart) and resumed.resumed and resumed.resume_token
        await ws2.send(encode_client_control(ClientSessionEnd()))
        await ws2.wait_closed()
        return start.resume_token, resumed.resume_token

    async def scenario() -> tuple[ClientRun, list[tuple[SessionStart, Error]]]:
        used, expired = await spent_and_expired()
        foreign = TokenBook().issue((0, 1))
        done = asyncio.Event()
        run = ClientRun()
        # It listens 5 s after its last frame (with a looped file `until_frames` would count the file's
        # frames, not those sent): its last block is answered on a loaded machine too.
        victim = asyncio.create_task(stream_client(loopback_server.ws_url, pcm, repeat_until=done, run=run,
                                                   tail_s=5.0))
        while run.session_start is None:
            await asyncio.sleep(0.01)  # polls the client's record; wait_for bounds the scenario
        token = run.session_start.resume_token
        assert token
        rng = np.random.default_rng(19)
        seen: list[tuple[SessionStart, Error]] = []
        for i in range(attempts):
            if i % 10 == 0:
                bad = [used, expired, foreign, "", "x" * 200][(i // 10) % 5]
            else:  # one character of the victim's live token changed
                at = int(rng.integers(len(token)))
                char = token[at]
                while char == token[at]:
                    char = string.ascii_letters[int(rng.integers(52))]
                bad = token[:at] + char + token[at + 1:]
            (start, error), ws = await first_messages(f"{loopback_server.ws_url}?resume={bad}", 2)
            assert isinstance(start, SessionStart) and isinstance(error, Error)
            seen.append((start, error))
            await ws.close()
        done.set()
        return await victim, seen

    run, seen = asyncio.run(asyncio.wait_for(scenario(), timeout=300))
    victim_id = run.session_start.session_id if run.session_start else None
    assert all(not s.resumed and s.session_id != victim_id for s, _ in seen)
    assert all(e.code is ErrorCode.RESUME_FAILED and not e.fatal for _, e in seen)
    assert run.close_code == 1000 and not run.of_type(Error) and len(run.session_starts) == 1
    # Loopback answers each whole 80 ms block: every one sent came back.
    assert len(run.frames) == run.sent - run.sent % FRAMES_PER_BLOCK, "the session beside them lost audio"
    failures = {r: metric(loopback_server, f'voice_resume_failures_total{{reason="{r.value}"}}')
                - failures_before[r] for r in ResumeRefusal}
    assert sum(failures.values()) == attempts
    assert failures[ResumeRefusal.USED] == failures[ResumeRefusal.EXPIRED] == attempts // 50
    # A changed character among the first eleven changes the server id the token carries: "foreign" too.
    assert failures[ResumeRefusal.FOREIGN] >= attempts // 50
    wait_for_sessions(loopback_server, 0)


def test_a_drain_ends_detached_sessions_at_once() -> None:
    """A server told to drain (SIGTERM) ends a detached session at once, so nothing is left for the drain
    to wait on and it stops well before its drain timeout."""
    with ServerProcess("--engine", "loopback", "--resume-window", "120", "--drain-timeout", "60") as server:

        async def detach() -> None:
            with TcpProxy("127.0.0.1", server.port) as proxy:
                _, ws = await first_messages(proxy.url(), 1)
                await ws.send(SILENCE)
                await heard_by(server, 1)  # a session that heard nothing would not be kept
                proxy.cut()
                with pytest.raises(ConnectionClosed):
                    await ws.recv()

        asyncio.run(detach())
        assert poll_until(lambda: metric(server, "voice_sessions_detached") == 1, 5.0) is not None
        code, took_s = server.stop(signal.SIGTERM, timeout=90)
    # A drain that waited on the detached session would take its whole minute; half of it is ample for a
    # loaded machine to stop a server with nothing left to wait on.
    assert code == 0 and took_s < 30.0, (code, took_s)


def test_voice_agent_client_resume_carries_a_session_across_a_cut(loopback_server: ServerProcess,
                                                                   tmp_path: Path) -> None:
    """`voice-agent client --resume`: the link is cut while it streams a 4 s WAV; it resumes the same session
    and finishes, and says so in its report."""
    with wave.open(str(tmp_path / "in.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes((np.sin(np.arange(4 * 16000) / 16000 * 2 * np.pi * 440) * 8000).astype(np.int16))
    frames_before = metric(loopback_server, "voice_frames_in_total")
    with TcpProxy("127.0.0.1", loopback_server.port) as proxy:
        client = subprocess.Popen(
            [sys.executable, "-m", "procs", "client", "--url", proxy.url(), "--wav", str(tmp_path / "in.wav"),
             "--resume", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # A second of its audio has reached the server: the cut comes mid-sentence.
            assert poll_until(lambda: metric(loopback_server, "voice_frames_in_total") - frames_before >= 50,
                              20.0) is not None
            proxy.cut()
            proxy.restore()
            out, err = client.communicate(timeout=60)
        finally:
            client.kill()
    report = json.loads(out)
    assert client.returncode == 0, err
    assert report["ok"] and report["resumes"] == 1 and report["close_code"] == 1000
    assert len(report["session_ids"]) == 2 and len(set(report["session_ids"])) == 1
    assert report["frames_sent"] + report["frames_skipped"] >= 200
    wait_for_sessions(loopback_server, 0)


def test_the_demo_model_goes_on_after_a_resume_exactly_as_if_the_link_had_never_dropped() -> None:
    """The model's memory survives the cut: the demo model (its answer depends on everything it heard), fed
    the same audio once without a cut and once cut and resumed halfway, answers the same, frame for frame.
    `--seed` makes its sampling reproducible and `--step-clock off` steps each block as it comes, so both
    runs take the same steps; each run gets a fresh server."""
    pcm = telugu_speech_16k()[: 60 * 320]
    frames = [encode_client_audio(pcm[i * 320:(i + 1) * 320].tobytes()) for i in range(60)]
    half = 32  # a whole number of blocks
    delay = 4  # the demo model answers a block after its first (its acoustic delay): one block less back

    async def answer(ws: Any, n: int) -> list[bytes]:
        got: list[bytes] = []
        while len(got) < n:
            message = await asyncio.wait_for(ws.recv(), timeout=60)
            if isinstance(message, bytes):
                got.append(message)
        return got

    async def lock_step(ws: Any, blocks: range) -> list[bytes]:
        """Each 80 ms block sent once the one before was answered: a CPU of any speed takes the same steps
        (a burst would overflow the model's queue and drop blocks, a different conversation)."""
        got: list[bytes] = []
        for k in blocks:
            for frame in frames[4 * k:4 * k + 4]:
                await ws.send(frame)
            if k >= 1:  # the model's acoustic delay: block k answers once block k + 1 is heard
                got += await answer(ws, 4)
        return got

    async def uncut(url: str) -> list[bytes]:
        async with connect(url, compression=None) as ws:
            return await lock_step(ws, range(len(frames) // 4))

    async def cut_halfway(server: ServerProcess) -> tuple[list[bytes], SessionStart, SessionStart]:
        with TcpProxy("127.0.0.1", server.port) as proxy:
            ws = await connect(proxy.url(), compression=None)
            first = decode_server(await ws.recv())
            assert isinstance(first, SessionStart) and first.resume_token
            before = await lock_step(ws, range(half // 4))
            proxy.cut()
            with pytest.raises(ConnectionClosed):
                await answer(ws, 1)
            assert await asyncio.to_thread(
                poll_until, lambda: metric(server, "voice_sessions_detached") == 1, 10.0) is not None
            proxy.restore()
            async with connect(f"{proxy.url()}?resume={first.resume_token}", compression=None) as ws2:
                second = decode_server(await ws2.recv())
                assert isinstance(second, SessionStart)
                after = await lock_step(ws2, range(half // 4, len(frames) // 4))
        return before + after, first, second

    flags = ("--max-sessions", "1", "--step-clock", "off", "--seed", "19")
    with ServerProcess(*flags) as server:
        reference = asyncio.run(uncut(server.ws_url))
    with ServerProcess(*flags) as server:
        resumed, first, second = asyncio.run(cut_halfway(server))
    assert second.resumed and second.session_id == first.session_id
    assert len(reference) == len(resumed) == len(frames) - delay
    assert any(frame != reference[0] for frame in reference), "the model said nothing that could differ"
    assert resumed[:half - delay] == reference[:half - delay]
    assert resumed[half - delay:] == reference[half - delay:], "it went on differently after the resume"
