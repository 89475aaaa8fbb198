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

    async def scenario() -> tuple[bool, bool, list[str]]:
        event = asyncio.Event()
        seen: list[str] = []
        loop = asyncio.get_running_loop()

        def set_then_clear() -> None:
            # Both in one turn of the loop, as when a timer queued in the same turn
            # wakes the cycle: the waiter is woken by the set, and runs after the clear.
            seen.append("set and cleared")
            event.set()
            event.clear()

        def done() -> None:
            seen.append("done")
            event.set()

        # (What the drain did before: wait_event, which reads the cleared event.)
        loop.call_later(0.01, set_then_clear)
        naive = await wait_event(event, 1.0)
        seen.clear()
        loop.call_later(0.01, set_then_clear)
        loop.call_later(0.1, done)
        ok = await wait_settled(event, lambda: "done" in seen, 5.0)
        return naive, ok, list(seen)

    naive, ok, seen = asyncio.run(scenario())
    assert naive is False  # the trap the drain fell into
    assert ok is True and seen == ["set and cleared", "done"]


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
    assert unsettled is False and 0.05 <= took_s < 2.0
    assert settled_at_once is True


def test_a_set_but_unsettled_wait_lets_the_loop_run_what_settles_it() -> None:
    """Set, not settled yet: what settles it is a later callback, and the wait must not
    spin (a spinning drain would starve the heartbeat and the cycle for its whole bound)."""

    async def scenario() -> tuple[bool, float, int]:
        event = asyncio.Event()
        event.set()
        settled = [False]
        ticks = [0]
        loop = asyncio.get_running_loop()

        async def heartbeat() -> None:
            while True:
                ticks[0] += 1
                await asyncio.sleep(0.005)

        beat = asyncio.ensure_future(heartbeat())
        loop.call_later(0.05, lambda: settled.__setitem__(0, True))
        t = time.monotonic()
        ok = await wait_settled(event, lambda: settled[0], 5.0)
        took_s = time.monotonic() - t
        beat.cancel()
        return ok, took_s, ticks[0]

    ok, took_s, ticks = asyncio.run(scenario())
    assert ok is True and took_s < 2.0
    assert ticks >= 3  # the loop ran other tasks meanwhile
