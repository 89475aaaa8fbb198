"""systemd's view of the daemon: the watchdog, the STATUS line, and reloads (SIGHUP)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from prioqd import config as configuration
from prioqd.config import Config
from prioqd.errors import ConfigError
from prioqd.systemd import Notifier
from prioqd.timing import wait_event


class Control:
    def __init__(
        self,
        notifier: Notifier,
        *,
        status_text: Callable[[], str],
        apply: Callable[[Config, list[str], list[str]], Awaitable[str | None]],
        current: Callable[[], Config],
        log: Callable[[], Any],
    ) -> None:
        self.notifier = notifier
        self._status_text = status_text
        self._apply = apply
        self._current = current
        self._log = log
        self._reload = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._closing = asyncio.Event()
        #: Config keys changed on disk that only a restart applies.
        self.needs_restart: list[str] = []
        #: Why the last reload failed, until one succeeds.
        self.reload_error = ""

    def status_changed(self) -> None:
        self._status_dirty.set()

    def request_reload(self) -> None:
        self._reload.set()

    def close(self) -> None:
        self._closing.set()
        self._reload.set()
        self._status_dirty.set()

    async def watchdog_loop(self, interval_s: float) -> None:
        # Pinged from the event loop itself: if the loop wedges, the pings stop and
        # systemd's WatchdogSec kills and restarts us. Not ended by ``close``: the
        # lifecycle cancels it last, so a drain or a deregistration that hangs is
        # caught too (a sleep's cancellation cannot be lost).
        while True:
            self.notifier.send(WATCHDOG=1)
            await asyncio.sleep(interval_s)

    async def status_loop(self) -> None:
        # Woken by changes only (nothing at idle), and at most once a second.
        last = ""
        while not self._closing.is_set():
            await self._status_dirty.wait()
            self._status_dirty.clear()
            text = self._status_text()
            if text != last and not self._closing.is_set():
                self.notifier.send(STATUS=text)
                last = text
            await wait_event(self._closing, 1.0)

    async def reload_loop(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            if self._closing.is_set():
                return
            await self.reload()

    async def reload(self) -> bool:
        """Re-read the config file and apply what can change live; True if applied.

        Live: log level and format, slots, max_jobs_per_worker, every [jobs] and
        [daemon] key. Redis, queues and task modules need a restart: they are named
        in the log and the STATUS line. An invalid file, or workers that cannot start
        with it (a deploy half done), changes nothing: the daemon keeps serving on
        what it had, and says so in the log and the STATUS line.
        """
        self.notifier.reloading()
        old = self._current()
        try:
            new = configuration.load(old.path)
        except ConfigError as exc:
            return self._rejected(str(exc))
        merged, applied, pending = configuration.reloadable(old, new)
        problem = await self._apply(merged, applied, pending)
        if problem is not None:
            return self._rejected(problem)
        self.needs_restart = pending
        self.reload_error = ""
        # A key that needs a restart is something an operator must act on.
        log = self._log()
        (log.warning if pending else log.info)(
            "config reloaded", applied=applied, needs_restart=pending
        )
        self.notifier.ready(self._status_text())
        self.status_changed()
        return True

    def _rejected(self, problem: str) -> bool:
        self.reload_error = f"reload rejected: {problem}"
        self._log().error(
            "reload rejected; still running the previous configuration", error=problem
        )
        self.notifier.ready(self._status_text())
        self.status_changed()
        return False
