"""The daemon's identity and lease: register, heartbeat until deregistered, recover
the daemons that died.

Each daemon's lease is its score in ``<prefix>:daemons`` (expiry in ms, Redis's
clock). The heartbeat extends it every ``lease_s / 3`` and, while our own lease is
unbroken, recovers daemons whose lease ran out. The heartbeat keeps beating through
the whole drain of a stop: it ends only just before we deregister, so a long drain
never lets another daemon rerun the jobs still finishing here.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from prioqd import __version__
from prioqd.broker import Broker, Heartbeat
from prioqd.config import Config
from prioqd.daemon.slots import Slots
from prioqd.errors import BrokerError
from prioqd.timing import Backoff, wait_event


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def default_daemon_id() -> str:
    """host-pid-random: unique, and readable in ``prioqd status`` and the journal."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Lease:
    """Register, heartbeat, deregister; and our estimate of Redis's clock."""

    def __init__(
        self,
        broker: Broker,
        config: Config,
        daemon_id: str,
        *,
        slots: Slots,
        log: Any,
        on_redis_down: Callable[[str, BrokerError, Backoff], float],
        on_due_in_ms: Callable[[int], None],
    ) -> None:
        self.broker = broker
        self.config = config
        self.host = socket.gethostname()
        self.id = daemon_id
        self.log = log
        self._on_redis_down = on_redis_down
        self._on_due_in_ms = on_due_in_ms
        #: Dead letters dropped to keep within dead_letters_max: (how many, by what).
        self.on_trimmed: Callable[[int, str], None] = lambda n, during: None
        #: The daemon's slot tokens: their total is registered (and changes on reload).
        self.slots = slots
        #: The daemon's last error, as ``prioqd status`` and the dashboard show it.
        self.last_error: Callable[[], str] = lambda: ""
        #: Told of a problem the daemon's STATUS should show.
        self.on_problem: Callable[[str], None] = lambda text: None
        #: Called when a beat renews a lease a cycle had found gone: claims may start
        #: again (an idle daemon has no run ending to wake its cycle).
        self.on_renewed: Callable[[], None] = lambda: None
        self._error_written = ""
        #: Where we run: it does not change while we run, so it is read once, not
        #: every beat.
        self._where = {
            "host": self.host,
            "pid": str(os.getpid()),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"),
            "pidns": _pidns(),
        }
        #: Redis's clock minus ours, in seconds (measured at each beat).
        self.clock_offset_s = 0.0
        #: False once a cycle found our lease gone: claim nothing until a beat renews it.
        self.held = False
        self._beat_now = asyncio.Event()
        self._closing = asyncio.Event()

    # --- time -----------------------------------------------------------------------

    def redis_time(self) -> float:
        """Now, by Redis's clock (an estimate good to a round trip)."""
        return time.time() + self.clock_offset_s

    @property
    def interval_s(self) -> float:
        return self.config.daemon.lease_s / 3

    @property
    def lease_ms(self) -> int:
        """How long past a heartbeat this daemon counts as alive.

        Two intervals: one missed beat is tolerated, and since every live daemon
        checks for expired leases once an interval, a dead daemon's jobs are put
        back within lease_s of its last beat (2/3 + 1/3), as documented.
        """
        return int(self.interval_s * 2 * 1000)

    def info(self) -> dict[str, str]:
        return {
            **self._where,
            "priorities": ",".join(self.config.queues.priorities),
            "slots": str(self.slots.total),
            "started_at": f"{time.time():.6f}",
            "version": __version__,
        }

    # --- register, beat, deregister -------------------------------------------------

    async def register(self, stopping: asyncio.Event) -> bool:
        """Recover dead predecessors on this host, then take our lease. Retries
        through Redis outages; False if a stop came first."""
        backoff = Backoff()
        while not stopping.is_set():
            try:
                await self._recover_local_predecessors()
                await self.beat()
                return True
            except BrokerError as exc:
                await wait_event(stopping, self._on_redis_down("register", exc, backoff))
        return False

    async def _recover_local_predecessors(self) -> None:
        """Recover daemons that ran on this host and whose process is gone.

        After a SIGKILL and a restart (systemd's Restart=on-failure) the new process
        puts its predecessor's jobs back at once instead of waiting out the lease.
        Same host, same boot and same pid namespace are all required: a pid means
        nothing elsewhere, and a live daemon must never be robbed.
        """
        me = self.info()
        for other, info, _ in await self.broker.daemons():
            if other == self.id or not info.get("pid", "").isdigit():
                continue
            same_place = all(info.get(k) == me[k] and me[k] for k in ("host", "boot_id", "pidns"))
            if same_place and not _pid_alive(int(info["pid"])):
                queued, dead, trimmed, problems = await self.broker.recover(
                    other,
                    self.config.queues.priorities,
                    died=True,
                    max_recoveries=self.config.jobs.max_recoveries,
                    max_dead=self.config.jobs.dead_letters_max,
                )
                self.log.warning(
                    "recovered a dead daemon's jobs", dead_daemon=other, jobs=queued, poison=dead
                )
                if trimmed:
                    self.on_trimmed(trimmed, "recover")
                self._report(problems, [other])

    async def beat(self) -> Heartbeat:
        sent = time.time()
        beat = await self.broker.heartbeat(
            self.id,
            self.lease_ms,
            self.info(),
            max_recoveries=self.config.jobs.max_recoveries,
            max_dead=self.config.jobs.dead_letters_max,
        )
        self.clock_offset_s = beat.redis_now_ms / 1000 - (sent + time.time()) / 2
        if self.held and beat.registered:
            self.log.warning(
                "our lease had run out and our jobs were recovered by another daemon; "
                "their outcomes here are not recorded"
            )
        elif beat.lapsed:
            self.log.warning("our lease had run out; renewed before anyone recovered it")
        renewed = not self.held
        self.held = True
        if renewed:
            self.on_renewed()
        if beat.recovered_daemons:
            self.log.warning(
                "recovered jobs of daemons whose lease expired",
                dead_daemons=beat.recovered_daemons,
                jobs=beat.recovered_jobs,
                poison=beat.poisoned,
            )
        if beat.poisoned:
            self.log.error(
                "dead-lettered payloads whose daemons kept dying while holding them",
                jobs=beat.poisoned,
            )
        if beat.trimmed:
            self.on_trimmed(beat.trimmed, "heartbeat")
        self._report(beat.problems, beat.recovered_daemons)
        if beat.next_due_ms is not None:
            self._on_due_in_ms(beat.next_due_ms)
        error = self.last_error()[:500]
        if error != self._error_written or beat.registered:
            # Only when it changed: an idle daemon's beat stays one command.
            await self.broker.update_daemon_info(self.id, {"last_error": error})
            self._error_written = error
        return beat

    def _report(self, problems: list[str], daemons: list[str]) -> None:
        """Keys of a recovered (or deregistered) daemon that have the wrong type: left
        as they are (what they held is lost to prioqd), said once (the daemon is
        forgotten)."""
        if problems:
            self.log.error(
                "keys of the wrong type left as they are while recovering a daemon's jobs",
                daemons=daemons,
                problems=problems,
            )
            self.on_problem(problems[0])

    def lost(self) -> None:
        """A cycle found our lease gone: stop claiming and renew it now."""
        if self.held:
            self.held = False
            self.log.warning("our lease has run out; claiming nothing until it is renewed")
        self._beat_now.set()

    async def run(self) -> None:
        """Beat every interval until ``close``."""
        backoff = Backoff()
        while not self._closing.is_set():
            await wait_event(self._beat_now, self.interval_s)
            self._beat_now.clear()
            if self._closing.is_set():
                return
            try:
                await self.beat()
            except BrokerError as exc:
                self._on_redis_down("heartbeat", exc, backoff)
                continue
            backoff.reset()

    def close(self) -> None:
        """End the heartbeat loop (just before deregistering)."""
        self._closing.set()
        self._beat_now.set()

    async def deregister(self) -> int:
        """Put back whatever we still hold and forget us; how many jobs went back."""
        queued, _, trimmed, problems = await self.broker.recover(
            self.id,
            self.config.queues.priorities,
            died=False,
            max_recoveries=self.config.jobs.max_recoveries,
            max_dead=self.config.jobs.dead_letters_max,
        )
        if trimmed:
            self.on_trimmed(trimmed, "recover")
        self._report(problems, [self.id])
        return queued
