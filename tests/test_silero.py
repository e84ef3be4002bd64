"""StreamingVad against Silero's own offline segmentation and wrapper, on espeak-ng Telugu speech."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from procs.audio.silero import (
    WINDOW_SAMPLES,
    SpeechEdge,
    StreamingVad,
    offline_speech_segments,
    pcm16_to_float,
)
from tests.support.speech import (
    DEFAULT_UTTERANCES,
    SAMPLE_RATE,
    conversation_16k,
    conversation_16k_with_spans,
    read_wav,
    telugu_speech_16k,
    write_wav,
)

# The silero-vad package's own loaders use deprecated APIs; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning"),
]

FRAME_SAMPLES = 320  # one 20 ms wire frame at 16 kHz
TOLERANCE_MS = 100.0  # the end-to-end acceptance bound
WINDOW_MS = WINDOW_SAMPLES * 1000 / SAMPLE_RATE


@pytest.fixture(scope="module")
def conversation() -> np.ndarray:
    return conversation_16k()


@pytest.fixture(scope="module")
def other_conversation() -> np.ndarray:
    """Different utterance order and gaps, so sessions in different slots see different audio."""
    return conversation_16k(DEFAULT_UTTERANCES[::-1][:3], lead_silence_s=0.4, gap_s=1.3, tail_silence_s=1.2)


def stream_events(
    vad: StreamingVad, slot: int, pcm: np.ndarray, chunk: int = FRAME_SAMPLES
) -> list[SpeechEdge]:
    events: list[SpeechEdge] = []
    for offset in range(0, len(pcm), chunk):
        vad.push(slot, pcm[offset : offset + chunk])
        events += vad.process()
    return events


def as_segments(events: list[SpeechEdge]) -> list[tuple[float, float]]:
    """Pair start/end events, checking they alternate and start with a start."""
    kinds = [event.event for event in events]
    assert kinds == ["start", "end"] * (len(events) // 2), kinds
    return [(events[i].t_ms, events[i + 1].t_ms) for i in range(0, len(events), 2)]


def assert_segments_close(
    streamed: list[tuple[float, float]], offline: list[tuple[float, float]], tolerance_ms: float
) -> None:
    assert len(streamed) == len(offline), (streamed, offline)
    for (s_start, s_end), (o_start, o_end) in zip(streamed, offline, strict=True):
        assert abs(s_start - o_start) <= tolerance_ms, (streamed, offline)
        assert abs(s_end - o_end) <= tolerance_ms, (streamed, offline)


def test_conversation_has_separated_utterances(conversation: np.ndarray) -> None:
    pcm, spans = conversation_16k_with_spans()
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert np.array_equal(pcm, conversation)
    assert len(spans) == len(DEFAULT_UTTERANCES)
    assert not pcm[: round(spans[0][0] * SAMPLE_RATE / 1000)].any()  # leading digital silence
    for (_, prev_end), (next_start, _) in itertools.pairwise(spans):
        assert next_start - prev_end >= 1000.0
    speech = pcm[round(spans[0][0] * 16) : round(spans[0][1] * 16)]
    assert np.abs(speech.astype(np.int32)).max() > 3000  # real speech, not a silent clip


def test_speech_cache_and_wav_round_trip(tmp_path) -> None:
    first = telugu_speech_16k(DEFAULT_UTTERANCES[0], cache_dir=tmp_path)
    cached = list(tmp_path.glob("*.wav"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    again = telugu_speech_16k(DEFAULT_UTTERANCES[0], cache_dir=tmp_path)
    assert np.array_equal(first, again) and cached[0].stat().st_mtime_ns == mtime
    again[:] = 0  # callers get their own copy
    assert telugu_speech_16k(DEFAULT_UTTERANCES[0], cache_dir=tmp_path).any()

    write_wav(tmp_path / "copy.wav", first, SAMPLE_RATE)
    round_trip, rate = read_wav(tmp_path / "copy.wav")
    assert rate == SAMPLE_RATE and np.array_equal(round_trip, first)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"threshold": 0.6, "min_silence_ms": 300, "speech_pad_ms": 0},
        {"threshold": 0.4, "neg_threshold": 0.2, "min_silence_ms": 60, "speech_pad_ms": 50},
    ],
    ids=["defaults", "strict", "loose"],
)
def test_streaming_matches_offline_segments(conversation: np.ndarray, params: dict) -> None:
    streamed = as_segments(stream_events(StreamingVad(1, **params), 0, conversation))
    offline = offline_speech_segments(conversation, **params)
    assert len(offline) >= len(DEFAULT_UTTERANCES)
    # Same weights, same decisions: the events should land on the offline boundaries, within a window.
    assert_segments_close(streamed, offline, tolerance_ms=WINDOW_MS)


def test_streaming_matches_package_defaults(conversation: np.ndarray) -> None:
    """The acceptance check as the lead runs it: get_speech_timestamps with the package's defaults
    (TorchScript model, min_speech_duration_ms=250) on the whole audio."""
    from silero_vad import get_speech_timestamps, load_silero_vad

    reference = get_speech_timestamps(torch.from_numpy(pcm16_to_float(conversation)), load_silero_vad())
    offline = [(seg["start"] / 16, seg["end"] / 16) for seg in reference]
    streamed = as_segments(stream_events(StreamingVad(1), 0, conversation))
    assert_segments_close(streamed, offline, tolerance_ms=TOLERANCE_MS)


def test_chunk_size_does_not_change_events(conversation: np.ndarray) -> None:
    framed = stream_events(StreamingVad(1), 0, conversation, chunk=FRAME_SAMPLES)

    whole = StreamingVad(1)
    whole.push(0, conversation)
    assert whole.pending_samples(0) == len(conversation)
    at_once = whole.process()
    assert whole.pending_samples(0) == len(conversation) % WINDOW_SAMPLES

    rng = np.random.default_rng(7)
    ragged_vad = StreamingVad(1)
    ragged: list[SpeechEdge] = []
    offset = 0
    while offset < len(conversation):
        size = int(rng.integers(1, 3000))
        ragged_vad.push(0, conversation[offset : offset + size])
        offset += size
        if rng.random() < 0.5:  # sometimes let audio pile up over several pushes
            ragged += ragged_vad.process()
    ragged += ragged_vad.process()

    assert framed == at_once == ragged
    assert len(framed) == 2 * len(DEFAULT_UTTERANCES)


def test_interleaved_slots_are_isolated(conversation: np.ndarray, other_conversation: np.ndarray) -> None:
    quiet = np.zeros(3 * SAMPLE_RATE, dtype=np.int16)
    noise = (np.random.default_rng(3).normal(0, 300, 4 * SAMPLE_RATE)).astype(np.int16)
    # Delayed by whole windows so that the windows line up with the undelayed run's; the recurrent state
    # still drifts a little over the extra silence, so boundaries may move by a window.
    delay = 23 * WINDOW_SAMPLES
    late_start = np.concatenate([np.zeros(delay, dtype=np.int16), other_conversation])
    audios = {0: conversation, 2: other_conversation, 3: quiet, 5: late_start, 6: noise}
    chunks = {0: 320, 2: 320, 3: 500, 5: 111, 6: 2048}  # different phases: slots ready in different rounds

    alone = {slot: stream_events(StreamingVad(1), 0, pcm) for slot, pcm in audios.items()}

    shared = StreamingVad(8)  # slots 1, 4 and 7 stay idle
    together: dict[int, list[SpeechEdge]] = {slot: [] for slot in audios}
    offsets = dict.fromkeys(audios, 0)
    while any(offsets[slot] < len(pcm) for slot, pcm in audios.items()):
        for slot, pcm in audios.items():
            shared.push(slot, pcm[offsets[slot] : offsets[slot] + chunks[slot]])
            offsets[slot] += chunks[slot]
        for event in shared.process():
            together[event.slot].append(event)

    for slot in audios:
        assert [(e.event, e.t_ms) for e in together[slot]] == [(e.event, e.t_ms) for e in alone[slot]], slot
    assert len(alone[0]) == 2 * len(DEFAULT_UTTERANCES)
    assert len(alone[2]) == 6
    assert alone[3] == []
    assert [e.event for e in alone[5]] == [e.event for e in alone[2]]
    assert [e.t_ms for e in alone[5]] == pytest.approx([e.t_ms + delay / 16 for e in alone[2]], abs=WINDOW_MS)


def test_reset_starts_a_fresh_session(conversation: np.ndarray, other_conversation: np.ndarray) -> None:
    fresh = stream_events(StreamingVad(2), 1, other_conversation)

    vad = StreamingVad(2)
    # Leave slot 1 mid-utterance, with state, context, a pending partial window and a running clock.
    stream_events(vad, 1, conversation[: 2 * SAMPLE_RATE + 100])
    assert vad.in_speech(1) and vad.pending_samples(1) > 0 and vad.scored_ms(1) > 0
    vad.reset(1)
    assert not vad.in_speech(1) and vad.pending_samples(1) == 0 and vad.scored_ms(1) == 0
    assert vad.last_prob(1) == 0.0
    assert stream_events(vad, 1, other_conversation) == fresh


def test_batched_probabilities_match_package_wrapper(
    conversation: np.ndarray, other_conversation: np.ndarray
) -> None:
    """Rows of one batched call equal the package's OnnxWrapper run on each session alone."""
    from silero_vad import load_silero_vad

    n_windows = 200
    audios = [
        conversation[: n_windows * WINDOW_SAMPLES],
        other_conversation[: n_windows * WINDOW_SAMPLES],
        conversation[SAMPLE_RATE : SAMPLE_RATE + n_windows * WINDOW_SAMPLES],
    ]
    vad = StreamingVad(len(audios))
    batched = np.zeros((len(audios), n_windows))
    for window in range(n_windows):
        for slot, pcm in enumerate(audios):
            vad.push(slot, pcm[window * WINDOW_SAMPLES : (window + 1) * WINDOW_SAMPLES])
        vad.process()
        batched[:, window] = [vad.last_prob(slot) for slot in range(len(audios))]

    for model, tolerance in ((load_silero_vad(onnx=True), 1e-5), (load_silero_vad(), 1e-4)):
        for slot, pcm in enumerate(audios):
            model.reset_states()
            audio = torch.from_numpy(pcm16_to_float(pcm))
            single = [
                model(audio[w * WINDOW_SAMPLES : (w + 1) * WINDOW_SAMPLES], SAMPLE_RATE).item()
                for w in range(n_windows)
            ]
            np.testing.assert_allclose(batched[slot], single, atol=tolerance, rtol=0)
    assert batched.max() > 0.9 and batched.min() < 0.1  # both speech and silence were scored


def test_rejects_bad_input() -> None:
    vad = StreamingVad(2)
    with pytest.raises(TypeError):
        vad.push(0, np.zeros(320, dtype=np.float32))
    with pytest.raises(IndexError):
        vad.push(2, np.zeros(320, dtype=np.int16))
    with pytest.raises(IndexError):
        vad.reset(-1)
    with pytest.raises(ValueError):
        StreamingVad(0)
    vad.push(0, np.zeros(0, dtype=np.int16))
    vad.push(0, np.zeros(511, dtype=np.int16))
    assert vad.process() == [] and vad.scored_ms(0) == 0
    vad.push(0, np.zeros(1, dtype=np.int16))
    assert vad.process() == [] and vad.scored_ms(0) == WINDOW_MS
