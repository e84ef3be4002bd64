"""No segment is left in /dev/shm and no resource-tracker warning is printed: after a normal exit,
after SIGKILL of an attached child, after an exception inside `with Ring.create(...)`, when the
owner forgets to close, and when an unrelated process attaches. Each case runs a small script in a
fresh interpreter and asserts on its stderr."""

from __future__ import annotations

import gc
import os
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ringbuf import Policy, Ring
from ringbuf.segment import SHM_DIR
from tests.support.rings import REPO_ROOT, segments_with_prefix

PREAMBLE = """\
import multiprocessing, os, signal, subprocess, sys
from ringbuf import Policy, Ring
from tests.support import rings as ring_helpers
SPAWN = multiprocessing.get_context("spawn")
prefix = sys.argv[1]
"""

TRACKER_NOISE = ("resource_tracker", "leaked", "UserWarning")


@pytest.fixture
def prefix() -> str:
    return f"vrleak{secrets.token_hex(3)}"


def run_script(tmp_path: Path, body: str, prefix: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "scenario.py"
    main = 'if __name__ == "__main__":\n' + textwrap.indent(textwrap.dedent(body), "    ")
    script.write_text(PREAMBLE + main)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, str(script), prefix], capture_output=True, text=True, timeout=120, env=env
    )


def assert_clean(run: subprocess.CompletedProcess[str], prefix: str, returncode: int = 0) -> None:
    assert run.returncode == returncode, run.stderr
    for noise in TRACKER_NOISE:
        assert noise not in run.stderr, run.stderr
    assert segments_with_prefix(prefix) == []


def test_normal_exit_with_an_attached_child(tmp_path, prefix):
    run = run_script(
        tmp_path,
        """
        with Ring.create(64, 4, prefix=prefix) as ring:
            ring.bind_consumer()
            child = SPAWN.Process(target=ring_helpers.attach_and_exit, args=(ring.spec,))
            child.start()
            child.join()
            assert child.exitcode == 0
            assert ring.read_bytes() == b"bye"
        print("ok")
        """,
        prefix,
    )
    assert_clean(run, prefix)
    assert run.stdout.strip() == "ok"


def test_sigkill_of_an_attached_child(tmp_path, prefix):
    run = run_script(
        tmp_path,
        """
        with Ring.create(64, 4, Policy.DROP_OLDEST, prefix=prefix) as ring:
            control, child_end = SPAWN.Pipe()
            child = SPAWN.Process(
                target=ring_helpers.bound_then_block, args=(ring.spec, "producer", None, child_end)
            )
            child.start()
            assert control.recv() == "ready"
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            assert not ring.producer_alive()
        print("ok")
        """,
        prefix,
    )
    assert_clean(run, prefix)
    assert run.stdout.strip() == "ok"


def test_an_exception_inside_the_with_block(tmp_path, prefix):
    run = run_script(
        tmp_path,
        """
        with Ring.create(64, 4, prefix=prefix) as ring:
            attached = Ring.attach(ring.spec)
            attached.bind_consumer()
            view = attached.peek()  # views alive while the exception unwinds
            raise RuntimeError("boom inside the with-block")
        """,
        prefix,
    )
    assert "boom inside the with-block" in run.stderr
    assert_clean(run, prefix, returncode=1)


def test_an_owner_that_never_closes(tmp_path, prefix):
    run = run_script(
        tmp_path,
        """
        rings = [Ring.create(64, 4, prefix=prefix) for _ in range(3)]
        rings[0].try_write(b"unread")
        print(len(os.listdir("/dev/shm")) > 0)
        """,
        prefix,
    )
    assert_clean(run, prefix)


def test_an_unrelated_process_attaching_does_not_unlink_or_warn(tmp_path, prefix):
    """A process outside multiprocessing has its own resource tracker: with SharedMemory(name) it would
    unlink our segment at its exit (and warn). Ring.attach must not register it."""
    run = run_script(
        tmp_path,
        """
        with Ring.create(64, 4, prefix=prefix) as ring:
            ring.bind_consumer()
            attach = (
                "from ringbuf import Ring, RingSpec, Policy; "
                f"r = Ring.attach(RingSpec({ring.spec.name!r}, 64, 4, Policy.REFUSE)); "
                "r.bind_producer(); r.try_write(b'from outside')"
            )
            other = subprocess.run([sys.executable, "-c", attach], capture_output=True, text=True)
            assert other.returncode == 0 and other.stderr == "", other.stderr
            assert os.path.exists(os.path.join("/dev/shm", ring.spec.name))
            assert ring.read_bytes() == b"from outside"
        print("ok")
        """,
        prefix,
    )
    assert_clean(run, prefix)
    assert run.stdout.strip() == "ok"


def test_a_sigkilled_owner_is_cleaned_up_by_the_resource_tracker(tmp_path, prefix):
    """The safety net: the owner registered the segment, so its tracker unlinks it (and warns, rightly)."""
    run = run_script(
        tmp_path,
        """
        ring = Ring.create(64, 4, prefix=prefix)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        prefix,
    )
    # run_script returns when every holder of the stderr pipe is gone, i.e. the tracker has finished.
    assert run.returncode == -9
    assert "leaked shared_memory" in run.stderr
    assert segments_with_prefix(prefix) == []


def test_in_process_failure_inside_with_and_a_dropped_owner(prefix):
    with pytest.raises(RuntimeError), Ring.create(16, 2, prefix=prefix) as ring:
        ring.try_write(b"x")
        raise RuntimeError("a failing test")
    assert segments_with_prefix(prefix) == []
    name = Ring.create(16, 2, Policy.DROP_OLDEST, prefix=prefix).spec.name  # owner dropped at once
    gc.collect()
    assert not os.path.exists(os.path.join(SHM_DIR, name))
