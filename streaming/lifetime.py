"""Child processes that die with their parent.

The sandbox starts a broker, a Valkey server and Faust workers. If the sandbox is killed
(SIGKILL, an out-of-memory kill) nothing runs its cleanup, and those children would keep
running: ports held, a worker still consuming. `die_with_parent` is a `preexec_fn` that asks
Linux to SIGKILL the child when the thread that started it exits (PR_SET_PDEATHSIG). Start
children from the main thread: the signal follows the starting thread, not the process.
Elsewhere it does nothing (macOS has no such call); there `close()` still stops children.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

_PR_SET_PDEATHSIG = 1
# Looked up here, in the parent: the child (forked from a process with threads) should not
# load libraries before exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent goes (Linux), and exit at once if
    the parent is already gone (the signal is only sent for a death after this call)."""
    if _prctl is None:
        return
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() == 1:
        os._exit(1)


def terminate(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, and SIGKILL if the process has not exited after `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
