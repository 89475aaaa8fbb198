"""The blocking wait: with every queue empty, wait in Redis instead of polling.

One ``BLMOVE queue:p -> landing:D:p`` per priority, each on its own connection
(``broker.BlockingMove``). The first payload to land is run; the other waits are
called off with ``CLIENT UNBLOCK``, and a payload that lands in that race is adopted
and put back at the head of its queue, so the next claim takes jobs in strict
priority order. Idle, this costs no Redis commands and no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from prioqd.broker import BlockingMove, Broker
from prioqd.daemon.cycle import Cycle
from prioqd.daemon.dispatch import Dispatcher
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
        log: Any,
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
    ) -> None:
        self.priorities = priorities
        self.cycle = cycle
        self.dispatch = dispatch
        self.log = log
        self._on_redis_down = on_redis_down
        self._moves = BlockingMove(broker, daemon_id, priorities)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Priorities whose wait broke: a payload may have landed unseen, so they do
        #: not wait again until an ``Unland`` has put their landing list back.
        self._dirty: set[str] = set()
        self._backoff = Backoff()
        self._rank = {p: i for i, p in enumerate(priorities)}
        #: Payloads that landed together, while the first one's rivals are heard out.
        self._race: list[tuple[int, str, bytes]] | None = None
        self._settling: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def active(self) -> bool:
        return self.cycle.waiting

    def idle(self) -> None:
        """Every queue is empty: wait on all of them (the cycle stops claiming)."""
        if self._closing:
            return
        self.cycle.waiting = True
        for p in self.priorities:
            self._arm(p)

    def _arm(self, p: str) -> None:
        if p not in self._tasks and p not in self._dirty and not self._closing:
            self._tasks[p] = asyncio.ensure_future(self._wait(p))

    async def _wait(self, p: str) -> None:
        try:
            raw = await self._moves.move(p)
        except BrokerError as exc:
            self._dirty.add(p)
            del self._tasks[p]
            await asyncio.sleep(self._on_redis_down("blocking fetch", exc, self._backoff))
            self.cycle.repair(Unland(p))
            return
        except asyncio.CancelledError:
            # Shutdown: whatever landed is put back by deregistering.
            self._dirty.add(p)
            self._tasks.pop(p, None)
            raise
        del self._tasks[p]
        self._backoff.reset()
        if raw is not None:
            self._landed(p, raw)
        elif self.cycle.waiting and self._race is None:
            self._arm(p)  # called off, but we went back to waiting meanwhile

    def _landed(self, p: str, raw: bytes) -> None:
        claim = self.cycle.new_claim()
        if self._race is not None:
            self._race.append((claim, p, raw))  # settled by _settle
        elif self.cycle.waiting and not self._closing:
            others = [q for q in self._tasks if q != p]
            if p == self.priorities[0] or not others:
                # Nothing can outrank it: run it now, call the other waits off.
                self.cycle.waiting = False
                self.dispatch.land(claim, p, raw)
                if others:
                    self._settling = asyncio.ensure_future(self._unblock(others))
            else:
                # A higher payload may have landed at the same moment: hear every
                # wait out before choosing (the cycle claims nothing meanwhile).
                self._race = [(claim, p, raw)]
                self._settling = asyncio.ensure_future(self._settle(others))
        else:
            self.dispatch.land_back(claim, p, raw)
        self.cycle.wake()

    async def _settle(self, others: list[str]) -> None:
        """Call off the other waits, then run the highest payload that landed and put
        the rest back at the head of their queues."""
        tasks = [self._tasks[q] for q in others if q in self._tasks]
        await self._unblock(others)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        race, self._race = self._race or [], None
        self.cycle.waiting = False
        race.sort(key=lambda landed: self._rank[landed[1]])
        for i, (claim, p, raw) in enumerate(race):
            if i == 0 and not self._closing:
                self.dispatch.land(claim, p, raw)
            else:
                self.dispatch.land_back(claim, p, raw)
        self.cycle.wake()

    async def _unblock(self, priorities: list[str]) -> None:
        try:
            await self._moves.unblock(priorities)
        except BrokerError as exc:
            # The waits stay blocked; a payload landing there is put back all the same.
            self.log.warning("could not call off a blocking wait", error=str(exc))

    def unlanded(self, p: str) -> None:
        """An ``Unland`` of ``p`` was applied: it may wait again."""
        self._dirty.discard(p)
        if self.cycle.waiting:
            self._arm(p)

    async def close(self) -> None:
        """Call off every wait (shutdown)."""
        self._closing = True
        self.cycle.waiting = False
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
        with contextlib.suppress(Exception):
            await self._moves.close()
