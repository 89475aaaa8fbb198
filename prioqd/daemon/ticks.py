"""Periodic jobs: each ``[[schedule]]`` tick enqueued exactly once, however many
daemons share the Redis.

Every daemon with the entry sleeps until its next tick (Redis's clock, as the lease
estimates it), then offers the tick to the ``periodic`` Lua command, which pushes
the job only if no daemon has enqueued that tick or a later one: the dedup is one
atomic step in Redis. A tick found late (the daemon was down, or just started) is
a catch-up: with ``catch_up = "last"`` the most recent missed tick is enqueued once;
with ``"none"`` it is skipped. Nothing polls: between ticks the daemon sleeps.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from prioqd import periodic
from prioqd.broker import Broker
from prioqd.config import Config
from prioqd.errors import BrokerError
from prioqd.timing import Backoff, wait_event

#: A tick handled within this long of its time is on time; later, a catch-up.
ON_TIME_S = 30.0


class Ticks:
    def __init__(
        self,
        broker: Broker,
        config: Config,
        *,
        redis_time: Callable[[], float],
        log: Any,
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
    ) -> None:
        self.broker = broker
        self.config = config
        self._redis_time = redis_time
        self.log = log
        self._on_redis_down = on_redis_down
        #: The last tick handled here, by entry name.
        self._handled: dict[str, float] = {}
        #: Entries whose ticks cannot be computed, logged once (until a reload).
        self._broken: set[str] = set()
        self._wake = asyncio.Event()
        self._closing = False

    def reconfigured(self) -> None:
        """The schedule changed (a reload): look at it afresh."""
        self._broken.clear()
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        while not self._closing:
            self._wake.clear()
            now = self._redis_time()
            next_at = math.inf
            try:
                for entry in self.config.schedule:
                    ticks = self._ticks(entry, now)
                    if ticks is None:
                        continue
                    tick, following = ticks
                    if tick > self._handled.get(entry.name, -math.inf):
                        await self._offer(entry, tick, late=now - tick > ON_TIME_S)
                        self._handled[entry.name] = tick
                    next_at = min(next_at, following)
                backoff.reset()
            except BrokerError as exc:
                next_at = now + self._on_redis_down("periodic jobs", exc, backoff)
            await wait_event(self._wake, None if next_at == math.inf else next_at - now)

    def _ticks(self, entry: Any, now: float) -> tuple[float, float] | None:
        """The entry's last tick at or before ``now``, and its next one; None (logged
        once) if they cannot be computed. The config check computes them too, so this
        is for what it cannot foresee; one such entry must not stop the daemon, nor
        the other entries."""
        try:
            return periodic.last_tick(entry, now), periodic.next_tick(entry, now)
        except Exception as exc:
            if entry.name not in self._broken:
                self._broken.add(entry.name)
                self.log.error(
                    "schedule entry skipped: its ticks cannot be computed",
                    schedule=entry.name,
                    when=periodic.describe(entry),
                    error=repr(exc),
                )
            return None

    async def _offer(self, entry: Any, tick: float, *, late: bool) -> None:
        if late and entry.catch_up == "none":
            return
        pushed = await self.broker.periodic(
            entry.name,
            int(tick * 1000),
            entry.priority,
            periodic.payload(entry, tick),
            catch_up=late,
        )
        if pushed < 0:
            self.log.warning(
                "periodic tick not enqueued: it is later than Redis's clock "
                "(this host's clock jumped?)",
                schedule=entry.name,
                job_id=periodic.job_id(entry, tick),
            )
        elif pushed:
            self.log.info(
                "periodic job enqueued",
                schedule=entry.name,
                job_id=periodic.job_id(entry, tick),
                task=entry.task,
                queue=entry.priority,
                catch_up=late,
            )
