"""Redis access: the Lua commands, the blocking fetch, and error wrapping.

redis-py errors are turned into ``BrokerError`` here, where they enter prioqd.
redis-py's own retries are switched off: whether a command may be repeated after a
dropped connection is a question only the caller can answer (see the guards in
``lua/prioqd.lua``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import socket
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from prioqd.config import mask_url
from prioqd.errors import BrokerError, ConnectionSetupError
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
        self.socket_timeout_s = socket_timeout_s
        common: dict[str, Any] = {
            "socket_connect_timeout": connect_timeout_s,
            "retry": Retry(NoBackoff(), 0),
            "client_name": "prioqd",
        }
        if urllib.parse.urlsplit(url).scheme in ("redis", "rediss"):
            # TCP only: a unix:// connection takes no keepalive options (and needs none).
            common["socket_keepalive"] = True
            common["socket_keepalive_options"] = _KEEPALIVE
        if password is not None:
            common["password"] = password
        self._common = common
        self._pool = self._make_pool(socket_timeout_s)
        self.redis = aioredis.Redis(connection_pool=self._pool)
        self._script = self.redis.register_script(_SCRIPT)
        self._hot = _HotPath(self, _SCRIPT)

    async def close(self) -> None:
        await self._hot.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    def _make_pool(self, socket_timeout_s: float | None) -> ConnectionPool:
        """A pool for ``self.url``, with one connection object built (no socket is
        opened) so that a URL redis-py cannot turn into a connection fails here, at
        start-up, as ``ConnectionSetupError`` rather than later as a traceback."""
        try:
            pool = ConnectionPool.from_url(
                self.url, socket_timeout=socket_timeout_s, **self._common
            )
            pool.make_connection()  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ConnectionSetupError(
                f"cannot make a Redis connection from {mask_url(self.url)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return pool

    def connection(self, socket_timeout_s: float | None) -> AbstractConnection:
        """A connection of its own (not from the pool), for the hot path or for a
        blocked BLMOVE (``socket_timeout_s=None``: it may wait for hours)."""
        pool = self._make_pool(socket_timeout_s)
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        return conn

    async def _call(self, what: str, *args: Any) -> Any:
        with wrap_errors(what):
            return await self._script(args=[self.keys.prefix, *args])

    async def ping(self) -> None:
        with wrap_errors("ping"):
            await self.redis.ping()

    async def cycle(
        self, daemon_id: str, ops: Sequence[Op], want: int, priorities: Sequence[str]
    ) -> tuple[list[int], list[tuple[str, bytes]]]:
        """The daemon's one round trip: apply ``ops`` in order, then claim up to
        ``want`` payloads. Returns (one integer per op, [(priority, payload)])."""
        args: list[str | bytes | int] = [
            self.keys.prefix,
            "cycle",
            daemon_id,
            want,
            len(priorities),
            *priorities,
        ]
        for op in ops:
            args.extend(op)
        results, flat = await self._hot.evalsha(args)
        claimed = [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]
        return results, claimed

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


class _HotPath:
    """The per-cycle EVALSHA on a connection of its own, packed by hiredis.

    redis-py's Python command packer costs about 1.3 us an argument, and a cycle
    carries tens of arguments a job; hiredis packs them ten times faster. Only this
    one call takes the shortcut, and it keeps redis-py's connection and parser.
    """

    def __init__(self, broker: Broker, script: str) -> None:
        self._broker = broker
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()
        self._conn: AbstractConnection | None = None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def evalsha(self, args: list[str | bytes | int]) -> Any:
        with wrap_errors("cycle"):
            try:
                conn = self._conn
                if conn is None:
                    conn = self._conn = self._broker.connection(self._broker.socket_timeout_s)
                    await conn.connect()  # type: ignore[no-untyped-call]
                try:
                    return await self._send(conn, ["EVALSHA", self._sha, 0, *args])
                except redis.exceptions.NoScriptError:
                    # Redis restarted and lost its script cache: load it, once.
                    await self._send(conn, ["SCRIPT", "LOAD", self._script])
                    return await self._send(conn, ["EVALSHA", self._sha, 0, *args])
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                # The reply may be lost mid-way: the connection is unusable now.
                await self.close()
                raise

    @staticmethod
    async def _send(conn: AbstractConnection, args: list[Any]) -> Any:
        await conn.send_packed_command(hiredis.pack_command(tuple(args)))
        reply = await conn.read_response()
        if isinstance(reply, redis.exceptions.ResponseError):
            raise reply
        return reply


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
            conn = self._broker.connection(None)
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
