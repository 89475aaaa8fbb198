"""The job contract: parsing producers' JSON, and the records written when a job
starts and ends (as ops of the Lua ``cycle`` command, see ``prioqd.ops``).

Everything here is pure (no I/O), so the rules a producer sees are tested directly.
``parse`` never raises on data: every payload is a ``Job`` or a ``Rejected`` with a
reason a producer can act on.
"""

from __future__ import annotations

import base64
import enum
import json
import math
import random
import re
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import orjson

from prioqd.ops import End, Finish, Reject, Schedule, Start
from prioqd.timing import backoff_s

ALLOWED_FIELDS = (
    "task",
    "args",
    "kwargs",
    "id",
    "timeout_s",
    "max_retries",
    "delay_s",
    "eta",
    "meta",
    "enqueued_at",
    "unique",
)
_ALLOWED = frozenset(ALLOWED_FIELDS)
MAX_ID_LENGTH = 200
#: Statuses after which a job does not run again.
ENDED = frozenset(("succeeded", "dead", "cancelled"))
#: Arguments nested deeper than this are refused: pickling them for the worker (and
#: unpickling there) recurses once per level, and Python's stack is finite.
MAX_DEPTH = 100
#: delay_s / eta further away than this are refused (they would overflow, and are
#: surely a mistake: ten years).
MAX_DELAY_S = 10 * 365 * 86400.0
MAX_RETRIES = 1000


class JobState(enum.Enum):
    """Where a claimed job's record in Redis stands."""

    #: In our inflight hash; its start is not written yet (it may never be: a job that
    #: ends first is recorded in one step).
    CLAIMED = "claimed"
    #: Its start op is on its way to Redis.
    STARTING = "starting"
    #: Its start is written; ``Job.attempt`` holds the attempt number.
    STARTED = "started"
    #: Another daemon recovered the claim (our lease lapsed): nothing more is written.
    LOST = "lost"


@dataclass(slots=True)
class Job:
    """A valid job taken from a queue."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: str
    raw: bytes  # the payload as claimed
    json: str  # the stored form: with its id, without delay_s/eta
    rewritten: bool  # json differs from raw (an id was assigned, or a delay dropped)
    timeout_s: float | None = None
    max_retries: int | None = None
    due_ms: int = 0  # > 0: not due yet; goes to the schedule until then (Redis clock)
    enqueued_at: float | None = None  # Unix time, as the producer stated it
    unique: bool = False  # never runs twice at the same time (see ops.Lock)
    meta: dict[str, Any] | None = None
    claim: int = 0  # our claim number: the key of its inflight entry
    state: JobState = JobState.CLAIMED
    #: The attempt this run is: predicted by the claim (from the payload's history in
    #: Redis), confirmed by the start record, if one is written.
    attempt: int = 1
    started_at: float = 0.0  # wall clock, when dispatched
    dispatched_at: float = 0.0  # monotonic
    worker_pid: int = 0  # the worker process its batch went to


@dataclass(slots=True)
class Rejected:
    """A payload that can never run: it goes to the dead letters with ``reason``."""

    priority: str
    raw: bytes
    reason: str
    id: str = ""
    task: str = ""


def new_job_id() -> str:
    return uuid.uuid4().hex


def _number(v: Any) -> float | None:
    """``v`` as a finite float, or None if it is not a JSON number that fits one."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)  # a 400-digit integer raises OverflowError here
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


_NO_SPACE = re.compile(r"\S+")


class _NotFinite(ValueError):
    """A number JSON cannot carry: NaN, Infinity, or a literal too large for a double.
    Python's json reads them (as nan and inf); the stored form, written by orjson,
    would turn them into null, so a retry, a rerun, or any run of a delayed or id-less
    job would get other arguments than the first."""


def _constant(name: str) -> float:
    raise _NotFinite(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text if len(text) <= 24 else f"{text[:20]}...")
    return value


#: A payload with a run of 19 digits or more is read by json, not orjson: it may hold an
#: integer outside orjson's 64 bits (below -2**63 takes 19 digits, above 2**64 - 1 20),
#: which orjson turns into a float where json keeps it whole. (A float literal orjson
#: cannot fit in a double it refuses, and json then reads it, and refuses it too.) Found
#: with a table and a substring search: a regex search cost 2 us a payload, ten times
#: the parse itself.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_LONG_RUN = b"0" * 19


def _loads(text: str, raw: bytes) -> Any:
    """``json.loads`` that refuses non-finite numbers (``_NotFinite``). The common
    payload is read by orjson, ten times faster (0.2 us against 2 for a small job;
    json.loads with a hook builds a decoder at every call); what orjson refuses (NaN,
    a lone surrogate, a BOM, deep nesting, a syntax error) is read again by json, so
    that the result, or the error and its message, are json's."""
    if _LONG_RUN not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text, parse_constant=_constant, parse_float=_finite)


def valid_id(v: Any) -> TypeGuard[str]:
    # isprintable() rejects control characters; the regex, any kind of space.
    return (
        isinstance(v, str)
        and 0 < len(v) <= MAX_ID_LENGTH
        and v.isprintable()
        and _NO_SPACE.fullmatch(v) is not None
    )


#: Ids JSON writes byte for byte, so a payload without them as bytes cannot carry them
#: (unless it spells them with \u escapes).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_.:+=@%,-]+")


class IdMatch:
    """Does a JSON payload carry ``"id": job_id``? Parses only payloads that can:
    operators and producers look a job up among thousands of queued payloads."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._needle = job_id.encode() if _PLAIN_ID.fullmatch(job_id) else None

    def __call__(self, raw: bytes) -> dict[str, Any] | None:
        if self._needle is not None and self._needle not in raw and b"\\u" not in raw:
            return None
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        return obj if isinstance(obj, dict) and obj.get("id") == self.job_id else None


def split_member(member: bytes) -> tuple[str, bytes]:
    """A schedule member ``"p\\nU\\n<json>"`` -> (p, json); the layout is
    prioqd.lua's header."""
    parts = member.split(b"\n", 2)
    if len(parts) < 3:
        return "", member
    return parts[0].decode(errors="replace"), parts[2]


def split_entry(value: bytes) -> tuple[str, str, bytes]:
    """An inflight entry ``"p\\nS\\nR\\n<payload>"`` -> (p, S, payload)."""
    parts = value.split(b"\n", 3)
    if len(parts) < 4:
        return "", "c", value
    return parts[0].decode(errors="replace"), parts[1].decode(errors="replace"), parts[3]


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, list):
            items: Any = v
        elif isinstance(v, dict):
            items = v.values()
        else:
            continue
        if depth > limit:
            return True
        stack.extend((x, depth + 1) for x in items if isinstance(x, (list, dict)))
    return False


def parse(
    raw: bytes,
    priority: str,
    *,
    known_tasks: Collection[str],
    max_payload_bytes: int,
    max_timeout_s: float = math.inf,
    now: float,
) -> Job | Rejected:
    """Validate one payload from ``<prefix>:queue:<priority>``.

    ``now`` is Unix time by Redis's clock (the daemon's estimate of it): an ``eta`` is
    compared with it and due times are expressed in it. Never raises on data.
    """
    try:
        return _parse(raw, priority, known_tasks, max_payload_bytes, max_timeout_s, now)
    except Exception as exc:  # a bug here must cost one job, never the daemon
        return Rejected(priority, raw, f"could not parse the job: {type(exc).__name__}: {exc}")


def _parse(
    raw: bytes,
    priority: str,
    known_tasks: Collection[str],
    max_payload_bytes: int,
    max_timeout_s: float,
    now: float,
) -> Job | Rejected:
    if len(raw) > max_payload_bytes:
        size = len(raw)
        return Rejected(
            priority, raw, f"payload is {size} bytes, over max_payload_bytes={max_payload_bytes}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejected(priority, raw, f"payload is not UTF-8 text: {exc}")
    try:
        obj = _loads(text, raw)
    except _NotFinite as exc:
        return _not_finite(raw, text, priority, str(exc))
    except (ValueError, RecursionError) as exc:
        return Rejected(priority, raw, f"payload is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return Rejected(priority, raw, f"job must be a JSON object, got {_json_type(obj)}")
    if None in obj.values():
        # A field set to null is the field left out, for every field alike (Python
        # producers send None for "not given"; a missing task is still an error).
        obj = {k: v for k, v in obj.items() if v is not None}

    job_id = obj.get("id")
    rid = job_id if valid_id(job_id) else ""
    task = obj.get("task")
    rtask = safe_text(task) if isinstance(task, str) else ""

    def reject(reason: str) -> Rejected:
        return Rejected(priority, raw, reason, id=rid, task=rtask)

    if not _ALLOWED.issuperset(obj):
        unknown = sorted(safe_text(k) for k in obj if k not in _ALLOWED)
        return reject(
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"a job may have {', '.join(ALLOWED_FIELDS)} (put your own data in 'meta')"
        )
    if "id" in obj and not rid:
        return reject(
            f"'id' must be a non-empty string of at most {MAX_ID_LENGTH} printable "
            "characters without spaces"
        )
    if task is None:
        return reject("missing 'task'")
    if not isinstance(task, str) or not task:
        return reject("'task' must be a non-empty string")
    if task not in known_tasks:
        return reject(f"unknown task {rtask!r}")
    args = obj.get("args", [])
    if not isinstance(args, list):
        return reject(f"'args' must be an array, got {_json_type(args)}")
    kwargs = obj.get("kwargs", {})
    if not isinstance(kwargs, dict):
        return reject(f"'kwargs' must be an object, got {_json_type(kwargs)}")
    # Nesting MAX_DEPTH deep takes at least 2 * MAX_DEPTH bytes of brackets: a short
    # payload need not be walked.
    if len(raw) > 2 * MAX_DEPTH and _too_deep([args, kwargs], MAX_DEPTH):
        return reject(f"'args'/'kwargs' nest deeper than {MAX_DEPTH} levels")
    timeout_s = None
    if "timeout_s" in obj:
        timeout_s = _number(obj["timeout_s"])
        if timeout_s is None or timeout_s <= 0:
            return reject("'timeout_s' must be a number greater than 0")
        timeout_s = min(timeout_s, max_timeout_s)
    max_retries = obj.get("max_retries")
    if max_retries is not None and not (
        isinstance(max_retries, int)
        and not isinstance(max_retries, bool)
        and 0 <= max_retries <= MAX_RETRIES
    ):
        return reject(f"'max_retries' must be a whole number from 0 to {MAX_RETRIES}")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return reject("'meta' must be an object")
    # (As deep as args may go, and as the client allows: what is deeper reaches the
    # task's context, the records and the dashboard, where json's own limit is near.)
    if meta and len(raw) > 2 * MAX_DEPTH and _too_deep([meta], MAX_DEPTH):
        return reject(f"'meta' nests deeper than {MAX_DEPTH} levels")
    enqueued_at = None
    if "enqueued_at" in obj:
        enqueued_at = _number(obj["enqueued_at"])
        if enqueued_at is None:
            return reject("'enqueued_at' must be a number (Unix time in seconds)")
    unique = obj.get("unique", False)
    if not isinstance(unique, bool):
        return reject("'unique' must be true or false")
    if unique and "id" not in obj:
        return reject("'unique' needs an 'id': it is what makes two jobs the same")
    if "delay_s" in obj and "eta" in obj:
        return reject("give 'delay_s' or 'eta', not both")
    due_s = 0.0
    if "delay_s" in obj:
        delay = _number(obj["delay_s"])
        if delay is None or not 0 <= delay <= MAX_DELAY_S:
            return reject(f"'delay_s' must be a number from 0 to {MAX_DELAY_S:.0f}")
        due_s = now + delay if delay > 0 else 0.0
    elif "eta" in obj:
        eta = _number(obj["eta"])
        if eta is None:
            return reject("'eta' must be a number (Unix time in seconds)")
        if eta > now + MAX_DELAY_S:
            return reject(f"'eta' is more than {MAX_DELAY_S:.0f} s away")
        due_s = eta if eta > now else 0.0
    due_ms = int(due_s * 1000)

    rewritten = "delay_s" in obj or "eta" in obj or not rid
    if rewritten:
        # The stored form drops delay_s/eta (the schedule's score keeps the due time,
        # so a promoted job runs at once) and pins the id (so a rerun after a crash
        # updates the same job hash).
        obj = {k: v for k, v in obj.items() if k not in ("delay_s", "eta")}
        if not rid:
            rid = new_job_id()
            obj = {"id": rid, **obj}
        stored = dumps(obj)
    else:
        stored = text
    return Job(
        id=rid,
        task=task,
        args=args,
        kwargs=kwargs,
        priority=priority,
        raw=raw,
        json=stored,
        rewritten=rewritten,
        timeout_s=timeout_s,
        max_retries=max_retries,
        due_ms=due_ms,
        enqueued_at=enqueued_at,
        unique=unique,
        meta=meta,
    )


def _not_finite(raw: bytes, text: str, priority: str, number: str) -> Rejected:
    """The rejection of a payload with a non-finite number, with its id and task if it
    has them (read leniently, as Python's json accepts it), so that its job hash and
    a waiting producer hear of it."""
    reason = (
        f"payload has a number that is not finite ({number}): JSON has no NaN or "
        "Infinity, and a number must fit a double"
    )
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        obj = None
    if not isinstance(obj, dict):
        return Rejected(priority, raw, reason)
    job_id, task = obj.get("id"), obj.get("task")
    return Rejected(
        priority,
        raw,
        reason,
        id=job_id if valid_id(job_id) else "",
        task=safe_text(task) if isinstance(task, str) else "",
    )


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def dumps(obj: Any) -> str:
    """Compact JSON text that is always valid UTF-8."""
    try:
        return orjson.dumps(obj).decode()
    except (TypeError, orjson.JSONEncodeError):
        # A lone surrogate (from a "\ud800" escape in a payload) has no UTF-8 form,
        # and orjson refuses integers over 64 bits; ASCII escapes keep both.
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def safe_text(text: str) -> str:
    """``text`` made encodable as UTF-8 (lone surrogates become backslash escapes).

    Strings that come from payloads or task code end up in Redis as UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _ts(t: float) -> str:
    return f"{t:.6f}"


def payload_field(raw: bytes) -> dict[str, str]:
    """The original payload for a dead letter: as text when it is UTF-8, else base64."""
    try:
        return {"payload": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_b64": base64.b64encode(raw).decode("ascii")}


def cancelled_run(now: float) -> RunResult:
    return RunResult("cancelled", error="cancelled", started_at=now, finished_at=now)


def cancelled_outcome(
    job_id: str, *, task: Any, priority: str | None, error: str, attempts: str | None
) -> str:
    """The outcome JSON of a job an operator or producer cancelled before any daemon
    held it (``attempts``: its job hash's count, if any)."""
    return dumps(
        {
            "id": job_id,
            "task": task if isinstance(task, str) and task else None,
            "priority": priority,
            "status": "cancelled",
            "result": None,
            "error": error,
            "attempts": int(attempts) if attempts and attempts.isdigit() else 0,
            "finished_at": round(time.time(), 6),
        }
    )


# --- outcomes of a run -------------------------------------------------------------

RunStatus = Literal[
    "ok", "error", "timeout", "crashed", "rejected", "bad_result", "not_run", "cancelled"
]


@dataclass(slots=True)
class RunResult:
    """What the pool reports for one job."""

    status: RunStatus
    result_json: str = ""  # ok: the return value as JSON text
    error: str = ""  # one line: "ValueError: boom", "timed out after 2.0s", ...
    traceback: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0


# Failures that running again cannot fix go straight to the dead letters.
_PERMANENT: frozenset[str] = frozenset({"rejected", "bad_result", "cancelled"})


@dataclass(frozen=True, slots=True)
class Ending:
    """How a started run ended, as decided by policy."""

    status: Literal["succeeded", "failed", "dead", "cancelled"]
    retry_in_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The [jobs] settings that decide what is written when a job ends."""

    ttl_s: int
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float


def start_op(job: Job, *, daemon_id: str, ttl_s: int) -> Start:
    fields = {
        "status": "running",
        "task": job.task,
        "priority": job.priority,
        "started_at": _ts(job.started_at),
        "daemon": daemon_id,
    }
    if job.worker_pid:
        fields["worker_pid"] = str(job.worker_pid)
    return Start(job, ttl_s, fields)


def reject_op(rej: Rejected, claim: int, *, daemon_id: str, ttl_s: int, now: float) -> Reject:
    outcome = {
        "id": rej.id or None,
        "task": rej.task or None,
        "priority": rej.priority,
        "status": "dead",
        "result": None,
        "error": rej.reason,
        "attempts": 0,
        "finished_at": round(now, 6),
    }
    dead = {
        "reason": rej.reason,
        "id": rej.id or None,
        "task": rej.task or None,
        "priority": rej.priority,
        **payload_field(rej.raw),
        "attempts": 0,
        "daemon": daemon_id,
        "dead_at": round(now, 6),
    }
    fields = {
        "status": "dead",
        "task": rej.task,
        "priority": rej.priority,
        "error": rej.reason,
        "finished_at": _ts(now),
        "attempts": "0",
    }
    return Reject(rej, claim, ttl_s, dumps(outcome), dumps(dead), fields)


def schedule_member(job: Job, daemon_id: str) -> str:
    """The schedule's member for a job: unique per claim, so equal payloads never
    collapse into one entry."""
    return f"{job.priority}\n{daemon_id}/{job.claim}\n{job.json}"


def schedule_op(job: Job, *, daemon_id: str, ttl_s: int) -> Schedule:
    fields = {
        "status": "scheduled",
        "task": job.task,
        "priority": job.priority,
        "retry_at": _ts(job.due_ms / 1000),
    }
    return Schedule(job, ttl_s, schedule_member(job, daemon_id), job.due_ms, fields)


def _run_record(job: Job, run: RunResult, daemon_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """What every ending of a run records: (outcome JSON fields, job hash fields)."""
    duration = max(0.0, run.finished_at - run.started_at)
    outcome: dict[str, Any] = {
        "id": job.id,
        "task": job.task,
        "priority": job.priority,
        "status": "",
        "result": None,
        "error": None,
        "attempts": job.attempt,
        "started_at": round(run.started_at, 6),
        "finished_at": round(run.finished_at, 6),
        "duration_s": round(duration, 6),
    }
    fields = {
        "started_at": _ts(run.started_at),
        "finished_at": _ts(run.finished_at),
        "duration_s": f"{duration:.6f}",
        "daemon": daemon_id,
        "attempts": str(job.attempt),
    }
    return outcome, fields


def _with_result(outcome_json: str, result_json: str) -> str:
    # The worker's JSON text is embedded as is: parsing it only to dump it again
    # would cost more than the rest of the outcome. The first "result":null is the
    # key (inside a JSON string value the quotes would be escaped).
    return outcome_json.replace('"result":null', '"result":' + result_json, 1)


def finish_op(job: Job, run: RunResult, *, daemon_id: str, ttl_s: int) -> Finish:
    """A success recorded in one step, for a job that ended before its start was
    written: the claim goes straight to ``succeeded``. ``job.attempt`` is the claim's
    prediction; the script refuses it if the job hash counts otherwise, and the job
    then takes the slow path: start, then end."""
    outcome, fields = _run_record(job, run, daemon_id)
    outcome["status"] = fields["status"] = "succeeded"
    fields.update(task=job.task, priority=job.priority, result=run.result_json)
    head = _with_result(dumps(outcome), run.result_json)
    return Finish(job, run, ttl_s, head, fields)


def end_op(
    job: Job, run: RunResult, *, daemon_id: str, policy: Policy, now_ms: int, rng: random.Random
) -> End:
    """Decide succeeded / failed-and-retry / dead for a started run that ended.

    ``now_ms`` is Redis's clock (the daemon's estimate): a retry is due then plus
    its backoff.
    """
    run.error = safe_text(run.error)
    run.traceback = safe_text(run.traceback)
    outcome, fields = _run_record(job, run, daemon_id)
    if run.status == "ok":
        outcome["status"] = fields["status"] = "succeeded"
        fields.update(result=run.result_json)
        return End(
            job, run, Ending("succeeded"), policy.ttl_s,
            _with_result(dumps(outcome), run.result_json), fields,
            dels=("error", "traceback", "retry_at"),
        )  # fmt: skip
    allowed = job.max_retries if job.max_retries is not None else policy.max_retries
    outcome["error"] = fields["error"] = run.error
    dels = ["result"]
    if run.traceback:
        fields["traceback"] = run.traceback
    else:
        dels.append("traceback")
    if run.status not in _PERMANENT and job.attempt <= allowed:
        retry_in = backoff_s(job.attempt, policy.backoff_base_s, policy.backoff_max_s, rng)
        due_ms = now_ms + int(retry_in * 1000)
        outcome["status"] = fields["status"] = "failed"
        outcome["retry_in_s"] = round(retry_in, 3)
        fields["retry_at"] = _ts(due_ms / 1000)
        return End(
            job, run, Ending("failed", retry_in), policy.ttl_s, dumps(outcome), fields,
            dels=dels, member=schedule_member(job, daemon_id), due_ms=due_ms,
        )  # fmt: skip
    dels.append("retry_at")
    if run.status == "cancelled":
        # An operator's decision, not a failure: no dead letter, no retry.
        outcome["status"] = fields["status"] = "cancelled"
        return End(job, run, Ending("cancelled"), policy.ttl_s, dumps(outcome), fields, dels=dels)
    if run.status in _PERMANENT:
        reason = run.error
    else:
        reason = f"{run.error} (attempt {job.attempt} of {allowed + 1}, no retries left)"
    letter = {
        "reason": reason,
        "id": job.id,
        "task": job.task,
        "priority": job.priority,
        "payload": job.json,
        "attempts": job.attempt,
        "traceback": run.traceback or None,
        "daemon": daemon_id,
        "dead_at": round(run.finished_at, 6),
    }
    outcome["status"] = fields["status"] = "dead"
    return End(
        job, run, Ending("dead"), policy.ttl_s, dumps(outcome), fields,
        dels=dels, dead_letter=dumps(letter),
    )  # fmt: skip
