"""CPU the network process spends per session on moshi.server's wire (`/api/chat`), against `/ws`'s PCM.

The adapter (procs/network/moshi_api.py) alone, sans I/O, on one core: `--seconds` of Telugu speech in as the
Ogg/Opus pages a moshi client sends (decode, 24 -> 16 kHz, 20 ms frames into the session), and as many
seconds of model audio out (24 kHz frames into the session's Ogg/Opus writer). Prints CPU seconds per
session-second each way, and the same session fed our `/ws` PCM frames for comparison.

    python -m bench.moshi_api_cost --seconds 60
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import sphn

from procs.audio.resample import Resampler16to24, float_to_int16
from procs.config import ServerConfig
from procs.frames import ModelFrame
from procs.network.moshi_api import MoshiAdapter
from procs.network.session import Session, SessionRules
from procs.network.wires import PcmWire
from protocol import encode_client_audio, session_start
from tests.support.speech import conversation_16k

FRAME24 = 480


def new_session() -> Session:
    rules = SessionRules.of(ServerConfig(idle_timeout_s=None), rate_frames_per_s=1e9, rate_burst_frames=1e9)
    return Session(session_start("bench", "m", False, 1), 0, 1, now=0.0, rules=rules)


def frame(pcm: np.ndarray, k: int) -> ModelFrame:
    return ModelFrame(seq=k, t_in_ns=0, gen=1, block_pos=k % 4, queue_us=0, step_us=0, resample_us=0,
                      dropped=0, realigned=0, pcm=pcm.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    pcm16 = np.resize(conversation_16k(), int(args.seconds * 16000) // 320 * 320)
    pcm24 = Resampler16to24().process(pcm16)
    writer = sphn.OpusStreamWriter(24000)
    n24 = len(pcm24) // FRAME24
    pages = [b"\x01" + ogg for i in range(n24)
             if len(ogg := writer.append_pcm(pcm24[i * FRAME24:(i + 1) * FRAME24]))]
    out24 = [float_to_int16(pcm24[i * FRAME24:(i + 1) * FRAME24]) for i in range(n24)]

    adapter = MoshiAdapter(new_session())
    t0 = time.process_time()
    published = sum(len(adapter.receive(page, 0)) for page in pages)
    t_in = time.process_time() - t0
    t0 = time.process_time()
    sent = 0
    for k, pcm in enumerate(out24):
        adapter.session.model_audio(frame(pcm, k))
        while adapter.next_outgoing(0) is not None:
            sent += 1
    t_out = time.process_time() - t0

    plain = PcmWire(new_session())  # /ws's edge, as the server holds it
    frames16 = [encode_client_audio(pcm16[i:i + 320].tobytes()) for i in range(0, len(pcm16), 320)]
    t0 = time.process_time()
    for message in frames16:
        plain.receive(message, 0)
    t_plain_in = time.process_time() - t0
    t0 = time.process_time()
    for k, pcm in enumerate(out24):
        plain.session.model_audio(frame(pcm, k))
        while plain.next_outgoing(0) is not None:
            pass
    t_plain_out = time.process_time() - t0

    s = args.seconds
    print(f"{s:.0f} s of audio each way; {published} frames published, {sent} messages out, "
          f"{adapter.bytes_out * 8 / s / 1000:.1f} kbit/s down as Ogg/Opus")
    print(f"/api/chat: in {1e3 * t_in / s:.2f} ms, out {1e3 * t_out / s:.2f} ms CPU per session-second")
    print(f"/ws (PCM): in {1e3 * t_plain_in / s:.2f} ms, out {1e3 * t_plain_out / s:.2f} ms CPU per "
          "session-second")


if __name__ == "__main__":
    main()
