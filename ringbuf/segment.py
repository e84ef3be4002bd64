"""POSIX shared-memory segments under /dev/shm: created (and alone unlinked) by their owner, mapped by anyone.

The owner registers a segment with multiprocessing's resource tracker, so the segment is unlinked even if
the owner is killed outright; processes that only attach open /dev/shm directly and never touch the
tracker (it would unlink the segment when *they* exit). Rings (ringbuf/ring.py) and boards
(ringbuf/board.py) lay out their own headers on top.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from multiprocessing import resource_tracker

SHM_DIR = "/dev/shm"


def create_segment(name: str, size: int) -> mmap.mmap:
    """A new zero-filled segment of `size` bytes (O_EXCL: never someone else's), registered for cleanup."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        resource_tracker.register("/" + name, "shared_memory")
        os.ftruncate(fd, size)  # a fresh tmpfs file reads as zeros
        return mmap.mmap(fd, size)
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        os.close(fd)


def attach_segment(name: str) -> mmap.mmap:
    """Map an existing segment without owning it."""
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(SHM_DIR, name))
    resource_tracker.unregister("/" + name, "shared_memory")
