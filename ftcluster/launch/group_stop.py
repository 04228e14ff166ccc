"""A stop the driver asks of its Ray Train worker group: its own Ctrl+C or SIGTERM.

The driver cannot signal workers on other nodes, and a signal would look like a node drain, which
Ray answers by restarting the group (training.max_failures). Instead it writes the signal's number
under the launch's key in Ray's GCS key-value store; every worker reads it at step boundaries (at
most once a second), the group agrees on it with the boundary's signal check, saves a checkpoint and
ends its training function without an error, so Ray does not restart it. The driver then reports
the stop as an interrupt, with the step and the checkpoint.
"""

from __future__ import annotations

import time

KEY_PREFIX = "ftcluster/stop/"
POLL_INTERVAL_S = 1.0  # how often a worker asks the GCS (a step boundary in between reuses the answer)


def _key(launch: str) -> bytes:
    return f"{KEY_PREFIX}{launch}".encode()


def request_group_stop(launch: str, signum: int) -> None:
    """In the driver: ask the launch's workers to checkpoint and stop at their next step boundary."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_key(launch), str(signum).encode(), overwrite=True)


def forget_group_stop(launch: str) -> None:
    """In the driver, when the launch has ended: its key leaves the GCS."""
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_initialized

    if _internal_kv_initialized():
        _internal_kv_del(_key(launch))


class GroupStopPoll:
    """In a worker: the signal the driver asked this launch to stop for (0: none)."""

    def __init__(self, launch: str) -> None:
        self.key = _key(launch)
        self.signum = 0
        self.asked_at = float("-inf")

    def __call__(self, fresh: bool = False) -> int:
        now = time.monotonic()
        if self.signum == 0 and (fresh or now - self.asked_at >= POLL_INTERVAL_S):
            from ray.experimental.internal_kv import _internal_kv_get

            value = _internal_kv_get(self.key)
            self.signum, self.asked_at = int(value) if value else 0, now
        return self.signum
