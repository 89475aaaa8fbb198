"""The job contract: parsing producers' JSON, and the records written when a job
starts and ends.

Everything here is pure (no I/O), so the rules a producer sees are tested directly.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

import orjson

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
)
_ALLOWED = frozenset(ALLOWED_FIELDS)
MAX_ID_LENGTH = 200

#: One operation of the Lua ``record`` command: its name and its arguments.
Op = Sequence[str | bytes]


@dataclass(slots=True)
class Job:
    """A valid job taken from a queue."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    priority: str
    raw: bytes  # the payload as claimed: what the claim list holds
    json: str  # the payload with its id: what is put back or retried
    timeout_s: float | None = None
    max_retries: int | None = None
    delay_ms: int = 0  # > 0: not due yet, goes to the schedule
    token: str = ""
    attempt: int = 0  # from the start record: 0 until written, -1 if the claim was lost
    started_at: float = 0.0
    dispatched_at: float = 0.0  # monotonic


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_NO_SPACE = re.compile(r"\S+")


def _valid_id(v: Any) -> TypeGuard[str]:
    # isprintable() rejects control characters; the regex, any kind of space.
    return (
        isinstance(v, str)
        and 0 < len(v) <= MAX_ID_LENGTH
        and v.isprintable()
        and _NO_SPACE.fullmatch(v) is not None
    )


def parse(
    raw: bytes,
    priority: str,
    *,
    known_tasks: Collection[str],
    max_payload_bytes: int,
    now: float | None = None,
) -> Job | Rejected:
    """Validate one payload from ``<prefix>:queue:<priority>``.

    Never raises on data: every problem becomes a ``Rejected`` with a reason a
    producer can act on.
    """
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
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Rejected(priority, raw, f"payload is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return Rejected(priority, raw, f"job must be a JSON object, got {_json_type(obj)}")

    job_id = obj.get("id")
    rid = job_id if _valid_id(job_id) else ""
    task = obj.get("task")
    rtask = safe_text(task) if isinstance(task, str) else ""

    def reject(reason: str) -> Rejected:
        return Rejected(priority, raw, reason, id=rid, task=rtask)

    if not _ALLOWED.issuperset(obj):
        unknown = sorted(k for k in obj if k not in _ALLOWED)
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
        return reject(f"unknown task {task!r}")
    args = obj.get("args", [])
    if not isinstance(args, list):
        return reject(f"'args' must be an array, got {_json_type(args)}")
    kwargs = obj.get("kwargs", {})
    if not isinstance(kwargs, dict):
        return reject(f"'kwargs' must be an object, got {_json_type(kwargs)}")
    timeout_s = obj.get("timeout_s")
    if timeout_s is not None and not (_is_number(timeout_s) and timeout_s > 0):
        return reject("'timeout_s' must be a number greater than 0")
    max_retries = obj.get("max_retries")
    if max_retries is not None and not (
        isinstance(max_retries, int) and not isinstance(max_retries, bool) and max_retries >= 0
    ):
        return reject("'max_retries' must be a whole number, 0 or greater")
    if "meta" in obj and not isinstance(obj["meta"], dict):
        return reject("'meta' must be an object")
    delay_s = obj.get("delay_s")
    eta = obj.get("eta")
    if delay_s is not None and eta is not None:
        return reject("give 'delay_s' or 'eta', not both")
    if delay_s is not None and not (_is_number(delay_s) and delay_s >= 0):
        return reject("'delay_s' must be a number, 0 or greater")
    if eta is not None and not _is_number(eta):
        return reject("'eta' must be a number (Unix time in seconds)")

    delay_ms = 0
    if delay_s is not None:
        delay_ms = int(delay_s * 1000)
    elif eta is not None:
        delay_ms = int((eta - (time.time() if now is None else now)) * 1000)

    if delay_ms > 0 or not rid:
        # The stored form drops delay_s/eta (the schedule's score keeps the due time,
        # so a promoted job runs at once) and pins the id (so a rerun after a crash
        # updates the same job hash).
        obj = {k: v for k, v in obj.items() if k not in ("delay_s", "eta")}
        if not rid:
            rid = new_job_id()
            obj = {"id": rid, **obj}
        stored = _dumps(obj)
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
        timeout_s=float(timeout_s) if timeout_s is not None else None,
        max_retries=max_retries,
        delay_ms=max(0, delay_ms),
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


def _dumps(obj: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except (TypeError, orjson.JSONEncodeError):
        # A lone surrogate (from a "\ud800" escape in a payload) has no UTF-8 form;
        # ASCII escapes keep it, and the record stays valid JSON.
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


# --- outcomes of a run -------------------------------------------------------------

RunStatus = Literal["ok", "error", "timeout", "crashed", "rejected", "bad_result", "not_run"]


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
_PERMANENT: frozenset[str] = frozenset({"rejected", "bad_result"})


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": between half and all of the step."""
    step = min(cap_s, base_s * (2.0 ** max(0, attempt - 1)))
    return step / 2 + rng.uniform(0, step / 2)


@dataclass(slots=True)
class Ending:
    """How a run ended, as decided by policy, and the ``record end`` op to write it."""

    status: Literal["succeeded", "failed", "dead", "requeued"]
    op: Op
    retry_in_s: float = 0.0


def _pairs(fields: dict[str, str]) -> list[str]:
    out = [str(len(fields))]
    for k, v in fields.items():
        out += (k, v)
    return out


def start_op(job: Job, *, daemon_id: str, ttl_s: int, now: float) -> Op:
    return [
        "start", job.priority, job.raw, job.token, job.json, job.id, str(ttl_s),
        *_pairs({
            "status": "running",
            "task": job.task,
            "priority": job.priority,
            "started_at": _ts(now),
            "daemon": daemon_id,
        }),
    ]  # fmt: skip


def _reject_record(rej: Rejected, daemon_id: str, now: float) -> tuple[dict[str, Any], str]:
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
    return outcome, _dumps(dead)


def reject_op(rej: Rejected, *, daemon_id: str, ttl_s: int, now: float) -> Op:
    outcome, dead = _reject_record(rej, daemon_id, now)
    fields = {
        "status": "dead",
        "task": rej.task,
        "priority": rej.priority,
        "error": rej.reason,
        "finished_at": _ts(now),
        "attempts": "0",
    }
    return [
        "reject", rej.priority, rej.raw, rej.id, str(ttl_s), _dumps(outcome), dead,
        *_pairs(fields),
    ]  # fmt: skip


def schedule_op(job: Job, *, ttl_s: int, now: float) -> Op:
    fields = {
        "status": "scheduled",
        "task": job.task,
        "priority": job.priority,
        "retry_at": _ts(now + job.delay_ms / 1000),
    }
    return [
        "schedule", job.priority, job.raw, job.id, str(ttl_s),
        f"{job.priority}\n{job.json}", str(job.delay_ms), *_pairs(fields),
    ]  # fmt: skip


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
        "started_at": round(run.started_at, 6),
        "finished_at": round(run.finished_at, 6),
        "duration_s": round(duration, 6),
    }
    fields = {
        "started_at": _ts(run.started_at),
        "finished_at": _ts(run.finished_at),
        "duration_s": f"{duration:.6f}",
        "daemon": daemon_id,
    }
    return outcome, fields


def _with_result(outcome_json: str, result_json: str) -> str:
    # The worker's JSON text is embedded as is: parsing it only to dump it again
    # would cost more than the rest of the outcome. The first "result":null is the
    # key (inside a JSON string value the quotes would be escaped).
    return outcome_json.replace('"result":null', '"result":' + result_json, 1)


def finish_op(job: Job, run: RunResult, *, daemon_id: str, ttl_s: int) -> Op:
    """A success recorded in one step, for a job that ended before its start was
    written: the claim goes straight to ``succeeded`` (Lua adds the attempt count)."""
    outcome, fields = _run_record(job, run, daemon_id)
    outcome["status"] = fields["status"] = "succeeded"
    fields.update(task=job.task, priority=job.priority, result=run.result_json)
    # "attempts" is appended by the script, which knows it.
    head = _with_result(_dumps(outcome), run.result_json)[:-1] + ',"attempts":'
    return ["finish", job.priority, job.raw, job.id, str(ttl_s), head, *_pairs(fields)]


def requeue_op(job: Job) -> Op:
    return ["requeue", job.token, job.id]


def putback_op(priority: str, raw: bytes) -> Op:
    return ["putback", priority, raw]


def restore_op(priority: str) -> Op:
    return ["restore", priority]


def end_op(
    job: Job,
    run: RunResult,
    *,
    daemon_id: str,
    ttl_s: int,
    max_retries: int,
    backoff_base_s: float,
    backoff_max_s: float,
    rng: random.Random,
) -> Ending:
    """Decide succeeded / failed-and-retry / dead for a finished run."""
    if run.status == "not_run":
        return Ending("requeued", requeue_op(job))
    run.error = safe_text(run.error)
    run.traceback = safe_text(run.traceback)
    outcome, fields = _run_record(job, run, daemon_id)
    outcome["attempts"] = job.attempt
    fields["attempts"] = str(job.attempt)
    dead_entry = ""
    member = ""
    delay_ms = 0
    retry_in = 0.0
    if run.status == "ok":
        status: Literal["succeeded", "failed", "dead"] = "succeeded"
        outcome["status"] = status
        outcome_json = _with_result(_dumps(outcome), run.result_json)
        fields.update(status=status, result=run.result_json)
        dels = ["error", "traceback", "retry_at"]
    else:
        allowed = job.max_retries if job.max_retries is not None else max_retries
        retry = run.status not in _PERMANENT and job.attempt <= allowed
        outcome["error"] = run.error
        fields["error"] = run.error
        dels = ["result"]
        if run.traceback:
            fields["traceback"] = run.traceback
        else:
            dels.append("traceback")
        if retry:
            status = "failed"
            retry_in = backoff_s(job.attempt, backoff_base_s, backoff_max_s, rng)
            delay_ms = int(retry_in * 1000)
            member = f"{job.priority}\n{job.json}"
            outcome["retry_in_s"] = round(retry_in, 3)
            fields["retry_at"] = _ts(run.finished_at + retry_in)
        else:
            status = "dead"
            dels.append("retry_at")
            if run.status in _PERMANENT:
                reason = run.error
            else:
                reason = f"{run.error} (attempt {job.attempt} of {allowed + 1}, no retries left)"
            dead_entry = _dumps(
                {
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
            )
        outcome["status"] = status
        fields["status"] = status
        outcome_json = _dumps(outcome)
    terminal = status != "failed"
    op = [
        "end", job.token, job.id, str(ttl_s), "1" if terminal else "0", dead_entry, member,
        str(delay_ms), outcome_json, str(len(dels)), *dels, *_pairs(fields),
    ]  # fmt: skip
    return Ending(status, op, retry_in)
