"""What a task can know and say about the job it runs: ``current_job()`` and
``set_progress()``.

The worker process sets the context around each call (a ``ContextVar``, so an
``async def`` task sees it too). Progress goes to the daemon over the worker's result
pipe and from there to the job hash's ``progress`` field, at most twice a second a
job: a call within half a second of the last one sent only keeps its value (not even
encoded: a throttled call costs next to nothing), which is sent by the next call
after that, or when the job ends, so the last value always arrives.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prioqd.errors import PrioqdError

#: Progress a job sends at most this often.
PROGRESS_EVERY_S = 0.5
#: A progress value (as JSON) may be this long at most.
MAX_PROGRESS_BYTES = 4096


class NotInTaskError(PrioqdError):
    """``current_job()`` or ``set_progress()`` was called outside a running task."""


@dataclass(frozen=True)
class JobContext:
    """The job a task is running."""

    id: str
    task: str
    priority: str
    #: 1 for the first run, 2 for the first retry...
    attempt: int
    #: Retries allowed after the first attempt.
    max_retries: int
    meta: dict[str, Any]
    #: When the producer pushed it (Unix time), if it said so.
    enqueued_at: float | None
    #: Unix time at which the job's timeout kills it.
    deadline: float


_NOTHING: Any = object()


class _Running:
    """One job's context in the worker. Set around every call, read by few tasks: the
    ``JobContext`` is only built when a task asks for it (a frozen dataclass of eight
    fields costs about a microsecond, a tenth of a trivial job's whole run)."""

    __slots__ = ("_fields", "_job", "_send", "pending", "sent_at", "seq")

    def __init__(self, fields: tuple[Any, ...], send: Callable[[Any], None], seq: int) -> None:
        #: (id, task, priority, attempt, max_retries, meta, enqueued_at, deadline)
        self._fields = fields
        self._job: JobContext | None = None
        self._send = send
        self.seq = seq
        self.sent_at = -math.inf
        #: The last progress value given and not sent yet, as given (encoded when sent).
        self.pending: Any = _NOTHING

    @property
    def job(self) -> JobContext:
        if self._job is None:
            job_id, task, priority, attempt, max_retries, meta, enqueued_at, deadline = self._fields
            self._job = JobContext(
                job_id, task, priority, attempt, max_retries, meta or {}, enqueued_at, deadline
            )
        return self._job

    def flush(self) -> None:
        """Send the progress waiting, if any; ``ValueError`` if it is no progress value."""
        if self.pending is not _NOTHING:
            value, self.pending = self.pending, _NOTHING
            self._send(("progress", self.seq, encode_progress(value)))
            self.sent_at = time.monotonic()


_current: ContextVar[_Running | None] = ContextVar("prioqd_job", default=None)


def current_job() -> JobContext:
    """The job the calling task runs; ``NotInTaskError`` outside a task."""
    running = _current.get()
    if running is None:
        raise NotInTaskError("current_job() is only available inside a running prioqd task")
    return running.job


def set_progress(value: float | dict[str, Any]) -> None:
    """Report progress: a number, or a small JSON object (at most 4 KiB as JSON).

    Written to the job hash's ``progress`` field (visible in ``prioqd inspect`` and
    the client), at most twice a second; the last value when the job ends. A value
    is encoded when it is sent, so a dict changed after the call is sent as it then
    is, and a bad one (not JSON, over 4 KiB) raises ``ValueError`` from the call that
    sends it; one still waiting when the job ends is dropped, with a warning on
    stderr. A call that only keeps its value costs well under a microsecond.
    """
    running = _current.get()
    if running is None:
        raise NotInTaskError("set_progress() is only available inside a running prioqd task")
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise TypeError("progress must be a number or a JSON object (a dict)")
    running.pending = value
    if time.monotonic() - running.sent_at >= PROGRESS_EVERY_S:
        running.flush()


def encode_progress(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("progress must be a finite number")
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, RecursionError) as exc:
        raise ValueError(f"progress must be JSON: {exc}") from exc
    if len(text) > MAX_PROGRESS_BYTES:
        raise ValueError(f"progress is {len(text)} bytes of JSON, over {MAX_PROGRESS_BYTES}")
    return text


def enter(fields: tuple[Any, ...], send: Callable[[Any], None], seq: int) -> object:
    """Set the context for one job (the worker calls this); returns a token. ``fields``
    are ``JobContext``'s, in its order; progress goes out as ``send(("progress", seq,
    json))``."""
    return _current.set(_Running(fields, send, seq))


def leave(token: object) -> None:
    """Clear the context after a job, sending its last progress if any is waiting.
    (The job has ended: a value that cannot be sent is dropped with a warning, not
    turned into the job's failure.)"""
    running = _current.get()
    _current.reset(token)  # type: ignore[arg-type]
    if running is None:
        return
    try:
        running.flush()
    except ValueError as exc:
        print(f"prioqd: last progress of job {running.job.id} dropped: {exc}", file=sys.stderr)
