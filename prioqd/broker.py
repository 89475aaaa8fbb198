"""Redis access: the Lua commands, the blocking fetch, and error wrapping.

redis-py errors are turned into ``BrokerError`` here, where they enter prioqd.
redis-py's own retries are switched off: whether a command may be repeated after a
dropped connection is a question only the caller can answer (see the guards in
``lua/prioqd.lua``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from prioqd.config import mask_url
from prioqd.errors import BrokerError
from prioqd.jobs import Op
from prioqd.keys import Keys

__all__ = ["BlockingFetch", "Broker", "Heartbeat", "mask_url", "wrap_errors"]

_SCRIPT = resources.files("prioqd").joinpath("lua/prioqd.lua").read_text(encoding="utf-8")

# A blocked BLMOVE may wait for hours; TCP keepalive is what notices a peer that
# vanished without closing the connection (power loss, network cut).
_KEEPALIVE: dict[int, int | bytes] = {}
for _name, _value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
    if hasattr(socket, _name):
        _KEEPALIVE[getattr(socket, _name)] = _value


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise BrokerError(f"{what}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class Heartbeat:
    registered: bool
    recovered_daemons: list[str]
    recovered_jobs: int
    next_due_ms: int | None


class Broker:
    """The daemon's and the CLI's single way into Redis."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        *,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        password: str | None = None,
    ) -> None:
        self.url = url
        self.keys = keys
        common: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "socket_keepalive": True,
            "socket_keepalive_options": _KEEPALIVE,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "prioqd",
        }
        if password is not None:
            common["password"] = password
        self._common = common
        self._pool = ConnectionPool.from_url(url, socket_timeout=socket_timeout_s, **common)
        self.redis = aioredis.Redis(connection_pool=self._pool)
        self._script = self.redis.register_script(_SCRIPT)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    def blocking_connection(self) -> AbstractConnection:
        """A connection of its own with no read timeout, for one blocked BLMOVE."""
        pool = ConnectionPool.from_url(self.url, socket_timeout=None, **self._common)
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        return conn

    async def _call(self, what: str, *args: Any) -> Any:
        with wrap_errors(what):
            return await self._script(args=[self.keys.prefix, *args])

    async def ping(self) -> None:
        with wrap_errors("ping"):
            await self.redis.ping()

    async def claim(
        self, daemon_id: str, max_jobs: int, priorities: Sequence[str]
    ) -> list[tuple[str, bytes]]:
        flat = await self._call("claim", "claim", daemon_id, max_jobs, *priorities)
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def record(self, daemon_id: str, ops: Sequence[Op]) -> list[int]:
        args: list[str | bytes] = []
        for op in ops:
            args.extend(op)
        result = await self._call("record", "record", daemon_id, *args)
        return [int(x) for x in result]

    async def heartbeat(
        self, daemon_id: str, lease_ms: int, info: dict[str, str], max_recover: int = 10
    ) -> Heartbeat:
        flat: list[str] = []
        for k, v in info.items():
            flat += [k, v]
        registered, daemons, jobs, due = await self._call(
            "heartbeat", "heartbeat", daemon_id, lease_ms, max_recover, *flat
        )
        names = daemons.decode() if isinstance(daemons, bytes) else str(daemons)
        return Heartbeat(
            registered=bool(registered),
            recovered_daemons=[d for d in names.split(",") if d],
            recovered_jobs=int(jobs),
            next_due_ms=None if int(due) < 0 else int(due),
        )

    async def recover(self, daemon_id: str, priorities: Sequence[str]) -> int:
        return int(await self._call("recover", "recover", daemon_id, *priorities))

    async def restore_claims(self, daemon_id: str, priorities: Sequence[str]) -> int:
        return int(await self._call("restore", "restore", daemon_id, *priorities))

    async def undead(self, entry: bytes, priority: str, payload: bytes, job_id: str) -> bool:
        return bool(
            await self._call("requeue dead letter", "undead", entry, priority, payload, job_id)
        )

    async def promote(self, max_jobs: int = 1000) -> tuple[int, int | None]:
        moved, due = await self._call("promote", "promote", max_jobs)
        return int(moved), None if int(due) < 0 else int(due)

    async def update_daemon_info(self, daemon_id: str, info: dict[str, str]) -> None:
        with wrap_errors("update daemon info"):
            r: Any = self.redis
            await r.hset(self.keys.daemon(daemon_id), mapping=info)

    async def daemons(self) -> list[tuple[str, dict[str, str], float]]:
        """Registered daemons: (id, info, lease ms left by Redis's clock)."""
        r: Any = self.redis  # redis-py's stubs type replies loosely
        with wrap_errors("list daemons"):
            now_s, now_us = await r.time()
            now_ms = now_s * 1000 + now_us // 1000
            entries = await r.zrange(self.keys.daemons, 0, -1, withscores=True)
            out = []
            for raw_id, expiry in entries:
                daemon_id = raw_id.decode()
                info = await r.hgetall(self.keys.daemon(daemon_id))
                decoded = {k.decode(): v.decode(errors="replace") for k, v in info.items()}
                out.append((daemon_id, decoded, float(expiry - now_ms)))
            return out


class BlockingFetch:
    """Waits for a job without polling: one ``BLMOVE queue:p -> claim:D:p`` per priority.

    Redis cannot block on several keys and move atomically, so each priority gets a
    connection of its own, blocked with no timeout. The first reply wins; the others
    are released with ``CLIENT UNBLOCK``. A job that arrives in that race has already
    been moved into this daemon's claim list, so it is returned too and nothing is
    lost. Idle, this costs no CPU and no Redis commands at all.
    """

    def __init__(self, broker: Broker, daemon_id: str, priorities: Sequence[str]) -> None:
        self._broker = broker
        self._daemon_id = daemon_id
        self._priorities = list(priorities)
        self._conns: list[AbstractConnection | None] = [None] * len(self._priorities)
        self._client_ids: list[int] = [0] * len(self._priorities)

    async def _connection(self, i: int) -> AbstractConnection:
        conn = self._conns[i]
        if conn is None:
            conn = self._broker.blocking_connection()
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("CLIENT", "ID")
            self._client_ids[i] = int(await conn.read_response())
            self._conns[i] = conn
        return conn

    async def close(self) -> None:
        conns, self._conns = self._conns, [None] * len(self._priorities)
        for conn in conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.disconnect()

    async def wait(self) -> list[tuple[str, bytes]]:
        keys = self._broker.keys
        tasks: list[asyncio.Task[Any]] = []
        try:
            with wrap_errors("blocking fetch"):
                for i, p in enumerate(self._priorities):
                    conn = await self._connection(i)
                    await conn.send_command(
                        "BLMOVE", keys.queue(p), keys.claim(self._daemon_id, p), "RIGHT", "LEFT", 0
                    )
                for maybe in self._conns:
                    assert maybe is not None
                    tasks.append(asyncio.ensure_future(maybe.read_response(timeout=math.inf)))
                _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if pending:
                    ids = [self._client_ids[i] for i, t in enumerate(tasks) if t in pending]
                    async with self._broker.redis.pipeline(transaction=False) as pipe:
                        for cid in ids:
                            pipe.client_unblock(cid)
                        await pipe.execute()
                replies = await asyncio.gather(*tasks)
        except BaseException:
            # Cancelled (shutdown) or a connection failed: the connections are in an
            # unknown state, so drop them. Anything BLMOVE moved stays in the claim
            # lists, which are put back on a clean stop or by lease recovery.
            for t in tasks:
                t.cancel()
            await self.close()
            raise
        pairs = zip(self._priorities, replies, strict=True)
        return [(p, reply) for p, reply in pairs if reply is not None]


@contextlib.asynccontextmanager
async def connected(broker: Broker) -> AsyncIterator[Broker]:
    try:
        yield broker
    finally:
        await broker.close()
