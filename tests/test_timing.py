"""prioqd.timing's waits, on a real event loop (no daemon, no Redis)."""

from __future__ import annotations

import asyncio
import time

from prioqd.timing import wait_event, wait_settled


def test_a_set_undone_before_the_waiter_runs_is_waited_past_not_taken_for_a_timeout() -> None:
    """The drain's wait: the cycle sets `drained`, then a timer with nothing to do wakes
    the cycle, which clears it, before the waiter runs. That is not a timeout (a stop
    once logged "outcomes not written" 7 ms into its 5 s): wait on until it is set and
    settled, and only then say so."""

    async def scenario() -> tuple[bool, bool, float]:
        event = asyncio.Event()
        work_left = [True]
        loop = asyncio.get_running_loop()

        def set_then_clear() -> None:
            # Both in one turn of the loop, as when a timer queued in the same turn
            # wakes the cycle: the waiter is woken by the set, and runs after the clear.
            event.set()
            event.clear()

        def done() -> None:
            work_left[0] = False
            event.set()

        loop.call_later(0.01, set_then_clear)
        loop.call_later(0.05, done)
        # (What the drain did before: wait_event, which reads the cleared event.)
        naive = await wait_event(event, 0.03)
        event.clear()
        loop.call_later(0.01, set_then_clear)
        loop.call_later(0.05, done)
        work_left[0] = True
        t = time.monotonic()
        ok = await wait_settled(event, lambda: not work_left[0], 1.0)
        return naive, ok, time.monotonic() - t

    naive, ok, took_s = asyncio.run(scenario())
    assert naive is False  # the trap the drain fell into
    assert ok is True and 0.04 <= took_s < 0.5


def test_wait_settled_gives_up_at_its_timeout_and_holds_out_for_its_condition() -> None:
    async def scenario() -> tuple[bool, float, bool]:
        event = asyncio.Event()
        event.set()  # set, but the condition never holds
        t = time.monotonic()
        unsettled = await wait_settled(event, lambda: False, 0.05)
        took_s = time.monotonic() - t
        settled_at_once = await wait_settled(event, lambda: True, 0.0)
        return unsettled, took_s, settled_at_once

    unsettled, took_s, settled_at_once = asyncio.run(scenario())
    assert unsettled is False and 0.04 <= took_s < 0.5
    assert settled_at_once is True
