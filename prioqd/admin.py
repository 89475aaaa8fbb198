"""Operator actions over Redis: inspect, cancel, pause and resume, status, dead
letters, the schedule. The CLI and the web dashboard both use this module; neither
talks to a daemon except through Redis.

Where a job can be (see the key layout in ``lua/prioqd.lua``):

- ``P:queue:p``: queued. Found by reading the list in chunks from the head (the
  right end), so its position is known; a queue of a million jobs costs a scan.
- ``P:landing:D:p`` or ``P:inflight:D``: held by daemon D, claimed (not started) or
  running (its start is recorded).
- ``P:scheduled``: a delayed job or a retry, with its due time.
- ``P:dead``: a dead letter, with its reason.
- nowhere: ended (its hash says so) or unknown.

A job moves while we look. Every change made here is one atomic step that checks
the job is still where it was seen (``cancel_queued`` removes the exact payload
text, ``cancel_scheduled`` the exact member), and a miss is looked up again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prioqd import jobs
from prioqd.broker import Broker, as_text, wrap_errors
from prioqd.config import Config
from prioqd.errors import PrioqdError
from prioqd.keys import Keys

#: How many list elements one LRANGE reads while searching a queue.
CHUNK = 1000
#: How long a cancel asked of a daemon stays in ``P:cancels`` (a daemon that is down
#: when it is asked sees it when it comes back, within this long).
CANCEL_TTL_S = 3600
#: How long ``cancel`` waits for a daemon to confirm a cancel of a job it holds.
CANCEL_WAIT_S = 3.0
#: How often a job that moves while we look for it is looked up again.
LOOKUPS = 3

State = Literal["queued", "claimed", "running", "scheduled", "dead", "ended", "unknown"]
CancelOutcome = Literal["cancelled", "requested", "ended", "unknown"]


class UnknownPriority(PrioqdError):
    """A priority name that no configuration, daemon or queue knows."""


def _priorities(field: str) -> list[str]:
    """A daemon's ``priorities`` field ("high,normal") as a list."""
    return [p for p in field.split(",") if p]


def _float(v: Any) -> float | None:
    try:
        f = float(as_text(v))
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _json_obj(raw: bytes | str) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


# --- what the operator sees -----------------------------------------------------------


@dataclass
class Where:
    """Where a job is now."""

    state: State
    priority: str | None = None
    #: Queued: 0 is the next job a daemon takes from this queue.
    position: int | None = None
    depth: int | None = None
    daemon: str | None = None
    worker_pid: str | None = None
    started_at: float | None = None
    running_s: float | None = None
    due_at: float | None = None
    reason: str | None = None
    traceback: str | None = None
    #: Ended: succeeded, dead or cancelled (from the job hash).
    status: str | None = None


class _Search:
    """How far a lookup reads each list it searches (None: to its end), and whether
    that stopped it short of the end of one."""

    def __init__(self, max_entries: int | None) -> None:
        self.max_entries = max_entries
        self.cut = False

    async def more(self, read: int, length: Callable[[], Awaitable[int]]) -> bool:
        """Whether to read on, ``read`` entries of this list in; ``length`` tells the
        list's length, asked only at the bound (to know whether it cut anything)."""
        if self.max_entries is None or read < self.max_entries:
            return True
        if await length() > read:
            self.cut = True
        return False


@dataclass
class JobInfo:
    id: str
    #: The job hash (``P:job:<id>``), decoded.
    fields: dict[str, str]
    where: Where
    #: The job's JSON where it is held (queue, schedule, daemon, dead letter).
    payload: str | None = None
    #: The outcome JSON in the done list, if the job has ended.
    outcome: dict[str, Any] | None = None
    now: float = 0.0
    #: The exact bytes where it was found: the queue's element, the schedule's member.
    raw: bytes | None = None
    #: False if a search limit (``inspect(search_max=...)``) cut the search short: an
    #: unknown job may then wait deeper in a queue, the schedule or the dead letters.
    searched_all: bool = True

    @property
    def found(self) -> bool:
        return self.where.state != "unknown" or bool(self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "found": self.found,
            "where": {k: v for k, v in asdict(self.where).items() if v is not None},
            "hash": self.fields,
            "payload": self.payload,
            "outcome": self.outcome,
        }


@dataclass
class Held:
    """A job a daemon holds."""

    daemon: str
    priority: str
    #: "claimed" (taken, start not recorded) or "running".
    state: Literal["claimed", "running"]
    payload: bytes
    job: dict[str, Any] | None


@dataclass
class QueueStatus:
    priority: str
    depth: int
    paused: bool
    #: Seconds since the producer pushed the job at the head, if it set enqueued_at.
    oldest_age_s: float | None
    configured: bool
    served: bool


@dataclass
class DaemonStatus:
    id: str
    host: str
    pid: str
    slots: int | None
    priorities: list[str]
    in_flight: int
    running: int
    lease_left_s: float
    alive: bool
    last_error: str
    version: str
    started_at: float | None


@dataclass
class RunningJob:
    id: str | None
    task: str | None
    priority: str
    daemon: str
    state: Literal["claimed", "running"]
    started_at: float | None
    running_s: float | None
    worker_pid: str | None


@dataclass
class Status:
    queues: list[QueueStatus]
    scheduled: int
    dead: int
    daemons: list[DaemonStatus]
    running: list[RunningJob]
    paused: list[str]
    now: float

    @property
    def in_flight(self) -> int:
        return sum(d.in_flight for d in self.daemons)

    @property
    def alive(self) -> list[DaemonStatus]:
        return [d for d in self.daemons if d.alive]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": {q.priority: q.depth for q in self.queues if q.configured},
            "unserved_queues": {q.priority: q.depth for q in self.queues if not q.configured},
            "priorities": [asdict(q) for q in self.queues],
            "paused": self.paused,
            "scheduled": self.scheduled,
            "dead": self.dead,
            "in_flight": self.in_flight,
            "daemons": [asdict(d) for d in self.daemons],
            "running": [asdict(j) for j in self.running],
        }


@dataclass
class DeadLetter:
    raw: bytes
    entry: dict[str, Any]
    #: sha1 of the letter's text: names it for a requeue (letters need not have an id).
    key: str = ""
    #: The first 200 bytes of a payload kept by reference (``payload_key``).
    payload_head: str | None = None

    def __post_init__(self) -> None:
        self.key = hashlib.sha1(self.raw).hexdigest()

    @property
    def payload(self) -> str:
        if "payload" in self.entry:
            return str(self.entry["payload"])
        if "payload_b64" in self.entry:
            return f"(not UTF-8, base64) {self.entry['payload_b64']}"
        if self.payload_head is not None:
            return self.payload_head
        return ""

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.entry)
        if self.payload_head is not None:
            out["payload_head"] = self.payload_head
        return out


@dataclass
class ScheduledJob:
    id: str | None
    task: str | None
    priority: str
    due_at: float
    payload: str


#: ``undead``'s answer for a unique job whose id a live job holds.
UNDEAD_DUPLICATE = -2


@dataclass
class RequeueResult:
    moved: int = 0
    #: Ids (or letter keys) asked for that are not in the dead letters.
    missing: list[str] = field(default_factory=list)
    #: Ids whose payload key is gone (the letter stays).
    gone: list[str] = field(default_factory=list)
    #: Unique jobs left in the dead letters: a live job of the same id holds its lock.
    duplicates: list[str] = field(default_factory=list)


@dataclass
class CancelResult:
    id: str
    outcome: CancelOutcome
    detail: str

    @property
    def ok(self) -> bool:
        return self.outcome == "cancelled"


def parse_letter(raw: bytes) -> dict[str, Any]:
    """A dead letter's JSON; an unreadable one is shown with its text."""
    from prioqd.jobs import payload_field

    entry = _json_obj(raw)
    if entry is None:
        entry = {"reason": "unreadable dead letter", **payload_field(raw)}
    return entry


def letter_payload(entry: dict[str, Any]) -> bytes:
    if "payload_b64" in entry:
        return base64.b64decode(entry["payload_b64"])
    return str(entry.get("payload", "")).encode("utf-8")


# --- in words (the CLI and the dashboard say the same) ---------------------------------


def age_text(seconds: float | None) -> str:
    """12s, 4m05s, 3h02m, 2d04h; "-" if unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when_text(t: float | None) -> str:
    """A Unix time as UTC text, "2025-01-31 12:00:00Z"."""
    if t is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"
    except (OverflowError, OSError, ValueError):
        return "????-??-?? ??:??:??"


def describe(info: JobInfo) -> str:
    """Where a job is, in one line (the CLI and the web page say the same)."""
    w = info.where
    if w.state == "queued":
        return f"queued in {w.priority}, position {w.position} from the head (of {w.depth})"
    if w.state == "running":
        pid = f", worker pid {w.worker_pid}" if w.worker_pid else ""
        return f"running on daemon {w.daemon}{pid}, for {age_text(w.running_s)}"
    if w.state == "claimed":
        return f"claimed by daemon {w.daemon} (priority {w.priority}), not started yet"
    if w.state == "scheduled":
        left = None if w.due_at is None else w.due_at - info.now
        due = f"due {when_text(w.due_at)}"
        return f"scheduled ({w.priority}), {due}" + (
            f", in {age_text(left)}" if left is not None and left > 0 else ", due now"
        )
    if w.state == "dead":
        return f"dead: {w.reason or 'no reason recorded'}"
    if w.state == "ended":
        return f"ended: {w.status}"
    searched = "any queue" if info.searched_all else "the part of the queues looked at"
    if info.fields:
        return f"not found in {searched} (job hash says {info.fields.get('status', '?')})"
    if not info.searched_all:
        return "not found: no job hash, not held, not in the part of the lists looked at"
    return "unknown: no job hash, not queued, scheduled, held or dead"


# --- the actions -----------------------------------------------------------------------


class Admin:
    """Operator actions on one prioqd deployment (one Redis, one prefix)."""

    def __init__(self, broker: Broker, config: Config, *, rescan_queues_s: float = 0.0) -> None:
        self.broker = broker
        self.config = config
        self.keys: Keys = broker.keys
        self.r: Any = broker.redis  # redis-py's stubs type replies loosely
        #: How long the queue names a SCAN found are used before the next SCAN (0:
        #: every call). The dashboard's pages refresh every few seconds, and a SCAN
        #: walks the whole keyspace; depths are read afresh every time.
        self.rescan_queues_s = rescan_queues_s
        self._queue_names: list[str] = []
        self._queues_scanned_at: float | None = None

    async def queues(self) -> dict[str, int]:
        """Every queue (configured, or found in Redis) that exists, and its depth."""
        now = time.monotonic()
        if self._queues_scanned_at is None or now - self._queues_scanned_at >= self.rescan_queues_s:
            self._queue_names = await self.broker.queue_names()
            self._queues_scanned_at = now
        names = dict.fromkeys([*self.config.queues.priorities, *self._queue_names])
        return await self.broker.queue_depths(list(names))

    async def now(self) -> float:
        """Unix time by Redis's clock (daemons' lease times use it)."""
        with wrap_errors("time"):
            s, us = await self.r.time()
        return float(s) + float(us) / 1e6

    # --- where is it -------------------------------------------------------------------

    async def _daemon_priorities(self) -> dict[str, list[str]]:
        """Registered daemons -> the priorities they serve (config's, if unknown)."""
        with wrap_errors("list daemons"):
            ids = [as_text(d) for d in await self.r.zrange(self.keys.daemons, 0, -1)]
            async with self.r.pipeline(transaction=False) as pipe:
                for d in ids:
                    pipe.hget(self.keys.daemon(d), "priorities")
                prios = await pipe.execute(raise_on_error=False)  # (a key of the wrong type)
        return {
            d: _priorities(as_text(p) if isinstance(p, bytes) else "")
            or list(self.config.queues.priorities)
            for d, p in zip(ids, prios, strict=True)
        }

    async def held(self, daemons: dict[str, list[str]] | None = None) -> list[Held]:
        """Every job every registered daemon holds (landing lists and inflight);
        ``daemons``: what ``_daemon_priorities`` would read, if already known."""
        if daemons is None:
            daemons = await self._daemon_priorities()
        out: list[Held] = []
        with wrap_errors("list jobs in flight"):
            async with self.r.pipeline(transaction=False) as pipe:
                for d, prios in daemons.items():
                    pipe.hvals(self.keys.inflight(d))
                    for p in prios:
                        pipe.lrange(self.keys.landing(d, p), 0, -1)
                replies = await pipe.execute(raise_on_error=False)
        i = 0
        for d, prios in daemons.items():
            values = replies[i]
            i += 1
            if isinstance(values, list):
                for v in values:
                    p, state, payload = jobs.split_entry(v)
                    out.append(
                        Held(d, p, "claimed" if state.startswith("c") else "running", payload,
                             _json_obj(payload))
                    )  # fmt: skip
            for p in prios:
                landed = replies[i]
                i += 1
                if isinstance(landed, list):
                    out.extend(Held(d, p, "claimed", raw, _json_obj(raw)) for raw in landed)
        return out

    async def _find_held(self, job_id: str) -> Held | None:
        for h in await self.held():
            if h.job is not None and h.job.get("id") == job_id:
                return h
        return None

    async def _find_queued(
        self, job_id: str, search: _Search
    ) -> tuple[str, int, int, bytes] | None:
        """(priority, position from the head, depth, raw payload) of a queued job."""
        match = jobs.IdMatch(job_id)
        queues = await self.queues()
        for p in self._ordered(queues):
            key = self.keys.queue(p)
            seen = 0
            while await search.more(seen, functools.partial(self._length, "llen", key)):
                # From the head (the right end) back: negative indexes do not move
                # when producers push on the left.
                with wrap_errors("search a queue"):
                    chunk = await self.r.lrange(key, -(seen + CHUNK), -(seen + 1))
                if not chunk:
                    break
                for k, raw in enumerate(reversed(chunk)):
                    if match(raw) is not None:
                        return p, seen + k, int(queues.get(p, 0)), raw
                seen += len(chunk)
                if len(chunk) < CHUNK:
                    break
        return None

    def _ordered(self, found: dict[str, int]) -> list[str]:
        """Configured priorities first (highest first), then the others."""
        configured = [p for p in self.config.queues.priorities if p in found]
        return configured + sorted(p for p in found if p not in configured)

    async def _find_scheduled(self, job_id: str, search: _Search) -> tuple[bytes, float] | None:
        match = jobs.IdMatch(job_id)
        start = 0
        scheduled = functools.partial(self._length, "zcard", self.keys.scheduled)
        while await search.more(start, scheduled):
            with wrap_errors("search the schedule"):
                chunk = await self.r.zrange(
                    self.keys.scheduled, start, start + CHUNK - 1, withscores=True
                )
            for member, score in chunk:
                _, payload = jobs.split_member(member)
                if match(payload) is not None:
                    return member, float(score) / 1000
            if len(chunk) < CHUNK:
                return None
            start += CHUNK
        return None

    async def _find_dead(self, job_id: str, search: _Search) -> DeadLetter | None:
        match = jobs.IdMatch(job_id)
        start = 0
        while await search.more(start, functools.partial(self._length, "llen", self.keys.dead)):
            with wrap_errors("search the dead letters"):
                chunk = await self.r.lrange(self.keys.dead, start, start + CHUNK - 1)
            for raw in chunk:
                if match(raw) is not None:
                    return DeadLetter(raw, parse_letter(raw))
            if len(chunk) < CHUNK:
                return None
            start += CHUNK
        return None

    async def _length(self, command: str, key: str) -> int:
        with wrap_errors("search a list"):
            return int(await self.r.execute_command(command.upper(), key))

    async def _job_hash(self, job_id: str) -> dict[str, str]:
        with wrap_errors("read a job"):
            raw = await self.r.hgetall(self.keys.job(job_id))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    async def inspect(self, job_id: str, *, search_max: int | None = None) -> JobInfo:
        """The job hash and where the job is now. ``search_max``: read at most that many
        entries of each queue, of the schedule and of the dead letters (the dashboard's
        bound: a page refreshed on an unknown id must not read a backlog of millions
        every few seconds); ``JobInfo.searched_all`` says if that cut the search."""
        for attempt in range(LOOKUPS):
            info = await self._inspect_once(job_id, _Search(search_max))
            moving = info.where.state == "unknown" and info.fields.get("status") in (
                "queued", "running", "scheduled", "failed",
            )  # fmt: skip
            # (A search cut short would only be cut short again: once is the bound.)
            if not moving or not info.searched_all or attempt == LOOKUPS - 1:
                return info
        raise AssertionError("unreachable")  # pragma: no cover

    async def _inspect_once(self, job_id: str, search: _Search) -> JobInfo:
        now = await self.now()
        fields = await self._job_hash(job_id)
        info = JobInfo(job_id, fields, Where("unknown"), now=now)
        status = fields.get("status")
        held = await self._find_held(job_id)
        if held is not None:
            started = _float(fields.get("started_at"))
            running = held.state == "running"
            info.where = Where(
                held.state,
                priority=held.priority,
                daemon=held.daemon,
                worker_pid=fields.get("worker_pid") or None,
                started_at=started if running else None,
                running_s=max(0.0, now - started) if running and started else None,
            )
            info.payload = as_text(held.payload)
            return info
        queued = await self._find_queued(job_id, search)
        if queued is not None:
            p, position, depth, raw = queued
            info.where = Where("queued", priority=p, position=position, depth=depth)
            info.payload = as_text(raw)
            info.raw = raw
            return info
        scheduled = await self._find_scheduled(job_id, search)
        if scheduled is not None:
            member, due = scheduled
            p, payload = jobs.split_member(member)
            info.where = Where("scheduled", priority=p, due_at=due)
            info.payload = as_text(payload)
            info.raw = member
            return info
        if status in ("succeeded", "cancelled"):
            info.where = Where("ended", priority=fields.get("priority"), status=status)
            info.outcome = await self._outcome(job_id)
            return info
        letter = await self._find_dead(job_id, search)
        if letter is not None or status == "dead":
            e = letter.entry if letter is not None else {}
            info.where = Where(
                "dead",
                priority=e.get("priority") or fields.get("priority"),
                reason=str(e.get("reason") or fields.get("error") or "") or None,
                traceback=e.get("traceback") or fields.get("traceback") or None,
                status="dead",
            )
            info.payload = letter.payload if letter is not None else None
            info.outcome = await self._outcome(job_id)
            return info
        info.searched_all = not search.cut
        return info

    async def _outcome(self, job_id: str) -> dict[str, Any] | None:
        with wrap_errors("read an outcome"):
            raw = await self.r.lindex(self.keys.done(job_id), 0)
        return _json_obj(raw) if raw is not None else None

    # --- cancel --------------------------------------------------------------------------

    async def cancel(
        self, job_ids: Sequence[str], wait_s: float = CANCEL_WAIT_S
    ) -> list[CancelResult]:
        """Cancel jobs: a queued or scheduled one is removed and recorded as cancelled
        at once; one a daemon holds is asked of the daemons (``P:cancels`` and the
        control channel), waiting up to ``wait_s`` for it to say so."""
        results: dict[str, CancelResult] = {}
        asked: list[str] = []
        ttl = self.config.jobs.result_ttl_s
        for job_id in dict.fromkeys(job_ids):
            for _ in range(LOOKUPS):
                info = await self.inspect(job_id)
                state = info.where.state
                job = _json_obj(info.payload) if info.payload else None
                outcome = jobs.cancelled_outcome(
                    job_id,
                    task=(job or {}).get("task", info.fields.get("task")),
                    priority=info.where.priority,
                    error="cancelled",
                    attempts=info.fields.get("attempts"),
                )
                unique = bool(job and job.get("unique") is True)
                if state == "queued" and info.raw is not None and info.where.priority:
                    if await self.broker.cancel_queued(
                        info.where.priority, info.raw, job_id, ttl, outcome, unique=unique
                    ):
                        results[job_id] = CancelResult(
                            job_id, "cancelled", f"removed from queue {info.where.priority}"
                        )
                        break
                    continue  # taken meanwhile: look again
                if state == "scheduled" and info.raw is not None:
                    if await self.broker.cancel_scheduled(
                        info.raw, job_id, ttl, outcome, unique=unique
                    ):
                        results[job_id] = CancelResult(
                            job_id, "cancelled", "removed from the schedule"
                        )
                        break
                    continue
                if state in ("claimed", "running") or (
                    state == "unknown" and info.fields.get("status") in ("queued", "running")
                ):
                    asked.append(job_id)
                    results[job_id] = CancelResult(
                        job_id, "requested", f"asked daemon {info.where.daemon or '?'} to stop it"
                    )
                    break
                if state in ("ended", "dead"):
                    status = info.where.status or info.fields.get("status", "ended")
                    results[job_id] = CancelResult(job_id, "ended", f"already ended: {status}")
                    break
                results[job_id] = CancelResult(job_id, "unknown", "no such job")
                break
            else:
                results[job_id] = CancelResult(job_id, "unknown", "kept moving; try again")
        if asked:
            for res in await self._cancel_held(asked, wait_s):
                results[res.id] = res
        return [results[j] for j in dict.fromkeys(job_ids)]

    async def _cancel_held(self, job_ids: list[str], wait_s: float) -> list[CancelResult]:
        """Ask the daemons, then wait for each job to end (an event on ``P:events``)."""
        pending = set(job_ids)
        pubsub = self.r.pubsub()
        try:
            with wrap_errors("cancel"):
                await pubsub.subscribe(self.keys.events)
                await self.broker.cancel_held(job_ids, CANCEL_TTL_S)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + wait_s
                # A job that ended before we subscribed sent its event already.
                for job_id in list(pending):
                    if (await self._job_hash(job_id)).get("status") in jobs.ENDED:
                        pending.discard(job_id)
                while pending and loop.time() < deadline:
                    msg = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=max(0.0, deadline - loop.time())
                    )
                    if msg is None or msg.get("type") != "message":
                        continue
                    event = _json_obj(msg["data"]) or {}
                    if event.get("id") in pending and event.get("status") in jobs.ENDED:
                        pending.discard(event["id"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        out = []
        for job_id in job_ids:
            status = (await self._job_hash(job_id)).get("status")
            if status == "cancelled":
                out.append(CancelResult(job_id, "cancelled", "stopped by its daemon"))
            elif status in ("succeeded", "dead"):
                # It ended before its daemon saw the cancel: nothing is left to cancel.
                with wrap_errors("cancel"):
                    await self.r.zrem(self.keys.cancels, job_id)
                out.append(CancelResult(job_id, "ended", f"already ended: {status}"))
            else:
                out.append(
                    CancelResult(
                        job_id,
                        "requested",
                        f"no daemon confirmed within {wait_s:g}s; the cancel stays asked "
                        f"for {CANCEL_TTL_S // 60} min",
                    )
                )
        return out

    # --- pause and resume ------------------------------------------------------------------

    async def known_priorities(self) -> list[str]:
        """Configured priorities, those any daemon serves, and every existing queue."""
        names = list(self.config.queues.priorities)
        for prios in (await self._daemon_priorities()).values():
            names += prios
        names += list(await self.queues())
        return list(dict.fromkeys(names))

    async def _check_priorities(self, priorities: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(priorities))
        known = await self.known_priorities()
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise UnknownPriority(
                f"unknown priority {', '.join(map(repr, unknown))}; known: {', '.join(known)}"
            )
        return wanted

    async def paused(self) -> list[str]:
        with wrap_errors("read paused priorities"):
            return sorted(as_text(p) for p in await self.r.smembers(self.keys.paused))

    async def pause(self, priorities: Iterable[str]) -> list[str]:
        """Pause priorities (kept in Redis, announced on the control channel); returns
        every paused priority."""
        return await self._set_paused(await self._check_priorities(priorities), pause=True)

    async def resume(self, priorities: Iterable[str]) -> list[str]:
        return await self._set_paused(await self._check_priorities(priorities), pause=False)

    async def _set_paused(self, names: list[str], *, pause: bool) -> list[str]:
        message = json.dumps({"op": "pause" if pause else "resume", "priorities": names})
        with wrap_errors("pause" if pause else "resume"):
            async with self.r.pipeline(transaction=True) as pipe:
                if pause:
                    pipe.sadd(self.keys.paused, *names)
                else:
                    pipe.srem(self.keys.paused, *names)
                pipe.publish(self.keys.control, message)
                await pipe.execute()
        return await self.paused()

    # --- status ----------------------------------------------------------------------------

    async def status(self) -> Status:
        now = await self.now()
        found = await self.queues()
        configured = list(self.config.queues.priorities)
        names = configured + sorted(p for p in found if p not in configured)
        paused = await self.paused()
        with wrap_errors("status"):
            async with self.r.pipeline(transaction=False) as pipe:
                for p in names:
                    pipe.lindex(self.keys.queue(p), -1)
                pipe.zcard(self.keys.scheduled)
                pipe.llen(self.keys.dead)
                replies = await pipe.execute(raise_on_error=False)
        heads, scheduled, dead = replies[: len(names)], replies[-2], replies[-1]
        daemons_raw = await self.broker.daemons()
        held = await self.held(
            {d: _priorities(info.get("priorities", "")) or configured for d, info, _ in daemons_raw}
        )
        daemons = []
        for daemon_id, info, lease_ms in daemons_raw:
            mine = [h for h in held if h.daemon == daemon_id]
            slots = info.get("slots", "")
            daemons.append(
                DaemonStatus(
                    id=daemon_id,
                    host=info.get("host", "?"),
                    pid=info.get("pid", "?"),
                    slots=int(slots) if slots.isdigit() else None,
                    priorities=_priorities(info.get("priorities", "")),
                    in_flight=len(mine),
                    running=sum(1 for h in mine if h.state == "running"),
                    lease_left_s=round(lease_ms / 1000, 1),
                    alive=lease_ms > 0,
                    last_error=info.get("last_error", ""),
                    version=info.get("version", ""),
                    started_at=_float(info.get("started_at")),
                )
            )
        served = {p for d in daemons if d.alive for p in d.priorities}
        queues = []
        for p, head in zip(names, heads, strict=True):
            age = None
            if isinstance(head, bytes):
                enq = (_json_obj(head) or {}).get("enqueued_at")
                if isinstance(enq, (int, float)) and not isinstance(enq, bool):
                    age = max(0.0, now - float(enq))
            queues.append(
                QueueStatus(p, int(found.get(p, 0)), p in paused, age, p in configured, p in served)
            )
        running = await self._running(held, now)
        return Status(
            queues=queues,
            scheduled=int(scheduled) if isinstance(scheduled, int) else 0,
            dead=int(dead) if isinstance(dead, int) else 0,
            daemons=daemons,
            running=running,
            paused=paused,
            now=now,
        )

    async def running(self) -> list[RunningJob]:
        return await self._running(await self.held(), await self.now())

    async def _running(self, held: list[Held], now: float) -> list[RunningJob]:
        ids = [h.job.get("id") if h.job else None for h in held]
        with wrap_errors("read running jobs"):
            async with self.r.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    key = self.keys.job(job_id if isinstance(job_id, str) else "\0")
                    pipe.hmget(key, "started_at", "worker_pid")
                replies = await pipe.execute(raise_on_error=False)
        out = []
        for h, job_id, reply in zip(held, ids, replies, strict=True):
            started = pid = None
            if isinstance(reply, list) and h.state == "running":
                started = _float(reply[0]) if reply[0] is not None else None
                pid = as_text(reply[1]) if reply[1] is not None else None
            task = h.job.get("task") if h.job else None
            out.append(
                RunningJob(
                    id=job_id if isinstance(job_id, str) else None,
                    task=task if isinstance(task, str) else None,
                    priority=h.priority,
                    daemon=h.daemon,
                    state=h.state,
                    started_at=started,
                    running_s=max(0.0, now - started) if started else None,
                    worker_pid=pid,
                )
            )
        out.sort(key=lambda j: (j.state != "running", -(j.running_s or 0.0)))
        return out

    # --- the schedule --------------------------------------------------------------------

    async def scheduled(self, limit: int = 100) -> list[ScheduledJob]:
        """Scheduled jobs, soonest due first."""
        with wrap_errors("read the schedule"):
            members = await self.r.zrange(
                self.keys.scheduled, 0, max(0, limit) - 1, withscores=True
            )
        out = []
        for member, score in members[: max(0, limit)]:
            p, payload = jobs.split_member(member)
            job = _json_obj(payload) or {}
            job_id, task = job.get("id"), job.get("task")
            out.append(
                ScheduledJob(
                    id=job_id if isinstance(job_id, str) else None,
                    task=task if isinstance(task, str) else None,
                    priority=p,
                    due_at=float(score) / 1000,
                    payload=as_text(payload),
                )
            )
        return out

    # --- dead letters --------------------------------------------------------------------

    async def dead_letters(self, limit: int = 50, offset: int = 0) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, newest first; reads only those."""
        if limit <= 0:
            return []
        with wrap_errors("read dead letters"):
            raws = await self.r.lrange(self.keys.dead, offset, offset + limit - 1)
            letters = [DeadLetter(raw, parse_letter(raw)) for raw in raws[:limit]]
            by_ref = [
                (letter, pkey)
                for letter in letters
                if isinstance(pkey := letter.entry.get("payload_key"), str)
                and "payload" not in letter.entry
            ]
            if by_ref:
                async with self.r.pipeline(transaction=False) as pipe:
                    for _, pkey in by_ref:
                        pipe.getrange(pkey, 0, 199)
                    heads = await pipe.execute()
                for (letter, _), head in zip(by_ref, heads, strict=True):
                    letter.payload_head = as_text(head)
        return letters

    async def requeue(
        self, ids: Iterable[str] = (), *, keys: Iterable[str] = (), everything: bool = False
    ) -> RequeueResult:
        """Put dead letters back on their queues as fresh jobs: those with the given job
        ids, or letter keys (``DeadLetter.key``), or all of them."""
        wanted_ids, wanted_keys = set(ids), set(keys)
        with wrap_errors("read dead letters"):
            raws = await self.r.lrange(self.keys.dead, 0, -1)
        letters = [DeadLetter(raw, parse_letter(raw)) for raw in raws]
        chosen = [
            x
            for x in letters
            if everything or x.entry.get("id") in wanted_ids or x.key in wanted_keys
        ]
        result = RequeueResult()
        result.missing = sorted(
            (wanted_ids - {x.entry.get("id") for x in chosen})
            | (wanted_keys - {x.key for x in chosen})
        )
        priorities = self.config.queues.priorities
        for letter in chosen:
            entry = letter.entry
            priority = entry.get("priority")
            if priority not in priorities:
                priority = priorities[0 if priority is None else -1]
            pkey, job_id = entry.get("payload_key"), entry.get("id")
            done = await self.broker.undead(
                letter.raw,
                str(priority),
                letter_payload(entry),
                job_id if isinstance(job_id, str) else "",
                pkey if isinstance(pkey, str) else "",
                # As a push gives it: the lock outlives the wait, as the job's record.
                self.config.jobs.result_ttl_s,
            )
            if done == 1:
                result.moved += 1
            elif done == UNDEAD_DUPLICATE:
                result.duplicates.append(str(job_id or letter.key))
            elif done < 0:
                result.gone.append(str(job_id or letter.key))
        return result

    async def purge(self) -> int:
        """Delete every dead letter (and the payloads they keep by reference)."""
        return await self.broker.purge_dead()
