"""A board of u64 words in POSIX shared memory: each word has one writer, any process may read it.

For values that are only ever overwritten, never queued, such as a process's heartbeat (the time of its last
loop). Layout of /dev/shm/<name>: a magic word, the word count, then the words; every access is one aligned
8-byte load or store (memoryview 'Q'), which x86-64 does atomically, so a reader sees either the old or the
new value, never a torn one (see ringbuf/ring.py for the memory-ordering argument and what a weakly ordered
port would need). Ownership as for rings: the creator alone unlinks; attaching processes open /dev/shm
directly and never touch the resource tracker.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass
from typing import Any

from ringbuf.segment import attach_segment, create_segment, unlink_segment

BOARD_MAGIC = 0x564F4943454252  # "VOICEBR"
_HEADER_WORDS = 2


@dataclass(frozen=True)
class BoardSpec:
    name: str
    words: int


class Board:
    def __init__(self, spec: BoardSpec, segment: mmap.mmap, *, owner: bool) -> None:
        self.spec = spec
        self._mm: mmap.mmap | None = segment
        self._words = memoryview(segment).cast("Q")
        if self._words[0] != BOARD_MAGIC or self._words[1] != spec.words:
            self._words.release()
            raise ValueError(f"/dev/shm/{spec.name} is not a board of {spec.words} words")
        self._finalizer = weakref.finalize(self, unlink_segment, spec.name) if owner else None

    @classmethod
    def create(cls, words: int, *, prefix: str = "vboard") -> Board:
        """Create and own a board of `words` zeroed words."""
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        size = (_HEADER_WORDS + words) * 8
        segment = create_segment(name, size)
        header = memoryview(segment).cast("Q")
        header[1] = words
        header[0] = BOARD_MAGIC
        header.release()
        return cls(BoardSpec(name, words), segment, owner=True)

    @classmethod
    def attach(cls, spec: BoardSpec) -> Board:
        return cls(spec, attach_segment(spec.name), owner=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Board.attach, (self.spec,))

    def get(self, index: int) -> int:
        return self._words[_HEADER_WORDS + index]

    def set(self, index: int, value: int) -> None:
        self._words[_HEADER_WORDS + index] = value

    def close(self) -> None:
        if self._mm is None:
            return
        self._words.release()
        with contextlib.suppress(BufferError):
            self._mm.close()
        self._mm = None
        if self._finalizer is not None:
            self._finalizer()
