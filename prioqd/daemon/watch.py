"""The blocking waits: learn of a job in Redis without polling.

One ``BLMOVE queue:p -> landing:D:p`` per priority, each on its own connection
(``broker.BlockingMove``), in two modes:

- **Idle** (a claim found every queue empty; the cycle claims nothing meanwhile):
  wait on every queue. The first payload to land runs at once if a free token is
  left for every priority above it (a higher payload of the same moment then runs
  beside it). If not (one slot, say), one round trip first tells whether a higher
  one landed with it (see ``_settle``); only the highest payload that landed in that
  race runs, the rest go back to the head of their queues, so the next claim takes
  jobs in strict priority order.
- **Busy** (the cycle claims as slot tokens free up): wait only on the priorities
  above the lowest job held here that has not started. Such a payload is taken at
  once, on a token lent if none is free (``Slots.take_one``), and goes to the pool,
  which sends every lower job not started back to its queue (``Pool.evict``). So a
  higher job waits for one running job at most, never for a lower job that has not
  started. Waits no longer needed once those jobs start are left in place, not
  called off (see ``reconcile``); the rest of a burst is claimed in batches by the
  cycle.

A payload that lands on a wait being called off, or that is no longer higher than
what runs, is adopted and put back at the head of its queue. Idle, all this costs no
Redis commands and no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from prioqd.broker import BlockingMove, Broker
from prioqd.daemon.cycle import Cycle
from prioqd.daemon.dispatch import Dispatcher
from prioqd.daemon.slots import Slots
from prioqd.errors import BrokerError
from prioqd.ops import Unland
from prioqd.timing import Backoff


class Watch:
    def __init__(
        self,
        broker: Broker,
        daemon_id: str,
        priorities: list[str],
        *,
        cycle: Cycle,
        dispatch: Dispatcher,
        slots: Slots,
        log: Any,
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
        on_failure: Callable[[BaseException], None],
        paused: set[str],
    ) -> None:
        self.priorities = priorities
        self._on_failure = on_failure
        self.cycle = cycle
        self.dispatch = dispatch
        self.slots = slots
        self.log = log
        self._on_redis_down = on_redis_down
        self._moves = BlockingMove(broker, daemon_id, priorities)
        self._rank = {p: i for i, p in enumerate(priorities)}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Priorities whose wait broke: a payload may have landed unseen, so they do
        #: not wait again until an ``Unland`` has put their landing list back.
        self._dirty: set[str] = set()
        #: Waits being called off.
        self._leaving: set[str] = set()
        #: Payloads that landed together, while the first one's rivals are heard out.
        self._race: list[tuple[int, str, bytes]] | None = None
        self._background: set[asyncio.Future[None]] = set()
        #: Waits left in place from idle mode until a claim shows we are busy.
        self._left_over = False
        self._backoff = Backoff()
        #: Priorities an operator paused (the daemon's one set): never waited on.
        self.paused = paused
        #: Idle mode: every queue empty, the waits here claim and the cycle does not.
        self.idle = False
        self._closing = False
        #: A ``reconcile`` is due at the end of this turn of the loop (``changed``).
        self._reconcile_due = False

    # --- which queues to wait on -------------------------------------------------------

    def go_idle(self) -> None:
        """Every queue is empty: wait on all of them (the cycle stops claiming)."""
        if self._closing:
            return
        self.idle = True
        self._left_over = False
        for p in self.priorities:
            self._arm(p)

    def paused_changed(self) -> None:
        """Operators paused or resumed priorities (``self.paused`` holds them now)."""
        stop = [p for p in self._tasks if p in self.paused and p not in self._leaving]
        if stop:
            self._call_off(stop)
        if self.idle:
            for p in self.priorities:
                self._arm(p)
        else:
            self.reconcile()

    def may_start(self, rank: int) -> bool:
        """Whether a job of ``rank`` may start now: not if a payload of a higher
        priority has landed and waits unread on our connections (it arrived while the
        worker was finishing; its reply is a fraction of a millisecond from being read).
        The pool then holds the lower job back briefly, and the higher one takes the
        worker instead."""
        higher = [p for p in self.priorities[:rank] if p in self._tasks]
        return not higher or not self._moves.unread(higher)

    def _outranks_held(self, p: str) -> bool:
        lowest = self.dispatch.lowest_held()
        return lowest is not None and self._rank[p] < lowest

    def _busy_targets(self) -> list[str]:
        """The priorities above the lowest job held here that has not started.

        Not those above the jobs running here: a wait that stays blocked while this
        daemon is busy would be served before an idle daemon's (Redis serves the
        longest-blocked client first), and a higher job would wait here for a running
        job while another daemon idles. The price is a window of about a round trip: a
        claim Redis ran just before a higher push hands a lower job to the next free
        worker (see docs/design.md, "What is left")."""
        lowest = self.dispatch.lowest_unstarted()
        if lowest is None:
            return []
        return [p for p in self.priorities[:lowest] if p not in self.paused]

    def changed(self) -> None:
        """The jobs held here changed: ``reconcile`` once this turn of the loop is done.
        A worker's frames come in bursts (a batch's results, read at once), and each
        ended job says so: one reconcile for all of them, not one a job."""
        if not self._reconcile_due:
            self._reconcile_due = True
            asyncio.get_running_loop().call_soon(self._reconcile_now)

    def _reconcile_now(self) -> None:
        self._reconcile_due = False
        self.reconcile()

    def reconcile(self) -> None:
        """Busy mode: wait on the priorities above the lowest job held here that has
        not started. A wait no longer needed is left in place (calling it off and
        renewing it for every prefetched job would cost two commands a job): what
        lands there is taken if it outranks what runs here, else put back."""
        if self._closing or self.idle or self._race is not None:
            return
        for p in self._busy_targets():
            self._arm(p)

    def _arm(self, p: str) -> None:
        if (
            p not in self._tasks
            and p not in self._dirty
            and p not in self.paused
            and not self._closing
        ):
            self._tasks[p] = task = asyncio.ensure_future(self._wait(p))
            task.add_done_callback(self._failed)

    def _call_off(self, priorities: list[str]) -> None:
        self._leaving.update(priorities)
        self._background_task(self._unblock(priorities))

    def _background_task(self, coro: Any) -> asyncio.Future[None]:
        task: asyncio.Future[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Future[None]) -> None:
        self._background.discard(task)
        self._failed(task)

    def _failed(self, task: asyncio.Future[Any]) -> None:
        # A failure here would leave the daemon waiting on nothing: an internal failure.
        if not task.cancelled() and task.exception() is not None:
            self._on_failure(task.exception())  # type: ignore[arg-type]

    async def _unblock(self, priorities: list[str]) -> None:
        try:
            await self._moves.unblock(priorities)
        except BrokerError as exc:
            # The waits stay blocked; a payload landing there is put back all the same.
            self.log.warning("could not call off a blocking wait", error=str(exc))

    # --- a wait, and what lands -------------------------------------------------------

    async def _wait(self, p: str) -> None:
        try:
            raw = await self._moves.move(p)
        except BrokerError as exc:
            self._dirty.add(p)
            self._done(p)
            await asyncio.sleep(self._on_redis_down("blocking fetch", exc, self._backoff))
            self.cycle.repair(Unland(p))
            return
        except asyncio.CancelledError:
            # Shutdown: whatever landed is put back by deregistering.
            self._dirty.add(p)
            self._done(p)
            raise
        self._done(p)
        self._backoff.reset()
        if raw is not None:
            self._landed(p, raw)
        elif self.idle and self._race is None:
            self._arm(p)  # called off, but we went back to idle meanwhile (or resumed)
        else:
            self.reconcile()

    def _done(self, p: str) -> None:
        self._tasks.pop(p, None)
        self._leaving.discard(p)

    def _landed(self, p: str, raw: bytes) -> None:
        claim = self.cycle.new_claim()
        if self._race is not None:
            self._race.append((claim, p, raw))  # settled by _settle
        elif self._closing or p in self.paused:
            self.dispatch.land_back(claim, p, raw)
        elif self.idle:
            higher = [q for q in self.priorities[: self._rank[p]] if q not in self.paused]
            if len(higher) < self.slots.free:
                # Nothing of the same moment can wait for it: a free token (an idle
                # worker) is left for every priority above it, whether its payload
                # lands on a wait or on one being called off (put back, then claimed),
                # so a higher job starts at once beside it. Run it now, no round trip
                # first. (Counting only the waits in place is not enough: a payload
                # put back from one being called off would find the token taken.)
                self.idle = False
                self.dispatch.land(claim, p, raw)
                self._leave_idle()
            else:
                # A higher payload may have landed at the same moment, and the tokens
                # left would not run both: find out before choosing (the cycle claims
                # nothing meanwhile). Not on an unread reply alone: Redis sends the
                # replies of one moment to its clients in no set order.
                self._race = [(claim, p, raw)]
                self._background_task(self._settle())
        elif self._outranks_held(p):
            # Higher than something held: it goes first, on a lent token if need be.
            self.dispatch.land(claim, p, raw)
            self.reconcile()
        else:
            self.dispatch.land_back(claim, p, raw)
        self.cycle.wake()

    async def _settle(self) -> None:
        """Run the highest payload that landed in a race and put the rest back at the
        head of their queues.

        Redis writes the replies of one event-loop turn to its clients in no set order,
        but writes them all before it reads another command: once a ``PING`` sent after
        the first payload was read comes back, any higher payload that landed with it
        is in our socket buffers. So one round trip decides: nothing unread on a higher
        wait, and the best payload at hand runs (the other waits stay or are called off
        as in busy mode). Only when a higher reply is there, or the ping failed, is every
        wait called off and heard out first."""
        try:
            await self._moves.barrier()
            heard_out = False
        except BrokerError as exc:
            self.log.debug("barrier failed: every wait is heard out", error=str(exc))
            heard_out = True
        if heard_out or self._higher_unread():
            others = [q for q in self._tasks if q not in self._leaving]
            tasks = [self._tasks[q] for q in others]
            self._leaving.update(others)
            await self._unblock(others)
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
        race, self._race = self._race or [], None
        self.idle = False
        race.sort(key=lambda landed: self._rank[landed[1]])
        for i, (claim, p, raw) in enumerate(race):
            if i == 0 and not self._closing:
                self.dispatch.land(claim, p, raw)
            else:
                self.dispatch.land_back(claim, p, raw)
        self._leave_idle()
        self.cycle.wake()

    def _leave_idle(self) -> None:
        """From idle to busy: the waits busy mode does not want are called off, the
        rest kept (see ``reconcile``). Not yet while a slot token is free: the cycle
        claims with it at once, and if every queue is still empty (one job pushed to
        an idle daemon) it goes back to idle and finds the waits in place (calling off
        and renewing two waits cost four commands a pickup). Meanwhile what lands on
        them is handled as in busy mode: taken if it outranks what runs here, else put
        back. They are called off when a claim brings jobs (``claimed``)."""
        self._left_over = True
        if self.slots.free <= 0:
            self.claimed()
        else:
            self.reconcile()

    def claimed(self) -> None:
        """A claim brought jobs: busy, for now. Call off the waits left over from idle
        that busy mode does not want."""
        if not self._left_over:
            return
        self._left_over = False
        if self._closing or self.idle:
            return
        targets = self._busy_targets()
        extra = [q for q in self._tasks if q not in targets and q not in self._leaving]
        if extra:
            self._call_off(extra)
        self.reconcile()

    def _higher_unread(self) -> bool:
        """Whether a wait above the best payload of the race has a reply unread."""
        best = min(self._rank[p] for _, p, _ in self._race or [])
        return self._moves.unread(
            [q for q in self._tasks if self._rank[q] < best and q not in self._leaving]
        )

    def unlanded(self, p: str) -> None:
        """An ``Unland`` of ``p`` was applied: it may wait again."""
        self._dirty.discard(p)
        if self.idle:
            self._arm(p)
        else:
            self.reconcile()

    async def close(self) -> None:
        """Call off every wait (shutdown)."""
        self._closing = True
        self.idle = False
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            if pending:
                # The cancellation was lost (a read completing as it landed): closing
                # the connections makes the blocked reads fail instead.
                await self._moves.close()
                await asyncio.wait(pending, timeout=2.0)
        for bg in list(self._background):
            bg.cancel()
        with contextlib.suppress(Exception):
            await self._moves.close()
