"""Redis access: the Lua commands, the blocking moves, and error wrapping.

redis-py errors are turned into ``BrokerError`` here, where they enter prioqd.
redis-py's own retries are switched off: whether a command may be repeated after a
dropped connection is a question only the caller can answer (see the guards in
``lua/prioqd.lua``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import math
import select
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

from prioqd.config import Config, mask_url
from prioqd.errors import BrokerError, ConnectionSetupError, ScriptError
from prioqd.keys import Keys
from prioqd.ops import Op
from prioqd.systemd import redis_password

__all__ = ["BlockingMove", "Broker", "CycleReply", "Heartbeat", "mask_url", "wrap_errors"]

_SCRIPT = resources.files("prioqd").joinpath("lua/prioqd.lua").read_text(encoding="utf-8")

# A blocked BLMOVE may wait for hours; TCP keepalive is what notices a peer that
# vanished without closing the connection (power loss, network cut).
_KEEPALIVE: dict[int, int | bytes] = {}
for _name, _value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
    if hasattr(socket, _name):
        _KEEPALIVE[getattr(socket, _name)] = _value

#: errnos of a host out of fds, memory or processes: "not now", whatever the call.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN)

#: Error replies that say "not now" rather than "never": the same call may succeed
#: later (Redis is loading, out of memory, running a slow script, a read-only replica
#: after a failover...). Anything else from the script is a ``ScriptError``.
_TRANSIENT = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
#: redis-py strips the code from the errors it has a class for ("OOM command not
#: allowed..." becomes an OutOfMemoryError "command not allowed..."): those are
#: recognised by their class.
_TRANSIENT_CLASSES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,  # MASTERDOWN too
)


def _classify(what: str, exc: BaseException) -> BrokerError:
    text = f"{what}: {type(exc).__name__}: {exc}"
    if (
        isinstance(exc, redis.exceptions.ResponseError)
        and not isinstance(exc, _TRANSIENT_CLASSES)
        and not str(exc).startswith(_TRANSIENT)
    ):
        return ScriptError(text)
    return BrokerError(text)


@contextlib.contextmanager
def wrap_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.RedisError, OSError) as exc:
        raise _classify(what, exc) from exc


@dataclass(frozen=True)
class Heartbeat:
    #: Our lease was missing: a first registration, or another daemon recovered us.
    registered: bool
    #: Our lease had run out but nobody had recovered us yet.
    lapsed: bool
    recovered_daemons: list[str]
    recovered_jobs: int
    #: Payloads dead-lettered as poison by the recovery.
    poisoned: int
    next_due_ms: int | None
    redis_now_ms: int
    #: Keys of the wrong type the recoveries left as they were (reasons).
    problems: list[str]
    #: Dead letters dropped, oldest first, to keep within dead_letters_max.
    trimmed: int = 0


@dataclass(frozen=True)
class CycleReply:
    results: list[int]
    #: (priority, payload, attempts it had used before) in claim order.
    claimed: list[tuple[str, bytes, int]]
    #: Whether our lease was held; if not, nothing was claimed.
    lease_held: bool
    #: Reasons of payloads the claim sent to the dead letters (over max_payload_bytes).
    dropped: list[str]
    #: Dead letters dropped, oldest first, to keep within dead_letters_max.
    trimmed: int
    #: Paused priorities, as the claim saw them (empty if it claimed nothing).
    paused: list[str]
    #: Keys of the wrong type the call read as empty (reasons).
    problems: list[str]


def cancel_args(job_id: str, ttl_s: int, outcome: str, unique: bool) -> list[Any]:
    """The arguments the cancel_queued / cancel_scheduled commands share: the job
    hash's fields are taken from the outcome JSON."""
    o = json.loads(outcome)
    fields = {
        "status": "cancelled",
        "task": o.get("task") or "",
        "priority": o.get("priority") or "",
        "error": o.get("error") or "cancelled",
        "finished_at": f"{o.get('finished_at') or 0:.6f}",
    }
    flat = [x for kv in fields.items() for x in kv]
    return [job_id, ttl_s, "1" if unique else "0", outcome, len(flat), *flat]


def as_text(v: Any) -> str:
    """A Redis reply as text (bytes decoded, invalid UTF-8 replaced)."""
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _lines(v: Any) -> list[str]:
    return [line for line in as_text(v).split("\n") if line]


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
        self._hot = _HotPath(self, _SCRIPT, "cycle")
        #: The heartbeat's own: an idle daemon runs nothing else, every few seconds, on
        #: cold caches, where redis-py's layers cost about as much as the rest.
        self._beat = _HotPath(self, _SCRIPT, "heartbeat")

    @classmethod
    def from_config(cls, cfg: Config, *, socket_timeout_s: float | None = None) -> Broker:
        """A broker for ``cfg`` (its own socket timeout unless given), the password
        from the systemd credential or ``PRIOQD_REDIS_PASSWORD``."""
        return cls(
            cfg.redis.url,
            Keys(cfg.queues.prefix),
            socket_timeout_s=socket_timeout_s or cfg.redis.socket_timeout_s,
            connect_timeout_s=cfg.redis.connect_timeout_s,
            password=redis_password(),
        )

    async def close(self) -> None:
        await self._hot.close()
        await self._beat.close()
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
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                # No fd left (redis-py reads its own metadata here): an outage of the
                # host, not a bad URL. Callers retry it as they retry Redis.
                raise BrokerError(f"cannot make a Redis connection: {exc}") from exc
            raise ConnectionSetupError(
                f"cannot make a Redis connection from {mask_url(self.url)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
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
        self,
        daemon_id: str,
        ops: Sequence[Op],
        *,
        next_claim: int,
        max_payload_bytes: int,
        max_dead: int,
        tokens: int,
        sizes: Sequence[tuple[str, int]],
        repeat: bool,
    ) -> CycleReply:
        """The daemon's one round trip: apply ``ops`` in order, then claim payloads for
        up to ``tokens`` slot tokens, ``size`` payloads a token from each priority in
        ``sizes`` (highest first). ``repeat``: the reply of the last call was lost, so
        ``ops`` may repeat ops that applied (they answer as they did then)."""
        args: list[str | bytes] = [
            self.keys.prefix, "cycle", daemon_id, str(next_claim), str(max_payload_bytes),
            str(max_dead), str(tokens), "1" if repeat else "0", str(len(sizes)),
        ]  # fmt: skip
        for priority, size in sizes:
            args += (priority, str(size))
        for op in ops:
            args.extend(op.args())
        results, flat, held, dropped, trimmed, paused, problems = await self._hot.evalsha(args)
        claimed = [
            (as_text(flat[i]), flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat), 3)
        ]
        return CycleReply(
            results,
            claimed,
            bool(held),
            [as_text(d) for d in dropped],
            int(trimmed),
            [as_text(p) for p in paused],
            [as_text(p) for p in problems],
        )

    async def heartbeat(
        self,
        daemon_id: str,
        lease_ms: int,
        info: dict[str, str],
        *,
        max_recoveries: int,
        max_dead: int,
        max_recover: int = 10,
    ) -> Heartbeat:
        args: list[str | bytes] = [
            self.keys.prefix, "heartbeat", daemon_id, str(lease_ms), str(max_recover),
            str(max_recoveries), str(max_dead),
        ]  # fmt: skip
        for k, v in info.items():
            args += (k, v)
        reply = await self._beat.evalsha(args)
        registered, lapsed, daemons, jobs, poisoned, due, now, trimmed, problems = reply
        return Heartbeat(
            registered=bool(registered),
            lapsed=bool(lapsed),
            recovered_daemons=[d for d in as_text(daemons).split(",") if d],
            recovered_jobs=int(jobs),
            poisoned=int(poisoned),
            next_due_ms=None if int(due) < 0 else int(due),
            redis_now_ms=int(now),
            trimmed=int(trimmed),
            problems=_lines(problems),
        )

    async def recover(
        self,
        daemon_id: str,
        priorities: Sequence[str],
        *,
        died: bool,
        max_recoveries: int,
        max_dead: int,
    ) -> tuple[int, int, int, list[str]]:
        """Put back every job ``daemon_id`` holds; (jobs put back, jobs dead as poison,
        dead letters trimmed to keep within ``max_dead``, keys of the wrong type left as
        they were)."""
        queued, dead, trimmed, problems = await self._call(
            "recover", "recover", daemon_id, int(died), max_recoveries, max_dead, *priorities
        )
        return int(queued), int(dead), int(trimmed), _lines(problems)

    async def undead(
        self,
        entry: bytes,
        priority: str,
        payload: bytes,
        job_id: str,
        payload_key: str,
        lock_ttl_s: int,
    ) -> int:
        args = (entry, priority, payload, job_id, payload_key, lock_ttl_s)
        return int(await self._call("requeue dead letter", "undead", *args))

    async def purge_dead(self) -> int:
        return int(await self._call("purge dead letters", "purge"))

    async def cancel_held(self, job_ids: Sequence[str], keep_s: int) -> None:
        """Ask the daemons to cancel jobs they hold (``P:cancels``, kept ``keep_s``, and
        a note on ``P:control``)."""
        await self._call("cancel held jobs", "cancel_held", keep_s * 1000, *job_ids)

    async def cancel_queued(
        self, priority: str, raw: bytes, job_id: str, ttl_s: int, outcome: str, *, unique: bool
    ) -> bool:
        """Remove the payload ``raw`` from its queue and record the job as cancelled,
        atomically; False if it was no longer queued."""
        reply = await self._call(
            "cancel queued job", "cancel_queued", priority, raw,
            *cancel_args(job_id, ttl_s, outcome, unique),
        )  # fmt: skip
        return int(reply) == 1

    async def cancel_scheduled(
        self, member: bytes, job_id: str, ttl_s: int, outcome: str, *, unique: bool
    ) -> bool:
        """Remove ``member`` from the schedule and record the job as cancelled,
        atomically; False if it was no longer scheduled."""
        reply = await self._call(
            "cancel scheduled job", "cancel_scheduled", member,
            *cancel_args(job_id, ttl_s, outcome, unique),
        )  # fmt: skip
        return int(reply) == 1

    async def promote(
        self, max_dead: int, max_jobs: int = 1000
    ) -> tuple[int, int, int | None, int]:
        """(moved to their queues, dead-lettered, ms until the next due job or None,
        dead letters trimmed to keep within ``max_dead``)."""
        moved, dead, due, trimmed = await self._call("promote", "promote", max_jobs, max_dead)
        return int(moved), int(dead), None if int(due) < 0 else int(due), int(trimmed)

    async def queues(self) -> dict[str, int]:
        """Every ``<prefix>:queue:*`` list and its depth, served or not."""
        return await self.queue_depths(await self.queue_names())

    async def queue_names(self) -> list[str]:
        """The priority of every ``<prefix>:queue:*`` key: a SCAN of the whole keyspace
        (with millions of job hashes, thousands of round trips)."""
        r: Any = self.redis
        with wrap_errors("list queues"):
            keys = [k async for k in r.scan_iter(match=self.keys.queue_pattern, count=1000)]
        return [self.keys.priority_of(as_text(k)) for k in keys]

    async def queue_depths(self, priorities: Sequence[str]) -> dict[str, int]:
        """The depth of each of these queues that is a list (one that is gone, or of
        another type, is left out)."""
        r: Any = self.redis
        with wrap_errors("list queues"):
            async with r.pipeline(transaction=False) as pipe:
                for p in priorities:
                    pipe.type(self.keys.queue(p))
                    pipe.llen(self.keys.queue(p))
                replies = await pipe.execute(raise_on_error=False)
        out = {}
        for i, p in enumerate(priorities):
            kind, depth = replies[2 * i], replies[2 * i + 1]
            if kind == b"list" and isinstance(depth, int):
                out[p] = depth
        return out

    async def unserved_queues(self, priorities: Sequence[str]) -> dict[str, int]:
        return {p: n for p, n in (await self.queues()).items() if p not in priorities}

    async def periodic(
        self, name: str, tick_ms: int, priority: str, payload: str, *, catch_up: bool
    ) -> int:
        """Enqueue a schedule's tick unless some daemon did: 1 if this call did, 0 if
        not, -1 if the tick is later than Redis's clock (refused: see the script)."""
        return int(
            await self._call(
                "periodic job", "periodic", name, tick_ms, priority, payload, int(catch_up)
            )
        )

    async def update_daemon_info(self, daemon_id: str, info: dict[str, str]) -> None:
        with wrap_errors("update daemon info"):
            r: Any = self.redis
            await r.hset(self.keys.daemon(daemon_id), mapping=info)

    async def daemons(self) -> list[tuple[str, dict[str, str], float]]:
        """Registered daemons: (id, info, lease ms left by Redis's clock). Whatever
        is there is read as text (invalid UTF-8 replaced), and an info key of the wrong
        type as no info: one bad entry must not stop every daemon's start-up."""
        r: Any = self.redis  # redis-py's stubs type replies loosely
        with wrap_errors("list daemons"):
            now_s, now_us = await r.time()
            now_ms = now_s * 1000 + now_us // 1000
            entries = await r.zrange(self.keys.daemons, 0, -1, withscores=True)
            ids = [as_text(raw_id) for raw_id, _ in entries]
            async with r.pipeline(transaction=False) as pipe:
                for daemon_id in ids:
                    pipe.hgetall(self.keys.daemon(daemon_id))
                infos = await pipe.execute(raise_on_error=False)
        return [
            (
                daemon_id,
                {as_text(k): as_text(v) for k, v in info.items()} if isinstance(info, dict) else {},
                float(expiry - now_ms),
            )
            for daemon_id, (_, expiry), info in zip(ids, entries, infos, strict=True)
        ]


class _Direct:
    """Commands on a connection of its own, packed and parsed by hiredis.

    redis-py's Python command packer costs about 1.3 us an argument, and a cycle
    carries tens of arguments a job; hiredis packs them ten times faster. Its reply
    path (pool, timeouts, parser layers) costs about 40 us of CPU a round trip where
    reading the stream into a hiredis Reader costs about 25. Only the two calls on the
    way of every job take the shortcut: the cycle's EVALSHA and the idle pickup's
    barrier ``PING``. redis-py still makes the connection (TLS, unix sockets, AUTH,
    SELECT). One caller at a time: each use has a ``_Direct`` of its own.
    """

    def __init__(self, broker: Broker, what: str) -> None:
        self._broker = broker
        self._what = what
        self._conn: AbstractConnection | None = None
        self._parser = hiredis.Reader()
        #: Bumped by each close: a call that sees it change had its connection torn
        #: down under it (a shutdown closing the waits while a barrier connects).
        self._closes = 0

    async def close(self) -> None:
        self._closes += 1
        self._parser = hiredis.Reader()  # whatever was half read belongs to the old one
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def call(self, *args: str | bytes | int) -> Any:
        closes = self._closes
        try:
            conn = self._conn
            if conn is None:
                conn = self._conn = self._broker.connection(self._broker.socket_timeout_s)
                await conn.connect()  # type: ignore[no-untyped-call]
            return await self._exchange(conn, args)
        except redis.exceptions.ResponseError as exc:
            # An error reply leaves the connection usable, except the protocol errors
            # after which Redis closes it (an argument over proto-max-bulk-len).
            if "protocol error" in str(exc).lower():
                await self.close()
            raise _classify(self._what, exc) from exc
        except BaseException as exc:
            # Anything else (a timeout, a reset, a cancellation mid-read) leaves the
            # connection in an unknown state: the reply may be lost mid-way.
            closed_under_us = self._closes != closes
            await self.close()
            if isinstance(exc, (redis.exceptions.RedisError, OSError, RuntimeError)) or (
                # redis-py's connect() fails with whatever it finds half torn down
                # (an AttributeError on a None stream): a closed connection, not a bug.
                closed_under_us and isinstance(exc, Exception)
            ):
                raise _classify(self._what, exc) from exc
            raise

    async def _exchange(self, conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
        return await self._send(conn, args)

    async def _send(self, conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
        # redis-py's own streams, made by conn.connect(); nothing else reads them.
        reader, writer = conn._reader, conn._writer
        if reader is None or writer is None:
            raise redis.exceptions.ConnectionError("not connected")
        parser = self._parser
        writer.write(hiredis.pack_command(args))
        async with asyncio.timeout(self._broker.socket_timeout_s):
            while (reply := parser.gets()) is False:
                data = await reader.read(1 << 16)
                if not data:
                    raise redis.exceptions.ConnectionError("Redis closed the connection")
                parser.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            text = str(reply)
            if text.startswith("NOSCRIPT"):
                raise redis.exceptions.NoScriptError(text)
            raise redis.exceptions.ResponseError(text)
        return reply


class _HotPath(_Direct):
    """An EVALSHA of the script on a connection of its own (the cycle's, the
    heartbeat's); the script is loaded again if Redis lost it."""

    def __init__(self, broker: Broker, script: str, what: str) -> None:
        super().__init__(broker, what)
        self._script = script
        self._sha = hashlib.sha1(script.encode()).hexdigest()

    async def evalsha(self, args: list[str | bytes]) -> Any:
        return await self.call("EVALSHA", self._sha, 0, *args)

    async def _exchange(self, conn: AbstractConnection, args: tuple[Any, ...]) -> Any:
        try:
            return await self._send(conn, args)
        except redis.exceptions.NoScriptError:
            # Redis restarted and lost its script cache: load it, once.
            await self._send(conn, ("SCRIPT", "LOAD", self._script))
            return await self._send(conn, args)


class BlockingMove:
    """Blocking waits without polling: ``BLMOVE queue:p -> landing:D:p`` on a connection
    of its own per priority, blocked with no timeout.

    Redis cannot block on several keys and move atomically, so each priority gets
    its own connection; ``unblock`` releases some of them with ``CLIENT UNBLOCK``. A
    payload that arrives in that race has already been moved into the landing list,
    so ``move`` returns it and nothing is lost. Idle, this costs no CPU and no Redis
    commands at all.
    """

    def __init__(self, broker: Broker, daemon_id: str, priorities: Sequence[str]) -> None:
        self._broker = broker
        self._daemon_id = daemon_id
        self._conns: dict[str, AbstractConnection] = {}
        self._client_ids: dict[str, int] = {}
        self._blocked: set[str] = set()
        self._priorities = list(priorities)
        self._barrier = _Direct(broker, "barrier")

    async def _connection(self, p: str) -> AbstractConnection:
        conn = self._conns.get(p)
        if conn is None:
            conn = self._broker.connection(None)
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("CLIENT", "ID")
            self._client_ids[p] = int(await conn.read_response())
            self._conns[p] = conn
        return conn

    async def _drop(self, p: str) -> None:
        conn = self._conns.pop(p, None)
        self._client_ids.pop(p, None)
        # Not blocked any more: an unblock during the disconnect below must skip it.
        self._blocked.discard(p)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def close(self) -> None:
        for p in list(self._conns):
            await self._drop(p)
        await self._barrier.close()

    async def move(self, p: str) -> bytes | None:
        """Block until a payload of priority ``p`` lands (returned) or ``unblock(p)``
        (None, unless a payload landed in the race). Raises ``BrokerError``; the
        connection is then dropped, and a payload may have landed unseen."""
        keys = self._broker.keys
        try:
            with wrap_errors("blocking fetch"):
                conn = await self._connection(p)
                await conn.send_command(
                    "BLMOVE", keys.queue(p), keys.landing(self._daemon_id, p), "RIGHT", "LEFT", 0
                )
                self._blocked.add(p)
                reply = await conn.read_response(timeout=math.inf)
                if isinstance(reply, redis.exceptions.ResponseError):
                    raise reply
                return reply  # type: ignore[no-any-return]
        except BaseException:
            # Cancelled (shutdown) or the connection failed: its state is unknown.
            await self._drop(p)
            raise
        finally:
            self._blocked.discard(p)

    def unread(self, priorities: Sequence[str]) -> bool:
        """Whether a reply waits unread on the waits of ``priorities``: in the stream's
        buffer, or in the socket (one ``select`` with no timeout)."""
        fds = []
        for p in priorities:
            conn = self._conns.get(p)
            if conn is None or p not in self._blocked:
                continue
            reader = getattr(conn, "_reader", None)
            if reader is not None and getattr(reader, "_buffer", None):
                return True
            writer = getattr(conn, "_writer", None)
            sock = writer.transport.get_extra_info("socket") if writer is not None else None
            if sock is not None:
                fds.append(sock.fileno())
        if not fds:
            return False
        try:
            readable, _, _ = select.select(fds, [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    async def barrier(self) -> None:
        """One round trip on a connection of its own. Redis writes every reply of an
        event-loop turn before it reads the next command, so when this returns, each
        payload that landed with one already read is readable here (``unread``)."""
        await self._barrier.call("PING")

    async def unblock(self, priorities: Sequence[str]) -> None:
        ids = [
            self._client_ids[p] for p in priorities if p in self._blocked and p in self._client_ids
        ]
        if not ids:
            return
        with wrap_errors("unblock"):
            async with self._broker.redis.pipeline(transaction=False) as pipe:
                for cid in ids:
                    pipe.client_unblock(cid)
                await pipe.execute()
