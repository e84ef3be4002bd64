"""When the inference process runs a batched step, and how a new session's blocks are aligned to the steps."""

from __future__ import annotations

from dataclasses import dataclass

FRAME_NS = 20_000_000
BLOCK_NS = 80_000_000
FRAMES_PER_BLOCK = 4


@dataclass
class StepPolicy:
    """When a batched step runs.

    A masked slot costs as much compute as a live one, so a step is worth running for the whole batch
    at once: it runs as soon as every open session has a full block, or when the oldest full block has
    waited `max_wait_ns`, whichever comes first. To make "every session ready at once" the usual case,
    a new session's block boundary is aligned to the phase of the running steps (`alignment_skip`): its
    first 0-3 frames are skipped so that its blocks complete within 10 ms of the others'. With
    `max_wait_ns == 0` (loopback, where a step is free) a block is stepped the moment it is full and no
    frame is ever skipped.
    """

    max_wait_ns: int
    last_step_ns: int | None = None

    def should_step(self, now_ns: int, ready_at: list[int | None], open_slots: list[bool]) -> bool:
        waiting = [t for t, o in zip(ready_at, open_slots, strict=True) if o and t is not None]
        if not waiting:
            return False
        if all(t is not None for t, o in zip(ready_at, open_slots, strict=True) if o):
            return True
        return now_ns - min(waiting) >= self.max_wait_ns

    def next_deadline_ns(self, ready_at: list[int | None]) -> int | None:
        waiting = [t for t in ready_at if t is not None]
        return min(waiting) + self.max_wait_ns if waiting else None

    def alignment_skip(self, first_frame_ns: int, others_open: bool) -> int:
        if self.max_wait_ns == 0 or not others_open or self.last_step_ns is None:
            return 0

        def distance(k: int) -> int:
            done = first_frame_ns + (FRAMES_PER_BLOCK - 1 + k) * FRAME_NS
            phase = (done - self.last_step_ns) % BLOCK_NS
            return min(phase, BLOCK_NS - phase)

        return min(range(FRAMES_PER_BLOCK), key=distance)
