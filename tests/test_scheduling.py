"""The inference process's step policy: when a batched step runs, and how sessions get aligned."""

from procs.inference.policy import BLOCK_NS, FRAME_NS, StepPolicy

MS = 1_000_000


def test_steps_at_once_when_every_open_session_is_ready() -> None:
    p = StepPolicy(max_wait_ns=25 * MS)
    assert p.should_step(100 * MS, [90 * MS, 99 * MS, None], [True, True, False])


def test_waits_for_a_session_that_is_not_ready_until_the_deadline() -> None:
    p = StepPolicy(max_wait_ns=25 * MS)
    ready_at = [90 * MS, None]
    assert not p.should_step(100 * MS, ready_at, [True, True])
    assert p.next_deadline_ns(ready_at) == 115 * MS
    assert p.should_step(115 * MS, ready_at, [True, True])


def test_nothing_to_step_without_a_ready_open_session() -> None:
    p = StepPolicy(max_wait_ns=0)
    assert not p.should_step(1, [None, 5], [True, False])
    assert p.next_deadline_ns([None, None]) is None


def test_zero_wait_steps_the_moment_a_block_is_full() -> None:
    p = StepPolicy(max_wait_ns=0)
    assert p.should_step(10, [10, None], [True, True])


def test_alignment_puts_a_new_session_within_10_ms_of_the_step_grid() -> None:
    p = StepPolicy(max_wait_ns=25 * MS, last_step_ns=1_000 * MS)
    for offset_ms in range(0, 80, 3):
        first = 5_000 * MS + offset_ms * MS
        k = p.alignment_skip(first, others_open=True)
        assert 0 <= k < 4
        done = first + (3 + k) * FRAME_NS
        phase = (done - p.last_step_ns) % BLOCK_NS
        assert min(phase, BLOCK_NS - phase) <= 10 * MS


def test_no_alignment_for_loopback_or_a_lone_session() -> None:
    assert StepPolicy(max_wait_ns=0, last_step_ns=0).alignment_skip(13 * MS, others_open=True) == 0
    assert StepPolicy(max_wait_ns=25 * MS, last_step_ns=0).alignment_skip(13 * MS, others_open=False) == 0
