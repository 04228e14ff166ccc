"""Run a command that starts embedded Ray in a session of its own, so a signal to the whole process
group reaches only the driver.

Ray starts its services (GCS, raylet, and through them the training workers) in the process group of
the driver that calls `ray.init`. A signal to that group (`kill -TERM -PGID`, a container runtime or
init that signals the group, Ctrl-C in a terminal) would then end every Ray process mid-step, before
the driver could ask the workers to checkpoint. So the command re-runs itself as a child in a new
session and waits for it here: this process takes the group's signals and hands each one to the
child alone, which stops the workers at a step boundary exactly as for a signal sent to it directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys

CHILD_ENV = "FTCLUSTER_OWN_SESSION"  # set in the child (and by in-process callers that need no session)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2)


def needs_own_session() -> bool:
    """True in the process a user started; False in the child (or where the environment says so)."""
    return os.environ.get(CHILD_ENV) != "1" and sys.platform.startswith("linux")


def _signal_when_parent_dies() -> None:
    """In the child, before exec: SIGTERM when this process's parent goes (even by SIGKILL), so the
    child stops at a step boundary instead of training on unwatched."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def rerun_in_own_session() -> int:
    """Run this same command (`python -m ftcluster ARGS`) as a child in a new session; forward
    SIGINT, SIGTERM and SIGHUP to it alone; return its exit code (128 + N for a signal N)."""
    child = subprocess.Popen([sys.executable, "-m", "ftcluster", *sys.argv[1:]], env={**os.environ, CHILD_ENV: "1"},
                             start_new_session=True, preexec_fn=_signal_when_parent_dies)

    def forward(signum: int, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    code = child.wait()
    return 128 - code if code < 0 else code
