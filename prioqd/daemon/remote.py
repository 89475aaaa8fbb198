"""Operators' commands, heard without polling: pause, resume, cancel.

``prioqd pause/resume/cancel`` (and the web dashboard) write the state to Redis
(``<prefix>:paused``, ``<prefix>:cancels``) and publish a note on
``<prefix>:control``. This part subscribes to that channel and, on every note (and
after every reconnection, since notes sent meanwhile are lost), reads the state
afresh: the state in Redis is the truth, the note only says "look now".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import redis.exceptions

from prioqd.broker import Broker, as_text, wrap_errors
from prioqd.errors import BrokerError
from prioqd.timing import Backoff, wait_event


class Remote:
    def __init__(
        self,
        broker: Broker,
        *,
        log: Any,
        on_paused: Callable[[set[str]], None],
        on_cancel: Callable[[set[str]], None],
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
        paused: set[str],
        on_problems: Callable[[list[str]], None] = lambda problems: None,
    ) -> None:
        self.broker = broker
        self._on_problems = on_problems
        self._problems: list[str] = []
        self.log = log
        self._on_paused = on_paused
        self._on_cancel = on_cancel
        self._on_redis_down = on_redis_down
        self._closing = asyncio.Event()
        #: The daemon's paused priorities (its one set; changed through on_paused).
        self.paused = paused

    async def refresh(self) -> None:
        """Read the paused priorities and the pending cancels. A key of the wrong type
        reads as empty and is reported (once): it must not stop every daemon."""
        keys = self.broker.keys
        r: Any = self.broker.redis
        problems: list[str] = []
        with wrap_errors("read operator commands"):
            async with r.pipeline(transaction=False) as pipe:
                pipe.smembers(keys.paused)
                pipe.zrange(keys.cancels, 0, -1, withscores=True)
                pipe.time()
                replies = await pipe.execute(raise_on_error=False)
            paused = _members(replies[0], keys.paused, "set", problems)
            # Expiries are Redis's clock (cancel_held sets them): compared with ours, a
            # host an hour off would drop, or keep, every cancel.
            seconds, micros = replies[2]
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            live = replies[1]
            if not isinstance(live, Exception):
                live = [m for m, expiry in live if expiry >= now_ms]
            cancels = _members(live, keys.cancels, "zset", problems)
        if problems != self._problems:
            self._problems = problems
            self._on_problems(problems)
        if paused != self.paused:
            self._on_paused(paused)
        self._on_cancel(cancels)

    async def run(self) -> None:
        backoff = Backoff()
        while not self._closing.is_set():
            pubsub = self.broker.redis.pubsub()
            try:
                with wrap_errors("subscribe to the control channel"):
                    await pubsub.subscribe(self.broker.keys.control)
                # Subscribed first, then read: a note sent in between is not lost.
                await self.refresh()
                backoff.reset()
                while not self._closing.is_set():
                    with wrap_errors("control channel"):
                        note = await self._next_note(pubsub)
                    if note is not None:
                        await self.refresh()
            except BrokerError as exc:
                await wait_event(
                    self._closing, self._on_redis_down("control channel", exc, backoff)
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _next_note(self, pubsub: Any) -> Any:
        """The next note on the channel, or None once closing. The read blocks with no
        timeout: an idle daemon's loop does not wake for it (a read with a timeout, to
        look at the closing flag, woke it every second: a third of its idle CPU)."""
        read = asyncio.ensure_future(
            pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        )
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({read, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not read.done():
                read.cancel()  # the pubsub is closed after this: its state does not matter
                with contextlib.suppress(asyncio.CancelledError):
                    await read
        return read.result() if not read.cancelled() else None

    def close(self) -> None:
        self._closing.set()


def _members(reply: Any, key: str, kind: str, problems: list[str]) -> set[str]:
    """A set's (or sorted set's) members as text (invalid UTF-8 replaced, as an
    operator's typo must not stop the daemon); empty, with a problem noted, for a key
    of the wrong type."""
    if isinstance(reply, redis.exceptions.ResponseError):
        if not str(reply).startswith("WRONGTYPE"):
            raise reply
        problems.append(f"WRONGTYPE: {key} is not a {kind}: read as empty")
        return set()
    return {as_text(m) for m in reply}
