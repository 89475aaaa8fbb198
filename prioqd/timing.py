"""Small helpers about time, one copy each: backoff with jitter, a moving average,
and "sleep until an event or a timeout"."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable


def backoff_s(
    failures: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with "equal jitter": between half and all of the step.

    ``failures`` counts from 1 (the first retry waits about ``base_s``). Used for job
    retries and for reconnecting to Redis alike.
    """
    exponent = min(max(0, failures - 1), 64)  # 2.0 ** 1024 would overflow
    step = min(cap_s, base_s * (2.0**exponent))
    return step / 2 + (rng or random).uniform(0, step / 2)


class Backoff:
    """Failures in a row of one thing (a Redis call, a worker start) and the next delay."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 5.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return backoff_s(self.failures, self.base_s, self.cap_s)

    def reset(self) -> None:
        self.failures = 0


class Ewma:
    """An exponentially weighted moving average. The first sample sets it outright, so
    an estimate is usable after one observation rather than ramping up over dozens."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2, initial: float | None = None) -> None:
        self.alpha = alpha
        self.value = initial

    def add(self, sample: float) -> float:
        value = sample if self.value is None else self.value + self.alpha * (sample - self.value)
        self.value = value
        return value


async def wait_event(event: asyncio.Event, timeout_s: float | None) -> bool:
    """Wait for ``event`` at most ``timeout_s`` (None: for ever); True if it is set."""
    if timeout_s is None:
        await event.wait()
        return True
    if event.is_set():
        return True
    # A timeout scope, not wait_for: no task of its own to make and cancel (an idle
    # daemon does this every heartbeat, on cold caches).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    return event.is_set()


#: How often ``wait_settled`` looks again at an event that is set but not settled.
_SETTLE_POLL_S = 0.001


async def wait_settled(event: asyncio.Event, settled: Callable[[], bool], timeout_s: float) -> bool:
    """Wait at most ``timeout_s`` until ``event`` is set and ``settled()`` holds, both at
    once; True if they did.

    For an event that is cleared again as new work comes, and now and then for nothing
    (a timer that wakes a loop with nothing left to do): ``wait_event`` alone can wake
    for a set that a clear has already undone by the time its waiter runs, and would
    report a timeout that was not one.
    """
    deadline = time.monotonic() + timeout_s
    while not (event.is_set() and settled()):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if event.is_set():
            # Set but not settled: what settles it runs in a later callback. A wait on
            # a set event would return at once and spin, starving those callbacks.
            await asyncio.sleep(min(left, _SETTLE_POLL_S))
        else:
            await wait_event(event, left)
    return True
