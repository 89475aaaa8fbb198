"""Producing jobs from Python: :class:`Client` and :class:`AsyncClient`.

::

    from prioqd import Client
    from myapp.tasks import send_welcome_mail      # a @task function, never run here

    client = Client.from_config("/etc/prioqd/config.toml")
    job = client.enqueue(send_welcome_mail, 42)                     # checked by mypy
    job = client.enqueue("send_welcome_mail", 42, priority="high")  # by name
    job = client.options(priority="high", id="mail-42", unique=True).enqueue(
        send_welcome_mail, 42
    )
    job.result(timeout_s=30)

**What is pushed** is exactly the documented job JSON (``task``, ``args``,
``kwargs``, ``id``, and ``timeout_s``, ``max_retries``, ``delay_s`` or ``eta``,
``meta`` when given) plus ``enqueued_at`` (Unix seconds) and ``unique`` (only when
true), onto ``<prefix>:queue:<priority>``, as ``redis-cli LPUSH`` would. A job is
checked here with the daemon's own parser (``prioqd.jobs.parse``) before it is
pushed, so a job the daemon would dead-letter raises ``ValueError`` instead. The
client never imports or runs a task: a ``@task`` function passed to ``enqueue`` only
lends its name (and, to a type checker, its signature).

**Typing.** PEP 612 cannot put keyword-only parameters (``priority=...``) between
``*args: P.args`` and ``**kwargs: P.kwargs``, so ``enqueue`` is overloaded:

- ``enqueue(task_function, *args, **kwargs)``: ``task_function`` is a
  :class:`prioqd.Task` (what ``@task`` returns); ``args`` and ``kwargs`` are checked
  against its signature and every keyword goes to the task. The handle is
  ``JobHandle[R]``, ``R`` the task's return type (awaited, for an ``async def``).
- ``enqueue("task_name", *args, priority=..., id=..., ..., **kwargs)``: the call
  shape of issue 12, unchecked; the option names are options here.
- ``options(priority=..., ...).enqueue(...)`` sets options for either form; there every
  keyword goes to the task, so a task may take a parameter named ``priority``.

So ``client.enqueue(square, "7")`` and ``client.enqueue(square, 7, priority="high")``
are both mypy errors (the second is also a ``TypeError`` at run time, pointing to
``options``), and ``client.options(priority="high").enqueue(square, 7)`` is the typed
way to set a priority.

**Waiting.** ``result()`` waits on ``<prefix>:done:<id>`` in slices of at most 2 s,
with ``BLMOVE done done`` (a rotation of the one-element list) rather than ``BLPOP``:
the outcome stays there for every other waiter (the handle of a duplicate unique
push, ``prioqd submit --wait``, a second ``result()``). Each slice first looks at
the job hash too, in case a ``BLPOP`` elsewhere took the outcome.

Redis errors are raised as :class:`prioqd.errors.BrokerError` (redis-py's exception
is its ``__cause__``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, ParamSpec, Self, TypeAlias, TypeVar, cast, overload

import redis.asyncio as aioredis
from redis import Redis as SyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from prioqd import jobs
from prioqd.broker import as_text, cancel_args, wrap_errors
from prioqd.config import DEFAULT_CONFIG_PATH, Config, JobsConfig, QueuesConfig, RedisConfig
from prioqd.config import load as load_config
from prioqd.errors import JobFailed
from prioqd.keys import Keys
from prioqd.registry import Task
from prioqd.systemd import redis_password

__all__ = [
    "AsyncClient",
    "AsyncEnqueuer",
    "AsyncJobHandle",
    "Client",
    "Enqueuer",
    "JobFailed",
    "JobHandle",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
C = TypeVar("C")

_log = logging.getLogger("prioqd.client")

_SCRIPT = resources.files("prioqd").joinpath("lua/prioqd.lua").read_text(encoding="utf-8")

#: The keyword arguments of ``enqueue`` that are options, not the task's arguments.
OPTION_NAMES = frozenset(
    ("priority", "id", "delay_s", "eta", "timeout_s", "max_retries", "meta", "unique")
)
#: Longest single blocking wait: a long ``result()`` is a series of these, so a
#: dropped connection or a socket timeout never stands between a caller and its job.
SLICE_S = 2.0
#: How long ``cancel()`` waits for a daemon to report a running job cancelled.
CANCEL_WAIT_S = 5.0
#: How long a cancel asked of the daemons stays in ``<prefix>:cancels``: the daemon
#: that holds the job hears of it at once on ``<prefix>:control``; the entry is for a
#: daemon that missed the note (reconnecting) or takes the job in a race.
CANCEL_KEEP_S = 600
#: Queue and schedule entries read per command when looking for a job by id.
_CHUNK = 1000
#: Job hash fields an outcome can be rebuilt from.
_HASH_FIELDS = ("status", "task", "priority", "result", "error", "attempts")


# --- options and payloads ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Options:
    priority: str | None = None
    id: str | None = None
    delay_s: float | None = None
    eta: float | None = None
    timeout_s: float | None = None
    max_retries: int | None = None
    meta: Mapping[str, Any] | None = None
    unique: bool = False


@dataclass(frozen=True, slots=True)
class _Push:
    """One checked job, ready for the ``enqueue`` command."""

    priority: str
    payload: bytes
    job: dict[str, Any]  # the payload's JSON
    id: str
    unique: bool
    lock_ttl_s: int

    def where(self) -> _Where:
        """Where the job is once pushed, until a daemon takes it."""
        return _Where("queued", self.priority, self.payload, self.job)


def _json_problem(value: Any, where: str) -> str | None:
    """Why ``value`` is not plain JSON (what the task would receive back), or None.

    Stricter than ``json.dumps``: it refuses NaN and infinities (not JSON) and keys
    that are not strings (``json.dumps`` would turn ``{1: x}`` into ``{"1": x}``).
    Tuples are arrays. Iterative, so a self-containing list is refused, not looped on.
    """
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        v, path, depth = stack.pop()
        if v is None or isinstance(v, (bool, int, str)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                return f"{path} is {v!r}, which JSON cannot carry"
            continue
        if depth >= jobs.MAX_DEPTH:
            return f"{where} nests deeper than {jobs.MAX_DEPTH} levels"
        if isinstance(v, (list, tuple)):
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    return f"{path} has a key {k!r} that is not a string"
                stack.append((x, f"{path}[{k!r}]", depth + 1))
        else:
            return f"{path} is a {type(v).__name__}, which is not JSON-serialisable"
    return None


def _text(v: Any) -> str | None:
    """A reply as text (replies are bytes, or str for a client with decode_responses)."""
    return None if v is None else as_text(v)


def _bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode("utf-8")


def _accepts_keyword(fn: Any, name: str) -> bool:
    """Whether ``fn`` can take ``name=...`` (a keyword parameter, or ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    for param in sig.parameters.values():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if param.name == name and param.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False


def _task_name(task: Any) -> str:
    if isinstance(task, Task):
        return task.name
    if isinstance(task, str):
        return task
    raise TypeError(
        f"enqueue() takes a task name or a function decorated with @prioqd.task, not {task!r}"
    )


# --- the protocol, free of I/O -------------------------------------------------------
# Each operation is a generator that yields Redis requests and receives their
# replies, so Client and AsyncClient share every line of it and differ only in how
# they send a request (``_run``).


@dataclass(frozen=True, slots=True)
class _Cmd:
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Lua:
    """A command of prioqd.lua (its arguments after the prefix)."""

    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Batch:
    """Commands sent together (a pipeline, not a transaction); the reply is a list."""

    cmds: tuple[_Cmd, ...]


_Request: TypeAlias = _Cmd | _Lua | _Batch
_Steps: TypeAlias = Generator[_Request, Any, T]


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a job that has not ended was found."""

    kind: str  # "queued", "scheduled" or "held" (by a daemon, start not recorded)
    priority: str = ""
    element: bytes = b""  # the exact queue element or schedule member
    job: Mapping[str, Any] | None = None  # its JSON


def _outcome_json(job_id: str, raw: Any) -> dict[str, Any]:
    try:
        outcome = json.loads(raw)
    except ValueError:
        outcome = None
    if not isinstance(outcome, dict):
        return {"id": job_id, "status": "unknown", "error": "unreadable outcome"}
    return outcome


def _outcome_from_hash(job_id: str, values: Sequence[Any]) -> dict[str, Any] | None:
    """The outcome of an ended job rebuilt from its hash, or None if it has not ended."""
    status, task, priority, result, error, attempts = (_text(v) for v in values)
    if status not in jobs.ENDED:
        return None
    try:
        value = None if result is None else json.loads(result)
    except ValueError:
        value = result
    return {
        "id": job_id,
        "task": task,
        "priority": priority,
        "status": status,
        "result": value,
        "error": error,
        "attempts": int(attempts) if attempts and attempts.lstrip("-").isdigit() else 0,
    }


class _Protocol:
    """Settings and every operation of a client, as request generators."""

    def __init__(
        self,
        *,
        prefix: str,
        priorities: Sequence[str] | None,
        result_ttl_s: int | None,
        max_payload_bytes: int | None,
        socket_timeout_s: float | None,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty string, got {prefix!r}")
        prios = list(priorities if priorities is not None else QueuesConfig().priorities)
        if not prios or not all(isinstance(p, str) and p for p in prios):
            raise ValueError(f"priorities must be non-empty strings, got {prios!r}")
        self.keys = Keys(prefix)
        self.priorities: tuple[str, ...] = tuple(prios)
        #: The middle priority, as ``prioqd submit`` chooses.
        self.default_priority = prios[len(prios) // 2]
        defaults = JobsConfig()
        self.result_ttl_s = int(result_ttl_s or defaults.result_ttl_s)
        self.max_payload_bytes = int(max_payload_bytes or defaults.max_payload_bytes)
        self.slice_s = SLICE_S
        if socket_timeout_s:
            # A blocking wait must end before the socket's read timeout fires.
            self.slice_s = max(0.05, min(SLICE_S, socket_timeout_s / 2))

    # -- enqueue --

    def split_options(self, task: Any, kwargs: dict[str, Any]) -> tuple[_Options, dict[str, Any]]:
        """Options and the task's own keyword arguments, from ``enqueue``'s keywords."""
        if isinstance(task, str):
            options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_NAMES}
            return _Options(**options), kwargs
        if isinstance(task, Task):
            clash = sorted(k for k in kwargs if k in OPTION_NAMES and not _accepts_keyword(task, k))
            if clash:
                names = ", ".join(f"{k}=" for k in clash)
                raise TypeError(
                    f"task {task.name!r} takes no keyword argument {names}; with a task "
                    f"function, set job options through client.options({names}...)"
                    f".enqueue({task.name}, ...)"
                )
        return _Options(), kwargs

    def prepare(
        self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any], o: _Options
    ) -> _Push:
        """The job JSON for one push, checked as the daemon would check it."""
        name = _task_name(task)
        priority = self.default_priority if o.priority is None else o.priority
        if priority not in self.priorities:
            raise ValueError(
                f"unknown priority {priority!r}; configured: {', '.join(self.priorities)}"
            )
        if o.id is not None and not jobs.valid_id(o.id):
            raise ValueError(
                f"job id {o.id!r} is not valid: it must be 1-{jobs.MAX_ID_LENGTH} printable "
                "characters without spaces"
            )
        if not isinstance(o.unique, bool):
            raise ValueError(f"unique must be True or False, got {o.unique!r}")
        if o.unique and o.id is None:
            raise ValueError("unique=True needs an id: the id is what makes two jobs the same job")
        if o.meta is not None and not isinstance(o.meta, Mapping):
            raise ValueError(f"meta must be a mapping (a JSON object), got {o.meta!r}")
        meta = None if o.meta is None else dict(o.meta)
        for value, where in ((args, "args"), (kwargs, "kwargs"), (meta, "meta")):
            if (problem := _json_problem(value, where)) is not None:
                raise ValueError(f"task {name!r}: {problem}")
        now = time.time()
        job: dict[str, Any] = {
            "task": name,
            "args": list(args),
            "kwargs": dict(kwargs),
            "id": o.id if o.id is not None else jobs.new_job_id(),
        }
        for field in ("timeout_s", "max_retries", "delay_s", "eta"):
            value = getattr(o, field)
            if value is not None:
                job[field] = value
        if meta is not None:
            job["meta"] = meta
        job["enqueued_at"] = round(now, 6)
        if o.unique:
            job["unique"] = True
        try:
            payload = json.dumps(
                job, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: only escapes can carry it
            payload = json.dumps(job, allow_nan=False, separators=(",", ":")).encode("ascii")
        except (TypeError, ValueError) as exc:  # an option of the wrong type
            raise ValueError(f"task {name!r}: the job is not JSON-serialisable: {exc}") from exc
        checked = jobs.parse(
            payload,
            priority,
            known_tasks=(name,),
            max_payload_bytes=self.max_payload_bytes,
            now=now,
        )
        if isinstance(checked, jobs.Rejected):
            raise ValueError(f"task {name!r}: the daemon would reject this job: {checked.reason}")
        delay = checked.due_ms / 1000 - now if checked.due_ms else 0.0
        return _Push(
            priority=priority,
            payload=payload,
            job=job,
            id=job["id"],
            unique=o.unique,
            # The lock outlives a delay, and then the result TTL, unless released.
            lock_ttl_s=self.result_ttl_s + max(0, math.ceil(delay)),
        )

    def push(self, p: _Push) -> _Steps[bool]:
        """True if pushed, False if a live unique job of that id was there first."""
        unique = "1" if p.unique else "0"
        n = yield _Lua(("enqueue", p.priority, p.payload, p.id, unique, str(p.lock_ttl_s)))
        if int(n) == 0:
            _log.info("duplicate: unique job %s is already queued or running; not pushed", p.id)
        return int(n) == 1

    # -- waiting for the outcome --

    def outcome(self, job_id: str, timeout_s: float | None) -> _Steps[dict[str, Any] | None]:
        """The outcome JSON of the job once it has ended, or None after ``timeout_s``."""
        done, job = self.keys.done(job_id), self.keys.job(job_id)
        deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        while True:
            head, fields = yield _Batch(
                (_Cmd(("LINDEX", done, 0)), _Cmd(("HMGET", job, *_HASH_FIELDS)))
            )
            if head is not None:
                return _outcome_json(job_id, head)
            # The done list may have been taken by a BLPOP elsewhere: the hash says too.
            ended = _outcome_from_hash(job_id, fields)
            if ended is not None:
                return ended
            wait = self.slice_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = min(wait, left)
            # BLMOVE of the list onto itself: wakes with the outcome and leaves it there.
            head = yield _Cmd(("BLMOVE", done, done, "RIGHT", "LEFT", f"{max(wait, 0.01):.3f}"))
            if head is not None:
                return _outcome_json(job_id, head)

    def result(
        self, job_id: str, timeout_s: float | None
    ) -> _Steps[tuple[dict[str, Any] | None, str | None]]:
        """The outcome, and the task's traceback if it did not succeed."""
        outcome = yield from self.outcome(job_id, timeout_s)
        if outcome is None or outcome.get("status") == "succeeded":
            return outcome, None
        tb = yield _Cmd(("HGET", self.keys.job(job_id), "traceback"))
        return outcome, _text(tb)

    # -- where a job is --

    def locate(self, job_id: str, hint: _Where | None) -> _Steps[_Where | None]:
        """Where job ``job_id`` waits or is held, or None (ended, unknown, in transit).

        Its queue first (by the exact element when this client pushed it, else by
        reading the queues), then what daemons hold, then the schedule: the order in
        which a job moves, so one that moves meanwhile is usually still found.
        """
        match = jobs.IdMatch(job_id)
        where = yield from self._in_queues(match, hint)
        if where is None:
            where = yield from self._held(match)
        if where is None:
            where = yield from self._scheduled(match)
        return where

    def _in_queues(self, match: jobs.IdMatch, hint: _Where | None) -> _Steps[_Where | None]:
        if hint is not None:
            pos = yield _Cmd(("LPOS", self.keys.queue(hint.priority), hint.element))
            if pos is not None:
                return hint
        for p in self.priorities:
            start = 0
            while True:
                chunk = yield _Cmd(("LRANGE", self.keys.queue(p), start, start + _CHUNK - 1))
                for el in chunk:
                    found = match(_bytes(el))
                    if found is not None:
                        return _Where("queued", p, _bytes(el), found)
                if len(chunk) < _CHUNK:
                    break
                start += _CHUNK
        return None

    def _held(self, match: jobs.IdMatch) -> _Steps[_Where | None]:
        """Claimed by a daemon, start not recorded (the layout: prioqd.lua's header)."""
        keys = self.keys
        for d in (yield _Cmd(("ZRANGE", keys.daemons, 0, -1))):
            daemon = _text(d) or ""
            replies = yield _Batch(
                (
                    _Cmd(("HVALS", keys.inflight(daemon))),
                    *(_Cmd(("LRANGE", keys.landing(daemon, p), 0, -1)) for p in self.priorities),
                )
            )
            entries = [jobs.split_entry(_bytes(v))[2] for v in replies[0]]
            entries += [_bytes(v) for landed in replies[1:] for v in landed]
            for payload in entries:
                found = match(payload)
                if found is not None:
                    return _Where("held", "", payload, found)
        return None

    def _scheduled(self, match: jobs.IdMatch) -> _Steps[_Where | None]:
        start = 0
        while True:
            members = yield _Cmd(("ZRANGE", self.keys.scheduled, start, start + _CHUNK - 1))
            for m in members:
                priority, payload = jobs.split_member(_bytes(m))
                found = match(payload)
                if found is not None:
                    return _Where("scheduled", priority, _bytes(m), found)
            if len(members) < _CHUNK:
                return None
            start += _CHUNK

    def status(self, job_id: str, hint: _Where | None) -> _Steps[str]:
        status, lock = yield _Batch(
            (
                _Cmd(("HGET", self.keys.job(job_id), "status")),
                _Cmd(("GET", self.keys.unique(job_id))),
            )
        )
        if status is not None:
            return _text(status) or "unknown"
        if lock is not None:
            return "queued"  # a unique job pushed and not started yet
        where = yield from self.locate(job_id, hint)
        if where is None:
            return "unknown"
        return "scheduled" if where.kind == "scheduled" else "queued"

    def progress(self, job_id: str) -> _Steps[Any]:
        raw = _text((yield _Cmd(("HGET", self.keys.job(job_id), "progress"))))
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    # -- cancelling --

    def cancel(self, job_id: str, hint: _Where | None, wait_s: float) -> _Steps[bool]:
        """Cancel a waiting job at once, or ask the daemon that holds it to, and wait
        up to ``wait_s`` for it to say so. True if this call cancelled it."""
        keys = self.keys
        for _ in range(3):  # a job that moved while we looked is looked for again
            status, attempts, lock = yield _Batch(
                (
                    _Cmd(("HGET", keys.job(job_id), "status")),
                    _Cmd(("HGET", keys.job(job_id), "attempts")),
                    _Cmd(("GET", keys.unique(job_id))),
                )
            )
            status, lock_text = _text(status), _text(lock)
            where: _Where | None = None
            if status in jobs.ENDED:
                return False
            if status == "running" or lock_text not in (None, "q"):
                where = _Where("held")  # a live run, started or not: no need to look
            elif status in ("scheduled", "failed"):  # waits in the schedule for its time
                where = yield from self._scheduled(jobs.IdMatch(job_id))
            if where is None:
                where = yield from self.locate(job_id, hint)
            if where is None:
                continue
            if where.kind == "held":
                yield _Lua(("cancel_held", str(CANCEL_KEEP_S * 1000), job_id))
                outcome = yield from self.outcome(job_id, wait_s)
                return outcome is not None and outcome.get("status") == "cancelled"
            args = self._cancel_args(job_id, where, _text(attempts))
            if int((yield _Lua(args))) == 1:
                return True
        return False

    def _cancel_args(self, job_id: str, where: _Where, attempts: str | None) -> tuple[Any, ...]:
        job = where.job or {}
        outcome = jobs.cancelled_outcome(
            job_id,
            task=job.get("task"),
            priority=where.priority,
            error=f"cancelled while {where.kind}",
            attempts=attempts,
        )
        common = cancel_args(job_id, self.result_ttl_s, outcome, job.get("unique") is True)
        if where.kind == "queued":
            return ("cancel_queued", where.priority, where.element, *common)
        return ("cancel_scheduled", where.element, *common)


def _ended(job_id: str, outcome: dict[str, Any] | None, timeout_s: float | None) -> dict[str, Any]:
    """The outcome a wait brought back; ``TimeoutError`` if it brought none."""
    if outcome is None:
        raise TimeoutError(f"job {job_id}: no outcome within {timeout_s:g} s")
    return outcome


def _result(
    job_id: str, reply: tuple[dict[str, Any] | None, str | None], timeout_s: float | None
) -> Any:
    """The task's return value from a wait for its outcome (and traceback);
    ``JobFailed`` unless it succeeded."""
    raw, tb = reply
    outcome = _ended(job_id, raw, timeout_s)
    if outcome.get("status") != "succeeded":
        error = outcome.get("error")
        raise JobFailed(
            job_id, str(outcome.get("status")), None if error is None else str(error), tb, outcome
        )
    return outcome.get("result")


def _url_kwargs(url: str, socket_timeout_s: float, connect_timeout_s: float) -> dict[str, Any]:
    """Connection settings as the daemon's: no retries (a push must not be repeated
    behind our back), and the password from the systemd credential or
    ``PRIOQD_REDIS_PASSWORD`` unless the URL carries one."""
    kw: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "client_name": "prioqd-client",
    }
    parts = urllib.parse.urlsplit(url)
    if parts.password is None and "password=" not in parts.query:
        password = redis_password()
        if password is not None:
            kw["password"] = password
    return kw


def _socket_timeout(client: Any) -> float | None:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    value = kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _config(path: str | os.PathLike[str]) -> Config:
    return load_config(os.fspath(path))


# --- the synchronous client ------------------------------------------------------------


class _ClientBase:
    """What both clients share: built from a config file, and what they know."""

    _p: _Protocol

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        raise NotImplementedError  # pragma: no cover - each client has its own

    @classmethod
    def from_config(
        cls, config: str | os.PathLike[str] | Config = DEFAULT_CONFIG_PATH, *, redis: Any = None
    ) -> Self:
        """A client for the daemons that run on this config file, or config
        (``ConfigError`` if it is invalid); on ``redis``, a client of the matching
        kind you already have, if given, else on the config's URL."""
        cfg = config if isinstance(config, Config) else _config(config)
        common: dict[str, Any] = {
            "prefix": cfg.queues.prefix,
            "priorities": cfg.queues.priorities,
            "result_ttl_s": cfg.jobs.result_ttl_s,
            "max_payload_bytes": cfg.jobs.max_payload_bytes,
        }
        if redis is not None:
            return cls(redis=redis, **common)
        return cls(
            cfg.redis.url,
            socket_timeout_s=cfg.redis.socket_timeout_s,
            connect_timeout_s=cfg.redis.connect_timeout_s,
            **common,
        )

    @property
    def prefix(self) -> str:
        return self._p.keys.prefix

    @property
    def priorities(self) -> tuple[str, ...]:
        return self._p.priorities


class Client(_ClientBase):
    """Push jobs and follow them, with blocking calls (``redis.Redis`` underneath).

    Build it from the daemon's config file (``Client.from_config(path)``: URL, prefix,
    priorities, result TTL and payload limit as the daemons use them), from a URL
    (``Client("redis://host:6379/0", prefix="prioqd")``), or around a ``redis.Redis``
    you already have (``Client(redis=r, prefix="prioqd")``; it is not closed by
    ``close()``). Built from a config or URL, it uses the password the daemon would:
    the systemd credential ``redis-password`` or ``PRIOQD_REDIS_PASSWORD``.

    ``priorities`` (highest first) are the ones ``enqueue`` accepts; the default is the
    middle one. Without a config they are ``high``, ``normal``, ``low``, like the
    daemon's defaults; ``result_ttl_s`` and ``max_payload_bytes`` default to the
    daemon's defaults too. ``socket_timeout_s`` and ``connect_timeout_s`` apply to the
    connections the client makes. Thread-safe as ``redis.Redis`` is.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "prioqd",
        redis: SyncRedis | None = None,
        priorities: Sequence[str] | None = None,
        result_ttl_s: int | None = None,
        max_payload_bytes: int | None = None,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if url is not None and redis is not None:
            raise ValueError("give a url or a redis client, not both")
        self._owned = redis is None
        if redis is None:
            url = url or RedisConfig().url
            redis = _sync_redis_from_url(url, socket_timeout_s, connect_timeout_s)
        self.redis = redis
        self._p = _Protocol(
            prefix=prefix,
            priorities=priorities,
            result_ttl_s=result_ttl_s,
            max_payload_bytes=max_payload_bytes,
            socket_timeout_s=_socket_timeout(redis),
        )
        self._script = redis.register_script(_SCRIPT)

    def close(self) -> None:
        """Close the connections, if this client made them."""
        if self._owned:
            self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, steps: _Steps[T]) -> T:
        with wrap_errors("prioqd client"):
            try:
                reply: Any = None
                while True:
                    try:
                        request = steps.send(reply)
                    except StopIteration as stop:
                        return cast(T, stop.value)
                    reply = self._send(request)
            finally:
                steps.close()

    def _send(self, request: _Request) -> Any:
        if isinstance(request, _Cmd):
            return self.redis.execute_command(*request.args)  # type: ignore[no-untyped-call]
        if isinstance(request, _Lua):
            return self._script(args=[self._p.keys.prefix, *request.args])
        with self.redis.pipeline(transaction=False) as pipe:
            for cmd in request.cmds:
                pipe.execute_command(*cmd.args)  # type: ignore[no-untyped-call]
            return pipe.execute()

    # Overloads: see the module docstring. The first two check a task function's
    # arguments; the third is enqueue-by-name with the options as keywords.
    @overload
    def enqueue(
        self, task: Task[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> JobHandle[R]: ...
    @overload
    def enqueue(self, task: Task[P, R], /, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]: ...
    @overload
    def enqueue(
        self,
        task: str,
        /,
        *args: Any,
        priority: str | None = None,
        id: str | None = None,
        delay_s: float | None = None,
        eta: float | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        meta: Mapping[str, Any] | None = None,
        unique: bool = False,
        **kwargs: Any,
    ) -> JobHandle[Any]: ...
    def enqueue(self, task: Task[..., Any] | str, /, *args: Any, **kwargs: Any) -> JobHandle[Any]:
        """Push a job; returns its handle at once.

        ``task`` is a task name, with the options as keywords (``priority``, ``id``,
        ``delay_s`` or ``eta``, ``timeout_s``, ``max_retries``, ``meta``, ``unique``),
        or a ``@task`` function, whose arguments a type checker then checks and which
        takes its options from :meth:`options`. The priority defaults to the middle
        one; the id to 32 random hex digits.

        ``unique=True`` (with an ``id``): the job is pushed only if no job of that id is
        queued, scheduled or running; otherwise nothing is pushed, ``duplicate`` is
        published on ``<prefix>:events``, and the handle (``duplicate`` true) follows
        the live job, so ``result()`` returns its outcome.

        Raises ``ValueError`` for a job the daemon would reject (an unknown priority,
        a bad id, arguments that are not JSON...), ``BrokerError`` if Redis fails.
        """
        options, kwargs = self._p.split_options(task, kwargs)
        return self._enqueue(task, args, kwargs, options)

    def _enqueue(
        self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any], options: _Options
    ) -> JobHandle[Any]:
        push = self._p.prepare(task, args, kwargs, options)
        pushed = self._run(self._p.push(push))
        hint = push.where() if pushed else None
        priority = push.priority if pushed else None
        return JobHandle(self, push.id, priority=priority, hint=hint, duplicate=not pushed)

    def options(
        self,
        *,
        priority: str | None = None,
        id: str | None = None,
        delay_s: float | None = None,
        eta: float | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        meta: Mapping[str, Any] | None = None,
        unique: bool = False,
    ) -> Enqueuer:
        """Job options for ``.enqueue(task, *args, **kwargs)``, where every keyword
        goes to the task: ``client.options(priority="high").enqueue(square, 7)``."""
        return Enqueuer(
            self, _Options(priority, id, delay_s, eta, timeout_s, max_retries, meta, unique)
        )

    def job(self, job_id: str) -> JobHandle[Any]:
        """A handle on a job pushed earlier (by anyone), from its id."""
        return JobHandle(self, job_id)


class Enqueuer:
    """``Client.options(...)``: job options bound to a client."""

    def __init__(self, client: Client, options: _Options) -> None:
        self._client = client
        self._options = options

    @overload
    def enqueue(
        self, task: Task[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> JobHandle[R]: ...
    @overload
    def enqueue(self, task: Task[P, R], /, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]: ...
    @overload
    def enqueue(self, task: str, /, *args: Any, **kwargs: Any) -> JobHandle[Any]: ...
    def enqueue(self, task: Task[..., Any] | str, /, *args: Any, **kwargs: Any) -> JobHandle[Any]:
        """As :meth:`Client.enqueue`, with these options; every keyword is the task's."""
        return self._client._enqueue(task, args, kwargs, self._options)


class _Handle(Generic[C, R]):
    """What both handles hold: their client, the job's id, and where it was pushed."""

    __slots__ = ("_client", "_hint", "duplicate", "id", "priority")

    def __init__(
        self,
        client: C,
        job_id: str,
        *,
        priority: str | None = None,
        hint: _Where | None = None,
        duplicate: bool = False,
    ) -> None:
        self._client = client
        self._hint = hint
        self.id = job_id
        self.priority = priority
        self.duplicate = duplicate

    def __repr__(self) -> str:
        dup = ", duplicate" if self.duplicate else ""
        return f"<{type(self).__name__} {self.id}{dup}>"


class JobHandle(_Handle[Client, R]):
    """A job pushed (or looked up) by a :class:`Client`.

    ``priority`` is the queue it was pushed onto (None if this handle did not push it).
    ``duplicate`` is true when ``enqueue(..., unique=True)`` found a live job of the
    same id and pushed nothing: this handle then follows that job.
    """

    __slots__ = ()

    def status(self) -> str:
        """The job hash's status (``running``, ``scheduled``, ``failed``, ``succeeded``,
        ``dead``, ``cancelled``, ``queued``), else ``queued`` if it waits in a queue or
        a daemon has taken it but not started it yet, else ``unknown`` (never pushed,
        or its record expired)."""
        return self._client._run(self._client._p.status(self.id, self._hint))

    def progress(self) -> Any:
        """What the task last reported with ``prioqd.set_progress()`` (a number or a
        JSON object), or None. The daemon writes it at most twice a second."""
        return self._client._run(self._client._p.progress(self.id))

    def outcome(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The outcome JSON once the job has ended (``succeeded``, ``dead`` or
        ``cancelled``), without raising for a failed job. ``TimeoutError`` after
        ``timeout_s`` seconds (None: wait for ever)."""
        outcome = self._client._run(self._client._p.outcome(self.id, timeout_s))
        return _ended(self.id, outcome, timeout_s)

    def result(self, timeout_s: float | None = None) -> R:
        """The task's return value (as JSON brings it back: tuples become lists).

        Raises ``prioqd.JobFailed`` if the job ended ``dead`` or ``cancelled`` (with
        the error and the task's traceback), ``TimeoutError`` if it has not ended
        within ``timeout_s`` seconds (None: wait for ever).
        """
        reply = self._client._run(self._client._p.result(self.id, timeout_s))
        return cast(R, _result(self.id, reply, timeout_s))

    def cancel(self, wait_s: float = CANCEL_WAIT_S) -> bool:
        """Cancel the job: one that waits in a queue or the schedule is removed at
        once; one a daemon holds is killed by that daemon, and this waits up to
        ``wait_s`` for it to report so. Its outcome is then ``cancelled`` (a waiter
        gets ``JobFailed``). Returns whether this call cancelled it: False if it had
        already ended, or is unknown."""
        return self._client._run(self._client._p.cancel(self.id, self._hint, wait_s))


def _sync_redis_from_url(url: str, socket_timeout_s: float, connect_timeout_s: float) -> SyncRedis:
    return SyncRedis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        **_url_kwargs(url, socket_timeout_s, connect_timeout_s),
    )


# --- the asyncio client ------------------------------------------------------------------


class AsyncClient(_ClientBase):
    """:class:`Client` for asyncio (``redis.asyncio.Redis`` underneath): the same
    constructors and options; ``enqueue`` and every handle method are coroutines."""

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = "prioqd",
        redis: aioredis.Redis | None = None,
        priorities: Sequence[str] | None = None,
        result_ttl_s: int | None = None,
        max_payload_bytes: int | None = None,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
    ) -> None:
        if url is not None and redis is not None:
            raise ValueError("give a url or a redis client, not both")
        self._owned = redis is None
        if redis is None:
            url = url or RedisConfig().url
            redis = aioredis.Redis.from_url(
                url,
                retry=AsyncRetry(NoBackoff(), 0),
                **_url_kwargs(url, socket_timeout_s, connect_timeout_s),
            )
        self.redis = redis
        self._p = _Protocol(
            prefix=prefix,
            priorities=priorities,
            result_ttl_s=result_ttl_s,
            max_payload_bytes=max_payload_bytes,
            socket_timeout_s=_socket_timeout(redis),
        )
        self._script = redis.register_script(_SCRIPT)

    async def aclose(self) -> None:
        """Close the connections, if this client made them."""
        if self._owned:
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, steps: _Steps[T]) -> T:
        with wrap_errors("prioqd client"):
            try:
                reply: Any = None
                while True:
                    try:
                        request = steps.send(reply)
                    except StopIteration as stop:
                        return cast(T, stop.value)
                    reply = await self._send(request)
            finally:
                steps.close()

    async def _send(self, request: _Request) -> Any:
        if isinstance(request, _Cmd):
            return await self.redis.execute_command(*request.args)  # type: ignore[no-untyped-call]
        if isinstance(request, _Lua):
            return await self._script(args=[self._p.keys.prefix, *request.args])
        async with self.redis.pipeline(transaction=False) as pipe:
            for cmd in request.cmds:
                pipe.execute_command(*cmd.args)
            return await pipe.execute()

    @overload
    async def enqueue(
        self, task: Task[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncJobHandle[R]: ...
    @overload
    async def enqueue(
        self, task: Task[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncJobHandle[R]: ...
    @overload
    async def enqueue(
        self,
        task: str,
        /,
        *args: Any,
        priority: str | None = None,
        id: str | None = None,
        delay_s: float | None = None,
        eta: float | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        meta: Mapping[str, Any] | None = None,
        unique: bool = False,
        **kwargs: Any,
    ) -> AsyncJobHandle[Any]: ...
    async def enqueue(
        self, task: Task[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> AsyncJobHandle[Any]:
        """As :meth:`Client.enqueue`."""
        options, kwargs = self._p.split_options(task, kwargs)
        return await self._enqueue(task, args, kwargs, options)

    async def _enqueue(
        self, task: Any, args: Sequence[Any], kwargs: Mapping[str, Any], options: _Options
    ) -> AsyncJobHandle[Any]:
        push = self._p.prepare(task, args, kwargs, options)
        pushed = await self._run(self._p.push(push))
        hint = push.where() if pushed else None
        priority = push.priority if pushed else None
        return AsyncJobHandle(self, push.id, priority=priority, hint=hint, duplicate=not pushed)

    def options(
        self,
        *,
        priority: str | None = None,
        id: str | None = None,
        delay_s: float | None = None,
        eta: float | None = None,
        timeout_s: float | None = None,
        max_retries: int | None = None,
        meta: Mapping[str, Any] | None = None,
        unique: bool = False,
    ) -> AsyncEnqueuer:
        """As :meth:`Client.options`."""
        return AsyncEnqueuer(
            self, _Options(priority, id, delay_s, eta, timeout_s, max_retries, meta, unique)
        )

    def job(self, job_id: str) -> AsyncJobHandle[Any]:
        """A handle on a job pushed earlier (by anyone), from its id."""
        return AsyncJobHandle(self, job_id)


class AsyncEnqueuer:
    """``AsyncClient.options(...)``: job options bound to a client."""

    def __init__(self, client: AsyncClient, options: _Options) -> None:
        self._client = client
        self._options = options

    @overload
    async def enqueue(
        self, task: Task[P, Coroutine[Any, Any, R]], /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncJobHandle[R]: ...
    @overload
    async def enqueue(
        self, task: Task[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> AsyncJobHandle[R]: ...
    @overload
    async def enqueue(self, task: str, /, *args: Any, **kwargs: Any) -> AsyncJobHandle[Any]: ...
    async def enqueue(
        self, task: Task[..., Any] | str, /, *args: Any, **kwargs: Any
    ) -> AsyncJobHandle[Any]:
        """As :meth:`Client.enqueue`, with these options; every keyword is the task's."""
        return await self._client._enqueue(task, args, kwargs, self._options)


class AsyncJobHandle(_Handle[AsyncClient, R]):
    """:class:`JobHandle` for :class:`AsyncClient`: the same methods, as coroutines."""

    __slots__ = ()

    async def status(self) -> str:
        """As :meth:`JobHandle.status`."""
        return await self._client._run(self._client._p.status(self.id, self._hint))

    async def progress(self) -> Any:
        """As :meth:`JobHandle.progress`."""
        return await self._client._run(self._client._p.progress(self.id))

    async def outcome(self, timeout_s: float | None = None) -> dict[str, Any]:
        """As :meth:`JobHandle.outcome`."""
        outcome = await self._client._run(self._client._p.outcome(self.id, timeout_s))
        return _ended(self.id, outcome, timeout_s)

    async def result(self, timeout_s: float | None = None) -> R:
        """As :meth:`JobHandle.result`."""
        reply = await self._client._run(self._client._p.result(self.id, timeout_s))
        return cast(R, _result(self.id, reply, timeout_s))

    async def cancel(self, wait_s: float = CANCEL_WAIT_S) -> bool:
        """As :meth:`JobHandle.cancel`."""
        return await self._client._run(self._client._p.cancel(self.id, self._hint, wait_s))
