"""What the engine's worker processes (the drafter's, the tensor-parallel ranks) share: how to
start a Python child inside Triton's stub, and how to wait on its pipe."""
import os
import shutil
import socket
import sys
import time
from multiprocessing.connection import Connection

# Both sides poll the pipe this long before blocking on it: a blocked virtual CPU halts, and
# waking it is slow (docs/drafts.md). Beyond this, an idle drafter sleeps.
SPIN_SECONDS = 0.05


def wait_readable(conn: Connection, timeout: float) -> bool:
    """conn.poll(timeout), busy for the first SPIN_SECONDS (yielding to any other runnable thread)."""
    deadline = time.monotonic() + SPIN_SECONDS
    while time.monotonic() < deadline:
        if conn.poll(0):
            return True
        os.sched_yield()
    return conn.poll(timeout)


def python_executable() -> str:
    name = os.path.basename(sys.executable or "")
    if name.startswith("python"):
        return sys.executable
    candidate = os.path.join(sys.exec_prefix, "bin", "python3")
    return candidate if os.path.exists(candidate) else shutil.which("python3")


def free_port() -> int:
    """A TCP port free on the loopback now (for a child's rendezvous or a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
