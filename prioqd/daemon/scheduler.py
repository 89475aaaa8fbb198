"""The schedule: retries and delayed jobs, promoted to their queues when due.

Nothing polls it. Every daemon knows the earliest due time (from its own schedule
ops, and from each heartbeat reply) and sleeps until then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from prioqd.broker import Broker
from prioqd.config import Config
from prioqd.errors import BrokerError
from prioqd.timing import Backoff, wait_event


class Scheduler:
    def __init__(
        self,
        broker: Broker,
        config: Config,
        *,
        log: Any,
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
    ) -> None:
        self.broker = broker
        self.config = config
        self.log = log
        self._on_redis_down = on_redis_down
        #: Dead letters dropped to keep within dead_letters_max: (how many, by what).
        self.on_trimmed: Callable[[int, str], None] = lambda n, during: None
        self._next_at: float | None = None  # monotonic
        self._wake = asyncio.Event()
        self._closing = False

    def due_in(self, delay_ms: int) -> None:
        """Something is due in ``delay_ms``: promote then, unless sooner already."""
        at = time.monotonic() + delay_ms / 1000
        if self._next_at is None or at < self._next_at:
            self._next_at = at
            self._wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        while not self._closing:
            self._wake.clear()
            if self._next_at is None:
                await self._wake.wait()
                continue
            delay = self._next_at - time.monotonic()
            if delay > 0:
                await wait_event(self._wake, delay)
                continue
            self._next_at = None
            try:
                moved, dead, next_due, trimmed = await self.broker.promote(
                    self.config.jobs.dead_letters_max
                )
                backoff.reset()
            except BrokerError as exc:
                self.due_in(int(self._on_redis_down("promote", exc, backoff) * 1000))
                continue
            if moved:
                self.log.debug("scheduled jobs due", jobs=moved)
            if dead:
                self.log.error(
                    "due jobs of a priority no daemon serves were dead-lettered", jobs=dead
                )
            if trimmed:
                self.on_trimmed(trimmed, "promote")
            if next_due is not None:
                self.due_in(next_due)

    def close(self) -> None:
        self._closing = True
        self._wake.set()
