"""Calling code that may never return (a user's reward function) with a time limit, signals honoured.

Python cannot stop a function from outside, so the call runs in a daemon thread while the caller
waits in short slices: past the limit the caller gives up with TimeoutError (the thread is left
behind and dies with the process, which the caller then ends), and a SIGINT/SIGTERM that arrives
meanwhile stops it at once (`STOP.raise_while_waiting`) instead of waiting for a step boundary.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ftcluster.core.interrupts import STOP

T = TypeVar("T")
SLICE_S = 0.05  # how often a waiting caller looks at the signals


def call_bounded(function: Callable[[], T], timeout_s: float) -> T:
    """``function()``'s value or exception, or TimeoutError after ``timeout_s``; Interrupted on a signal."""
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:  # handed to the caller
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="bounded-call", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(min(SLICE_S, max(0.0, deadline - time.monotonic()))):
        STOP.raise_while_waiting()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
